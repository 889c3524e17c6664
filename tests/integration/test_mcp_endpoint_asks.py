"""An upstream's sampling and elicitation requests during a tool call, relayed to the MCP client
and its answers back (docs/mcp-endpoint.md, "Sampling and elicitation").

Real NATS and PostgreSQL, the real mcp_proxy, two gateway replicas over real HTTP, and the
conformance fixture upstream (tests/upstreams/conformance_server.py) over stdio and over
Streamable HTTP. The official SDK client answers with its callbacks; raw HTTP shows the
routing: the request on one replica's stream, the response POSTed to the other, and the
refusals (a forged id, another session's, another user's, a call that is over).
"""

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import (
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequestParams,
    ElicitResult,
    TextContent,
)

from contracts.commands.identity import UserCreated
from tests.helpers import eventually, http_upstream
from tests.integration.mcp_world import bearer, platform_settings, real_proxy

pytestmark = pytest.mark.integration

UPSTREAMS = Path(__file__).resolve().parents[1] / "upstreams"
CONFORMANCE = str(UPSTREAMS / "conformance_server.py")
HANDSHAKE_ONLY = str(UPSTREAMS / "handshake_server.py")  # the same tools, handshake era only
SSE = {"Accept": "application/json, text/event-stream"}


@dataclass
class Stack:
    urls: list[str]  # two gateway replicas over real HTTP
    ann: UserCreated
    bea: UserCreated


@pytest.fixture(scope="module")
def http_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("upstream") / "conformance.log"
    with http_upstream(HANDSHAKE_ONLY, log=log) as port:
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
        async with real_proxy(settings, replicas=2) as platform:
            url0, url1 = platform.urls
            ann, bea = [await platform.user(e, "alpha") for e in ("ann@asks.test", "bea@asks.test")]
            async with httpx.AsyncClient(base_url=url0, timeout=60) as http:

                async def known() -> bool:
                    return (await http.get("/v1/me", headers=bearer(bea.api_key))).status_code == 200

                await eventually(known, timeout=30)
                stdio = {"transport": "stdio", "command": sys.executable, "args": [CONFORMANCE]}
                for who, spec in (
                    (ann, {**stdio, "name": "fixture"}),
                    (ann, {"name": "remote", "transport": "http", "url": http_fixture}),
                    (bea, {**stdio, "name": "fixture"}),
                ):
                    created = await http.post("/v1/mcp/servers", json=spec, headers=bearer(who.api_key))
                    assert created.status_code == 201, created.text
            yield Stack([url0, url1], ann, bea)


