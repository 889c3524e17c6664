"""The MCP fast lane (services/gateway/adapters/http/mcp_fast.py): which requests it takes,
that it hands every refusal to Litestar, and that an error inside answers as Litestar would."""

import asyncio
from typing import Any

import msgspec
import pytest
from litestar import Litestar

from services.gateway.adapters.http import mcp_endpoint
from services.gateway.adapters.http.mcp_fast import McpFastLane, endpoint_of
from services.gateway.domain import Denied, Principal

KEY = "mcp_" + "k" * 44
ANN = Principal("u1", "ann@alpha.test", "o1", "free", False, "k1")


def scope(path: str = "/mcp", method: str = "POST", **extra: Any) -> dict[str, Any]:
    headers = [(b"host", b"gatehouse.test"), (b"authorization", f"Bearer {KEY}".encode())]
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5000),
        "query_string": b"",
        "headers": headers,
        **extra,
    }


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [
        ("/mcp", "POST", (True, None)),
        ("/servers/github/mcp", "POST", (True, "github")),
        ("/servers/my-notes_2/mcp", "POST", (True, "my-notes_2")),
        ("/mcp", "GET", (False, None)),
        ("/mcp", "DELETE", (False, None)),
        ("/mcp/", "POST", (False, None)),
        ("/mcpx", "POST", (False, None)),
        ("/servers/mcp", "POST", (False, None)),
        ("/servers//mcp", "POST", (False, None)),
        ("/servers/a/b/mcp", "POST", (False, None)),
        ("/servers/github/mcp/", "POST", (False, None)),
        ("/sse", "POST", (False, None)),
        ("/messages", "POST", (False, None)),
        ("/v1/mcp/servers", "POST", (False, None)),
    ],
)
def test_the_lane_takes_only_mcp_posts_on_normal_paths(
    path: str, method: str, expected: tuple[bool, str | None]
) -> None:
    assert endpoint_of(scope(path, method)) == expected


def test_the_lane_leaves_websockets_and_mounted_apps_to_litestar() -> None:
    assert endpoint_of(scope(type="websocket")) == (False, None)
    assert endpoint_of(scope(root_path="/gatehouse")) == (False, None)


class FakeGateway:
    def __init__(self, answer: Principal | Denied, ready: bool = True) -> None:
        self.answer = answer
        self.view_ready = asyncio.Event()
        if ready:
            self.view_ready.set()
        self.used: list[Principal] = []

    def authenticate(self, key: str) -> Principal | Denied:
        assert key == KEY
        return self.answer

    async def note_use(self, principal: Principal) -> None:
        self.used.append(principal)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []

    async def slow(self, s: Any, receive: Any, send: Any) -> None:
        self.calls.append(s)

    async def send(self, message: Any) -> None:
        self.sent.append(message)


async def receive() -> Any:
    return {"type": "http.request", "body": b"", "more_body": False}


@pytest.mark.parametrize(
    ("answer", "ready", "headers"),
    [
        (Denied.REVOKED, True, None),
        (Denied.UNKNOWN, True, None),
        (ANN, False, None),  # the key view is still loading: Litestar answers 503
        (ANN, True, [(b"authorization", b"Basic abc")]),  # malformed: Litestar answers and reports
        (ANN, True, [(b"host", b"bad host"), (b"authorization", f"Bearer {KEY}".encode())]),
    ],
)
async def test_every_refusal_goes_through_litestar(
    answer: Principal | Denied, ready: bool, headers: list[tuple[bytes, bytes]] | None
) -> None:
    gateway = FakeGateway(answer, ready)
    lane = McpFastLane(Litestar(route_handlers=[]), gateway)
    s = scope() if headers is None else scope(headers=headers)
    recorder = Recorder()
    await lane(s, receive, recorder.send, None, recorder.slow)
    assert recorder.calls == [s] and recorder.sent == [] and gateway.used == []
    assert "user" not in s


async def test_an_authenticated_post_goes_to_the_mcp_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[tuple[Any, str | None]] = []

    async def serve(s: Any, receive: Any, send: Any, server: str | None) -> None:
        served.append((s["user"], server))

    monkeypatch.setattr(mcp_endpoint, "serve", serve)
    gateway = FakeGateway(ANN)
    app = Litestar(route_handlers=[])
    lane = McpFastLane(app, gateway)
    recorder = Recorder()
    s = scope("/servers/github/mcp")
    await lane(s, receive, recorder.send, "github", recorder.slow)
    assert served == [(ANN, "github")] and recorder.calls == [] and gateway.used == [ANN]
    assert s["app"] is app and s["litestar_app"] is app


async def test_an_unexpected_error_is_the_problem_litestar_would_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def serve(s: Any, receive: Any, send: Any, server: str | None) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(mcp_endpoint, "serve", serve)
    lane = McpFastLane(Litestar(route_handlers=[]), FakeGateway(ANN))
    recorder = Recorder()
    await lane(scope(), receive, recorder.send, None, recorder.slow)
    start, body = recorder.sent[0], recorder.sent[1]
    assert start["status"] == 500
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert msgspec.json.decode(body["body"]) == {
        "type": "about:blank",
        "title": "Internal error",
        "status": 500,
        "detail": "Something went wrong on our side; it has been logged.",
    }


async def test_an_error_after_the_answer_started_is_not_answered_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def serve(s: Any, receive: Any, send: Any, server: str | None) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    monkeypatch.setattr(mcp_endpoint, "serve", serve)
    lane = McpFastLane(Litestar(route_handlers=[]), FakeGateway(ANN))
    recorder = Recorder()
    with pytest.raises(RuntimeError):
        await lane(scope(), receive, recorder.send, None, recorder.slow)
    assert len(recorder.sent) == 1
