"""The gateway with the real mcp_proxy (and secrets) service, in front of a real upstream: the
official SDK's MCPServer in tests/upstreams/echo_server.py, started by mcp_proxy over stdio.

The official SDK client talks to the gateway over real HTTP, in both protocol eras, and the
REST routes drive the same server; a secret the upstream needs is set through the gateway.
"""

import base64
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import LoggingMessageNotificationParams

from contracts.commands.identity import UserCreated
from services.secrets.bootstrap import build as secrets_build
from tests.helpers import eventually
from tests.integration.mcp_world import bearer, platform_settings, real_proxy

pytestmark = pytest.mark.integration

ECHO = str(Path(__file__).resolve().parents[1] / "upstreams" / "echo_server.py")
CONFORMANCE = str(Path(__file__).resolve().parents[1] / "upstreams" / "conformance_server.py")


@dataclass
class Stack:
    http: httpx.AsyncClient
    url: str
    ann: UserCreated
    bea: UserCreated


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_server: str) -> AsyncIterator[Stack]:
    master = "k1:" + base64.b64encode(os.urandom(32)).decode()
    with platform_settings(tmp_path_factory, postgres_server, GATEHOUSE_MASTER_KEYS=master) as settings:
        async with real_proxy(settings, also=((secrets_build, "secrets"),)) as platform:
            (app,), (url,) = platform.apps, platform.urls
            ann, bea = [await platform.user(e, "alpha") for e in ("ann@upstream.test", "bea@upstream.test")]
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gh"
            ) as http:

                async def known() -> bool:
                    return (await http.get("/v1/me", headers=bearer(ann.api_key))).status_code == 200

                await eventually(known, timeout=30)
                plain = {"name": "echo", "transport": "stdio", "command": sys.executable, "args": [ECHO]}
                created = await http.post("/v1/mcp/servers", json=plain, headers=bearer(ann.api_key))
                assert created.status_code == 201, created.text
                assert created.json()["requires_auth"] is False
                secret_env = {"TEST_UPSTREAM_TOKEN": {"secret": "upstream_token"}}
                vault = {**plain, "name": "vault", "env": secret_env}
                created = await http.post("/v1/mcp/servers", json=vault, headers=bearer(ann.api_key))
                assert created.status_code == 201, created.text
                assert created.json()["requires_auth"] is True
                yield Stack(http, url, ann, bea)


