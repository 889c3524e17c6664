"""mcp_proxy's rules without servers: names, URLs, secret references, pool keys, catalogs,
history cursors, the lean JSON-RPC peer and the idempotency memory."""

import asyncio
from datetime import UTC, datetime

import msgspec
import pytest

from contracts.commands.mcp import FORWARDED_METHODS, CallOutcome, SecretRef, ServerSpec, UpstreamFeatures
from services.mcp_proxy.adapters.stdio.jsonrpc import JsonRpcPeer, RpcError
from services.mcp_proxy.application.ports import CallCanceled, UpstreamFailed
from services.mcp_proxy.application.recent import Recent
from services.mcp_proxy.config import load_proxy_settings
from services.mcp_proxy.domain import requests
from services.mcp_proxy.domain.addresses import AddressPolicy, check_url, classify
from services.mcp_proxy.domain.calls import ToolCall, arguments_digest
from services.mcp_proxy.domain.catalog import ServerCatalog, catalog_id, visible
from services.mcp_proxy.domain.errors import Conflict, Invalid, MissingSecret, NotFound
from services.mcp_proxy.domain.history import decode_cursor, encode_cursor
from services.mcp_proxy.domain.pooling import credentials_hash, pool_key
from services.mcp_proxy.domain.specs import (
    SpecPolicy,
    check_server_name,
    check_spec,
    resolve_values,
    secret_names,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PUBLIC = {
    "example.org": ["93.184.216.34"],
    "evil.example": ["10.0.0.5"],
    "both.example": ["1.1.1.1", "127.0.0.1"],
}


def resolver(host: str, port: int) -> list[str]:
    if host not in PUBLIC:
        raise OSError("Name or service not known")
    return PUBLIC[host]


def policy(*allow: str) -> SpecPolicy:
    return SpecPolicy(addresses=AddressPolicy(allow))


def http(url: str, **headers: object) -> ServerSpec:
    return msgspec.convert({"name": "web", "transport": "http", "url": url, "headers": headers}, ServerSpec)


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "github", "my-server_2", "0x", "a" * 32, "a_b-c"])
def test_good_server_names(name: str) -> None:
    assert check_server_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "Git", "a__b", "x__", "-a", "_a", "a" * 33, "a.b", "a b", "é"])
def test_bad_server_names(name: str) -> None:
    with pytest.raises(Invalid, match="server name"):
        check_server_name(name)


# -- URLs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://169.254.10.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://127.0.0.1:8080/mcp", "loopback"),
        ("http://[::1]/mcp", "loopback"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://10.1.2.3/mcp", "private"),
        ("http://192.168.1.1/mcp", "private"),
        ("http://172.16.0.1/mcp", "private"),
        ("http://100.64.0.1/mcp", "non-public"),
        ("http://0.0.0.0/mcp", "private"),
        ("http://224.0.0.1/mcp", "reserved"),
        ("https://evil.example/mcp", "private"),  # a public name resolving to a private address
        ("https://both.example/mcp", "loopback"),  # every address counts
    ],
)
def test_internal_addresses_are_refused(url: str, kind: str) -> None:
    with pytest.raises(Invalid) as refused:
        check_url(url, AddressPolicy(), resolver)
    assert kind in str(refused.value) and "GATEHOUSE_MCP_ALLOW_PRIVATE" in str(refused.value)


def test_public_urls_pass() -> None:
    assert check_url("https://example.org/mcp", AddressPolicy(), resolver) == "https://example.org/mcp"
    assert check_url("http://93.184.216.34:8080/sse", AddressPolicy(), resolver)


