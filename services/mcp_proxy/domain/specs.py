"""What a registration may say: server names, transports, env and header values.

Server names are `^[a-z0-9][a-z0-9_-]{0,31}$` without `__`, because the gateway names the
tools of several servers `<server>__<tool>`. Values in `env` and `headers` are plain
strings or `{"secret": "NAME"}`, resolved at call time from the caller's secrets, so a
credential is never stored in a registration. Credential-bearing headers
(`Authorization`, `Cookie`, ...) must be secret references for that reason.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from contracts.commands.mcp import EnvValue, SecretRef, ServerSpec
from contracts.commands.secrets import NAME_PATTERN as SECRET_NAME_PATTERN
from services.mcp_proxy.domain.addresses import AddressPolicy, Resolver, check_url, system_resolver
from services.mcp_proxy.domain.errors import Invalid

SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SECRET_NAME = re.compile(SECRET_NAME_PATTERN)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
# Loader variables would let a registration subvert an allow-listed command.
FORBIDDEN_ENV_PREFIXES = ("LD_", "DYLD_")
# Framing and session headers belong to the transport, not to a registration.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "accept",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
    }
)
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
MAX_ARGS, MAX_ARG = 64, 4096
MAX_VALUES, MAX_VALUE = 64, 32 * 1024


@dataclass(frozen=True)
class SpecPolicy:
    """The operator's limits on what may be registered (services/mcp_proxy/config.py)."""

    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    stdio_commands: frozenset[str] = frozenset({"*"})
    max_timeout_s: float = 600.0


def check_server_name(name: str) -> str:
    if not SERVER_NAME.match(name) or "__" in name:
        raise Invalid(
            f"{name!r} is not a valid server name: use 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit, without '__'"
        )
    return name


def check_secret_name(name: str) -> str:
    if not SECRET_NAME.match(name):
        raise Invalid(
            f"{name!r} is not a valid secret name: use 1-64 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def secret_names(spec: ServerSpec) -> list[str]:
    """The secrets a server references (in env and headers), sorted, each once."""
    refs = {v.secret for v in (*spec.env.values(), *spec.headers.values()) if isinstance(v, SecretRef)}
    return sorted(refs)


def resolve_values(values: Mapping[str, EnvValue], secrets: Mapping[str, str]) -> dict[str, str]:
    """Env or headers with every secret reference replaced by its value (KeyError: not resolved)."""
    return {k: (secrets[v.secret] if isinstance(v, SecretRef) else v) for k, v in values.items()}


def check_spec(spec: ServerSpec, policy: SpecPolicy, resolve: Resolver = system_resolver) -> ServerSpec:
    """The spec when it can be registered; Invalid names the first problem."""
    check_server_name(spec.name)
    if not 0 < spec.timeout_s <= policy.max_timeout_s:
        raise Invalid(f"timeout_s must be more than 0 and at most {policy.max_timeout_s:g} seconds")
    if spec.transport == "stdio":
        _check_stdio(spec, policy)
    else:
        _check_remote(spec, policy, resolve)
    return spec


def _check_stdio(spec: ServerSpec, policy: SpecPolicy) -> None:
    if not spec.command or not spec.command.strip():
        raise Invalid('a stdio server needs a command (e.g. "npx" or "uvx")')
    if spec.url is not None or spec.headers:
        raise Invalid("url and headers are for http and sse servers; a stdio server takes command, args, env")
    if "\x00" in spec.command or len(spec.command) > MAX_ARG:
        raise Invalid("the command is not a valid program name or path")
    if "*" not in policy.stdio_commands and spec.command not in policy.stdio_commands:
        allowed = ", ".join(sorted(policy.stdio_commands)) or "none"
        raise Invalid(f"the command {spec.command!r} is not allowed here (allowed: {allowed})")
    if len(spec.args) > MAX_ARGS or any(len(a) > MAX_ARG or "\x00" in a for a in spec.args):
        raise Invalid(f"at most {MAX_ARGS} args of at most {MAX_ARG} characters each")
    _check_values("env", spec.env)
    for name in spec.env:
        if not ENV_NAME.match(name):
            raise Invalid(f"{name!r} is not a valid environment variable name")
        if name.upper().startswith(FORBIDDEN_ENV_PREFIXES):
            raise Invalid(f"the environment variable {name} may not be set for an upstream")


def _check_remote(spec: ServerSpec, policy: SpecPolicy, resolve: Resolver) -> None:
    if not spec.url:
        raise Invalid(f"an {spec.transport} server needs a url")
    if spec.command is not None or spec.args or spec.env:
        raise Invalid("command, args and env are for stdio servers; an http or sse server takes url, headers")
    check_url(spec.url, policy.addresses, resolve)
    _check_values("headers", spec.headers)
    for name, value in spec.headers.items():
        if not HEADER_NAME.match(name):
            raise Invalid(f"{name!r} is not a valid header name")
        lower = name.lower()
        if lower in FORBIDDEN_HEADERS:
            raise Invalid(f"the header {name} is set by the transport and may not be registered")
        if lower in CREDENTIAL_HEADERS and not isinstance(value, SecretRef):
            raise Invalid(
                f'the header {name} carries a credential: give it as {{"secret": "NAME"}} '
                "(set the value with PUT /v1/secrets/NAME), never inline"
            )


def _check_values(field: str, values: Mapping[str, EnvValue]) -> None:
    if len(values) > MAX_VALUES:
        raise Invalid(f"at most {MAX_VALUES} entries in {field}")
    for name, value in values.items():
        if isinstance(value, SecretRef):
            check_secret_name(value.secret)
        elif len(value) > MAX_VALUE or "\x00" in value or (field == "headers" and _breaks_line(value)):
            raise Invalid(f"the value of {field}[{name!r}] is not allowed (too long or control characters)")


def _breaks_line(value: str) -> bool:
    return "\r" in value or "\n" in value
