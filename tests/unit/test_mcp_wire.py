"""The gateway's MCP wire helpers: tool names, cursors, message decoding, result splicing, Origin."""

import json
import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.commands.mcp import FORWARDED_METHODS, UpstreamFeatures
from services.gateway.adapters.mcp_face import OriginPolicy
from services.gateway.mcp import naming
from services.gateway.mcp import protocol as p

pytestmark = pytest.mark.unit

SERVER = st.from_regex(r"[A-Za-z0-9]{1,8}(?:[-_][A-Za-z0-9]{1,8}){0,2}", fullmatch=True)
TOOL = st.text(min_size=1, max_size=120)


@given(SERVER, TOOL)
def test_exposed_names_are_valid_stable_and_route_back(server: str, tool: str) -> None:
    name = naming.exposed_name(server, tool)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)
    assert name == naming.exposed_name(server, tool)
    if name == f"{server}__{tool}":
        assert naming.split(name) == (server, tool)
    else:
        assert naming.may_be_shortened(name)  # looked up in the catalog, never split blindly


def test_shortened_names_differ_per_tool() -> None:
    long = "x" * 80
    assert naming.exposed_name("a", long + "1") != naming.exposed_name("a", long + "2")
    assert naming.exposed_name("a", "b.c") != naming.exposed_name("a", "b_c")
    assert naming.split("nounderscore") is None and naming.split("__x") is None


def test_cursors_round_trip_and_reject_junk() -> None:
    assert naming.decode_cursor(naming.encode_cursor(300)) == 300
    for junk in ("", "!!!", "dG9vbHM6LTE", "b3RoZXI6MQ"):  # "", bad base64, "tools:-1", "other:1"
        assert naming.decode_cursor(junk) is None


def test_decode_message() -> None:
    message = p.decode_message(b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}')
    assert message.is_request and message.id == "a" and bytes(message.params) == b'{"name":"x"}'
    note = p.decode_message(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert note.is_notification and not note.params
    cases = {
        b"[]": p.INVALID_REQUEST,
        b"  [{}]": p.INVALID_REQUEST,
        b"{": p.PARSE_ERROR,
        b"": p.PARSE_ERROR,
        b'"text"': p.INVALID_REQUEST,
        b'{"jsonrpc":"1.0","id":1,"method":"x"}': p.INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":null,"method":"x"}': p.INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":1.5,"method":"x"}': p.INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":1}': p.INVALID_REQUEST,
    }
    for body, code in cases.items():
        with pytest.raises(p.ProtocolError) as err:
            p.decode_message(body)
        assert err.value.code == code, body


def test_results_are_spliced_not_reencoded() -> None:
    upstream = b'{"content":[{"type":"text","text":"a"}],  "isError" : false}'
    assert p.result(b"7", msgspec.Raw(upstream)) == b'{"jsonrpc":"2.0","id":7,"result":' + upstream + b"}"
    modern = p.as_modern_result(upstream)
    assert json.loads(modern) == {**json.loads(upstream), "resultType": "complete"}
    assert p.as_modern_result(b'{"resultType":"input_required"}') == b'{"resultType":"input_required"}'
    assert json.loads(p.as_modern_result(b" { } ")) == {"resultType": "complete"}
    error = json.loads(p.tool_error_result('he said "no"', modern=True))
    assert error == {
        "content": [{"type": "text", "text": 'he said "no"'}],
        "isError": True,
        "resultType": "complete",
    }
    page = json.loads(p.tools_page([b'{"name":"a"}'], "next", modern=True))
    assert page == {
        "tools": [{"name": "a"}],
        "nextCursor": "next",
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
    }


def test_one_servers_endpoint_is_described_with_unprefixed_names() -> None:
    everything = json.loads(p.initialize_result("2025-11-25"))["instructions"]
    assert "<server>__<tool>" in everything
    for result in (p.initialize_result("2025-11-25", "github"), p.discover_result("github")):
        text = json.loads(result)["instructions"]
        assert "`github`" in text and "__" not in text
    assert json.loads(p.DISCOVER_RESULT)["instructions"] == everything


