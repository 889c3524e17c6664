"""`notifications/tools/list_changed` on the standalone GET stream (and legacy `/sse`), with the
real identity and mcp_proxy services and two gateway replicas over real HTTP: a server
registered or removed through one replica reaches the streams of exactly the users whose
catalog it changes, on the other replica, over NATS.
"""

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from contracts.commands.identity import UserCreated
from services.gateway.adapters.http import mcp_listen
from services.gateway.bootstrap import GatewayServer, server_config
from services.kit.config import Settings
from tests.helpers import eventually
from tests.integration.mcp_world import MODERN, bearer, platform_settings, real_proxy, replica

pytestmark = pytest.mark.integration

ECHO = str(Path(__file__).resolve().parents[1] / "upstreams" / "echo_server.py")
LIST_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
QUIET_S = 1.5  # how long "nothing arrived" is watched for, after the expected stream got its message


@dataclass
class Stack:
    apps: list[Litestar]
    http: list[httpx.AsyncClient]  # in-process, for plain requests
    urls: list[str]  # real HTTP, for streams
    ann: UserCreated  # alpha
    bea: UserCreated  # alpha
    ada: UserCreated  # alpha admin
    bob: UserCreated  # beta
    settings: Settings


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> AsyncIterator[Stack]:
    with platform_settings(tmp_path_factory, postgres_server) as settings:
        async with real_proxy(settings, replicas=2) as platform:
            (app0, app1), (url0, url1) = platform.apps, platform.urls
            ann = await platform.user("ann@alpha.test", "alpha")
            bea = await platform.user("bea@alpha.test", "alpha")
            ada = await platform.user("ada@alpha.test", "alpha", is_admin=True)
            bob = await platform.user("bob@beta.test", "beta")
            transports = [httpx.ASGITransport(app=app) for app in (app0, app1)]
            async with (
                httpx.AsyncClient(transport=transports[0], base_url="http://gh") as h0,
                httpx.AsyncClient(transport=transports[1], base_url="http://gh") as h1,
            ):

                async def known() -> bool:
                    for h in (h0, h1):
                        for user in (ann, bea, ada, bob):
                            if (await h.get("/v1/me", headers=bearer(user.api_key))).status_code != 200:
                                return False
                    return True

                await eventually(known, timeout=30)
                yield Stack([app0, app1], [h0, h1], [url0, url1], ann, bea, ada, bob, settings)


async def initialize(http: httpx.AsyncClient, key: str, path: str = "/mcp") -> str:
    answer = await http.post(
        path, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}, headers=bearer(key)
    )
    assert answer.status_code == 200, answer.text
    session: str = answer.headers["mcp-session-id"]
    return session


def stream_headers(key: str, session: str) -> dict[str, str]:
    return {
        **bearer(key),
        "Mcp-Session-Id": session,
        "Accept": "text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
    }


