"""The MCP endpoint (`/mcp`, `/servers/{name}/mcp`, legacy `/sse` + `/messages`) on two gateway
replicas, with fake_mcp_proxy answering `cmd.mcp_proxy.*` over real NATS.
"""

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.gateway.mcp import exchange
from services.gateway.mcp.naming import exposed_name
from tests.helpers import eventually
from tests.integration.fake_mcp_proxy import LONG_TOOL
from tests.integration.mcp_world import MODERN, World, bearer, mcp_world, platform_settings

pytestmark = pytest.mark.integration

INIT_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "test", "version": "1"},
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> AsyncIterator[World]:
    with platform_settings(tmp_path_factory, postgres_server) as settings:
        async with mcp_world(settings) as w:
            yield w


def rpc(method: str, params: dict[str, Any] | None = None, id: int | str | None = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        body["id"] = id
    if params is not None:
        body["params"] = params
    return body


async def initialize(
    http: httpx.AsyncClient, key: str, path: str = "/mcp", version: str = "2025-06-18"
) -> str:
    answer = await http.post(
        path, json=rpc("initialize", {**INIT_PARAMS, "protocolVersion": version}), headers=bearer(key)
    )
    assert answer.status_code == 200, answer.text
    session = answer.headers["mcp-session-id"]
    assert len(session) >= 40
    return session


def session_headers(key: str, session: str, version: str = "2025-06-18") -> dict[str, str]:
    return {**bearer(key), "Mcp-Session-Id": session, "MCP-Protocol-Version": version}


def modern_headers(key: str, method: str, name: str | None = None) -> dict[str, str]:
    headers = {**bearer(key), "MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


async def call(
    w: World, session: str, name: str, arguments: dict[str, Any], replica: int = 0
) -> dict[str, Any]:
    answer = await w.http[replica].post(
        "/mcp",
        json=rpc("tools/call", {"name": name, "arguments": arguments}),
        headers=session_headers(w.ann.api_key, session),
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


# -- the handshake era --------------------------------------------------------------------------
async def test_initialize_negotiates_and_assigns_a_session(world: World) -> None:
    answer = await world.http[0].post(
        "/mcp", json=rpc("initialize", INIT_PARAMS, id="init-1"), headers=bearer(world.ann.api_key)
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"[\x21-\x7e]{40,}", answer.headers["mcp-session-id"])
    body = answer.json()
    assert body["id"] == "init-1"
    result = body["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["serverInfo"]["name"] == "gatehouse"
    assert result["capabilities"] == {"tools": {"listChanged": True}, "logging": {}}
    assert result["instructions"]
    for asked, got in (
        ("2025-11-25", "2025-11-25"),
        ("2025-03-26", "2025-03-26"),
        ("1999-01-01", "2025-11-25"),
    ):
        again = await world.http[0].post(
            "/mcp",
            json=rpc("initialize", {**INIT_PARAMS, "protocolVersion": asked}),
            headers=bearer(world.ann.api_key),
        )
        assert again.json()["result"]["protocolVersion"] == got
        assert again.headers["mcp-session-id"] != answer.headers["mcp-session-id"]


async def test_tools_list_merges_the_callers_servers(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    answer = await world.http[0].post(
        "/mcp", json=rpc("tools/list"), headers=session_headers(world.ann.api_key, session)
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    names = [t["name"] for t in result["tools"]]
    assert "nextCursor" not in result
    assert {"github__echo", "jira__echo", "wiki__echo"} <= set(names)  # own servers and the org's
    assert not any(n.startswith("notes__") for n in names)  # bea's server
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names)
    assert len(names) == len(set(names))
    assert exposed_name("github", "dotted.name") in names
    assert exposed_name("github", LONG_TOOL) in names
    echo = next(t for t in result["tools"] if t["name"] == "github__echo")
    assert echo["inputSchema"]["properties"]["text"] == {"type": "string"}
    assert echo["description"] == "Echoes its arguments back"
    # Names do not depend on which other servers exist.
    assert exposed_name("github", LONG_TOOL) == exposed_name("github", LONG_TOOL)
    assert len(exposed_name("github", LONG_TOOL)) == 64


async def test_tools_list_pages_with_an_opaque_cursor(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange, "PAGE_SIZE", 5)
    session = await initialize(world.http[0], world.ann.api_key)
    names: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        answer = await world.http[1].post(
            "/mcp",
            json=rpc("tools/list", {"cursor": cursor} if cursor else None),
            headers=session_headers(world.ann.api_key, session),
        )
        result = answer.json()["result"]
        names += [t["name"] for t in result["tools"]]
        pages += 1
        cursor = result.get("nextCursor")
        if cursor is None:
            break
    assert pages == 5 and len(names) == 24 and len(set(names)) == 24  # 3 servers x 8 tools
    bad = await world.http[0].post(
        "/mcp",
        json=rpc("tools/list", {"cursor": "not-a-cursor"}),
        headers=session_headers(world.ann.api_key, session),
    )
    assert bad.json()["error"]["code"] == -32602


async def test_tools_call_is_routed_with_the_callers_identity(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    before = len(world.proxy.calls)
    body = await call(world, session, "github__echo", {"text": "hi", "n": [1, 2]})
    assert body["result"]["content"][0]["type"] == "text"
    assert json.loads(body["result"]["content"][0]["text"]) == {
        "tool": "echo",
        "arguments": {"text": "hi", "n": [1, 2]},
    }
    assert "isError" not in body["result"]
    sent = world.proxy.calls[before]
    assert (sent.server, sent.tool) == ("github", "echo")
    assert json.loads(bytes(sent.arguments)) == {"text": "hi", "n": [1, 2]}
    assert sent.caller.user_id == world.ann.user_id
    assert (
        sent.caller.org_id == world.users["ann"].org_id
        and sent.caller.tier == "free"
        and not sent.caller.is_admin
    )
    assert sent.meta.actor.id == world.ann.user_id and sent.meta.actor.kind == "user"
    assert world.ann.api_key not in repr(sent)  # the client's credential goes nowhere
    # The org's server, and shortened names, route back to the real tool.
    await call(world, session, "wiki__echo", {})
    assert (world.proxy.calls[-1].server, world.proxy.calls[-1].tool) == ("wiki", "echo")
    await call(world, session, exposed_name("jira", "dotted.name"), {"x": 1}, replica=1)
    assert (world.proxy.calls[-1].server, world.proxy.calls[-1].tool) == ("jira", "dotted.name")
    await call(world, session, exposed_name("github", LONG_TOOL), {})
    assert world.proxy.calls[-1].tool == LONG_TOOL


async def test_progress_and_logs_are_asked_for_when_the_client_can_receive_them(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    params = {"name": "github__echo", "arguments": {}, "_meta": {"progressToken": "p-7"}}
    headers = session_headers(world.ann.api_key, session)
    streams = {**headers, "Accept": "application/json, text/event-stream"}
    answer = await world.http[0].post("/mcp", json=rpc("tools/call", params), headers=streams)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"  # no notification came: plain JSON
    assert (world.proxy.calls[-1].progress_token, world.proxy.calls[-1].log_level) == ("p-7", None)
    bad = await world.http[0].post("/mcp", json=rpc("logging/setLevel", {"level": "loud"}), headers=streams)
    assert bad.json()["error"]["code"] == -32602
    level = await world.http[0].post(
        "/mcp", json=rpc("logging/setLevel", {"level": "warning"}), headers=streams
    )
    assert level.json()["result"] == {}
    answer = await world.http[1].post("/mcp", json=rpc("tools/call", params), headers=streams)  # any replica
    assert (world.proxy.calls[-1].progress_token, world.proxy.calls[-1].log_level) == ("p-7", "warning")
    answer = await world.http[0].post("/mcp", json=rpc("tools/call", params), headers=headers)
    assert answer.status_code == 200  # no SSE accepted: nothing to deliver notifications with
    assert (world.proxy.calls[-1].progress_token, world.proxy.calls[-1].log_level) == (None, None)
    modern = {**modern_headers(world.ann.api_key, "tools/call", "github__echo"), "Accept": streams["Accept"]}
    opted = {**params, "_meta": {"io.modelcontextprotocol/logLevel": "warning"}}
    answer = await world.http[0].post("/mcp", json=rpc("tools/call", opted), headers=modern)
    assert answer.status_code == 200, answer.text  # 2026-07-28: logs only for a request that opts in
    assert (world.proxy.calls[-1].progress_token, world.proxy.calls[-1].log_level) == (None, "warning")


async def test_call_outcomes_map_onto_mcp(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    failed = (await call(world, session, "github__fail", {}))["result"]
    assert failed["isError"] is True and failed["content"][0]["text"] == "the tool failed"
    timed_out = (await call(world, session, "github__timeout", {}))["result"]
    assert timed_out["isError"] is True and "timed out" in timed_out["content"][0]["text"]
    secret = (await call(world, session, "github__needs_secret", {}))["error"]
    assert (
        secret["code"] == -32002
        and "github_token" in secret["message"]
        and "/v1/secrets" in secret["message"]
    )
    quota = (await call(world, session, "github__quota", {}))["result"]
    assert quota["isError"] is True and "Monthly quota exceeded" in quota["content"][0]["text"]
    unknown_tool = (await call(world, session, "github__nope", {}))["error"]
    assert unknown_tool["code"] == -32602 and "nope" in unknown_tool["message"]
    unknown_server = (await call(world, session, "zzz__echo", {}))["error"]
    assert unknown_server["code"] == -32602 and "zzz" in unknown_server["message"]
    not_prefixed = (await call(world, session, "echo", {}))["error"]
    assert not_prefixed["code"] == -32602 and "<server>__<tool>" in not_prefixed["message"]
    bad_arguments = await world.http[0].post(
        "/mcp",
        json=rpc("tools/call", {"name": "github__echo", "arguments": [1]}),
        headers=session_headers(world.ann.api_key, session),
    )
    assert bad_arguments.json()["error"]["code"] == -32602


async def test_another_users_server_is_unknown(world: World) -> None:
    session = await initialize(world.http[0], world.bea.api_key)
    answer = await world.http[0].post(
        "/mcp",
        json=rpc("tools/call", {"name": "github__echo", "arguments": {}}),
        headers=session_headers(world.bea.api_key, session),
    )
    assert answer.json()["error"]["code"] == -32602


async def test_sessions_unknown_foreign_missing_and_ended(world: World) -> None:
    ann = world.ann.api_key
    unknown = await world.http[0].post("/mcp", json=rpc("tools/list"), headers=session_headers(ann, "x" * 43))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32600
    bea_session = await initialize(world.http[0], world.bea.api_key)
    foreign = await world.http[0].post(
        "/mcp", json=rpc("tools/list"), headers=session_headers(ann, bea_session)
    )
    assert foreign.status_code == 404
    missing = await world.http[0].post("/mcp", json=rpc("tools/list"), headers=bearer(ann))
    assert missing.status_code == 400 and "Mcp-Session-Id" in missing.json()["error"]["message"]
    # DELETE ends a session on every replica (one created on 0, ended on 1, used on 0).
    session = await initialize(world.http[0], ann)
    assert (await world.http[0].post("/mcp", json=rpc("ping"), headers=session_headers(ann, session))).json()[
        "result"
    ] == {}
    assert (
        await world.http[1].delete("/mcp", headers=session_headers(world.bea.api_key, session))
    ).status_code == 404
    assert (await world.http[1].delete("/mcp", headers=session_headers(ann, session))).status_code == 204

    async def gone() -> bool:
        answer = await world.http[0].post("/mcp", json=rpc("ping"), headers=session_headers(ann, session))
        return answer.status_code == 404

    await eventually(gone, timeout=5)
    assert (await world.http[0].delete("/mcp", headers=session_headers(ann, session))).status_code == 404
    assert (await world.http[0].delete("/mcp", headers=bearer(ann))).status_code == 400


async def test_a_session_made_on_one_replica_is_served_by_the_other(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    body = await call(world, session, "jira__echo", {"on": "replica 1"}, replica=1)
    assert json.loads(body["result"]["content"][0]["text"])["arguments"] == {"on": "replica 1"}


async def test_malformed_messages(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    headers = {**session_headers(world.ann.api_key, session), "content-type": "application/json"}
    batch = await world.http[0].post(
        "/mcp", content=json.dumps([rpc("ping"), rpc("ping", id=2)]), headers=headers
    )
    assert batch.status_code == 400
    assert (
        batch.json()["error"]["code"] == -32600
        and "atches are not supported" in batch.json()["error"]["message"]
    )
    parse = await world.http[0].post(
        "/mcp", content=b'{"jsonrpc": "2.0", "id": 1, "method": ', headers=headers
    )
    assert parse.status_code == 400 and parse.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error: the body is not valid JSON."},
    }
    not_rpc = await world.http[0].post("/mcp", content=b'{"id": 1, "method": "ping"}', headers=headers)
    assert not_rpc.status_code == 400 and not_rpc.json()["error"]["code"] == -32600
    unknown = await world.http[0].post("/mcp", json=rpc("resources/subscribe", id=9), headers=headers)
    assert (
        unknown.status_code == 200 and unknown.json()["error"]["code"] == -32601 and unknown.json()["id"] == 9
    )
    notification = await world.http[0].post(
        "/mcp", json=rpc("notifications/initialized", id=None), headers=headers
    )
    assert notification.status_code == 202 and notification.content == b""
    response = await world.http[0].post(
        "/mcp", json={"jsonrpc": "2.0", "id": 5, "result": {}}, headers=headers
    )  # a response to nothing the gateway asked (tests/integration/test_mcp_endpoint_asks.py)
    assert response.status_code == 400 and "Unknown response id 5" in response.json()["error"]["message"]
    empty = await world.http[0].post("/mcp", json=rpc("prompts/list"), headers=headers)
    assert empty.json()["result"] == {"prompts": []}


async def test_transport_rules(world: World) -> None:
    ann = world.ann.api_key
    assert (await world.http[0].get("/mcp", headers=bearer(ann))).status_code == 405
    no_key = await world.http[0].post("/mcp", json=rpc("initialize", INIT_PARAMS))
    assert no_key.status_code == 401 and no_key.headers["content-type"].startswith("application/problem+json")
    evil = await world.http[0].post(
        "/mcp", json=rpc("initialize", INIT_PARAMS), headers={**bearer(ann), "Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and "Origin" in evil.json()["error"]["message"]
    local = await world.http[0].post(
        "/mcp",
        json=rpc("initialize", INIT_PARAMS),
        headers={**bearer(ann), "Origin": "http://localhost:6274"},
    )
    assert local.status_code == 200
    version = await world.http[0].post(
        "/mcp", json=rpc("ping"), headers={**bearer(ann), "MCP-Protocol-Version": "1999-01-01"}
    )
    assert version.status_code == 400
    assert version.json()["error"]["code"] == -32022
    assert MODERN in version.json()["error"]["data"]["supported"]
    query_key = await world.http[0].post(f"/mcp?api_key={ann}", json=rpc("initialize", INIT_PARAMS))
    assert query_key.status_code == 401


async def test_cancellation_reaches_mcp_proxy_from_either_replica(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    headers = session_headers(world.ann.api_key, session)
    params = {"name": "github__slow", "arguments": {"seconds": 10}}
    slow = asyncio.create_task(
        world.http[0].post("/mcp", json=rpc("tools/call", params, id=77), headers=headers)
    )
    await eventually(lambda: asyncio.sleep(0, any(c.tool == "slow" for c in world.proxy.calls[-3:])))
    cancelled = rpc("notifications/cancelled", {"requestId": 77, "reason": "user"}, id=None)
    assert (await world.http[1].post("/mcp", json=cancelled, headers=headers)).status_code == 202
    answer = await asyncio.wait_for(slow, timeout=5)
    assert answer.json()["result"]["isError"] is True
    assert world.proxy.cancels[-1].request_id == world.proxy.calls[-1].request_id
    assert world.proxy.cancels[-1].caller.user_id == world.ann.user_id


# -- one server's endpoint ----------------------------------------------------------------------
async def test_one_servers_endpoint_shows_its_tools_unprefixed(world: World) -> None:
    ann = world.ann.api_key
    opened = await world.http[1].post(
        "/servers/github/mcp", json=rpc("initialize", INIT_PARAMS), headers=bearer(ann)
    )
    assert "`github`" in opened.json()["result"]["instructions"]  # not the `<server>__<tool>` of /mcp
    session = await initialize(world.http[0], ann, path="/servers/github/mcp")
    listed = await world.http[1].post(
        "/servers/github/mcp", json=rpc("tools/list"), headers=session_headers(ann, session)
    )
    names = [t["name"] for t in listed.json()["result"]["tools"]]
    assert "echo" in names and "dotted.name" in names and not any("__" in n for n in names)
    answer = await world.http[0].post(
        "/servers/github/mcp",
        json=rpc("tools/call", {"name": "dotted.name", "arguments": {}}),
        headers=session_headers(ann, session),
    )
    assert answer.status_code == 200 and "result" in answer.json()
    assert (world.proxy.calls[-1].server, world.proxy.calls[-1].tool) == ("github", "dotted.name")
    # The session belongs to that endpoint, and unknown servers have none.
    other = await world.http[0].post("/mcp", json=rpc("tools/list"), headers=session_headers(ann, session))
    assert other.status_code == 404
    unknown = await world.http[0].post(
        "/servers/notes/mcp", json=rpc("initialize", INIT_PARAMS), headers=bearer(ann)
    )
    assert unknown.status_code == 404 and "notes" in unknown.json()["error"]["message"]


# -- the stateless era (2026-07-28) -----------------------------------------------------------------
async def test_stateless_discover_list_and_call(world: World) -> None:
    ann = world.ann.api_key
    discover = await world.http[1].post(
        "/mcp",
        json=rpc("server/discover", {"_meta": MODERN_META}),
        headers=modern_headers(ann, "server/discover"),
    )
    assert discover.status_code == 200 and "mcp-session-id" not in discover.headers
    result = discover.json()["result"]
    assert MODERN in result["supportedVersions"] and "2025-11-25" in result["supportedVersions"]
    assert result["capabilities"]["tools"] == {}  # no subscriptions/listen: no listChanged claimed
    assert result["resultType"] == "complete" and result["ttlMs"] == 0 and result["cacheScope"] == "private"
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "gatehouse"
    listed = await world.http[0].post(
        "/mcp", json=rpc("tools/list", {"_meta": MODERN_META}), headers=modern_headers(ann, "tools/list")
    )
    assert listed.json()["result"]["resultType"] == "complete"
    assert "github__echo" in [t["name"] for t in listed.json()["result"]["tools"]]
    params = {"name": "github__echo", "arguments": {"a": 1}, "_meta": MODERN_META}
    called = await world.http[1].post(
        "/mcp", json=rpc("tools/call", params), headers=modern_headers(ann, "tools/call", "github__echo")
    )
    assert called.status_code == 200, called.text
    assert called.json()["result"]["resultType"] == "complete"
    assert json.loads(called.json()["result"]["content"][0]["text"])["arguments"] == {"a": 1}
    assert world.proxy.calls[-1].caller.user_id == world.ann.user_id
    # A stateless notification is accepted and dropped.
    note = await world.http[0].post(
        "/mcp", json=rpc("notifications/x", id=None), headers=modern_headers(ann, "notifications/x")
    )
    assert note.status_code == 202
    unknown = await world.http[0].post(
        "/mcp", json=rpc("resources/subscribe", {}), headers=modern_headers(ann, "resources/subscribe")
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32601


async def test_stateless_headers_must_match_the_body(world: World) -> None:
    ann = world.ann.api_key
    params = {"name": "github__echo", "arguments": {}, "_meta": MODERN_META}
    wrong_method = await world.http[0].post(
        "/mcp", json=rpc("tools/call", params), headers=modern_headers(ann, "tools/list")
    )
    assert wrong_method.status_code == 400 and wrong_method.json()["error"]["code"] == -32020
    wrong_name = await world.http[0].post(
        "/mcp", json=rpc("tools/call", params), headers=modern_headers(ann, "tools/call", "jira__echo")
    )
    assert wrong_name.status_code == 400 and wrong_name.json()["error"]["code"] == -32020
    missing_name = await world.http[0].post(
        "/mcp", json=rpc("tools/call", params), headers=modern_headers(ann, "tools/call")
    )
    assert missing_name.status_code == 400 and missing_name.json()["error"]["code"] == -32020
    encoded = await world.http[0].post(
        "/mcp",
        json=rpc("tools/call", params),
        headers=modern_headers(ann, "tools/call", "=?base64?Z2l0aHViX19lY2hv?="),
    )
    assert encoded.status_code == 200, encoded.text
    other_version = {
        **params,
        "_meta": {**MODERN_META, "io.modelcontextprotocol/protocolVersion": "2025-11-25"},
    }
    wrong_version = await world.http[0].post(
        "/mcp",
        json=rpc("tools/call", other_version),
        headers=modern_headers(ann, "tools/call", "github__echo"),
    )
    assert wrong_version.status_code == 400 and wrong_version.json()["error"]["code"] == -32020
    no_version = await world.http[0].post(
        "/mcp", json=rpc("tools/list"), headers={**bearer(ann), "Mcp-Method": "tools/list"}
    )
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == -32020
    # In a session, a contradicting Mcp-Method is refused too.
    session = await initialize(world.http[0], ann)
    contradicting = await world.http[0].post(
        "/mcp", json=rpc("tools/list"), headers={**session_headers(ann, session), "Mcp-Method": "tools/call"}
    )
    assert contradicting.status_code == 400 and contradicting.json()["error"]["code"] == -32020


async def test_stateless_call_is_cancelled_when_the_client_goes_away(world: World) -> None:
    params = {"name": "github__slow", "arguments": {"seconds": 10}, "_meta": MODERN_META}
    before = len(world.proxy.cancels)
    async with httpx.AsyncClient(base_url=world.urls[0], timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/mcp",
                json=rpc("tools/call", params),
                headers=modern_headers(world.ann.api_key, "tools/call", "github__slow"),
            )

    async def cancelled() -> bool:
        return len(world.proxy.cancels) > before

    await eventually(cancelled, timeout=5)
    assert world.proxy.cancels[-1].caller.user_id == world.ann.user_id


# -- the legacy HTTP+SSE transport --------------------------------------------------------------
async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    kind, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield kind, "\n".join(data)
            kind, data = "message", []


async def test_legacy_sse_stream_on_one_replica_posts_on_the_other(world: World) -> None:
    ann = world.ann.api_key
    async with (
        httpx.AsyncClient(base_url=world.urls[0], timeout=10) as stream_http,
        httpx.AsyncClient(base_url=world.urls[1], timeout=10) as post_http,
        stream_http.stream("GET", f"/sse?api_key={ann}") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        kind, endpoint = await anext(events)
        assert kind == "endpoint" and endpoint.startswith("/messages?session_id=")
        # No key on the POST: the session id stands in for it (the stream's key is checked).
        accepted = await post_http.post(endpoint, json=rpc("initialize", INIT_PARAMS, id=1))
        assert accepted.status_code == 202
        kind, data = await anext(events)
        assert kind == "message" and json.loads(data)["result"]["protocolVersion"] == "2025-06-18"
        params = {"name": "github__echo", "arguments": {"via": "sse"}}
        assert (
            await post_http.post(endpoint, json=rpc("tools/call", params, id=2), headers=bearer(ann))
        ).status_code == 202
        kind, data = await anext(events)
        message = json.loads(data)
        assert message["id"] == 2
        assert json.loads(message["result"]["content"][0]["text"])["arguments"] == {"via": "sse"}
        assert world.proxy.calls[-1].caller.user_id == world.ann.user_id
        # Another user's key on this session: as if it did not exist.
        foreign = await post_http.post(endpoint, json=rpc("ping", id=3), headers=bearer(world.bea.api_key))
        assert foreign.status_code == 404
        evil = await post_http.post(
            endpoint, json=rpc("ping", id=4), headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
    unknown = await world.http[1].post("/messages?session_id=nope", json=rpc("ping"))
    assert unknown.status_code == 404
    no_key = await world.http[1].get("/sse")
    assert no_key.status_code == 401


# -- the official SDK client, over real HTTP ----------------------------------------------------
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_official_sdk_client_lists_and_calls_tools(world: World, mode: str) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(
        headers=bearer(world.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        transport = streamable_http_client(f"{world.urls[1]}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            assert client.protocol_version == ("2025-11-25" if mode == "legacy" else MODERN)
            assert client.server_info is not None and client.server_info.name == "gatehouse"
            listed = await client.list_tools()
            names = [t.name for t in listed.tools]
            assert {"github__echo", "jira__echo", "wiki__echo"} <= set(names)
            result = await client.call_tool("github__echo", {"text": f"sdk {mode}"})
            assert not result.is_error
            assert json.loads(result.content[0].text)["arguments"] == {"text": f"sdk {mode}"}  # type: ignore[union-attr]
            failed = await client.call_tool("github__fail", {})
            assert failed.is_error
            shortened = exposed_name("github", "dotted.name")
            assert not (await client.call_tool(shortened, {})).is_error
    assert world.proxy.calls[-1].tool == "dotted.name"
    assert world.proxy.calls[-1].caller.user_id == world.ann.user_id


async def test_the_official_sdk_client_over_legacy_sse(world: World) -> None:
    from mcp import Client
    from mcp.client.sse import sse_client

    async with Client(
        sse_client(f"{world.urls[0]}/sse", headers=bearer(world.ann.api_key)), mode="legacy"
    ) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        assert "github__echo" in names
        result = await client.call_tool("jira__echo", {"over": "sse"})
        assert json.loads(result.content[0].text)["arguments"] == {"over": "sse"}  # type: ignore[union-attr]


async def test_a_revoked_key_stops_working_on_every_transport(world: World) -> None:
    http = world.http[0]
    issued = await http.post(
        "/v1/users/me/mcp-keys", json={"name": "short-lived"}, headers=bearer(world.ann.api_key)
    )
    assert issued.status_code == 201, issued.text
    key, key_id = issued.json()["api_key"], issued.json()["id"]
    session = await initialize(http, key)
    async with (
        httpx.AsyncClient(base_url=world.urls[0], timeout=10) as real,
        real.stream("GET", f"/sse?api_key={key}") as stream,
    ):
        events = sse_events(stream)
        _, endpoint = await anext(events)
        assert (await real.post(endpoint, json=rpc("ping", id=1))).status_code == 202
        assert (
            await http.delete(f"/v1/users/me/mcp-keys/{key_id}", headers=bearer(world.ann.api_key))
        ).status_code == 204

        async def refused() -> bool:
            keyless = await world.http[1].post(endpoint, json=rpc("ping", id=2))
            in_session = await world.http[1].post(
                "/mcp", json=rpc("ping"), headers=session_headers(key, session)
            )
            return keyless.status_code == 401 and in_session.status_code == 401

        await eventually(refused, timeout=5)


async def test_oversized_bodies_are_refused(world: World) -> None:
    session = await initialize(world.http[0], world.ann.api_key)
    huge = {"name": "github__echo", "arguments": {"blob": "x" * (world.apps[0].state.mcp.max_body_bytes + 1)}}
    answer = await world.http[0].post(
        "/mcp", json=rpc("tools/call", huge), headers=session_headers(world.ann.api_key, session)
    )
    assert answer.status_code == 413 and answer.json()["error"]["code"] == -32600


async def test_the_callers_trace_reaches_mcp_proxy(world: World) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    session = await initialize(world.http[0], world.ann.api_key)
    headers = {
        **session_headers(world.ann.api_key, session),
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
    }
    answer = await world.http[0].post(
        "/mcp", json=rpc("tools/call", {"name": "github__echo"}), headers=headers
    )
    assert answer.status_code == 200 and "result" in answer.json()
    assert (world.proxy.calls[-1].meta.trace.traceparent or "").split("-")[1] == trace_id
