"""mcp_proxy on real NATS and PostgreSQL, calling real upstream processes and HTTP servers.

The upstream is tests/upstreams/echo_server.py (the official SDK's MCPServer). Secrets come
from a responder on `cmd.secrets.reveal` that this test registers (the RevealSecret /
RevealedSecret contract, refusing unknown names with 404 as the secrets service does).
"""

import asyncio
import functools
import hashlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from contracts.commands import mcp as cmd
from contracts.commands.audit import GetDigest, ProjectionDigest, Rebuild, RebuildReport
from contracts.commands.common import CommandMeta, Empty
from contracts.commands.secrets import RevealedSecret, RevealSecret
from contracts.envelope import Actor
from contracts.events import decode_payload
from contracts.events.mcp import ToolCallCompleted, UpstreamProcessStarted, UpstreamProcessStopped
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.rpc import CommandClient, CommandFailed, CommandServer, refuse
from services.mcp_proxy.application.ports import QuotaExceeded, Reservation
from services.mcp_proxy.bootstrap import build
from tests.helpers import eventually, http_upstream, running, stream_envelopes

pytestmark = pytest.mark.integration

ECHO = str(Path(__file__).resolve().parents[1] / "upstreams" / "echo_server.py")
ORG = "org-" + uuid.uuid4().hex[:8]


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def caller(user: str, admin: bool = False, org: str = ORG) -> cmd.Caller:
    return cmd.Caller(user_id=user, org_id=org, is_admin=admin)


def meta(user: str = "test") -> CommandMeta:
    return CommandMeta(actor=Actor(kind="user", id=user), correlation_id=str(uuid.uuid4()))


def stdio_spec(name: str = "echo", **env: Any) -> cmd.ServerSpec:
    return cmd.ServerSpec(name=name, transport="stdio", command=sys.executable, args=[ECHO], env=env)


def upstream_pids(under: Path | None = None) -> list[int]:
    """Test upstreams alive now; with `under`, only those working in that directory (a test's
    own: mcp_proxy starts each in its user's home there, and their children inherit it)."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "tests/upstreams" not in cmdline:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if under is not None and not Path(proc.cwd()).is_relative_to(under):
                continue
        except psutil.Error:  # gone meanwhile
            continue
        pids.append(proc.pid)
    return pids


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_orphans(tmp_path: Path) -> Iterator[None]:
    """Whatever this test's mcp_proxy started is gone when it ends (other runs on the machine
    are not counted)."""
    yield
    leftover = set(upstream_pids(tmp_path))
    for pid in leftover:  # fail, but do not leave them behind either
        psutil.Process(pid).kill()
    assert not leftover, f"upstream processes survived the test: {leftover}"


class Proxy:
    def __init__(self, bus: Bus, secrets: dict[tuple[str, str], str]) -> None:
        self.bus, self.client, self.secrets = bus, CommandClient(bus), secrets
        self.reveals: list[RevealSecret] = []

    async def register(
        self, who: cmd.Caller, spec: cmd.ServerSpec, scope: cmd.Scope = "user"
    ) -> cmd.ServerView:
        request = cmd.RegisterServer(meta=meta(who.user_id), caller=who, scope=scope, spec=spec)
        return await self.client.call("mcp_proxy", "register_server", request, cmd.ServerView, timeout=10)

    async def call(
        self,
        who: cmd.Caller,
        tool: str,
        arguments: Any = None,
        server: str = "echo",
        request_id: str | None = None,
        timeout_s: float | None = None,
        raw: bytes | None = None,
        progress_token: str | int | None = None,
        log_level: str | None = None,
    ) -> cmd.CallOutcome:
        request = cmd.CallTool(
            meta=meta(who.user_id),
            caller=who,
            request_id=request_id or str(uuid.uuid4()),
            server=server,
            tool=tool,
            arguments=msgspec.Raw(raw if raw is not None else msgspec.json.encode(arguments or {})),
            timeout_s=timeout_s,
            progress_token=progress_token,
            log_level=log_level,
        )
        return await self.client.call("mcp_proxy", "call", request, cmd.CallOutcome, timeout=30)

    async def value(self, who: cmd.Caller, tool: str, arguments: Any = None, server: str = "echo") -> Any:
        outcome = await self.call(who, tool, arguments, server)
        assert outcome.status == "success", outcome
        assert outcome.result
        content = msgspec.json.decode(outcome.result)["structuredContent"]
        return content["result"] if set(content) == {"result"} else content  # dicts come unwrapped

    async def ask(self, verb: str, request: msgspec.Struct, reply: type[Any]) -> Any:
        return await self.client.call("mcp_proxy", verb, request, reply, timeout=30)


async def serve_secrets(bus: Bus, proxy: Proxy) -> CommandServer:
    """A stand-in for the secrets service's reveal command (same subject, same contract)."""
    server = CommandServer(bus, "secrets")

    async def reveal(r: RevealSecret) -> RevealedSecret:
        proxy.reveals.append(r)
        value = proxy.secrets.get((r.user_id, r.name)) or proxy.secrets.get((r.org_id, r.name))
        if value is None:
            raise refuse(404, "Not found", f"No secret named {r.name}.")
        return RevealedSecret(name=r.name, scope="user", version=1, value=value)

    server.route("reveal", RevealSecret, reveal)
    await server.start()
    return server


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("GATEHOUSE_MCP_ALLOW_PRIVATE", "127.0.0.1")
    monkeypatch.setenv("GATEHOUSE_MCP_KILL_GRACE_S", "0.5")
    monkeypatch.setenv("GATEHOUSE_MCP_MAX_MESSAGE_BYTES", str(1024 * 1024))
    monkeypatch.setenv("GATEHOUSE_MCP_START_TIMEOUT_S", "20")
    return monkeypatch


