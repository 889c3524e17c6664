"""Audit through the gateway: refused keys become `auth.failed` entries (prefix and IP, never
the key; a flood folded into a summary), and `GET /v1/audit/export` streams what the reader
may see as NDJSON."""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from contracts.commands.identity import UserCreated
from contracts.envelope import encode_envelope
from contracts.subjects import STREAM
from services.kit.config import Settings
from tests.helpers import eventually, stream_messages
from tests.integration.gateway_world import bearer, two_orgs_gateway


async def reports(bus: Any) -> list[dict[str, Any]]:
    """Every `events.gateway.>` envelope on the stream, as plain JSON (payload under `data`)."""
    return [json.loads(encode_envelope(m.envelope)) for m in await stream_messages(bus, "events.gateway.>")]


pytestmark = pytest.mark.integration
IP = "203.0.113.9"


@dataclass
class World:
    http: httpx.AsyncClient
    app: Any
    admin: UserCreated
    ann: UserCreated
    bea: UserCreated
    other: UserCreated


@pytest.fixture
async def world(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setenv("GATEHOUSE_AUTH_FAILURE_WINDOW_S", "1")
    monkeypatch.setenv("GATEHOUSE_AUTH_FAILURE_REPORTS", "2")
    async with two_orgs_gateway(settings, IP) as t:
        yield World(t.http, t.app, t.admin, t.ann, t.bea, t.other_admin)


async def entries(w: World, key: str, **params: Any) -> list[dict[str, Any]]:
    page = await w.http.get("/v1/audit", params={"limit": 500, **params}, headers=bearer(key))
    assert page.status_code == 200, page.text
    items: list[dict[str, Any]] = page.json()["items"]
    return items


async def test_a_revoked_key_is_audited_for_its_owner_without_the_key(world: World) -> None:
    http, ann = world.http, world.ann
    issued = (
        await http.post("/v1/users/me/mcp-keys", json={"name": "old"}, headers=bearer(ann.api_key))
    ).json()
    assert (
        await http.delete(f"/v1/users/me/mcp-keys/{issued['id']}", headers=bearer(ann.api_key))
    ).status_code == 204
    refused = await http.get("/v1/me", headers={**bearer(issued["api_key"]), "User-Agent": "Cursor/9"})
    assert refused.status_code == 401

    async def audited() -> list[dict[str, Any]]:
        return await entries(world, ann.api_key, action="auth.failed")

    (entry,) = await eventually(audited)
    assert entry["outcome"] == "failure" and entry["ip"] == IP
    assert entry["actor"]["kind"] == "anonymous" and entry["actor"]["user_agent"] == "Cursor/9"
    assert entry["resource"] == {"type": "api_key", "id": issued["id"]}
    meta = entry["metadata"]
    assert meta["reason"] == "revoked" and meta["key_prefix"] == issued["prefix"] and meta["path"] == "/v1/me"
    assert entry["subject_user_id"] == ann.user_id
    assert await entries(world, world.bea.api_key, action="auth.failed") == []  # not about bea
    assert len(await entries(world, world.admin.api_key, action="auth.failed")) == 1
    assert await entries(world, world.other.api_key, action="auth.failed") == []  # another org
    reported = await reports(world.app.state.gateway.bus)
    assert issued["prefix"] in json.dumps(reported) and issued["api_key"] not in json.dumps(reported)


async def test_a_flood_of_bad_keys_is_folded_into_a_summary(world: World) -> None:
    bad = "mcp_" + "Z" * 43
    for _ in range(30):
        assert (await world.http.get("/v1/me", headers=bearer(bad))).status_code == 401
    bus = world.app.state.gateway.bus

    async def three() -> list[dict[str, Any]]:
        found = [r for r in await reports(bus) if r["data"].get("key_prefix") == bad[:12]]
        return found if len(found) == 3 else []

    found = await eventually(three, timeout=15)
    payloads = [r["data"] for r in found]
    assert [p.get("suppressed", False) for p in payloads] == [False, False, True]
    summary = payloads[-1]
    assert summary["attempts"] == 28 and summary["key_prefix"] == bad[:12]
    assert "28 further authentication failures from 203.0.113.9 with key mcp_ZZZZZZZZ" in summary["summary"]
    assert all(bad not in json.dumps(r) for r in found)
    assert all(r.get("org_id") is None for r in found)  # an unknown key: the `_platform` chain
    info = await bus.js.stream_info(STREAM)
    assert info.state.messages < 40  # the flood did not become 30 events


async def test_missing_credentials_are_refused_but_not_audited(world: World) -> None:
    assert (await world.http.get("/v1/me")).status_code == 401
    assert (await world.http.get("/v1/me", headers={"Authorization": "Basic abc"})).status_code == 401
    await world.app.state.auth_failures.stop()  # flush
    bus = world.app.state.gateway.bus
    reasons = [r["data"]["reason"] for r in await reports(bus)]
    assert reasons.count("malformed") == 1 and set(reasons) <= {"malformed", "unknown"}  # unknown: warm-up


async def export(w: World, key: str, **params: Any) -> httpx.Response:
    return await w.http.get("/v1/audit/export", params=params, headers=bearer(key))


async def test_export_streams_what_the_reader_may_see(world: World) -> None:
    http, ann = world.http, world.ann
    for name in ("a", "b", "c"):
        created = await http.post("/v1/users/me/mcp-keys", json={"name": name}, headers=bearer(ann.api_key))
        assert created.status_code == 201

    async def issued() -> bool:
        return len(await entries(world, world.admin.api_key, action="api_key.issued")) >= 6

    await eventually(issued, timeout=20)

    async def export_equals_listing() -> list[dict[str, Any]] | None:
        # The keys' use may still be arriving as entries: compare a listing and an export
        # taken with none in between.
        admin_view = await entries(world, world.admin.api_key)
        got = await export(world, world.admin.api_key)
        assert got.status_code == 200 and got.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in got.text.splitlines()]
        return lines if [e["id"] for e in lines] == [e["id"] for e in admin_view] else None

    lines = await eventually(export_equals_listing, timeout=10, step=0.2)

    own = [json.loads(line) for line in (await export(world, ann.api_key)).text.splitlines()]
    assert own and all(ann.user_id in (e["actor"]["id"], e.get("subject_user_id")) for e in own)
    filtered = [
        json.loads(x) for x in (await export(world, ann.api_key, action="api_key.issued")).text.splitlines()
    ]
    assert len(filtered) == 4 and {e["action"] for e in filtered} == {"api_key.issued"}
    beta = [json.loads(line) for line in (await export(world, world.other.api_key)).text.splitlines()]
    assert beta and not {e["id"] for e in beta} & {e["id"] for e in lines}


