"""The gateway's HTTP surface under bad input: every mistake a client can make gets the right
4xx as `application/problem+json` with a sentence in `detail`, never a 500, and nothing
already recorded is lost.

Identity and audit run in-process on real NATS and PostgreSQL; the gateway's Litestar app
runs in-process too, driven through httpx's ASGI transport in the test's own event loop
(Litestar's AsyncTestClient runs the app on a portal thread with a loop of its own, where
the gateway's NATS connection, bound to this loop, cannot be used).
"""

import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from litestar import Litestar
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from contracts.commands.identity import UserCreated
from contracts.events.identity import ApiKeyIssued
from services.identity.domain import PREFIX_LENGTH, hash_key, mint_key
from services.kit.config import Settings, load_settings
from services.kit.embedded import EmbeddedNats
from services.kit.rpc import CommandClient
from tests.helpers import eventually
from tests.integration.gateway_world import bearer, two_orgs_gateway

pytestmark = pytest.mark.integration

MAX_BODY = 2048
PROBLEM_JSON = "application/problem+json"


# -- the platform, once for the module -------------------------------------------------------
@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(tmp_path_factory.mktemp("gateway-http-nats")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def module_database(postgres_server: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(postgres_server)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def module_settings(
    module_nats: str, module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return load_settings(
        {
            "GATEHOUSE_NATS_URL": module_nats,
            "GATEHOUSE_DATABASE_URL": module_database,
            "GATEHOUSE_KEY_PEPPER": base64.b64encode(uuid.uuid4().bytes * 2).decode(),
            "GATEHOUSE_DATA_DIR": str(tmp_path_factory.mktemp("gateway-http-data")),
            "GATEHOUSE_MAX_BODY_BYTES": str(MAX_BODY),
            "GATEHOUSE_LOG_LEVEL": "INFO",
        }
    )


@dataclass
class World:
    app: Litestar
    http: httpx.AsyncClient
    client: CommandClient
    settings: Settings
    admin: UserCreated  # admin of org "alpha"
    ann: UserCreated  # plain user of "alpha"
    bea: UserCreated  # plain user of "alpha"
    other_admin: UserCreated  # admin of org "beta"
    keys: dict[str, str] = field(default_factory=dict)  # extra keys by role: "revoked", "expired"
    recorded: dict[str, Any] = field(default_factory=dict)  # what was there before the matrix


@pytest.fixture(scope="module")
async def world(module_settings: Settings) -> AsyncIterator[World]:
    async with two_orgs_gateway(module_settings, "203.0.113.9") as t:
        w = World(t.app, t.http, t.identity, module_settings, t.admin, t.ann, t.bea, t.other_admin)
        await prepare(w)
        yield w


async def prepare(w: World) -> None:
    """A revoked key, an expired key, and a record of what exists before the bad input."""
    http = w.http
    issued = await http.post(
        "/v1/users/me/mcp-keys", json={"name": "soon revoked"}, headers=bearer(w.ann.api_key)
    )
    assert issued.status_code == 201, issued.text
    revoked = issued.json()
    gone = await http.delete(f"/v1/users/me/mcp-keys/{revoked['id']}", headers=bearer(w.ann.api_key))
    assert gone.status_code == 204, gone.text
    w.keys["revoked"] = revoked["api_key"]

    # An expired key cannot be waited for (the shortest expiry is a day): put the fact that
    # identity would publish for it straight into the gateway's view, with a real hash.
    expired_key = mint_key()
    now = datetime.now(UTC)
    w.app.state.gateway.view.apply(
        ApiKeyIssued(
            key_id=str(uuid.uuid4()),
            user_id=w.ann.user_id,
            name="expired",
            prefix=expired_key[:PREFIX_LENGTH],
            key_hash=hash_key(expired_key, w.settings.require_pepper()),
            created_at=now - timedelta(days=2),
            expires_at=now - timedelta(days=1),
        )
    )
    w.keys["expired"] = expired_key

    users = await http.get("/v1/admin/users", headers=bearer(w.admin.api_key))
    assert users.status_code == 200, users.text
    keys = await http.get("/v1/users/me/mcp-keys", headers=bearer(w.ann.api_key))
    assert keys.status_code == 200, keys.text

    async def revocation_audited() -> Any:
        page = await http.get(
            "/v1/audit", params={"action": "api_key.revoked"}, headers=bearer(w.ann.api_key)
        )
        return page.status_code == 200 and page.json()["items"]

    await eventually(revocation_audited, timeout=30)
    audit = await http.get("/v1/audit", params={"limit": 500}, headers=bearer(w.admin.api_key))
    assert audit.status_code == 200, audit.text
    w.recorded = {"users": users.json(), "keys": keys.json(), "audit": audit.json()["items"]}


# -- the matrix --------------------------------------------------------------------------
Send = Callable[[World], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Case:
    id: str
    send: Send
    status: int
    detail: str = ""  # a fragment the sentence must contain (case-insensitive)


def as_role(role: str) -> Callable[[World], dict[str, str]]:
    def headers(w: World) -> dict[str, str]:
        key = {"admin": w.admin, "ann": w.ann, "bea": w.bea, "other_admin": w.other_admin}.get(role)
        return bearer(key.api_key if key else w.keys[role])

    return headers


ANN, ADMIN = as_role("ann"), as_role("admin")
KEYS = "/v1/users/me/mcp-keys"


def req(
    method: str,
    path: str | Callable[[World], str],
    headers: Callable[[World], dict[str, str]] | None = ANN,
    **kwargs: Any,
) -> Send:
    async def send(w: World) -> httpx.Response:
        url = path(w) if callable(path) else path
        sent = dict(kwargs)
        sent_headers = {**(headers(w) if headers else {}), **sent.pop("extra_headers", {})}
        return await w.http.request(method, url, headers=sent_headers, **sent)

    return send


def raw_json(body: bytes) -> dict[str, Any]:
    return {"content": body, "extra_headers": {"content-type": "application/json"}}


async def chunks(total: int) -> AsyncIterator[bytes]:
    yield b'{"name": "'
    sent = 0
    while sent < total:
        yield b"x" * 512
        sent += 512
    yield b'"}'


CASES = [
    # bodies
    Case("malformed-json", req("POST", KEYS, **raw_json(b'{"name": ')), 400, "JSON"),
    Case("not-json-at-all", req("POST", KEYS, **raw_json(b"name=laptop")), 400),
    Case("invalid-utf8", req("POST", KEYS, **raw_json(b'{"name": "\xff\xfe"}')), 400),
    Case("json-array-not-object", req("POST", KEYS, json=["laptop"]), 400),
    Case("wrong-type-name", req("POST", KEYS, json={"name": 5}), 400, "name"),
    Case("wrong-type-expiry", req("POST", KEYS, json={"name": "x", "expires_in_days": "ten"}), 400),
    Case("expiry-out-of-range", req("POST", KEYS, json={"name": "x", "expires_in_days": 0}), 400),
    Case("empty-name", req("POST", KEYS, json={"name": ""}), 400),
    Case("missing-field", req("POST", KEYS, json={}), 400, "name"),
    Case("unknown-field", req("POST", KEYS, json={"name": "x", "colour": "red"}), 400, "colour"),
    Case(
        "admin-unknown-field",
        req("POST", "/v1/admin/users", ADMIN, json={"email": "x@y.z", "role": "god"}),
        400,
    ),
    Case("admin-bad-email", req("POST", "/v1/admin/users", ADMIN, json={"email": "not-an-email"}), 400),
    Case(
        "admin-wrong-type",
        req("POST", "/v1/admin/users", ADMIN, json={"email": "c@alpha.test", "is_admin": "yes"}),
        400,
    ),
    Case(
        "admin-duplicate-email",
        req("POST", "/v1/admin/users", ADMIN, json={"email": "ann@alpha.test"}),
        409,
        "exists",
    ),
    Case("oversized-body", req("POST", KEYS, json={"name": "x" * (MAX_BODY * 2)}), 413),
    Case(
        "oversized-admin-body",
        req("POST", "/v1/admin/users", ADMIN, json={"email": "a" * MAX_BODY + "@x.y"}),
        413,
    ),
    Case(
        "oversized-chunked-body",
        req("POST", KEYS, content=chunks(MAX_BODY * 4), extra_headers={"content-type": "application/json"}),
        413,
    ),
    # routes and methods
    Case("unknown-route", req("GET", "/v1/nope"), 404),
    Case("unknown-route-no-key", req("GET", "/v1/nope", None), 404),
    Case("wrong-method-me", req("PATCH", "/v1/me"), 405),
    Case("wrong-method-keys", req("PUT", KEYS, json={"name": "x"}), 405),
    Case("wrong-method-audit", req("POST", "/v1/audit", json={}), 405),
    # keys: presence and form
    Case("missing-key", req("GET", "/v1/me", None), 401, "missing api key"),
    Case("garbled-key", req("GET", "/v1/me", lambda w: bearer("mcp_" + "garbled" * 7)), 401, "not valid"),
    Case("not-a-key-at-all", req("GET", "/v1/me", lambda w: bearer("hello")), 401, "not valid"),
    Case("truncated-key", req("GET", "/v1/me", lambda w: bearer(w.ann.api_key[:-3])), 401, "not valid"),
    Case("empty-bearer", req("GET", "/v1/me", lambda w: {"Authorization": "Bearer "}), 401),
    Case(
        "key-without-bearer", req("GET", "/v1/me", lambda w: {"Authorization": w.ann.api_key}), 401, "Bearer"
    ),
    Case(
        "token-scheme",
        req("GET", "/v1/me", lambda w: {"Authorization": f"Token {w.ann.api_key}"}),
        401,
        "Bearer",
    ),
    Case(
        "basic-auth",
        req(
            "GET",
            "/v1/me",
            lambda w: {
                "Authorization": "Basic " + base64.b64encode(f"ann:{w.ann.api_key}".encode()).decode()
            },
        ),
        401,
        "Bearer",
    ),
    Case("empty-x-mcp-api-key", req("GET", "/v1/me", lambda w: {"X-MCP-API-Key": ""}), 401),
    Case("query-key-off-sse", req("GET", lambda w: f"/v1/me?api_key={w.ann.api_key}", None), 401, "/sse"),
    Case("revoked-key", req("GET", "/v1/me", as_role("revoked")), 401, "revoked"),
    Case(
        "revoked-key-x-header",
        req("GET", "/v1/me", lambda w: {"X-MCP-API-Key": w.keys["revoked"]}),
        401,
        "revoked",
    ),
    Case("expired-key", req("GET", "/v1/me", as_role("expired")), 401, "expired"),
    Case("expired-key-issuing", req("POST", KEYS, as_role("expired"), json={"name": "x"}), 401, "expired"),
    # authorisation and tenancy
    Case("admin-list-as-user", req("GET", "/v1/admin/users"), 403, "admin"),
    Case(
        "admin-create-as-user", req("POST", "/v1/admin/users", json={"email": "eve@alpha.test"}), 403, "admin"
    ),
    Case(
        "admin-tier-as-user",
        req("PUT", lambda w: f"/v1/admin/users/{w.ann.user_id}/tier", json={"tier": "enterprise"}),
        403,
    ),
    Case(
        "admin-create-other-org",
        req("POST", "/v1/admin/users", ADMIN, json={"email": "x@beta.test", "org": "beta"}),
        403,
        "own org",
    ),
    Case(
        "tier-of-other-org-user",
        req("PUT", lambda w: f"/v1/admin/users/{w.other_admin.user_id}/tier", ADMIN, json={"tier": "pro"}),
        404,
    ),
    Case(
        "tier-of-unknown-user",
        req("PUT", lambda w: f"/v1/admin/users/{uuid.uuid4()}/tier", ADMIN, json={"tier": "pro"}),
        404,
    ),
    Case(
        "tier-of-garbled-user-id",
        req("PUT", "/v1/admin/users/not-a-uuid/tier", ADMIN, json={"tier": "pro"}),
        404,
    ),
    Case(
        "bad-tier-value",
        req("PUT", lambda w: f"/v1/admin/users/{w.ann.user_id}/tier", ADMIN, json={"tier": "gold"}),
        400,
        "tier",
    ),
    Case(
        "tier-wrong-type",
        req("PUT", lambda w: f"/v1/admin/users/{w.ann.user_id}/tier", ADMIN, json={"tier": 3}),
        400,
    ),
    Case("revoke-unknown-key", req("DELETE", lambda w: f"{KEYS}/{uuid.uuid4()}"), 404),
    Case("revoke-another-users-key", req("DELETE", lambda w: f"{KEYS}/{w.bea.key_id}"), 404),
    Case("revoke-another-orgs-key", req("DELETE", lambda w: f"{KEYS}/{w.other_admin.key_id}", ADMIN), 404),
    # audit filters
    Case("audit-bad-timestamp", req("GET", "/v1/audit", params={"since": "yesterday"}), 400, "since"),
    Case("audit-bad-until", req("GET", "/v1/audit", params={"until": "2026-13-45T99:00:00"}), 400),
    Case(
        "audit-since-after-until",
        req("GET", "/v1/audit", params={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}),
        400,
        "since",
    ),
    Case("audit-limit-zero", req("GET", "/v1/audit", params={"limit": 0}), 400, "limit"),
    Case("audit-limit-huge", req("GET", "/v1/audit", params={"limit": 100000}), 400, "limit"),
    Case("audit-limit-not-a-number", req("GET", "/v1/audit", params={"limit": "ten"}), 400, "limit"),
    Case(
        "audit-forged-cursor",
        req("GET", "/v1/audit", params={"cursor": "eyJvcmciOiJ4In0.AAAA"}),
        400,
        "cursor",
    ),
    Case("audit-garbage-cursor", req("GET", "/v1/audit", params={"cursor": "!!!"}), 400, "cursor"),
    Case("audit-overlong-cursor", req("GET", "/v1/audit", params={"cursor": "A" * 600}), 400),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_gets_a_4xx_problem(world: World, case: Case) -> None:
    response = await case.send(world)
    assert response.status_code != 500, response.text
    assert response.status_code == case.status, f"{case.id}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == case.status
    detail = body.get("detail")
    assert isinstance(detail, str) and len(detail.split()) >= 3, f"not a sentence: {detail!r}"
    assert case.detail.lower() in detail.lower(), f"{detail!r} does not mention {case.detail!r}"
    if case.status == 401:
        assert response.headers.get("www-authenticate", "").lower().startswith("bearer")


async def test_cursor_of_one_user_is_refused_to_another(world: World) -> None:
    first = await world.http.get("/v1/audit", params={"limit": 1}, headers=ADMIN(world))
    assert first.status_code == 200 and first.json()["next_cursor"], first.text
    cursor = first.json()["next_cursor"]
    follows = await world.http.get("/v1/audit", params={"limit": 1, "cursor": cursor}, headers=ADMIN(world))
    assert follows.status_code == 200, follows.text
    for headers in (ANN(world), as_role("other_admin")(world)):
        stolen = await world.http.get("/v1/audit", params={"limit": 1, "cursor": cursor}, headers=headers)
        assert stolen.status_code == 400, stolen.text
        assert stolen.headers["content-type"].startswith(PROBLEM_JSON)
        assert "cursor" in stolen.json()["detail"]


async def test_the_accepted_key_forms_still_work(world: World) -> None:
    """Controls for the matrix: the refusals above are about the input, not the keys."""
    key = world.ann.api_key
    for headers in (
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"bearer {key}"},
        {"X-MCP-API-Key": key},
    ):
        me = await world.http.get("/v1/me", headers=headers)
        assert me.status_code == 200, (headers, me.text)
        assert me.json()["user_id"] == world.ann.user_id
    health = await world.http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    schema = await world.http.get("/schema/openapi.json")
    assert schema.status_code == 200 and "/v1/me" in schema.json()["paths"]


async def test_nothing_recorded_is_lost_after_the_bad_input(world: World) -> None:
    """Runs after the matrix (file order): what existed before is all still there."""
    http = world.http
    users = await http.get("/v1/admin/users", headers=ADMIN(world))
    assert users.status_code == 200, users.text
    assert users.json() == world.recorded["users"]
    emails = sorted(u["email"] for u in users.json())
    assert emails == ["admin@alpha.test", "ann@alpha.test", "bea@alpha.test"]
    assert {u["tier"] for u in users.json()} == {"free"}, "a refused tier change was applied"

    keys = await http.get(KEYS, headers=ANN(world))
    assert keys.status_code == 200, keys.text
    before = {k["id"]: k for k in world.recorded["keys"]}
    after = {k["id"]: k for k in keys.json()}
    assert after.keys() == before.keys(), "a refused request issued or dropped a key"
    assert [k["revoked_at"] is not None for k in after.values()] == [
        k["revoked_at"] is not None for k in before.values()
    ]
    for user in (world.admin, world.ann, world.bea, world.other_admin):
        me = await http.get("/v1/me", headers=bearer(user.api_key))
        assert me.status_code == 200, me.text  # no refused revocation touched these keys

    audit = await http.get("/v1/audit", params={"limit": 500}, headers=ADMIN(world))
    assert audit.status_code == 200, audit.text
    now = {e["id"]: e for e in audit.json()["items"]}
    for entry in world.recorded["audit"]:
        assert now.get(entry["id"]) == entry, f"audit entry {entry['id']} changed or vanished"
    unexpected = (
        {e["action"] for e in now.values()}
        - {"api_key.used", "auth.failed"}  # refused keys are audited (docs/audit.md)
        - {e["action"] for e in world.recorded["audit"]}
    )
    assert not unexpected, f"refused requests left facts behind: {unexpected}"
    assert all(e["outcome"] == "success" for e in now.values() if e["action"] != "auth.failed")
