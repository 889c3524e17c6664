"""Sampling and elicitation during a call: the ids that route a client's answer, the capabilities
that allow asking, and the stdio peer's hand-over (docs/mcp-endpoint.md, "Sampling and
elicitation")."""

import base64
import json

import msgspec
import pytest

from contracts.commands.mcp import ClientRequest
from services.gateway.mcp import protocol as p
from services.gateway.mcp.asks import AskIds, AskRoute
from services.kit import natsauth
from services.mcp_proxy.adapters.asks import needed_feature
from services.mcp_proxy.adapters.stdio.jsonrpc import JsonRpcPeer

pytestmark = pytest.mark.unit

RID = "5d0c3a9e-0f4e-4f7b-9a51-1c2d3e4f5a6b"


def test_an_id_routes_back_only_for_its_own_user_and_session() -> None:
    ids = AskIds(b"pepper" * 6)
    sealed = ids.seal("u1", "s1", RID, 3)
    assert sealed.startswith(f"gh.{RID}.3.")
    assert ids.open("u1", "s1", sealed) == AskRoute(RID, 3)
    assert ids.open("u2", "s1", sealed) is None  # another user
    assert ids.open("u1", "s2", sealed) is None  # another session of the same user
    assert AskIds(b"other" * 7).open("u1", "s1", sealed) is None  # another deployment's key
    forged = sealed.replace(".3.", ".4.")  # another request of the call, same MAC
    assert ids.open("u1", "s1", forged) is None
    for garbage in (3, None, "", "gh", f"gh.{RID}.x.mac", "gh.a.b.c.d", sealed + "=", "x" * 300):
        assert ids.open("u1", "s1", garbage) is None


def test_a_request_is_shown_under_the_gateways_id_and_notifications_pass_as_they_are() -> None:
    ids = AskIds(b"pepper" * 6)
    params = b'{"messages":[{"role":"user","content":{"type":"text","text":"hi"}}],"maxTokens":5}'
    message = msgspec.json.encode(
        ClientRequest(id=1, method="sampling/createMessage", params=msgspec.Raw(params))
    )
    shown = json.loads(ids.outgoing(message, "u1", "s1", RID))
    assert shown["method"] == "sampling/createMessage" and shown["params"]["maxTokens"] == 5
    assert ids.open("u1", "s1", shown["id"]) == AskRoute(RID, 1)
    note = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}'
    assert ids.outgoing(note, "u1", "s1", RID) == note
    assert ids.outgoing(b'{"id":1,"method":3}', "u1", "s1", RID) == b""  # unreadable: dropped


@pytest.mark.parametrize(
    ("caps", "features"),
    [
        ({}, []),
        ({"sampling": {}}, ["sampling"]),
        ({"elicitation": {}}, ["elicitation.form"]),  # 2025-11-25: {} is form mode only
        ({"elicitation": {"url": {}}}, ["elicitation.url"]),
        (
            {"sampling": {"tools": {}}, "elicitation": {"form": {}, "url": {}}},
            ["sampling", "elicitation.form", "elicitation.url"],
        ),
        ({"sampling": True, "elicitation": None, "roots": {}}, []),  # not objects: not declared
    ],
)
def test_the_client_features_come_from_its_initialize(caps: dict[str, object], features: list[str]) -> None:
    params = p.decode_params(msgspec.Raw(json.dumps({"capabilities": caps}).encode()), p.InitializeParams)
    assert p.client_features(params.capabilities) == features


def test_each_upstream_request_needs_its_capability() -> None:
    assert needed_feature("sampling/createMessage", b"{}") == "sampling"
    assert needed_feature("elicitation/create", b'{"message":"x","requestedSchema":{}}') == "elicitation.form"
    assert needed_feature("elicitation/create", b'{"mode":"url","url":"https://x"}') == "elicitation.url"
    assert needed_feature("elicitation/create", b"[1]") is None
    assert needed_feature("roots/list", b"{}") is None


def test_the_stdio_peer_hands_requests_over_and_answers_with_the_upstreams_id() -> None:
    lines: list[bytes] = []
    taken: list[tuple[object, str, bytes]] = []

    def on_request(rid: int | str, method: str, params: bytes) -> bool:
        taken.append((rid, method, bytes(params)))
        return method == "sampling/createMessage"

    peer = JsonRpcPeer(lines.append, 1 << 20, lambda why: None, on_request=on_request)
    peer.feed(b'{"jsonrpc":"2.0","id":"up-1","method":"sampling/createMessage","params":{"maxTokens":1}}\n')
    peer.feed(b'{"jsonrpc":"2.0","id":2,"method":"roots/list"}\n')
    assert taken[0] == ("up-1", "sampling/createMessage", b'{"maxTokens":1}')
    assert json.loads(lines[0])["error"]["code"] == -32601 and json.loads(lines[0])["id"] == 2
    peer.respond("up-1", b'{"role":"assistant"}')
    peer.respond_error(7, -1, "declined", b'{"why":"user"}')
    assert json.loads(lines[1]) == {"jsonrpc": "2.0", "id": "up-1", "result": {"role": "assistant"}}
    assert json.loads(lines[2])["error"] == {"code": -1, "message": "declined", "data": {"why": "user"}}


def test_only_the_gateway_sends_answers_and_only_mcp_proxy_hears_them() -> None:
    for user in natsauth.USERS:
        rules = natsauth.permissions(user)
        assert ("mcp.answer.>" in rules["publish"].get("deny", [])) == (user != "gateway"), user  # type: ignore[attr-defined]
        assert ("mcp.answer.>" in rules["subscribe"]["deny"]) == (user != "mcp_proxy"), user  # type: ignore[index]


def test_the_mac_is_url_safe() -> None:
    sealed = AskIds(b"k" * 32).seal("u", "s", RID, 9)
    mac = sealed.rsplit(".", 1)[1]
    assert len(mac) == 22 and base64.urlsafe_b64decode(mac + "==")