async def test_export_pages_through_more_than_one_page(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gateway.adapters.http import audit as controller

    monkeypatch.setattr(controller, "EXPORT_PAGE", 2)

    async def export_equals_listing() -> bool:
        # Entries of earlier tests' requests may still be arriving (the projection lingers
        # up to 100 ms per batch): wait for more than two pages, and compare a listing and an
        # export taken with none in between.
        everything = await entries(world, world.admin.api_key)
        lines = [json.loads(line) for line in (await export(world, world.admin.api_key)).text.splitlines()]
        return len(everything) > 4 and [e["id"] for e in lines] == [e["id"] for e in everything]

    assert await eventually(export_equals_listing, timeout=10, step=0.2)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-11-21T10:00:00Z", "until": "2026-11-20T10:00:00Z"}, "since must not be after until"),
    ],
)
async def test_export_refuses_bad_filters(world: World, params: dict[str, str], fragment: str) -> None:
    got = await export(world, world.admin.api_key, **params)
    assert got.status_code == 400 and got.headers["content-type"].startswith("application/problem+json")
    assert fragment in got.json()["detail"]


async def test_export_needs_a_key(world: World) -> None:
    got = await world.http.get("/v1/audit/export")
    assert got.status_code == 401 and got.headers["content-type"].startswith("application/problem+json")