class Answers:
    """The SDK client's callbacks: what they were asked, and what they answer."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.elicited: list[dict[str, Any]] = []

    async def sampling(
        self, ctx: ClientRequestContext, params: CreateMessageRequestParams
    ) -> CreateMessageResult:
        content = params.messages[0].content
        self.prompts.append(content.text if isinstance(content, TextContent) else "?")
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="pong from the client"), model="test-llm"
        )

    async def elicitation(self, ctx: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        schema = params.requested_schema  # type: ignore[union-attr]  # form mode
        self.elicited.append(schema)
        if "username" in schema["properties"]:
            return ElicitResult(action="accept", content={"username": "ann", "email": "ann@asks.test"})
        return ElicitResult(action="decline")


@pytest.mark.parametrize("server", ["fixture", "remote"])  # a stdio and an HTTP upstream
async def test_the_sdk_clients_answers_reach_the_upstream(stack: Stack, server: str) -> None:
    answers = Answers()
    async with httpx2.AsyncClient(
        headers=bearer(stack.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        url = f"{stack.urls[0]}/servers/{server}/mcp"
        async with Client(
            streamable_http_client(url, http_client=http),
            mode="legacy",
            sampling_callback=answers.sampling,
            elicitation_callback=answers.elicitation,
        ) as client:
            sampled = await client.call_tool("test_sampling", {"prompt": "ping from the upstream"})
            assert sampled.content[0].text == "LLM response: pong from the client"  # type: ignore[union-attr]
            assert answers.prompts == ["ping from the upstream"]
            elicited = await client.call_tool("test_elicitation", {"message": "Who are you?"})
            text = elicited.content[0].text  # type: ignore[union-attr]
            assert text.startswith("User response: action=accept")
            assert json.loads(text.split("content=", 1)[1]) == {"username": "ann", "email": "ann@asks.test"}
            defaults = await client.call_tool("test_elicitation_sep1034_defaults", {})
            assert defaults.content[0].text == "Elicitation completed: action=decline, content={}"  # type: ignore[union-attr]
            props = answers.elicited[1]["properties"]  # SEP-1034: the defaults reach the client
            assert props["name"]["default"] == "John Doe" and props["verified"]["default"] is True


async def test_a_client_that_declared_nothing_is_not_asked(stack: Stack) -> None:
    async with httpx2.AsyncClient(
        headers=bearer(stack.ann.api_key), timeout=httpx2.Timeout(30, read=60)
    ) as http:
        for server, mode in (("fixture", "legacy"), ("remote", "legacy"), ("fixture", "auto")):
            answers = Answers()
            url = f"{stack.urls[1]}/servers/{server}/mcp"
            # "auto": the stateless era, which has no server-to-client requests on a call's stream
            callbacks: dict[str, Any] = {"sampling_callback": answers.sampling} if mode == "auto" else {}
            async with Client(
                streamable_http_client(url, http_client=http), mode=mode, **callbacks
            ) as client:
                sampled = await client.call_tool("test_sampling", {"prompt": "anyone?"})
                text = sampled.content[0].text  # type: ignore[union-attr]
                assert text.startswith("Sampling not supported or error:"), (server, mode, text)
                assert "does not serve sampling/createMessage" in text
                assert answers.prompts == []


async def test_the_legacy_sse_transport_relays_sampling(stack: Stack) -> None:
    answers = Answers()
    async with Client(
        sse_client(f"{stack.urls[1]}/sse", headers=bearer(stack.ann.api_key)),
        mode="legacy",
        sampling_callback=answers.sampling,
    ) as client:
        sampled = await client.call_tool("fixture__test_sampling", {"prompt": "over /sse"})
        assert sampled.content[0].text == "LLM response: pong from the client"  # type: ignore[union-attr]
        assert answers.prompts == ["over /sse"]


async def _session(http: httpx.AsyncClient, key: str, caps: dict[str, Any]) -> dict[str, str]:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": caps,
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    opened = await http.post("/servers/fixture/mcp", json=init, headers={**bearer(key), **SSE})
    assert opened.status_code == 200, opened.text
    return {**bearer(key), **SSE, "Mcp-Session-Id": opened.headers["mcp-session-id"]}


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif not line and data:
            yield json.loads("".join(data))
            data = []


async def test_a_response_reaches_the_call_through_any_replica_and_only_its_own(stack: Stack) -> None:
    ann, bea = stack.ann.api_key, stack.bea.api_key
    async with (
        httpx.AsyncClient(base_url=stack.urls[0], timeout=60) as one,
        httpx.AsyncClient(base_url=stack.urls[1], timeout=60) as two,
    ):
        mine = await _session(one, ann, {"sampling": {}})
        other_session = await _session(two, ann, {"sampling": {}})  # the same user's, another session
        foreign = await _session(two, bea, {"sampling": {}})
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "test_sampling", "arguments": {"prompt": "routed"}},
        }

        def respond(rid: Any, text: str = "answered on the other replica") -> dict[str, Any]:
            result = {"role": "assistant", "content": {"type": "text", "text": text}, "model": "m"}
            return {"jsonrpc": "2.0", "id": rid, "result": result}

        async with one.stream("POST", "/servers/fixture/mcp", json=call, headers=mine) as streamed:
            assert streamed.headers["content-type"] == "text/event-stream"
            events = _events(streamed)
            asked = await anext(events)
            assert asked["method"] == "sampling/createMessage"
            assert asked["params"]["messages"][0]["content"]["text"] == "routed"
            rid = asked["id"]
            assert isinstance(rid, str) and rid.startswith("gh.")

            forged = rid[:-4] + ("AAAA" if not rid.endswith("AAAA") else "BBBB")
            for headers, body in (
                (mine, respond(forged)),  # a garbled MAC
                (mine, respond(12)),  # an id the gateway never made
                (other_session, respond(rid)),  # the same user, another session
                (foreign, respond(rid)),  # another user
            ):
                refused = await two.post("/servers/fixture/mcp", json=body, headers=headers)
                assert refused.status_code == 400, refused.text
                error = refused.json()["error"]
                assert error["code"] == -32600 and "Unknown response id" in error["message"]
            not_object = await two.post(
                "/servers/fixture/mcp", json={"jsonrpc": "2.0", "id": rid, "result": 3}, headers=mine
            )
            assert not_object.status_code == 400

            taken = await two.post("/servers/fixture/mcp", json=respond(rid), headers=mine)
            assert taken.status_code == 202 and taken.content == b""
            again = await two.post("/servers/fixture/mcp", json=respond(rid), headers=mine)
            assert again.status_code == 409, again.text  # taken once only
            final = await anext(events)
            assert final["id"] == 7
            assert final["result"]["content"][0]["text"] == "LLM response: answered on the other replica"

        late = await one.post("/servers/fixture/mcp", json=respond(rid), headers=mine)
        assert late.status_code == 409 and "no longer waiting" in late.json()["error"]["message"]


async def test_a_client_error_goes_back_to_the_upstream(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.urls[1], timeout=60) as http:
        mine = await _session(http, stack.ann.api_key, {"elicitation": {}})
        call = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "test_elicitation", "arguments": {"message": "Name?"}},
        }
        async with http.stream("POST", "/servers/fixture/mcp", json=call, headers=mine) as streamed:
            events = _events(streamed)
            asked = await anext(events)
            assert asked["method"] == "elicitation/create"
            error = {"code": -32600, "message": "the user closed the dialog"}
            refused = await http.post(
                "/servers/fixture/mcp",
                json={"jsonrpc": "2.0", "id": asked["id"], "error": error},
                headers=mine,
            )
            assert refused.status_code == 202, refused.text
            final = await asyncio.wait_for(anext(events), 30)
            text = final["result"]["content"][0]["text"]
            assert text.startswith("Elicitation not supported or error:") and "closed the dialog" in text