@pytest.fixture
async def proxy(proxy_env: pytest.MonkeyPatch, settings: Settings) -> AsyncIterator[Proxy]:
    async with running(build, settings, "mcp_proxy") as bus:
        harness = Proxy(bus, {})
        secrets = await serve_secrets(bus, harness)
        try:
            yield harness
        finally:
            await secrets.stop()


# -- registry ---------------------------------------------------------------------------------
async def test_registration_rules(proxy: Proxy) -> None:
    alice, bob = caller("alice"), caller("bob")
    view = await proxy.register(alice, stdio_spec(TEST_UPSTREAM_TOKEN=cmd.SecretRef("upstream_token")))
    assert (view.name, view.scope, view.requires_auth, view.secrets) == (
        "echo",
        "user",
        True,
        ["upstream_token"],
    )

    async def refused(spec: cmd.ServerSpec, who: cmd.Caller = alice, scope: cmd.Scope = "user") -> Any:
        with pytest.raises(CommandFailed) as failed:
            await proxy.register(who, spec, scope)
        return failed.value.problem

    assert (await refused(stdio_spec())).status == 409
    for bad in ("Echo", "a__b", "-x", "x" * 33, "a.b"):
        assert (await refused(stdio_spec(bad))).status == 400
    assert "command" in (await refused(cmd.ServerSpec(name="nocmd", transport="stdio"))).detail
    for url in ("http://169.254.169.254/latest", "http://10.1.2.3/mcp", "http://[::1]:9/mcp", "ftp://x.org/"):
        problem = await refused(cmd.ServerSpec(name="remote", transport="http", url=url))
        assert problem.status == 400, url
    metadata = await refused(cmd.ServerSpec(name="remote", transport="http", url="http://169.254.169.254/"))
    assert "metadata" in metadata.detail and "GATEHOUSE_MCP_ALLOW_PRIVATE" in metadata.detail
    inline = cmd.ServerSpec(
        name="remote", transport="http", url="http://127.0.0.1:9/mcp", headers={"Authorization": "Bearer x"}
    )
    assert "secret" in (await refused(inline)).detail
    assert (await refused(stdio_spec("orgwide"), scope="org")).status == 403

    # bob does not see alice's server, and cannot call or remove it
    listed = await proxy.ask("list_servers", cmd.ListServers(meta=meta(), caller=bob), cmd.ServerList)
    assert listed.servers == []
    with pytest.raises(CommandFailed) as failed:
        await proxy.call(bob, "echo", {"text": "hi"})
    assert failed.value.problem.status == 404
    with pytest.raises(CommandFailed) as failed:
        await proxy.ask("remove_server", cmd.RemoveServer(meta=meta(), caller=bob, name="echo"), Empty)
    assert failed.value.problem.status == 404

    # an org server: registered by an admin, listed for every member, removed only by an admin
    admin = caller("root", admin=True)
    await proxy.register(admin, stdio_spec("shared"), scope="org")
    names = await proxy.ask("list_servers", cmd.ListServers(meta=meta(), caller=bob), cmd.ServerList)
    assert [(s.name, s.scope) for s in names.servers] == [("shared", "org")]
    with pytest.raises(CommandFailed) as failed:
        await proxy.ask("remove_server", cmd.RemoveServer(meta=meta(), caller=bob, name="shared"), Empty)
    assert failed.value.problem.status == 403
    await proxy.ask("remove_server", cmd.RemoveServer(meta=meta(), caller=alice, name="echo"), Empty)
    await proxy.ask("remove_server", cmd.RemoveServer(meta=meta(), caller=admin, name="shared"), Empty)
    listed = await proxy.ask("list_servers", cmd.ListServers(meta=meta(), caller=alice), cmd.ServerList)
    assert listed.servers == []
    await proxy.register(alice, stdio_spec())  # the name is free again