async def test_rest_routes_reach_the_upstream(stack: Stack) -> None:
    ann = bearer(stack.ann.api_key)
    probed = await stack.http.post("/v1/mcp/servers/echo/test", headers=ann)
    assert probed.status_code == 200, probed.text
    tools = await stack.http.get("/v1/mcp/echo/tools", headers=ann)
    assert tools.status_code == 200, tools.text
    by_name = {t["name"]: t for t in tools.json()}
    assert {"echo", "add", "whoami"} <= set(by_name)
    assert by_name["add"]["inputSchema"]["properties"]["a"]["type"] == "integer"
    executed = await stack.http.post(
        "/v1/mcp/echo/execute", json={"tool_name": "add", "arguments": {"a": 2, "b": 40}}, headers=ann
    )
    assert executed.status_code == 200, executed.text
    assert executed.json()["status"] == "success"
    assert executed.json()["result"]["content"][0]["text"] == "42"
    request_id = executed.json()["request_id"]

    async def in_history() -> bool:
        page = await stack.http.get("/v1/mcp/requests/history", params={"server": "echo"}, headers=ann)
        return page.status_code == 200 and request_id in {i["request_id"] for i in page.json()["items"]}

    await eventually(in_history, timeout=15)
    foreign = await stack.http.get("/v1/mcp/echo/tools", headers=bearer(stack.bea.api_key))
    assert foreign.status_code == 404


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_client_calls_the_upstream_through_the_gateway(stack: Stack, mode: str) -> None:
    async with httpx2.AsyncClient(
        headers=bearer(stack.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        async with Client(streamable_http_client(f"{stack.url}/mcp", http_client=http), mode=mode) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert {"echo__echo", "echo__add", "echo__sleep"} <= set(names)
            added = await client.call_tool("echo__add", {"a": 20, "b": 22})
            assert not added.is_error and added.content[0].text == "42"  # type: ignore[union-attr]
            echoed = await client.call_tool("echo__echo", {"text": f"über {mode}"})
            assert echoed.content[0].text == f"über {mode}"  # type: ignore[union-attr]
            invalid = await client.call_tool("echo__add", {"a": "not a number"})
            assert invalid.is_error  # the upstream's own validation error, passed through


async def test_one_servers_endpoint_with_the_sdk_client(stack: Stack) -> None:
    async with httpx2.AsyncClient(
        headers=bearer(stack.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        url = f"{stack.url}/servers/echo/mcp"
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert "echo" in names and "add" in names
            assert (await client.call_tool("add", {"a": 1, "b": 1})).content[0].text == "2"  # type: ignore[union-attr]


async def test_the_conformance_fixtures_content_passes_through_unchanged(stack: Stack) -> None:
    """What the official conformance suite checks of tools (docs/mcp-conformance.md), without Node."""
    bea = bearer(stack.bea.api_key)
    spec = {"name": "conformance", "transport": "stdio", "command": sys.executable, "args": [CONFORMANCE]}
    created = await stack.http.post("/v1/mcp/servers", json=spec, headers=bea)
    assert created.status_code == 201, created.text
    async with httpx2.AsyncClient(headers=bea, timeout=httpx2.Timeout(30, read=60)) as http:
        url = f"{stack.url}/servers/conformance/mcp"
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            schema = tools["json_schema_2020_12_tool"].input_schema  # JSON Schema 2020-12 kept as sent
            assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
            assert "address" in schema["$defs"] and schema["additionalProperties"] is False
            mixed = await client.call_tool("test_multiple_content_types", {})
            assert [c.type for c in mixed.content] == ["text", "image", "resource"]
            audio = (await client.call_tool("test_audio_content", {})).content[0]
            assert audio.type == "audio" and audio.mime_type == "audio/wav" and audio.data
            failed = await client.call_tool("test_error_handling", {})
            assert failed.is_error and "intentionally" in failed.content[0].text  # type: ignore[union-attr]


async def test_a_missing_secret_is_named_and_then_set_through_the_gateway(stack: Stack) -> None:
    ann = bearer(stack.ann.api_key)
    session = await stack.http.post(
        "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}},
        headers=ann,
    )
    headers = {**ann, "Mcp-Session-Id": session.headers["mcp-session-id"]}
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "vault__whoami", "arguments": {}},
    }
    missing = (await stack.http.post("/mcp", json=call, headers=headers)).json()
    assert "error" in missing, missing
    assert missing["error"]["code"] == -32002 and "upstream_token" in missing["error"]["message"]
    assert "/v1/secrets/upstream_token" in missing["error"]["message"]
    assert (
        await stack.http.put("/v1/secrets/upstream_token", json={"value": "s3cret"}, headers=ann)
    ).status_code == 200

    async def whoami() -> str | None:
        body = (await stack.http.post("/mcp", json=call, headers=headers)).json()
        result = body.get("result")
        return result["content"][0]["text"] if result and not result.get("isError") else None

    assert await eventually(whoami, timeout=15) == hashlib.sha256(b"s3cret").hexdigest()
    assert "s3cret" not in json.dumps(missing)


async def _fixtures_for(stack: Stack, name: str) -> dict[str, str]:
    """The conformance fixture upstream (progress and logging tools) as a server of ann's."""
    ann = bearer(stack.ann.api_key)
    spec = {"name": name, "transport": "stdio", "command": sys.executable, "args": [CONFORMANCE]}
    created = await stack.http.post("/v1/mcp/servers", json=spec, headers=ann)
    assert created.status_code in (201, 409), created.text  # 409: the other mode registered it
    return ann


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_and_logs_reach_the_sdk_client_before_the_result(stack: Stack, mode: str) -> None:
    ann = await _fixtures_for(stack, "fixtures")
    progress: list[tuple[float, float | None, str | None]] = []
    logs: list[LoggingMessageNotificationParams] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async with httpx2.AsyncClient(headers=ann, timeout=httpx2.Timeout(30, read=60)) as http:
        transport = streamable_http_client(f"{stack.url}/mcp", http_client=http)
        # log_level: the stateless era's per-request opt-in (no effect in the handshake era)
        async with Client(transport, mode=mode, logging_callback=on_log, log_level="debug") as client:
            if mode == "legacy":  # the handshake era's opt-in
                await client.set_logging_level("debug")
            result = await client.call_tool(
                "fixtures__test_tool_with_progress", {}, progress_callback=on_progress
            )
            assert result.content[0].text == "Tool with progress executed successfully"  # type: ignore[union-attr]
            # routed by the SDK to this call's callback: the upstream's token was replaced by its own
            assert progress == [(p, 100, f"Completed step {p:g} of 100") for p in (0, 50, 100)]
            result = await client.call_tool("fixtures__test_tool_with_logging", {})
            assert result.content[0].text == "Tool with logging executed successfully"  # type: ignore[union-attr]
            assert [(m.level, m.data) for m in logs] == [
                ("info", "Tool execution started"),
                ("info", "Tool processing data"),
                ("info", "Tool execution completed"),
            ]
            plain = await client.call_tool("echo__add", {"a": 1, "b": 2}, progress_callback=on_progress)
            assert plain.content[0].text == "3" and len(progress) == 3  # type: ignore[union-attr]


def _events(body: str) -> list[dict[str, Any]]:
    """The `message` events of an SSE body, decoded."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        if "event: message" in lines:
            events.append(
                json.loads("".join(line[len("data: ") :] for line in lines if line.startswith("data: ")))
            )
    return events


async def test_a_call_with_notifications_is_answered_as_sse_and_one_without_as_json(stack: Stack) -> None:
    ann = await _fixtures_for(stack, "fixtures")
    both = {"Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}
    opened = await stack.http.post("/mcp", json=init, headers={**ann, **both})
    session = {**ann, **both, "Mcp-Session-Id": opened.headers["mcp-session-id"]}

    def call(tool: str, token: str | None = None, rid: int = 2) -> dict[str, Any]:
        params: dict[str, Any] = {"name": tool, "arguments": {}}
        if token is not None:
            params["_meta"] = {"progressToken": token}
        return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}

    streamed = await stack.http.post(
        "/mcp", json=call("fixtures__test_tool_with_progress", "tok-1"), headers=session
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"] == "text/event-stream"
    *notes, final = _events(streamed.text)
    assert [n["method"] for n in notes] == ["notifications/progress"] * 3
    assert [n["params"]["progressToken"] for n in notes] == ["tok-1"] * 3  # the client's own token
    assert [n["params"]["progress"] for n in notes] == [0, 50, 100]
    assert final["id"] == 2 and final["result"]["content"][0]["text"].startswith("Tool with progress")

    level = {"jsonrpc": "2.0", "id": 9, "method": "logging/setLevel", "params": {"level": "info"}}
    assert (await stack.http.post("/mcp", json=level, headers=session)).json()["result"] == {}
    logged = await stack.http.post(
        "/mcp", json=call("fixtures__test_tool_with_logging", rid=3), headers=session
    )
    assert logged.headers["content-type"] == "text/event-stream"
    *notes, final = _events(logged.text)
    assert [(n["method"], n["params"]["data"]) for n in notes] == [
        ("notifications/message", "Tool execution started"),
        ("notifications/message", "Tool processing data"),
        ("notifications/message", "Tool execution completed"),
    ]
    assert final["id"] == 3 and "result" in final

    # nothing sent during the call, or a client that does not accept SSE: plain JSON as before
    quiet = await stack.http.post("/mcp", json=call("echo__echo", "tok-2", rid=4), headers=session)
    assert quiet.headers["content-type"] == "application/json" and quiet.json()["id"] == 4
    json_only = {**session, "Accept": "application/json"}
    plain = await stack.http.post(
        "/mcp", json=call("fixtures__test_tool_with_progress", "tok-3", 5), headers=json_only
    )
    assert plain.headers["content-type"] == "application/json"
    assert plain.json()["result"]["content"][0]["text"].startswith("Tool with progress")


async def test_the_legacy_sse_transport_carries_progress_before_the_result(stack: Stack) -> None:
    ann = await _fixtures_for(stack, "fixtures")
    progress: list[float] = []
    logs: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async with Client(
        sse_client(f"{stack.url}/sse", headers=ann), mode="legacy", logging_callback=on_log
    ) as client:
        await client.set_logging_level("info")
        result = await client.call_tool(
            "fixtures__test_tool_with_progress", {}, progress_callback=on_progress
        )
        assert result.content[0].text.startswith("Tool with progress")  # type: ignore[union-attr]
        assert progress == [0, 50, 100]
        await client.call_tool("fixtures__test_tool_with_logging", {})
        assert logs == ["Tool execution started", "Tool processing data", "Tool execution completed"]
