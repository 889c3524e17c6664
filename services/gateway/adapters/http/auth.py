"""Authentication of every request but /health, /ready and the schema, in memory.

Accepted: `Authorization: Bearer mcp_…` or `X-MCP-API-Key: mcp_…`. The `?api_key=` query
form is accepted only on /sse (old MCP clients cannot set headers there).
"""

from typing import Any
from urllib.parse import parse_qs

from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, ServiceUnavailableException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from services.gateway.adapters.auth_reports import AuthFailureReporter
from services.gateway.application import Gateway
from services.gateway.auth_failures import Failure
from services.gateway.domain import Denied, Principal
from services.identity.domain import hash_key

PUBLIC = ("^/health$", "^/ready$", "^/schema")
QUERY_KEY_PATHS = ("/sse",)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class MissingKey(NotAuthorizedException):
    """No credentials at all: refused, but not an attempt worth auditing."""


def presented_key(scope: Scope) -> str:
    """The key from the request, or NotAuthorizedException saying what is wrong with it."""
    authorization = _header(scope, b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            if scheme.startswith("mcp_"):
                raise NotAuthorizedException("Send the key as `Authorization: Bearer mcp_…`.")
            raise NotAuthorizedException("Only Bearer authorization is accepted.")
        if not token.strip():
            raise NotAuthorizedException("The Bearer token is empty.")
        return token.strip()
    header_key = _header(scope, b"x-mcp-api-key")
    if header_key is not None:
        return header_key.strip()
    query = scope.get("query_string", b"")
    if b"api_key=" in query:
        if scope["path"] not in QUERY_KEY_PATHS:
            raise NotAuthorizedException("The `api_key` query parameter is accepted only on /sse.")
        values = parse_qs(query.decode("latin-1")).get("api_key")
        if values:
            return values[0]
    raise MissingKey("Missing API key: send `Authorization: Bearer mcp_…` or `X-MCP-API-Key: mcp_…`.")


OWN_AUTH = "authenticates_itself"  # route option: the handler checks credentials itself


class AuthMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = PUBLIC
    exclude_opt_key = OWN_AUTH  # POST /messages: the legacy SSE session stands in for the key

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.failures = AuthFailureReporter(gateway.bus)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not self.gateway.view_ready.is_set():
            # Until the key view has replayed every identity event, a revoked key could look valid.
            raise ServiceUnavailableException("The gateway is still loading API keys; try again shortly.")
        try:
            key = presented_key(scope)
        except MissingKey:
            raise
        except NotAuthorizedException:
            self.failures.report(refusal(scope, "malformed", None), _header(scope, b"x-request-id"))
            raise
        result = self.gateway.authenticate(key)
        if not isinstance(result, Principal):
            self.failures.report(denial(self.gateway, scope, key, result), _header(scope, b"x-request-id"))
            raise NotAuthorizedException(result.value)
        scope["user"] = result
        await self.gateway.note_use(result)
        await next_app(scope, receive, send)


def client_ip(scope: Scope) -> str | None:
    client: Any = scope.get("client")
    return client[0] if client else None


REASONS = {Denied.UNKNOWN: "unknown", Denied.REVOKED: "revoked", Denied.EXPIRED: "expired"}


def key_prefix(key: str) -> str | None:
    """The public part of what looks like a key (`mcp_` + 8); nothing of anything else."""
    return key[:12] if key.startswith("mcp_") else None


def refusal(scope: Scope, reason: str, prefix: str | None, **known: str | None) -> Failure:
    path = str(scope.get("path", ""))
    return Failure(
        ip=client_ip(scope),
        reason=reason,
        key_prefix=prefix,
        user_agent=_header(scope, b"user-agent"),
        method=str(scope.get("method", "")),
        path=path[:200],
        **known,
    )


def denial(gateway: Gateway, scope: Scope, key: str, denied: Denied) -> Failure:
    """A refused key, with its id, owner and org when identity knows it (revoked, expired)."""
    prefix = key_prefix(key)
    if denied is Denied.UNKNOWN or prefix is None:
        return refusal(scope, REASONS[denied], prefix)
    record = gateway.view.keys.get(hash_key(key, gateway.pepper))
    user = gateway.view.users.get(record.user_id) if record else None
    return refusal(
        scope,
        REASONS[denied],
        prefix,
        key_id=record.key_id if record else None,
        user_id=record.user_id if record else None,
        org_id=user.org_id if user else None,
    )