# -- stdio: per-user processes with their own secrets -----------------------------------------
async def test_org_server_runs_per_user_with_their_own_secrets(proxy: Proxy) -> None:
    admin, alice, bob, carol = caller("root", admin=True), caller("alice"), caller("bob"), caller("carol")
    await proxy.register(admin, stdio_spec(TEST_UPSTREAM_TOKEN=cmd.SecretRef("upstream_token")), scope="org")
    proxy.secrets[("alice", "upstream_token")] = "alice-token-1234"
    proxy.secrets[("bob", "upstream_token")] = "bob-token-5678"

    assert await proxy.value(alice, "whoami") == sha("alice-token-1234")
    assert await proxy.value(bob, "whoami") == sha("bob-token-5678")
    alice_pid, bob_pid = await proxy.value(alice, "pid"), await proxy.value(bob, "pid")
    assert alice_pid != bob_pid
    assert await proxy.value(alice, "pid") == alice_pid  # reused
    assert all(r.purpose.startswith("tool_call:") and r.service == "mcp_proxy" for r in proxy.reveals)

    # the environment is minimal: the secret is there, the gateway's own variables are not
    names = await proxy.value(alice, "environment")
    assert "TEST_UPSTREAM_TOKEN" in names and "GATEHOUSE_DATABASE_URL" not in names
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "TEST_UPSTREAM_TOKEN", "LC_CTYPE"}
    assert os.environ.get("TEST_UPSTREAM_TOKEN") is None

    # carol never set the secret: the error names it and says how to set it
    missing = await proxy.call(carol, "whoami")
    assert missing.status == "error" and missing.error_code == -32002
    assert missing.error is not None and "upstream_token" in missing.error
    assert "PUT /v1/secrets/upstream_token" in missing.error

    tools = await proxy.ask("list_tools", cmd.ListTools(meta=meta(), caller=alice), cmd.ToolCatalog)
    (listing,) = tools.servers
    assert listing.error is None and {"echo", "add", "whoami", "sleep"} <= {t.name for t in listing.tools}
    echo_tool = next(t for t in listing.tools if t.name == "echo")
    assert msgspec.json.decode(echo_tool.inputSchema)["required"] == ["text"]
    tools = await proxy.ask("list_tools", cmd.ListTools(meta=meta(), caller=carol), cmd.ToolCatalog)
    assert tools.servers[0].error is not None and "upstream_token" in tools.servers[0].error

    tested = await proxy.ask(
        "test_server", cmd.TestServer(meta=meta(), caller=alice, name="echo"), cmd.ServerView
    )
    assert tested.status == "ok" and tested.tools_count >= 8
    listed = await proxy.ask("list_servers", cmd.ListServers(meta=meta(), caller=alice), cmd.ServerList)
    assert (listed.servers[0].status, listed.servers[0].tools_count) == ("ok", tested.tools_count)

    # a changed secret gets a fresh process; the old credential is never used again
    proxy.secrets[("alice", "upstream_token")] = "alice-token-rotated"
    rotated = await _after_secret_change(proxy, alice)
    assert rotated == sha("alice-token-rotated")