def test_the_allow_list_lets_chosen_hosts_and_networks_through() -> None:
    allowed = AddressPolicy(["127.0.0.1", "10.0.0.0/8", "Internal.Corp"])
    assert check_url("http://127.0.0.1:9000/mcp", allowed, resolver)
    assert check_url("http://10.9.8.7/mcp", allowed, resolver)
    assert check_url("https://evil.example/mcp", allowed, resolver)  # resolves into 10/8
    assert check_url("https://internal.corp/mcp", allowed, resolver)  # by name, not resolved
    with pytest.raises(Invalid):
        check_url("http://127.0.0.2/mcp", allowed, resolver)
    with pytest.raises(Invalid):
        check_url("http://169.254.169.254/", allowed, resolver)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.org/", "http"),
        ("file:///etc/passwd", "http"),
        ("example.org/mcp", "http"),
        ("http:///mcp", "no host"),
        ("http://user:pw@example.org/mcp", "credentials"),
        ("http://example.org:99999/", "not a valid URL"),
        ("http://nowhere.invalid/", "cannot be resolved"),
    ],
)
def test_malformed_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(Invalid, match=words):
        check_url(url, AddressPolicy(), resolver)


def test_classify() -> None:
    import ipaddress

    assert classify(ipaddress.ip_address("8.8.8.8")) is None
    assert classify(ipaddress.ip_address("169.254.169.254")) == "cloud metadata"


# -- specs and secret references ---------------------------------------------------------------
def test_secret_references_decode_from_json() -> None:
    spec = msgspec.json.decode(
        b'{"name":"gh","transport":"stdio","command":"npx","args":["-y","server"],'
        b'"env":{"GITHUB_TOKEN":{"secret":"github_token"},"MODE":"ro"}}',
        type=ServerSpec,
    )
    assert spec.env == {"GITHUB_TOKEN": SecretRef("github_token"), "MODE": "ro"}
    assert secret_names(spec) == ["github_token"]
    assert resolve_values(spec.env, {"github_token": "ghp_x"}) == {"GITHUB_TOKEN": "ghp_x", "MODE": "ro"}
    with pytest.raises(KeyError):
        resolve_values(spec.env, {})
    with pytest.raises(msgspec.ValidationError):  # a reference is exactly {"secret": NAME}
        msgspec.json.decode(
            b'{"name":"x","transport":"stdio","env":{"A":{"secret":"a","b":1}}}', type=ServerSpec
        )


def test_secret_names_are_deduplicated_across_env_and_headers() -> None:
    spec = http("https://example.org/mcp", A={"secret": "tok"}, B={"secret": "tok"}, C={"secret": "other"})
    assert secret_names(spec) == ["other", "tok"]


def test_stdio_specs() -> None:
    good = ServerSpec(name="fs", transport="stdio", command="uvx", args=["mcp-server-fs"], env={"A": "1"})
    assert check_spec(good, policy(), resolver) is good
    cases = [
        (ServerSpec(name="fs", transport="stdio"), "needs a command"),
        (ServerSpec(name="fs", transport="stdio", command="  "), "needs a command"),
        (ServerSpec(name="fs", transport="stdio", command="x", url="http://a"), "url and headers"),
        (ServerSpec(name="fs", transport="stdio", command="x", env={"LD_PRELOAD": "/x.so"}), "LD_PRELOAD"),
        (
            ServerSpec(name="fs", transport="stdio", command="x", env={"1BAD": "v"}),
            "environment variable name",
        ),
        (
            ServerSpec(name="fs", transport="stdio", command="x", env={"A": SecretRef("Bad Name")}),
            "secret name",
        ),
        (ServerSpec(name="fs", transport="stdio", command="x", timeout_s=0), "timeout_s"),
        (ServerSpec(name="fs", transport="stdio", command="x", timeout_s=601), "timeout_s"),
    ]
    for spec, words in cases:
        with pytest.raises(Invalid, match=words):
            check_spec(spec, policy(), resolver)
    only_npx = SpecPolicy(addresses=AddressPolicy(), stdio_commands=frozenset({"npx"}))
    with pytest.raises(Invalid, match="not allowed"):
        check_spec(good, only_npx, resolver)