@dataclass
class Stream:
    session: str
    messages: "asyncio.Queue[dict[str, Any]]" = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def next(self, timeout: float = 15.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def quiet(self, seconds: float = QUIET_S) -> None:
        """Nothing arrives for `seconds` (or the test fails, naming what did)."""
        await asyncio.sleep(seconds)
        assert self.messages.empty(), f"unexpected message: {self.messages.get_nowait()}"


async def _read(response: httpx.Response, stream: Stream) -> None:
    """`message` events into `messages`; comments and other events (as "<kind> <data>") into `comments`."""
    kind, data = "message", []
    try:
        async for line in response.aiter_lines():
            if line.startswith(":"):
                stream.comments.append(line[1:].strip())
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                text = "\n".join(data)
                if kind == "message":
                    stream.messages.put_nowait(json.loads(text))
                else:
                    stream.comments.append(f"{kind} {text}")
                kind, data = "message", []
    except httpx.HTTPError:
        pass
    finally:
        stream.ended.set()


@asynccontextmanager
async def listening(
    url: str, key: str, session: str | None = None, path: str = "/mcp", http: httpx.AsyncClient | None = None
) -> AsyncIterator[Stream]:
    """A standalone stream (a new session on `path` unless one is given), read in the background."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=None)) as client:
        if session is None:
            session = await initialize(http or client, key, path)
        async with client.stream("GET", path, headers=stream_headers(key, session)) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = Stream(session)
            reader = asyncio.create_task(_read(response, stream))
            await eventually(lambda: asyncio.sleep(0, "stream open" in stream.comments), timeout=5)
            try:
                yield stream
            finally:
                reader.cancel()


async def register(stack: Stack, key: str, name: str, replica: int = 1, scope: str = "user") -> None:
    body = {"name": name, "transport": "stdio", "command": sys.executable, "args": [ECHO], "scope": scope}
    created = await stack.http[replica].post("/v1/mcp/servers", json=body, headers=bearer(key))
    assert created.status_code == 201, created.text


async def remove(stack: Stack, key: str, name: str, replica: int = 1, scope: str = "user") -> None:
    removed = await stack.http[replica].delete(f"/v1/mcp/servers/{name}?scope={scope}", headers=bearer(key))
    assert removed.status_code == 204, removed.text


async def test_a_registry_change_reaches_exactly_the_users_it_concerns(stack: Stack) -> None:
    ann, bea, ada, bob = (u.api_key for u in (stack.ann, stack.bea, stack.ada, stack.bob))
    url0, url1 = stack.urls
    async with (
        listening(url0, ann) as ann_stream,
        listening(url0, bea) as bea_stream,
        listening(url1, bob) as bob_stream,
        listening(url0, bob) as bob_stream_here,
    ):
        # Ann's own server, registered through the other replica: only her stream hears of it.
        await register(stack, ann, "ann-tools")
        assert await ann_stream.next() == LIST_CHANGED
        await ann_stream.quiet(0)
        await asyncio.gather(bea_stream.quiet(), bob_stream.quiet(), bob_stream_here.quiet())
        # Org alpha's server: every alpha member's stream, never beta's.
        await register(stack, ada, "alpha-wiki", scope="org")
        assert await ann_stream.next() == LIST_CHANGED
        assert await bea_stream.next() == LIST_CHANGED
        await asyncio.gather(bob_stream.quiet(), bob_stream_here.quiet())
        # Removing is a change too.
        await remove(stack, ann, "ann-tools", replica=0)
        assert await ann_stream.next() == LIST_CHANGED
        await asyncio.gather(bea_stream.quiet(), bob_stream.quiet())
        await remove(stack, ada, "alpha-wiki", scope="org")
        assert await ann_stream.next() == LIST_CHANGED
        assert await bea_stream.next() == LIST_CHANGED
        # Bob's streams were listening all along: his own change reaches both, and no one else.
        await register(stack, bob, "bob-tools", replica=0)
        assert await bob_stream.next() == LIST_CHANGED
        assert await bob_stream_here.next() == LIST_CHANGED
        await asyncio.gather(ann_stream.quiet(), bea_stream.quiet())
        await remove(stack, bob, "bob-tools")
        assert await bob_stream.next() == LIST_CHANGED


async def test_after_the_notification_tools_list_is_fresh_on_the_streams_replica(stack: Stack) -> None:
    key = stack.bea.api_key
    session = await initialize(stack.http[0], key)
    headers = {**bearer(key), "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    listed = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}

    async def names() -> set[str]:
        answer = await stack.http[0].post("/mcp", json=listed, headers=headers)
        assert answer.status_code == 200, answer.text
        return {t["name"] for t in answer.json()["result"]["tools"]}

    assert "bea-echo__echo" not in await names()  # cached for a few seconds on replica 0
    async with listening(stack.urls[0], key, session) as stream:
        await register(stack, key, "bea-echo")  # through replica 1
        assert await stream.next() == LIST_CHANGED
        assert "bea-echo__echo" in await names()  # the cached catalog was dropped
        await remove(stack, key, "bea-echo")
        assert await stream.next() == LIST_CHANGED
        assert "bea-echo__echo" not in await names()


async def test_one_servers_endpoint_hears_only_of_that_server(stack: Stack) -> None:
    key = stack.bea.api_key
    await register(stack, key, "solo")
    session = await initialize(stack.http[1], key, "/servers/solo/mcp")
    async with (
        listening(stack.urls[0], key, session, path="/servers/solo/mcp") as solo,
        listening(stack.urls[1], key) as everything,
    ):
        await register(stack, key, "other")
        assert await everything.next() == LIST_CHANGED
        await solo.quiet()
        await remove(stack, key, "solo")
        assert await solo.next() == LIST_CHANGED
        assert await everything.next() == LIST_CHANGED
    await remove(stack, key, "other")


async def test_get_is_refused_like_a_post_would_be(stack: Stack) -> None:
    ann, bob = stack.ann.api_key, stack.bob.api_key
    http = stack.http[0]
    session = await initialize(http, ann)
    without_accept = await http.get("/mcp", headers={**bearer(ann), "Mcp-Session-Id": session})
    assert without_accept.status_code == 405 and "GET" in without_accept.headers["allow"]
    assert "text/event-stream" in without_accept.json()["error"]["message"]
    modern = await http.get("/mcp", headers={**stream_headers(ann, session), "MCP-Protocol-Version": MODERN})
    assert modern.status_code == 405 and "subscriptions/listen" in modern.json()["error"]["message"]
    unknown = await http.get("/mcp", headers=stream_headers(ann, "no-such-session"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32600
    foreign = await http.get("/mcp", headers=stream_headers(bob, session))
    assert foreign.status_code == 404
    other_endpoint = await http.get("/servers/solo/mcp", headers=stream_headers(ann, session))
    assert other_endpoint.status_code == 404
    no_session = await http.get("/mcp", headers={**bearer(ann), "Accept": "text/event-stream"})
    assert no_session.status_code == 400 and "Mcp-Session-Id" in no_session.json()["error"]["message"]
    bad_version = await http.get(
        "/mcp", headers={**stream_headers(ann, session), "MCP-Protocol-Version": "1"}
    )
    assert bad_version.status_code == 400 and bad_version.json()["error"]["code"] == -32022
    evil = await http.get("/mcp", headers={**stream_headers(ann, session), "Origin": "https://evil.example"})
    assert evil.status_code == 403
    no_key = await http.get("/mcp", headers={"Mcp-Session-Id": session, "Accept": "text/event-stream"})
    assert no_key.status_code == 401
    put = await http.put("/mcp", headers=bearer(ann))
    assert put.status_code == 405 and put.headers["allow"] == "GET, POST, DELETE"
    full = stack.apps[0].state.mcp.listeners
    full.max_streams, limit = 0, full.max_streams
    try:
        refused = await http.get("/mcp", headers=stream_headers(ann, session))
        assert refused.status_code == 503 and "event streams" in refused.json()["error"]["message"]
    finally:
        full.max_streams = limit


async def test_a_newer_get_replaces_the_older_and_delete_ends_it(stack: Stack) -> None:
    key = stack.ann.api_key
    session = await initialize(stack.http[0], key)
    async with listening(stack.urls[0], key, session) as first:
        await eventually(lambda: asyncio.sleep(0, _armed(stack.apps[0], session)), timeout=5)
        async with listening(stack.urls[1], key, session) as second:  # the other replica
            await asyncio.wait_for(first.ended.wait(), 5)
            await register(stack, key, "replaced")
            assert await second.next() == LIST_CHANGED
            assert first.messages.empty()
            ended = await stack.http[1].delete("/mcp", headers={**bearer(key), "Mcp-Session-Id": session})
            assert ended.status_code == 204
            await asyncio.wait_for(second.ended.wait(), 5)
    await remove(stack, key, "replaced")


def _armed(app: Litestar, session: str) -> bool:
    listener = app.state.mcp.listeners._sessions.get(session)
    return listener is not None and listener.armed


async def test_keepalives_and_a_revoked_key_ends_the_stream(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mcp_listen, "KEEPALIVE_S", 0.2)
    issued = await stack.http[0].post(
        "/v1/users/me/mcp-keys", json={"name": "stream"}, headers=bearer(stack.bea.api_key)
    )
    assert issued.status_code == 201, issued.text
    key = issued.json()["api_key"]
    await eventually(lambda: _knows(stack, key), timeout=10)
    async with listening(stack.urls[1], key) as stream:
        await eventually(lambda: asyncio.sleep(0, "keepalive" in stream.comments), timeout=5)
        assert not stream.ended.is_set()
        revoked = await stack.http[0].delete(
            f"/v1/users/me/mcp-keys/{issued.json()['id']}", headers=bearer(stack.bea.api_key)
        )
        assert revoked.status_code == 204
        await asyncio.wait_for(stream.ended.wait(), 5)


async def _knows(stack: Stack, key: str) -> bool:
    return (await stack.http[1].get("/v1/me", headers=bearer(key))).status_code == 200


async def test_the_legacy_sse_stream_hears_it_too(stack: Stack) -> None:
    key = stack.ann.api_key
    async with (
        httpx.AsyncClient(base_url=stack.urls[0], timeout=httpx.Timeout(10, read=None)) as http,
        http.stream("GET", "/sse", headers=bearer(key)) as response,
    ):
        assert response.status_code == 200
        stream = Stream("sse")
        reader = asyncio.create_task(_read(response, stream))
        try:

            def opened() -> bool:
                return any(c.startswith("endpoint /messages?session_id=") for c in stream.comments)

            await eventually(lambda: asyncio.sleep(0, opened()), timeout=10)
            await register(stack, key, "legacy-seen")
            assert await stream.next() == LIST_CHANGED
            await register(stack, stack.bob.api_key, "legacy-unseen")  # another org's user
            await stream.quiet()
        finally:
            reader.cancel()
    await remove(stack, key, "legacy-seen")
    await remove(stack, stack.bob.api_key, "legacy-unseen")


async def test_the_official_sdk_client_receives_it(stack: Stack) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import ToolListChangedNotification

    key = stack.bob.api_key
    seen: list[Any] = []

    async def handler(message: Any) -> None:
        seen.append(message)

    face = stack.apps[0].state.mcp
    before = face.listeners.standalone_count
    async with httpx2.AsyncClient(headers=bearer(key), timeout=httpx2.Timeout(30, read=60)) as http:
        transport = streamable_http_client(f"{stack.urls[0]}/mcp", http_client=http)
        async with Client(transport, mode="legacy", message_handler=handler) as client:
            await client.list_tools()
            # the SDK opens the GET stream itself after initialize
            await eventually(lambda: asyncio.sleep(0, face.listeners.standalone_count > before), timeout=10)
            await register(stack, key, "sdk-seen")

            def arrived() -> bool:
                return any(isinstance(m, ToolListChangedNotification) for m in seen)

            await eventually(lambda: asyncio.sleep(0, arrived()), timeout=15)
    await remove(stack, key, "sdk-seen")


async def test_shutdown_ends_open_streams(stack: Stack) -> None:
    async with replica(stack.settings) as (app, _):
        server = GatewayServer(server_config(app, "127.0.0.1", 0), app)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: asyncio.sleep(0, server.started), timeout=10)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            async with httpx.AsyncClient(base_url=url) as http:

                async def known() -> bool:
                    return (await http.get("/v1/me", headers=bearer(stack.ann.api_key))).status_code == 200

                await eventually(known, timeout=10)
            async with listening(url, stack.ann.api_key) as stream:
                server.should_exit = True
                await asyncio.wait_for(stream.ended.wait(), 5)
                await asyncio.wait_for(asyncio.shield(task), 10)  # uvicorn did not wait for the stream
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)


GROWING = str(Path(__file__).resolve().parents[1] / "upstreams" / "growing_server.py")


async def rpc(stack: Stack, replica: int, key: str, session: str, method: str, params: Any = None) -> Any:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, **({"params": params} if params else {})}
    headers = {**bearer(key), "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    answer = await stack.http[replica].post("/mcp", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


async def tool_names(stack: Stack, replica: int, key: str, session: str) -> set[str]:
    return {t["name"] for t in (await rpc(stack, replica, key, session, "tools/list"))["tools"]}


async def test_an_upstreams_own_change_reaches_only_its_users_streams(stack: Stack) -> None:
    """Ann's process of the org server grows a tool: her streams hear of it on every replica,
    Bea's (same org, same server, her own process) do not, nor Bob's."""
    ann, bea, ada, bob = (u.api_key for u in (stack.ann, stack.bea, stack.ada, stack.bob))
    url0, url1 = stack.urls
    ann_session, bea_session = await initialize(stack.http[0], ann), await initialize(stack.http[0], bea)
    body = {
        "name": "garden",
        "transport": "stdio",
        "command": sys.executable,
        "args": [GROWING],
        "scope": "org",
    }
    async with (
        listening(url0, ann, ann_session) as ann_stream,
        listening(url1, bea) as bea_stream,
        listening(url0, bob) as bob_stream,
    ):
        created = await stack.http[1].post("/v1/mcp/servers", json=body, headers=bearer(ada))
        assert created.status_code == 201, created.text
        assert await ann_stream.next() == LIST_CHANGED  # the registration itself
        assert await bea_stream.next() == LIST_CHANGED
        session = await initialize(stack.http[1], ann, "/servers/garden/mcp")
        async with listening(url1, ann, session, path="/servers/garden/mcp") as garden_stream:
            # both users' processes run (tools/list starts them); replica 0 caches Ann's catalog
            assert "garden__sprout" not in await tool_names(stack, 0, ann, ann_session)
            assert "garden__sprout" not in await tool_names(stack, 0, bea, bea_session)
            call_session = await initialize(stack.http[1], ann)
            grown = await rpc(
                stack,
                1,
                ann,
                call_session,
                "tools/call",
                {"name": "garden__grow", "arguments": {"name": "sprout"}},
            )
            assert grown["content"][0]["text"] == "grew sprout", grown
            assert await ann_stream.next() == LIST_CHANGED  # on the other replica
            assert await garden_stream.next() == LIST_CHANGED  # that server's endpoint
            assert "garden__sprout" in await tool_names(stack, 0, ann, ann_session)  # cache dropped
            assert "garden__sprout" not in await tool_names(stack, 0, bea, bea_session)  # her own process
            await asyncio.gather(ann_stream.quiet(), bea_stream.quiet(), bob_stream.quiet())
        removed = await stack.http[1].delete("/v1/mcp/servers/garden?scope=org", headers=bearer(ada))
        assert removed.status_code == 204, removed.text
        assert await ann_stream.next() == LIST_CHANGED