async def _after_secret_change(proxy: Proxy, who: cmd.Caller) -> str:
    """Publishes what the secrets service would (SecretStored), then calls whoami."""
    from datetime import UTC, datetime

    from contracts.envelope import Envelope, encode_envelope, payload_bytes
    from contracts.events.secrets import SecretStored

    stored = SecretStored(
        secret_id="s1",
        name="upstream_token",
        scope="user",
        user_id=who.user_id,
        version=2,
        fingerprint="f",
        key_id="k",
        stored_at=datetime.now(UTC),
    )
    envelope = Envelope(
        event_id=str(uuid.uuid4()),
        type="secrets.secret_stored",
        schema_version=1,
        occurred_at=datetime.now(UTC),
        org_id=who.org_id,
        actor=Actor(kind="user", id=who.user_id),
        correlation_id="c",
        data=payload_bytes(stored),
    )
    await proxy.bus.js.publish("events.secrets.secret_stored", encode_envelope(envelope))

    async def rotated() -> str | None:
        value = await proxy.value(who, "whoami")
        return value if value == sha("alice-token-rotated") else None

    result: str = await eventually(rotated, timeout=5)
    return result


# -- bad input ----------------------------------------------------------------------------------
async def test_bad_calls_fail_cleanly(proxy: Proxy) -> None:
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    unknown = await proxy.call(alice, "nope")
    assert unknown.status == "error" and unknown.error_code == -32602
    assert unknown.error is not None and "nope" in unknown.error and "echo" in unknown.error

    typed = await proxy.call(alice, "add", {"a": "x", "b": 2})
    assert typed.status == "error" and typed.error is not None and "valid integer" in typed.error
    assert typed.result and msgspec.json.decode(typed.result)["isError"] is True
    assert await proxy.value(alice, "add", {"a": 2, "b": 3}) == 5

    not_object = await proxy.call(alice, "echo", raw=b'["a"]')
    assert not_object.status == "error" and not_object.error_code == -32602

    with pytest.raises(CommandFailed) as failed:
        await proxy.call(alice, "echo", {"text": "x"}, server="nosuch")
    assert failed.value.problem.status == 404 and "nosuch" in failed.value.problem.detail

    pid = await proxy.value(alice, "pid")
    malformed = await proxy.call(alice, "malformed")
    assert malformed.status == "error" and malformed.error is not None and "malformed" in malformed.error
    assert await proxy.value(alice, "echo", {"text": "still here"}) == "still here"
    assert await proxy.value(alice, "pid") == pid  # junk on stdout does not cost the process

    # upstreams that cannot start: the reason comes back, and nothing is charged or leaked
    await proxy.register(alice, cmd.ServerSpec(name="missing", transport="stdio", command="/nonexistent/mcp"))
    missing = await proxy.call(alice, "x", server="missing")
    assert missing.status == "error" and missing.error_code == -32003 and missing.error is not None
    assert "could not be started" in missing.error and "/nonexistent/mcp" in missing.error
    dying = [sys.executable, "-c", "import sys; sys.stderr.write('no config found\\n'); sys.exit(3)"]
    await proxy.register(
        alice, cmd.ServerSpec(name="dying", transport="stdio", command=dying[0], args=dying[1:])
    )
    died = await proxy.call(alice, "x", server="dying")
    assert died.status == "error" and died.error_code == -32003 and died.error is not None
    assert "code 3" in died.error and "no config found" in died.error

    # pretty-printed arguments (newlines) are forwarded on one line
    spaced = await proxy.call(alice, "echo", raw=b'{\n  "text": "multi\\nline"\n}')
    assert spaced.status == "success" and spaced.result
    assert msgspec.json.decode(spaced.result)["structuredContent"]["result"] == "multi\nline"


async def test_timeout_kills_the_hung_process(proxy: Proxy) -> None:
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    pid = await proxy.value(alice, "pid")
    outcome = await proxy.call(alice, "sleep", {"seconds": 30}, timeout_s=1)
    assert outcome.status == "timeout" and outcome.error_code == -32005
    # cut at its own 1 s timeout, not after the upstream's 30 s sleep (speed itself is bench/'s)
    assert outcome.error is not None and "within 1 s" in outcome.error
    await eventually(lambda: _async(gone(pid)), timeout=5)
    new_pid = await proxy.value(alice, "pid")
    assert new_pid != pid


