"""Resources, prompts and completions of one server's upstream on `/servers/{name}/mcp`:
the gateway and the real mcp_proxy in front of the conformance fixture upstream
(tests/upstreams/conformance_server.py), once over stdio and once over Streamable HTTP.

The official SDK client drives the endpoint in both protocol eras; raw JSON-RPC checks the
refusals (a method off the allow-list, bad params, another user's server, `/mcp`).
"""

import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import msgspec
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import BlobResourceContents, PromptReference, TextResourceContents

from contracts.commands.identity import UserCreated
from contracts.events.mcp import UpstreamRequestCompleted
from services.kit.bus import Bus
from tests.helpers import eventually, http_upstream, stream_envelopes
from tests.integration.mcp_world import MODERN, bearer, platform_settings, real_proxy

pytestmark = pytest.mark.integration

UPSTREAMS = Path(__file__).resolve().parents[1] / "upstreams"
CONFORMANCE = str(UPSTREAMS / "conformance_server.py")
ECHO = str(UPSTREAMS / "echo_server.py")
INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "test", "version": "1"},
}


@dataclass
class Stack:
    http: httpx.AsyncClient
    url: str
    bus: Bus
    ann: UserCreated
    bea: UserCreated


@pytest.fixture(scope="module")
def http_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The conformance fixture over Streamable HTTP, as a remote upstream."""
    log = tmp_path_factory.mktemp("upstream") / "conformance.log"
    with http_upstream(CONFORMANCE, "--http", log=log) as port:
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: str, http_fixture: str
) -> AsyncIterator[Stack]:
    with (
        pytest.MonkeyPatch.context() as env,
        platform_settings(tmp_path_factory, postgres_server) as settings,
    ):
        env.setenv("GATEHOUSE_MCP_ALLOW_PRIVATE", "127.0.0.1")  # the HTTP fixture is on loopback
        async with real_proxy(settings) as platform:
            (app,), (url,), bus = platform.apps, platform.urls, platform.bus
            ann, bea = [await platform.user(e, "alpha") for e in ("ann@forward.test", "bea@forward.test")]
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gh", timeout=60
            ) as http:

                async def known() -> bool:
                    return (await http.get("/v1/me", headers=bearer(ann.api_key))).status_code == 200

                await eventually(known, timeout=30)
                stdio = {"transport": "stdio", "command": sys.executable}
                for who, spec in (
                    (ann, {**stdio, "name": "fixture", "args": [CONFORMANCE]}),
                    (ann, {"name": "remote", "transport": "http", "url": http_fixture}),
                    (ann, {**stdio, "name": "echo", "args": [ECHO]}),
                    (bea, {**stdio, "name": "own", "args": [ECHO]}),
                ):
                    created = await http.post("/v1/mcp/servers", json=spec, headers=bearer(who.api_key))
                    assert created.status_code == 201, created.text
                yield Stack(http, url, bus, ann, bea)


def rpc(method: str, params: dict[str, Any] | None = None, id: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        body["params"] = params
    return body


async def session(stack: Stack, server: str, key: str) -> dict[str, str]:
    opened = await stack.http.post(
        f"/servers/{server}/mcp", json=rpc("initialize", INIT), headers=bearer(key)
    )
    assert opened.status_code == 200, opened.text
    return {**bearer(key), "Mcp-Session-Id": opened.headers["mcp-session-id"]}


@pytest.mark.parametrize("server", ["fixture", "remote"])  # a stdio and an HTTP upstream
@pytest.mark.parametrize("mode", ["legacy", "auto"])  # handshake era, stateless era
async def test_the_sdk_client_reads_resources_prompts_and_completions(
    stack: Stack, server: str, mode: str
) -> None:
    async with httpx2.AsyncClient(
        headers=bearer(stack.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        url = f"{stack.url}/servers/{server}/mcp"
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            caps = client.server_capabilities
            assert caps.resources is not None and caps.prompts is not None and caps.completions is not None
            assert not caps.resources.subscribe  # updates would need a stream the gateway does not relay

            uris = {str(r.uri) for r in (await client.list_resources()).resources}
            assert {"test://static-text", "test://static-binary", "test://watched-resource"} <= uris
            text = (await client.read_resource("test://static-text")).contents[0]
            assert isinstance(text, TextResourceContents)
            assert text.text == "This is the content of the static text resource."
            binary = (await client.read_resource("test://static-binary")).contents[0]
            assert isinstance(binary, BlobResourceContents)
            assert binary.mime_type == "image/png" and binary.blob.startswith("iVBORw0KGgo")

            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["test://template/{id}/data"]
            filled = (await client.read_resource("test://template/123/data")).contents[0]
            assert isinstance(filled, TextResourceContents) and '"id": "123"' in filled.text

            prompts = {p.name: p for p in (await client.list_prompts()).prompts}
            assert {"test_simple_prompt", "test_prompt_with_arguments", "test_prompt_with_image"} <= set(
                prompts
            )
            assert [a.name for a in prompts["test_prompt_with_arguments"].arguments or []] == ["arg1", "arg2"]
            got = await client.get_prompt("test_prompt_with_arguments", {"arg1": "one", "arg2": "two"})
            assert got.messages[0].content.text == "Prompt with arguments: arg1='one', arg2='two'"  # type: ignore[union-attr]
            image = await client.get_prompt("test_prompt_with_image")
            assert image.messages[0].content.type == "image"

            completed = await client.complete(
                PromptReference(type="ref/prompt", name="test_prompt_with_arguments"),
                {"name": "arg1", "value": "t"},
            )
            assert completed.completion.values == []

            with pytest.raises(MCPError) as unknown:  # the upstream's own error, passed on
                await client.read_resource("test://no-such-resource")
            assert "test://no-such-resource" in unknown.value.message

            tools = [t.name for t in (await client.list_tools()).tools]
            assert "test_simple_text" in tools  # tools as before


async def test_subscriptions_are_forwarded_but_not_declared(stack: Stack) -> None:
    ann = await session(stack, "fixture", stack.ann.api_key)
    for method in ("resources/subscribe", "resources/unsubscribe"):
        answer = await stack.http.post(
            "/servers/fixture/mcp", json=rpc(method, {"uri": "test://watched-resource"}), headers=ann
        )
        assert answer.status_code == 200 and answer.json()["result"] == {}, answer.text
    # echo_server declares resources without `subscribe`: asked, it would refuse anyway
    echo = await session(stack, "echo", stack.ann.api_key)
    refused = await stack.http.post(
        "/servers/echo/mcp", json=rpc("resources/subscribe", {"uri": "test://x"}), headers=echo
    )
    assert refused.json()["error"]["code"] == -32601 and "resources" in refused.json()["error"]["message"]


async def test_what_an_upstream_lacks_is_neither_declared_nor_asked(stack: Stack) -> None:
    opened = await stack.http.post(
        "/servers/echo/mcp", json=rpc("initialize", INIT), headers=bearer(stack.ann.api_key)
    )
    caps = opened.json()["result"]["capabilities"]
    assert "completions" not in caps and caps["resources"] == {} and caps["prompts"] == {}
    echo = {**bearer(stack.ann.api_key), "Mcp-Session-Id": opened.headers["mcp-session-id"]}
    listed = await stack.http.post("/servers/echo/mcp", json=rpc("resources/list"), headers=echo)
    assert listed.json()["result"] == {"resources": []}  # the upstream's own (empty) list
    params = {"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": "b"}}
    complete = await stack.http.post(
        "/servers/echo/mcp", json=rpc("completion/complete", params), headers=echo
    )
    assert complete.json()["error"]["code"] == -32601


async def test_refusals_are_json_rpc_errors(stack: Stack) -> None:
    ann = await session(stack, "fixture", stack.ann.api_key)

    async def error_of(body: dict[str, Any], path: str = "/servers/fixture/mcp") -> dict[str, Any]:
        answer = await stack.http.post(path, json=body, headers=ann)
        assert answer.status_code == 200, answer.text  # a session answers errors with 200
        error: dict[str, Any] = answer.json()["error"]
        return error

    assert (await error_of(rpc("tasks/list")))["code"] == -32601  # off the allow-list
    assert (await error_of(rpc("sampling/createMessage", {})))["code"] == -32601
    assert (await error_of(rpc("resources/read", {})))["code"] == -32602  # no uri
    assert (await error_of(rpc("resources/read", {"uri": 7})))["code"] == -32602
    assert (await error_of(rpc("prompts/get", {"name": "p", "arguments": {"n": 1}})))["code"] == -32602
    assert (await error_of(rpc("completion/complete", {"ref": {"type": "ref/prompt"}})))["code"] == -32602
    unknown = await error_of(rpc("resources/read", {"uri": "test://nope"}))  # the upstream's error
    assert unknown == {
        "code": -32602,
        "message": "Unknown resource: test://nope",
        "data": {"uri": "test://nope"},
    }
    missing = await error_of(rpc("prompts/get", {"name": "test_prompt_with_arguments"}))
    assert "arg1" in missing["message"]


async def test_another_users_server_is_not_reachable(stack: Stack) -> None:
    bea = stack.bea.api_key
    for server in ("fixture", "remote"):  # ann's servers
        opened = await stack.http.post(
            f"/servers/{server}/mcp", json=rpc("initialize", INIT), headers=bearer(bea)
        )
        assert opened.status_code == 404 and server in opened.json()["error"]["message"]
    headers = {
        **bearer(bea),
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "resources/read",
        "Mcp-Name": "test://static-text",
    }
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN}
    stateless = await stack.http.post(
        "/servers/fixture/mcp",
        json=rpc("resources/read", {"uri": "test://static-text", "_meta": meta}),
        headers=headers,
    )
    assert stateless.status_code == 400 and stateless.json()["error"]["code"] == -32602
    assert "fixture" in stateless.json()["error"]["message"] and "result" not in stateless.json()
    # bea's own session on her own server reaches only her server
    own = await session(stack, "own", bea)
    listed = await stack.http.post("/servers/own/mcp", json=rpc("prompts/list"), headers=own)
    assert listed.json()["result"] == {"prompts": []}


async def test_the_merged_endpoint_keeps_tools_only(stack: Stack) -> None:
    opened = await stack.http.post("/mcp", json=rpc("initialize", INIT), headers=bearer(stack.ann.api_key))
    assert set(opened.json()["result"]["capabilities"]) == {"tools", "logging"}
    headers = {**bearer(stack.ann.api_key), "Mcp-Session-Id": opened.headers["mcp-session-id"]}
    listed = await stack.http.post("/mcp", json=rpc("resources/list"), headers=headers)
    assert listed.json()["result"] == {"resources": []}
    read = await stack.http.post(
        "/mcp", json=rpc("resources/read", {"uri": "test://static-text"}), headers=headers
    )
    assert read.json()["error"]["code"] == -32601 and "/servers/{name}/mcp" in read.json()["error"]["message"]


async def test_reads_are_recorded_without_their_content_and_not_as_tool_calls(stack: Stack) -> None:
    async def recorded() -> list[UpstreamRequestCompleted]:
        envelopes = await stream_envelopes(stack.bus, "events.mcp_proxy.upstream_request_completed")
        events = [msgspec.json.decode(e.data, type=UpstreamRequestCompleted) for e in envelopes]
        return [e for e in events if e.user_id == stack.ann.user_id]

    await stack.bus.nc.flush()
    before = len(await recorded())
    ann = await session(stack, "fixture", stack.ann.api_key)
    uri = "test://template/secret-looking-quokka/data"
    read = await stack.http.post(
        "/servers/fixture/mcp", json=rpc("resources/read", {"uri": uri}), headers=ann
    )
    assert "quokka" in read.text
    missing = await stack.http.post(
        "/servers/fixture/mcp", json=rpc("resources/read", {"uri": "test://quokka-missing"}), headers=ann
    )
    assert "quokka-missing" in missing.json()["error"]["message"]  # the caller sees the upstream's text
    listed = await stack.http.post("/servers/fixture/mcp", json=rpc("prompts/list"), headers=ann)
    assert "result" in listed.json()  # listings are not recorded

    async def two_more() -> list[UpstreamRequestCompleted]:
        events = await recorded()
        return events[before:] if len(events) >= before + 2 else []

    event, failed = await eventually(two_more, timeout=15)
    assert (event.server, event.method, event.status, event.outcome) == (
        "fixture",
        "resources/read",
        "success",
        "success",
    )
    assert (failed.status, failed.outcome, failed.error) == (
        "error",
        "failure",
        "The upstream answered with JSON-RPC error -32602.",
    )
    assert event.result_bytes > 0 and len(event.params_sha256) == 64 and event.params_bytes > len(uri)
    envelopes = await stream_envelopes(stack.bus, "events.mcp_proxy.>")
    assert not any(b"quokka" in bytes(e.data) for e in envelopes)  # neither the URI nor the content
    history = await stack.http.get("/v1/mcp/requests/history", headers=bearer(stack.ann.api_key))
    assert history.status_code == 200 and all(i["server"] != "fixture" for i in history.json()["items"])