def test_remote_specs() -> None:
    assert check_spec(http("https://example.org/mcp", **{"X-Token": {"secret": "t"}}), policy(), resolver)
    cases = [
        (ServerSpec(name="w", transport="http"), "needs a url"),
        (ServerSpec(name="w", transport="sse", url="https://example.org", command="x"), "command, args"),
        (http("https://example.org", Authorization="Bearer abc"), "credential"),
        (http("https://example.org", Cookie="s=1"), "credential"),
        (http("https://example.org", Host="other"), "set by the transport"),
        (http("https://example.org", **{"Bad Header": "x"}), "header name"),
        (http("https://example.org", X="a\r\nInjected: 1"), "not allowed"),
        (http("http://169.254.169.254/"), "metadata"),
    ]
    for spec, words in cases:
        with pytest.raises(Invalid, match=words):
            check_spec(spec, policy(), resolver)
    assert check_spec(http("https://example.org", Authorization={"secret": "tok"}), policy(), resolver)


def test_missing_secret_message_names_it_and_how_to_set_it() -> None:
    message = str(MissingSecret("github", "github_token"))
    assert "github_token" in message and "PUT /v1/secrets/github_token" in message and "github" in message
    assert "deleted" in str(MissingSecret("github", "github_token", reason="revoked"))


# -- catalogs ------------------------------------------------------------------------------------
def test_catalog_registers_once_per_name_and_revisions_grow() -> None:
    catalog = ServerCatalog("user", "u1", "o1", {})
    spec = ServerSpec(name="echo", transport="stdio", command="x", env={"T": SecretRef("tok")})
    catalog.register(spec, NOW, {})
    with pytest.raises(Conflict):
        catalog.register(spec, NOW, {})
    first = catalog.entries()["echo"]
    assert first.secrets == ("tok",) and first.spec == spec and first.revision == 1
    catalog.remove("echo", {})
    with pytest.raises(NotFound):
        catalog.remove("echo", {})
    catalog.register(spec, NOW, {})
    again = catalog.entries()["echo"]
    assert again.revision == 2 and again.server_id != first.server_id
    assert catalog.id == catalog_id("user", "u1") != catalog_id("org", "u1")
    kinds = [type(e).__qualname__ for e in catalog.collect_events()]
    assert kinds == [
        "ServerCatalog.Opened",
        "ServerCatalog.ServerRegistered",
        "ServerCatalog.ServerRemoved",
        "ServerCatalog.ServerRegistered",
    ]


def test_a_user_server_shadows_the_org_server_of_the_same_name() -> None:
    org = ServerCatalog("org", "o1", "o1", {})
    user = ServerCatalog("user", "u1", "o1", {})
    org.register(ServerSpec(name="gh", transport="stdio", command="org-cmd"), NOW, {})
    org.register(ServerSpec(name="jira", transport="stdio", command="jira"), NOW, {})
    user.register(ServerSpec(name="gh", transport="stdio", command="my-cmd"), NOW, {})
    seen = visible(user.entries(), org.entries())
    assert {n: (e.scope, e.spec.command) for n, e in seen.items()} == {
        "gh": ("user", "my-cmd"),
        "jira": ("org", "jira"),
    }


# -- pool keys -------------------------------------------------------------------------------------
def test_pool_keys_separate_users_registrations_and_credentials() -> None:
    env = {"TOKEN": "a", "MODE": "x"}
    key = pool_key("alice", "cat:echo:1", env)
    assert key == pool_key("alice", "cat:echo:1", {"MODE": "x", "TOKEN": "a"})  # order does not matter
    assert key != pool_key("bob", "cat:echo:1", env)
    assert key != pool_key("alice", "cat:echo:2", env)
    assert key != pool_key("alice", "cat:echo:1", {"TOKEN": "b", "MODE": "x"})
    assert len(credentials_hash(env)) == 64 and key.credentials == credentials_hash(env)


# -- call facts --------------------------------------------------------------------------------------
def test_a_tool_call_keeps_a_hash_never_the_arguments() -> None:
    call = ToolCall(
        request_id="r1",
        user_id="u",
        server="s",
        tool_name="t",
        status="success",
        duration_ms=1.5,
        arguments_sha256=arguments_digest(b'{"password":"hunter2"}'),
        arguments_bytes=22,
        result_bytes=10,
        reached_upstream=True,
        started_at=NOW,
        error=None,
        meta={},
    )
    (event,) = call.collect_events()
    assert "hunter2" not in repr(event.__dict__) and len(event.arguments_sha256) == 64  # type: ignore[attr-defined]