async def test_crash_then_restart(proxy: Proxy) -> None:
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    pid = await proxy.value(alice, "pid")
    crashed = await proxy.call(alice, "crash")
    assert crashed.status == "error" and crashed.error is not None
    assert "exited" in crashed.error or "closed" in crashed.error
    assert "crashing on purpose" in crashed.error  # the upstream's last words, from its stderr
    assert gone(pid)
    assert await proxy.value(alice, "pid") != pid


async def test_flood_is_stopped(proxy: Proxy) -> None:
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    pid = await proxy.value(alice, "pid")
    flooded = await proxy.call(alice, "flood", {"size": 3 * 1024 * 1024})
    assert flooded.status == "error" and flooded.error is not None and "flood" in flooded.error
    await eventually(lambda: _async(gone(pid)), timeout=5)
    assert await proxy.value(alice, "echo", {"text": "ok"}) == "ok"


async def test_cancel_ends_an_in_flight_call(proxy: Proxy) -> None:
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    await proxy.value(alice, "pid")
    request_id = str(uuid.uuid4())
    running_call = asyncio.create_task(proxy.call(alice, "sleep", {"seconds": 20}, request_id=request_id))
    await asyncio.sleep(0.5)
    await proxy.client.send("mcp_proxy", "cancel", cmd.CancelCall(caller=alice, request_id=request_id))
    outcome = await asyncio.wait_for(running_call, 5)
    assert outcome.status == "error" and outcome.error_code == -32800


async def test_idle_timeout_reaps_the_process_tree(proxy_env: pytest.MonkeyPatch, settings: Settings) -> None:
    proxy_env.setenv("GATEHOUSE_MCP_IDLE_TIMEOUT_S", "1.5")
    async with running(build, settings, "mcp_proxy") as bus:
        proxy = Proxy(bus, {})
        alice = caller("alice")
        await proxy.register(alice, stdio_spec())
        pid = await proxy.value(alice, "pid")
        in_group = await proxy.value(alice, "spawn_grandchild", {"escape": False})
        escaped = await proxy.value(alice, "spawn_grandchild", {"escape": True})
        assert psutil.pid_exists(in_group) and psutil.pid_exists(escaped)
        assert os.getpgid(escaped) != os.getpgid(pid)
        await eventually(lambda: _async(gone(pid) and gone(in_group) and gone(escaped)), timeout=15)

        async def recorded() -> list[Any]:
            events = [decode_payload(e) for e in await _events(bus)]
            return events if any(isinstance(e, UpstreamProcessStopped) for e in events) else []

        events = await eventually(recorded, timeout=10)
        stopped = [e for e in events if isinstance(e, UpstreamProcessStopped)]
        assert [(e.pid, e.reason) for e in stopped] == [(pid, "idle")]
        assert any(isinstance(e, UpstreamProcessStarted) and e.pid == pid for e in events)


# -- remote upstreams ---------------------------------------------------------------------------
@pytest.fixture
def http_upstreams(tmp_path: Path) -> Iterator[tuple[int, int]]:
    log = tmp_path / "upstreams.log"
    with http_upstream(ECHO, "--http", log=log) as http, http_upstream(ECHO, "--sse", log=log) as sse:
        yield http, sse