def test_one_servers_endpoint_declares_what_its_upstream_offers() -> None:
    plain = {"tools": {"listChanged": True}, "logging": {}}
    assert json.loads(p.initialize_result("2025-11-25"))["capabilities"] == plain
    everything = UpstreamFeatures(resources=True, subscribe=True, prompts=True, completions=True)
    declared = json.loads(p.initialize_result("2025-11-25", "github", everything))["capabilities"]
    # no subscribe, no listChanged: their notifications are not relayed
    assert declared == {**plain, "resources": {}, "prompts": {}, "completions": {}}
    only_prompts = json.loads(p.discover_result("github", UpstreamFeatures(prompts=True)))["capabilities"]
    # server/discover is the stateless era's: no subscriptions/listen, so no listChanged there
    assert only_prompts == {"tools": {}, "logging": {}, "prompts": {}}
    assert json.loads(p.DISCOVER_RESULT)["capabilities"] == {"tools": {}, "logging": {}}
    assert set(p.FORWARDED_PARAMS) == set(FORWARDED_METHODS)


def test_forwarded_params_are_checked_and_lose_only_their_meta() -> None:
    assert p.decode_params(msgspec.Raw(b'{"uri":"test://a"}'), p.UriParams).uri == "test://a"
    for raw, kind in (
        (b"{}", p.UriParams),
        (b'{"uri":5}', p.UriParams),
        (b'{"name":"p","arguments":{"n":1}}', p.PromptParams),
        (b'{"ref":{"type":"ref/prompt","name":"p"}}', p.CompleteParams),
        (b"[1]", p.ListParams),
    ):
        with pytest.raises(p.ProtocolError) as err:
            p.decode_params(msgspec.Raw(raw), kind)
        assert err.value.code == p.INVALID_PARAMS
    kept = b'{"name":"p","arguments":{"a":"1"},"extra":[1, 2]}'
    assert p.without_meta(msgspec.Raw(kept)) == kept  # untouched, byte for byte
    stripped = p.without_meta(msgspec.Raw(b'{"_meta":{"progressToken":1},"uri":"test://a","x":{"y":null}}'))
    assert json.loads(stripped) == {"uri": "test://a", "x": {"y": None}}
    assert p.without_meta(p.ABSENT) == b"{}" and p.without_meta(msgspec.Raw(b"null")) == b"{}"


def test_forwarded_results_get_the_stateless_fields() -> None:
    assert json.loads(p.as_modern_result(b'{"prompts":[]}', listing=True)) == {
        "prompts": [],
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
    }
    assert json.loads(p.as_modern_result(b'{"contents":[]}')) == {"contents": [], "resultType": "complete"}


def test_versions_and_headers() -> None:
    assert p.negotiate("2025-06-18") == "2025-06-18" and p.negotiate("2026-07-28") == "2025-11-25"
    assert p.decode_header_value("plain") == "plain"
    assert p.decode_header_value("=?base64?w7xiZXI=?=") == "über"
    assert p.decode_header_value("=?base64?%%%?=") is None
    err = p.unsupported_version("1999-01-01")
    assert err.code == -32022 and err.data["requested"] == "1999-01-01"


def test_origin_policy() -> None:
    default = OriginPolicy.from_env({})
    assert default.allows(None)
    for ok in ("http://localhost", "http://localhost:6274", "https://127.0.0.1:8443", "http://[::1]:3000"):
        assert default.allows(ok), ok
    for bad in ("https://evil.example", "http://localhost.evil.example", "null", "http://127.0.0.2"):
        assert not default.allows(bad), bad
    listed = OriginPolicy.from_env(
        {"GATEHOUSE_ALLOWED_ORIGINS": "https://app.example.com, https://b.example/"}
    )
    assert listed.allows("https://app.example.com") and listed.allows("https://B.example")
    assert not listed.allows("http://localhost")
    assert OriginPolicy.from_env({"GATEHOUSE_ALLOWED_ORIGINS": "*"}).allows("https://anything.example")