# -- history cursors -------------------------------------------------------------------------------
def test_history_cursors_are_sealed_and_scoped() -> None:
    key = b"k" * 32
    cursor = encode_cursor("alice", None, 42, key)
    assert decode_cursor(cursor, "alice", None, key) == 42
    for bad in ("", "garbage", cursor + "x", cursor.replace(".", ".A"), "a" * 600):
        with pytest.raises(Invalid):
            decode_cursor(bad, "alice", None, key)
    with pytest.raises(Invalid, match="another query"):
        decode_cursor(cursor, "bob", None, key)
    with pytest.raises(Invalid, match="another query"):
        decode_cursor(cursor, "alice", "github", key)
    with pytest.raises(Invalid):
        decode_cursor(cursor, "alice", None, b"x" * 32)


# -- the lean JSON-RPC peer --------------------------------------------------------------------------
class Wire:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.fatal: list[str] = []

    def peer(self, max_line: int = 1024) -> JsonRpcPeer:
        return JsonRpcPeer(self.lines.append, max_line, self.fatal.append)


async def test_peer_matches_responses_by_id_in_any_order_and_split_anywhere() -> None:
    wire = Wire()
    peer = wire.peer()
    first = asyncio.ensure_future(peer.request("tools/call", b'{"name":"a","arguments":{"x":1}}', 1))
    second = asyncio.ensure_future(peer.request("tools/list", None, 1))
    await asyncio.sleep(0)
    assert wire.lines == [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":1}}}\n',
        b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n',
    ]
    stream = (
        b'{"jsonrpc":"2.0","id":2,"result":{"tools":[]}}\n{"jsonrpc":"2.0","id":1,"result":{"ok":true}}\n'
    )
    for i in range(0, len(stream), 7):  # arbitrary chunking
        peer.feed(stream[i : i + 7])
    assert bytes(await first) == b'{"ok":true}' and bytes(await second) == b'{"tools":[]}'
    assert peer.in_flight == 0


async def test_peer_errors_notifications_junk_and_server_requests() -> None:
    wire = Wire()
    peer = wire.peer()
    call = asyncio.ensure_future(peer.request("tools/call", b"{}", 1))
    await asyncio.sleep(0)
    peer.feed(b"Starting server...\n")  # junk on stdout is skipped
    peer.feed(b'{"jsonrpc":"2.0","method":"notifications/message","params":{}}\n')
    peer.feed(b'{"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}\n')
    peer.feed(b'{"jsonrpc":"2.0","id":7,"method":"ping"}\n')
    peer.feed(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"bad"}}\n')
    with pytest.raises(RpcError) as err:
        await call
    assert (err.value.code, err.value.message) == (-32602, "bad")
    assert b'"id":"s1","error":{"code":-32601' in wire.lines[-2]
    assert wire.lines[-1] == b'{"jsonrpc":"2.0","id":7,"result":{}}\n'

    malformed = asyncio.ensure_future(peer.request("tools/call", b"{}", 1))
    await asyncio.sleep(0)
    peer.feed(b'{"jsonrpc":"2.0","id":2,"oops":1}\n')
    with pytest.raises(UpstreamFailed, match="malformed"):
        await malformed


async def test_peer_flood_and_cancel() -> None:
    wire = Wire()
    peer = wire.peer(max_line=100)
    waiting = asyncio.ensure_future(peer.request("tools/call", b"{}", 1))
    canceled = asyncio.ensure_future(peer.request("tools/call", b"{}", 1))
    await asyncio.sleep(0)
    assert peer.cancel(2, "canceled by the client")
    assert b'"method":"notifications/cancelled","params":{"requestId":2' in wire.lines[-1]
    with pytest.raises(CallCanceled):
        await canceled
    peer.feed(b"x" * 60)
    peer.feed(b"x" * 60)  # no newline yet, but already over the limit
    assert wire.fatal == ["flood"]
    with pytest.raises(UpstreamFailed, match="flood"):
        await waiting
    with pytest.raises(UpstreamFailed):
        peer.send("tools/call", b"{}")