async def test_http_and_sse_upstreams_with_secret_headers(
    proxy: Proxy, http_upstreams: tuple[int, int]
) -> None:
    http_port, sse_port = http_upstreams
    alice, bob = caller("alice"), caller("bob")
    proxy.secrets[("alice", "upstream_token")] = "alice-http-token"
    proxy.secrets[("bob", "upstream_token")] = "bob-http-token"
    headers: dict[str, cmd.EnvValue] = {"X-Upstream-Token": cmd.SecretRef("upstream_token")}
    for who in (alice, bob):
        await proxy.register(
            who,
            cmd.ServerSpec(
                name="web", transport="http", url=f"http://127.0.0.1:{http_port}/mcp", headers=headers
            ),
        )
        await proxy.register(
            who,
            cmd.ServerSpec(
                name="legacy", transport="sse", url=f"http://127.0.0.1:{sse_port}/sse", headers=headers
            ),
        )
    for server in ("web", "legacy"):
        assert await proxy.value(alice, "whoami", server=server) == sha("alice-http-token")
        assert await proxy.value(bob, "whoami", server=server) == sha("bob-http-token")
        assert await proxy.value(alice, "add", {"a": 20, "b": 22}, server=server) == 42
        sent = await proxy.value(alice, "headers", server=server)
        assert "authorization" not in {k.lower() for k in sent}
        typed = await proxy.call(alice, "add", {"a": "x", "b": 1}, server=server)
        assert typed.status == "error" and typed.error is not None and "valid integer" in typed.error
        timed_out = await proxy.call(alice, "sleep", {"seconds": 10}, server=server, timeout_s=0.5)
        assert timed_out.status == "timeout"
        assert await proxy.value(alice, "echo", {"text": "after"}, server=server) == "after"
    tools = await proxy.ask("list_tools", cmd.ListTools(meta=meta(), caller=alice), cmd.ToolCatalog)
    assert [(s.server, s.error) for s in tools.servers] == [("legacy", None), ("web", None)]
    assert all(len(s.tools) >= 8 for s in tools.servers)

    await proxy.register(alice, cmd.ServerSpec(name="down", transport="http", url="http://127.0.0.1:9/mcp"))
    down = await proxy.call(alice, "echo", {"text": "x"}, server="down")
    assert down.status == "error" and down.error_code == -32003 and down.error is not None
    assert "could not be reached" in down.error


async def test_progress_and_logs_of_a_call_reach_its_subject_before_the_outcome(
    proxy: Proxy, http_upstreams: tuple[int, int]
) -> None:
    http_port, sse_port = http_upstreams
    alice = caller("alice")
    await proxy.register(alice, stdio_spec())
    await proxy.register(
        alice, cmd.ServerSpec(name="web", transport="http", url=f"http://127.0.0.1:{http_port}/mcp")
    )
    await proxy.register(
        alice, cmd.ServerSpec(name="legacy", transport="sse", url=f"http://127.0.0.1:{sse_port}/sse")
    )
    for server in ("echo", "web", "legacy"):
        request_id = str(uuid.uuid4())
        sub = await proxy.bus.nc.subscribe(f"mcp.notify.{request_id}")
        outcome = await proxy.call(
            alice, "progress", {"steps": 3}, server, request_id, progress_token="tok-9", log_level="info"
        )
        assert outcome.status == "success", (server, outcome)
        assert sub.pending_msgs == 6, server  # all of them arrived before the outcome
        messages = [msgspec.json.decode((await sub.next_msg()).data) for _ in range(6)]
        progress = [m["params"] for m in messages if m["method"] == "notifications/progress"]
        assert progress == [
            {"progressToken": "tok-9", "progress": step, "total": 3, "message": f"step {step}"}
            for step in (1, 2, 3)
        ], server
        logs = [m["params"] for m in messages if m["method"] == "notifications/message"]
        assert [(m["level"], m["data"]) for m in logs] == [("info", f"step {n} done") for n in (1, 2, 3)]
        await sub.unsubscribe()
        # a call that asks for nothing publishes nothing
        quiet_id = str(uuid.uuid4())
        quiet = await proxy.bus.nc.subscribe(f"mcp.notify.{quiet_id}")
        assert (await proxy.call(alice, "progress", {"steps": 2}, server, quiet_id)).status == "success"
        assert quiet.pending_msgs == 0
        await quiet.unsubscribe()