async def test_peer_keeps_an_errors_data_raw() -> None:
    wire = Wire()
    peer = wire.peer()
    read = asyncio.ensure_future(peer.request("resources/read", b'{"uri":"test://nope"}', 1))
    await asyncio.sleep(0)
    peer.feed(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"Unknown","data":{"uri":"x"}}}\n')
    with pytest.raises(RpcError) as err:
        await read
    assert (err.value.code, err.value.data) == (-32602, b'{"uri":"x"}')


async def test_peer_timeout_leaves_nothing_pending() -> None:
    peer = Wire().peer()
    with pytest.raises(TimeoutError):
        await peer.request("tools/call", b"{}", 0.01)
    assert peer.in_flight == 0


# -- idempotency memory ------------------------------------------------------------------------------
async def test_recent_outcomes_expire_and_are_bounded() -> None:
    now = [0.0]
    recent = Recent(ttl_s=10, max_entries=2, max_bytes=100, clock=lambda: now[0])
    loop = asyncio.get_running_loop()
    outcome = CallOutcome(
        request_id="r", server="s", tool_name="t", status="success", result=msgspec.Raw(b"{}")
    )
    for key in (("u", "1"), ("u", "2"), ("u", "3")):
        fut = loop.create_future()
        recent.begin(key, fut)
        fut.set_result(outcome)
        recent.done(key, outcome)
    assert recent.get(("u", "1")) is None and len(recent) == 2  # the oldest made room
    assert recent.get(("u", "3")) is not None
    now[0] = 11
    assert recent.get(("u", "3")) is None


def test_settings_from_environment() -> None:
    from pathlib import Path

    s = load_proxy_settings(
        Path("/data"),
        {"GATEHOUSE_MCP_ALLOW_PRIVATE": "127.0.0.1, 10.0.0.0/8", "GATEHOUSE_MCP_IDLE_TIMEOUT_S": "2.5"},
    )
    assert s.allow_private == ("127.0.0.1", "10.0.0.0/8") and s.idle_timeout_s == 2.5
    assert s.max_procs_per_user == 8 and s.max_procs == 200 and s.data_dir == Path("/data/mcp_proxy")
    from services.kit.config import ConfigError

    with pytest.raises(ConfigError, match="GATEHOUSE_MCP_MAX_PROCS"):
        load_proxy_settings(Path("/d"), {"GATEHOUSE_MCP_MAX_PROCS": "lots"})


# -- forwarded requests ------------------------------------------------------------------------------
def test_every_forwarded_method_needs_a_feature_and_empty_lists_are_lists() -> None:
    assert set(requests.NEEDS) == set(FORWARDED_METHODS)
    assert requests.RECORDED < set(FORWARDED_METHODS)
    for method, empty in requests.EMPTY_LISTS.items():
        assert method.endswith("/list") and msgspec.json.decode(empty) in (
            {"resources": []},
            {"resourceTemplates": []},
            {"prompts": []},
        )


def test_features_come_from_the_initialize_result() -> None:
    everything = requests.features_of(
        b'{"protocolVersion":"2025-11-25","capabilities":{"tools":{},"completions":{},'
        b'"prompts":{"listChanged":false},"resources":{"subscribe":true}},"serverInfo":{"name":"x"}}'
    )
    assert everything == UpstreamFeatures(resources=True, subscribe=True, prompts=True, completions=True)
    tools_only = requests.features_of(b'{"capabilities":{"tools":{}}}')
    assert tools_only == UpstreamFeatures()
    assert requests.features_of(b"not json") == UpstreamFeatures()
    assert requests.features_of(b'{"capabilities":{"resources":{}}}') == UpstreamFeatures(resources=True)
    assert requests.offered(everything, "resources/subscribe")
    assert not requests.offered(UpstreamFeatures(resources=True), "resources/subscribe")
    assert requests.offered(UpstreamFeatures(resources=True), "resources/templates/list")
    assert not requests.offered(tools_only, "prompts/get")
    assert not requests.offered(everything, "tools/call")  # not forwarded at all