# -- the quota seam --------------------------------------------------------------------------
class Gate:
    """A QuotaGate that grants `allowed` calls, then refuses (what issue 5's gate plugs into)."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.log: list[tuple[str, str]] = []

    def granted(self, caller: cmd.Caller, request_id: str) -> Reservation | None:
        return None  # every call asks

    async def reserve(self, caller: cmd.Caller, request_id: str, server: str, tool: str) -> Reservation:
        if self.allowed <= 0:
            raise QuotaExceeded(
                "Monthly quota exceeded (50 calls). Upgrade to Pro for 500 calls/month.", 3600
            )
        self.allowed -= 1
        self.log.append(("reserve", request_id))
        return Reservation(request_id, caller.user_id)

    async def commit(self, reservation: Reservation) -> None:
        self.log.append(("commit", reservation.request_id))

    async def release(self, reservation: Reservation) -> None:
        self.log.append(("release", reservation.request_id))


async def test_quota_gate_is_asked_before_the_upstream(
    proxy_env: pytest.MonkeyPatch, settings: Settings
) -> None:
    gate = Gate(allowed=2)
    async with running(functools.partial(build, quota=gate), settings, "mcp_proxy") as bus:
        proxy = Proxy(bus, {})
        alice = caller("alice")
        await proxy.register(alice, stdio_spec())
        charged = await proxy.call(alice, "echo", {"text": "a"}, request_id="r1")
        not_reached = await proxy.call(alice, "nope", request_id="r2")  # unknown tool: released
        assert (charged.status, not_reached.status) == ("success", "error")
        assert gate.log == [("reserve", "r1"), ("commit", "r1"), ("reserve", "r2"), ("release", "r2")]
        with pytest.raises(CommandFailed) as refused:
            await proxy.call(alice, "echo", {"text": "b"}, request_id="r3")
        problem = refused.value.problem
        assert (problem.status, problem.code, problem.retry_after_s) == (429, "quota_exceeded", 3600)
        assert "Upgrade to Pro" in problem.detail

        async def refusal_recorded() -> Any:
            for e in await _events(bus):
                p = decode_payload(e)
                if isinstance(p, ToolCallCompleted) and p.request_id == "r3":
                    return p
            return None

        event = await eventually(refusal_recorded, timeout=10)
        assert event.reached_upstream is False and event.status == "error"


# -- history and events -------------------------------------------------------------------------
async def _events(bus: Bus) -> list[Any]:
    return await stream_envelopes(bus, "events.mcp_proxy.>")


def _async(value: Any) -> Any:
    async def done() -> Any:
        return value

    return done()


async def test_history_events_and_idempotency(proxy: Proxy) -> None:
    alice, bob = caller("alice"), caller("bob")
    await proxy.register(alice, stdio_spec())
    await proxy.register(bob, stdio_spec())
    secret_text = "do-not-store-" + uuid.uuid4().hex
    for i in range(5):
        await proxy.value(alice, "echo", {"text": f"{secret_text}-{i}"})
    await proxy.call(alice, "add", {"a": "x", "b": 1})
    await proxy.value(bob, "echo", {"text": "bob"})

    # the same request id twice runs once
    request_id = str(uuid.uuid4())
    first = await proxy.call(alice, "pid", request_id=request_id)
    again = await proxy.call(alice, "pid", request_id=request_id)
    assert again == first

    async def history(who: cmd.Caller, **kw: Any) -> cmd.HistoryPage:
        page: cmd.HistoryPage = await proxy.ask(
            "history", cmd.History(meta=meta(), caller=who, **kw), cmd.HistoryPage
        )
        return page

    page = await eventually(lambda: _full(history(alice, limit=50), 7), timeout=15)
    assert [i.tool_name for i in page.items][:2] == ["pid", "add"]  # newest first
    assert [i.status for i in page.items][1] == "error"
    assert all(i.server == "echo" and len(i.arguments_sha256) == 64 for i in page.items)
    echo_items = [i for i in page.items if i.tool_name == "echo"]
    expected = sha(msgspec.json.encode({"text": f"{secret_text}-4"}).decode())
    assert echo_items[0].arguments_sha256 == expected and echo_items[0].result_bytes > 0

    first_page = await history(alice, limit=3)
    assert len(first_page.items) == 3 and first_page.next_cursor
    second = await history(alice, limit=3, cursor=first_page.next_cursor)
    third = await history(alice, limit=3, cursor=second.next_cursor)
    ids = [i.request_id for i in first_page.items + second.items + third.items]
    assert ids == [i.request_id for i in page.items] and third.next_cursor is None
    assert [i.tool_name for i in (await history(bob)).items] == ["echo"]
    for cursor in ("garbage", first_page.next_cursor + "x"):
        with pytest.raises(CommandFailed) as failed:
            await history(alice, cursor=cursor)
        assert failed.value.problem.status == 400
    with pytest.raises(CommandFailed) as failed:  # another user's cursor
        await history(bob, cursor=first_page.next_cursor)
    assert failed.value.problem.status == 400

    envelopes = await _events(proxy.bus)
    calls = [(e, decode_payload(e)) for e in envelopes if e.type == "mcp_proxy.tool_call_completed"]
    assert len(calls) == 8
    assert sum(1 for _, p in calls if isinstance(p, ToolCallCompleted) and p.request_id == request_id) == 1
    for envelope, payload in calls:
        assert secret_text.encode() not in bytes(envelope.data)
        assert isinstance(payload, ToolCallCompleted) and payload.reached_upstream
        assert envelope.actor.kind == "user" and envelope.org_id == ORG
    types = {e.type for e in envelopes}
    assert {"mcp_proxy.server_registered", "mcp_proxy.upstream_process_started"} <= types

    before = await proxy.ask("history_digest", GetDigest(meta=meta()), ProjectionDigest)
    assert before.entries == 8
    report = await proxy.ask("rebuild_history", Rebuild(meta=meta()), RebuildReport)
    assert report.before.digest == report.after.digest == before.digest
    assert report.after.entries == 8


async def _full(pending: Any, n: int) -> Any:
    page = await pending
    return page if len(page.items) >= n else None


# -- an upstream's own tools/list_changed -------------------------------------------------------
GROWING = str(Path(__file__).resolve().parents[1] / "upstreams" / "growing_server.py")


async def test_an_upstreams_list_changed_is_published_for_its_user_once_a_second(
    proxy: Proxy, tmp_path: Path
) -> None:
    """stdio and Streamable HTTP (handshake era): the cached list is dropped and
    `mcp.tools_changed.<user>` tells the gateway, at most once a second per (user, server),
    never for another user."""
    heard: list[tuple[str, cmd.UpstreamToolsChanged]] = []

    async def got(msg: Any) -> None:
        heard.append((msg.subject, msgspec.json.decode(msg.data, type=cmd.UpstreamToolsChanged)))

    await proxy.bus.nc.subscribe("mcp.tools_changed.>", cb=got)
    await proxy.bus.nc.flush()
    alice, bob = caller("alice"), caller("bob")
    with http_upstream(GROWING, "--http", log=tmp_path / "growing.log") as port:
        await proxy.register(
            alice, cmd.ServerSpec(name="garden", transport="stdio", command=sys.executable, args=[GROWING])
        )
        await proxy.register(
            alice, cmd.ServerSpec(name="remote", transport="http", url=f"http://127.0.0.1:{port}/mcp")
        )
        await proxy.register(
            bob, cmd.ServerSpec(name="garden", transport="stdio", command=sys.executable, args=[GROWING])
        )
        assert await proxy.value(bob, "flap", {"times": 0}, server="garden") == "flapped 0"  # his process
        for server in ("garden", "remote"):
            listing = cmd.ListTools(meta=meta(), caller=alice)
            before = await proxy.ask("list_tools", listing, cmd.ToolCatalog)
            assert "sprout" not in {t.name for s in before.servers if s.server == server for t in s.tools}
            assert await proxy.value(alice, "grow", {"name": "sprout"}, server=server) == "grew sprout"
            expected = (
                "mcp.tools_changed.alice",
                cmd.UpstreamToolsChanged(user_id="alice", org_id=ORG, server=server),
            )
            await eventually(lambda expected=expected: asyncio.sleep(0, expected in heard), timeout=10)
            after = await proxy.ask("list_tools", listing, cmd.ToolCatalog)
            assert "sprout" in {t.name for s in after.servers if s.server == server for t in s.tools}
        await asyncio.sleep(1.1)  # both windows closed
        heard.clear()
        assert await proxy.value(alice, "flap", {"times": 20}, server="garden") == "flapped 20"
        await asyncio.sleep(1.5)
        assert (
            heard
            == [
                (
                    "mcp.tools_changed.alice",
                    cmd.UpstreamToolsChanged(user_id="alice", org_id=ORG, server="garden"),
                )
            ]
            * 2
        )
