"""The quick start, end to end: `gatehouse up` in an empty directory, then what a developer,
an admin and an operator do with it, over HTTP and the CLI."""

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway, Platform
from tests.helpers import eventually_sync

pytestmark = pytest.mark.e2e

KEYS = "/v1/users/me/mcp-keys"
PROBLEM_JSON = "application/problem+json"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def http(platform: Platform) -> Iterator[httpx.Client]:
    with platform.client() as client:
        yield client


@pytest.fixture(scope="module")
def second_gateway(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(platform, tmp_path_factory.mktemp("gateway-2") / "gateway.log")
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


def new_user(http: httpx.Client, platform: Platform, **fields: Any) -> dict[str, Any]:
    """An admin onboards a user into the admin's org; returns {user_id, api_key, email}."""
    email = fields.pop("email", f"dev-{uuid.uuid4().hex[:8]}@example.test")
    created = http.post("/v1/admin/users", json={"email": email, **fields}, headers=auth(platform.admin_key))
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    assert set(body) == {"user_id", "api_key"} and body["api_key"].startswith("mcp_")
    usable(http, body["api_key"])
    return {**body, "email": email}


def issue(http: httpx.Client, key: str, name: str) -> dict[str, Any]:
    issued = http.post(KEYS, json={"name": name}, headers=auth(key))
    assert issued.status_code == 201, issued.text
    body: dict[str, Any] = issued.json()
    usable(http, body["api_key"])
    return body


def usable(http: httpx.Client, key: str, timeout: float = 15.0) -> None:
    """Waits until the gateway behind `http` accepts a key (its view follows the stream)."""

    def works() -> bool:
        return http.get("/v1/me", headers=auth(key)).status_code == 200

    eventually_sync(works, timeout=timeout)


def key_id_of(http: httpx.Client, key: str, name: str) -> str:
    keys = http.get(KEYS, headers=auth(key))
    assert keys.status_code == 200, keys.text
    (found,) = [k["id"] for k in keys.json() if k["name"] == name]
    return str(found)


def assert_problem(response: httpx.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip(), response.text
    assert fragment.lower() in detail.lower(), detail


def audit(http: httpx.Client, key: str, **params: Any) -> list[dict[str, Any]]:
    page = http.get("/v1/audit", params={"limit": 500, **params}, headers=auth(key))
    assert page.status_code == 200, page.text
    items: list[dict[str, Any]] = page.json()["items"]
    return items


# -- first contact ---------------------------------------------------------------------------
def test_up_prints_what_a_user_needs(platform: Platform) -> None:
    out = platform.first_output()
    assert "NATS (JetStream) started" in out and "PostgreSQL started" in out, out
    assert f"Gatehouse is ready at {platform.url}" in out
    key = platform.admin_key
    assert f"curl -H 'Authorization: Bearer {key}' {platform.url}/v1/me" in out
    snippet = out.split("Cursor (~/.cursor/mcp.json):", 1)[1].split("Press Ctrl-C to stop.", 1)[0]
    server = json.loads(snippet)["mcpServers"]["gatehouse"]
    assert server == {"url": f"{platform.url}/mcp", "headers": {"Authorization": f"Bearer {key}"}}
    runtime = platform.runtime()
    assert runtime["gateway_url"] == platform.url
    assert runtime["nats_url"].startswith("nats://127.0.0.1:")
    assert runtime["database_url"].startswith("postgresql://")
    pepper = platform.data_dir / "keys" / "api-key-pepper"
    assert pepper.stat().st_mode & 0o777 == 0o600


def test_health_ready_and_openapi(http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200, ready.text
    schema = http.get("/schema/openapi.json")
    assert schema.status_code == 200, schema.text
    paths = schema.json()["paths"]
    assert "/v1/me" in paths and "/v1/users/me/mcp-keys" in paths and "/v1/audit" in paths


def test_me_with_the_printed_admin_key(http: httpx.Client, platform: Platform) -> None:
    me = http.get("/v1/me", headers=auth(platform.admin_key))
    assert me.status_code == 200, me.text
    body = me.json()
    assert set(body) == {"user_id", "email", "org_id", "tier", "is_admin"}
    assert body["email"] == "admin@gatehouse.local" and body["is_admin"] is True
    assert body["tier"] == "enterprise"
    assert_problem(http.get("/v1/me"), 401, "missing api key")


# -- an admin onboards users ---------------------------------------------------------------------
def test_admin_creates_a_user_in_own_org_and_non_admins_get_403(
    http: httpx.Client, platform: Platform
) -> None:
    admin_me = http.get("/v1/me", headers=auth(platform.admin_key)).json()
    dev = new_user(http, platform)
    me = http.get("/v1/me", headers=auth(dev["api_key"]))
    assert me.status_code == 200, me.text
    assert me.json() == {
        "user_id": dev["user_id"],
        "email": dev["email"],
        "org_id": admin_me["org_id"],
        "tier": "free",
        "is_admin": False,
    }
    listed = http.get("/v1/admin/users", headers=auth(platform.admin_key))
    assert listed.status_code == 200, listed.text
    assert dev["user_id"] in {u["user_id"] for u in listed.json()}

    dev_auth = auth(dev["api_key"])
    assert_problem(http.get("/v1/admin/users", headers=dev_auth), 403, "admin")
    assert_problem(http.post("/v1/admin/users", json={"email": "x@example.test"}, headers=dev_auth), 403)
    tier_url = f"/v1/admin/users/{dev['user_id']}/tier"
    assert_problem(http.put(tier_url, json={"tier": "enterprise"}, headers=dev_auth), 403)

    changed = http.put(tier_url, json={"tier": "pro"}, headers=auth(platform.admin_key))
    assert changed.status_code == 200 and changed.json()["tier"] == "pro", changed.text

    def dev_sees_pro() -> bool:
        return bool(http.get("/v1/me", headers=dev_auth).json()["tier"] == "pro")

    eventually_sync(dev_sees_pro, timeout=15)


# -- keys ------------------------------------------------------------------------------------
def test_a_new_key_works_on_the_gateway_that_issued_it_at_once(
    http: httpx.Client, platform: Platform
) -> None:
    """Like a revocation, an issue is known to the issuing gateway before the 201 is sent: a
    client that uses the key it was just given must not be told it is invalid."""
    created = http.post(
        "/v1/admin/users", json={"email": "eager@example.test"}, headers=auth(platform.admin_key)
    )
    assert created.status_code == 201, created.text
    me = http.get("/v1/me", headers=auth(created.json()["api_key"]))
    assert me.status_code == 200, f"a user's first key, used right after the 201: {me.text}"
    issued = http.post(KEYS, json={"name": "eager"}, headers=auth(created.json()["api_key"]))
    assert issued.status_code == 201, issued.text
    me = http.get("/v1/me", headers=auth(issued.json()["api_key"]))
    assert me.status_code == 200, f"a key used right after the 201: {me.text}"


def test_a_revoked_key_is_rejected_by_the_same_gateway_at_once(
    http: httpx.Client, platform: Platform
) -> None:
    dev = new_user(http, platform)
    laptop = issue(http, dev["api_key"], "laptop")
    assert set(laptop) == {"id", "name", "api_key", "prefix", "created_at", "expires_at"}
    assert laptop["api_key"].startswith(laptop["prefix"])

    listed = http.get(KEYS, headers=auth(dev["api_key"])).json()
    assert "api_key" not in json.dumps(listed)
    assert laptop["api_key"] not in json.dumps(listed)

    gone = http.delete(f"{KEYS}/{laptop['id']}", headers=auth(dev["api_key"]))
    assert gone.status_code == 204, gone.text
    assert_problem(http.get("/v1/me", headers=auth(laptop["api_key"])), 401, "revoked")
    (entry,) = [k for k in http.get(KEYS, headers=auth(dev["api_key"])).json() if k["id"] == laptop["id"]]
    assert entry["revoked_at"] is not None
    again = http.delete(f"{KEYS}/{laptop['id']}", headers=auth(dev["api_key"]))
    assert again.status_code == 204, "revoking twice is not an error"
    assert http.get("/v1/me", headers=auth(dev["api_key"])).status_code == 200


def test_a_key_revoked_on_one_gateway_is_rejected_by_another(
    http: httpx.Client, platform: Platform, second_gateway: Gateway
) -> None:
    dev = new_user(http, platform)
    with httpx.Client(base_url=second_gateway.url, timeout=30.0) as other:

        def accepted(client: httpx.Client, key: str) -> bool:
            return client.get("/v1/me", headers=auth(key)).status_code == 200

        eventually_sync(lambda: accepted(other, dev["api_key"]), timeout=15)
        for issuer, checker in ((http, other), (other, http)):
            key = issue(issuer, dev["api_key"], "replica")
            eventually_sync(lambda c=checker, k=key["api_key"]: accepted(c, k), timeout=15)
            gone = issuer.delete(f"{KEYS}/{key['id']}", headers=auth(dev["api_key"]))
            assert gone.status_code == 204, gone.text
            assert_problem(issuer.get("/v1/me", headers=auth(key["api_key"])), 401, "revoked")

            def rejected(client: httpx.Client = checker, k: str = key["api_key"]) -> httpx.Response | None:
                response = client.get("/v1/me", headers=auth(k))
                return response if response.status_code == 401 else None

            assert_problem(eventually_sync(rejected, timeout=15), 401, "revoked")
        assert accepted(other, dev["api_key"]) and accepted(http, dev["api_key"])


# -- the audit trail ---------------------------------------------------------------------------
def test_the_audit_trail_shows_who_issued_and_who_revoked(http: httpx.Client, platform: Platform) -> None:
    dev = new_user(http, platform)
    first_key_id = key_id_of(http, dev["api_key"], "default")
    target = issue(http, dev["api_key"], "target")  # issued with the first key
    other = issue(http, dev["api_key"], "other")
    gone = http.delete(f"{KEYS}/{target['id']}", headers=auth(other["api_key"]))  # revoked with another
    assert gone.status_code == 204, gone.text

    def both_entries() -> dict[str, dict[str, Any]] | None:
        entries = {e["action"]: e for e in audit(http, dev["api_key"], resource_id=target["id"])}
        return entries if {"api_key.issued", "api_key.revoked"} <= entries.keys() else None

    entries = eventually_sync(both_entries, timeout=30)
    issued, revoked = entries["api_key.issued"], entries["api_key.revoked"]
    assert issued["actor"]["kind"] == "user" and issued["actor"]["id"] == dev["user_id"]
    assert issued["actor"]["key_id"] == first_key_id
    assert revoked["actor"]["kind"] == "user" and revoked["actor"]["id"] == dev["user_id"]
    assert revoked["actor"]["key_id"] == other["id"]
    for entry in (issued, revoked):
        assert entry["resource"] == {"type": "api_key", "id": target["id"]}
        assert entry["outcome"] == "success" and entry["ip"] == "127.0.0.1"
        assert entry["hash"] and entry["prev_hash"] and entry["hash"] != entry["prev_hash"]
        assert target["api_key"] not in json.dumps(entry)
    assert revoked["seq"] > issued["seq"]

    admin_view = {e["action"] for e in audit(http, platform.admin_key, resource_id=target["id"])}
    assert {"api_key.issued", "api_key.revoked"} <= admin_view
    by_actor = audit(http, platform.admin_key, actor=dev["user_id"], action="api_key.revoked")
    assert [e["resource"]["id"] for e in by_actor] == [target["id"]]

    # who created the user: the admin, through the API
    admin_id = http.get("/v1/me", headers=auth(platform.admin_key)).json()["user_id"]
    registered = audit(http, dev["api_key"], action="user.registered")
    assert [(e["actor"]["id"], e["resource"]["id"]) for e in registered] == [(admin_id, dev["user_id"])]


def test_a_user_sees_only_their_own_entries(http: httpx.Client, platform: Platform) -> None:
    ann, bob = new_user(http, platform), new_user(http, platform)
    anns = issue(http, ann["api_key"], "ann's laptop")

    def admin_sees_it() -> bool:
        return bool(audit(http, platform.admin_key, resource_id=anns["id"]))

    eventually_sync(admin_sees_it, timeout=30)
    assert audit(http, bob["api_key"], resource_id=anns["id"]) == []
    assert audit(http, bob["api_key"], actor=ann["user_id"]) == []
    bobs = audit(http, bob["api_key"])
    assert bobs, "bob sees at least his own registration"
    assert all(bob["user_id"] in (e["actor"]["id"], e.get("subject_user_id")) for e in bobs), bobs
    anns_view = audit(http, ann["api_key"], resource_id=anns["id"], action="api_key.issued")
    assert [e["actor"]["id"] for e in anns_view] == [ann["user_id"]]


def test_another_users_key_id_answers_404_and_the_key_keeps_working(
    http: httpx.Client, platform: Platform
) -> None:
    ann, bob = new_user(http, platform), new_user(http, platform)
    anns = issue(http, ann["api_key"], "ann's key")
    assert_problem(http.delete(f"{KEYS}/{anns['id']}", headers=auth(bob["api_key"])), 404)
    assert_problem(http.delete(f"{KEYS}/{anns['id']}", headers=auth(platform.admin_key)), 404)
    me = http.get("/v1/me", headers=auth(anns["api_key"]))
    assert me.status_code == 200 and me.json()["user_id"] == ann["user_id"]
    (listed,) = [k for k in http.get(KEYS, headers=auth(ann["api_key"])).json() if k["id"] == anns["id"]]
    assert listed["revoked_at"] is None


def test_another_orgs_admin_cannot_touch_this_org(http: httpx.Client, platform: Platform) -> None:
    made = platform.cli("users", "create", "--email", "boss@elsewhere.test", "--org", "elsewhere", "--admin")
    assert made.returncode == 0, made.stderr
    fields = dict(re.findall(r"^(\w+): (\S+)", made.stdout, re.MULTILINE))
    assert {"user_id", "org_id", "api_key"} <= fields.keys(), made.stdout
    boss = fields["api_key"]
    usable(http, boss)
    dev = new_user(http, platform)
    assert_problem(
        http.put(f"/v1/admin/users/{dev['user_id']}/tier", json={"tier": "pro"}, headers=auth(boss)), 404
    )
    listed = http.get("/v1/admin/users", headers=auth(boss))
    assert listed.status_code == 200 and [u["email"] for u in listed.json()] == ["boss@elsewhere.test"]
    assert audit(http, boss, actor=dev["user_id"]) == []
    assert audit(http, boss, resource_id=dev["user_id"]) == []


# -- the operator's CLI --------------------------------------------------------------------------
def quiet_digest(platform: Platform) -> str:
    """Waits until the trail stops moving (asynchronous `api_key.used` facts), returns its digest."""
    seen: list[str] = []

    def settled() -> str | None:
        verified = platform.cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        seen.append(verified.stdout.strip().rsplit(" ", 1)[-1])
        return seen[-1] if len(seen) >= 2 and seen[-1] == seen[-2] else None

    digest: str = eventually_sync(settled, timeout=60, step=0.5)
    return digest


def test_replay_audit_reproduces_the_same_digest_twice(platform: Platform) -> None:
    live = quiet_digest(platform)
    rebuilt = []
    for _ in range(2):
        replay = platform.cli("replay", "audit")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "audit: rebuilt digest equals the live digest" in replay.stdout, replay.stdout
        found = re.search(
            r"^audit: rebuilt\s+entries=(\d+) .*digest=([0-9a-f]{64})", replay.stdout, re.MULTILINE
        )
        assert found, replay.stdout
        assert int(found.group(1)) > 0
        rebuilt.append(found.group(2))
    assert rebuilt[0] == rebuilt[1] == live


def test_audit_verify_exits_0(platform: Platform) -> None:
    verified = platform.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("audit chain intact:"), verified.stdout


def test_events_tail_prints_json_lines(platform: Platform) -> None:
    tail = platform.cli("events", "tail")
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert len(lines) > 5, tail.stdout
    events = [json.loads(line) for line in lines]
    for event in events:
        assert {"event_id", "type", "occurred_at", "actor", "correlation_id", "data"} <= event.keys()
    identity = [e for e in events if e["type"].startswith("identity.")]
    assert identity[0]["type"] == "identity.org_created", "the bootstrap admin's org comes first"
    registered = [e for e in events if e["type"] == "identity.user_registered"]
    assert registered[0]["data"]["email"] == "admin@gatehouse.local"
    assert len({e["event_id"] for e in events}) == len(events)
    assert platform.admin_key not in tail.stdout

    only = platform.cli("events", "tail", "--subject", "events.identity.user_registered")
    assert only.returncode == 0, only.stderr
    registered_only = [json.loads(line) for line in only.stdout.splitlines()]
    assert [e["event_id"] for e in registered_only] == [e["event_id"] for e in registered]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (("users", "create", "--email", "bad"), "bad"),
        (("users", "create", "--email", "admin@gatehouse.local"), "already exists"),
        (("users", "create", "--email", "x@example.test", "--org", "not an org!"), "org"),
        (("users", "create", "--email", "x@example.test", "--tier", "gold"), "tier"),
        (("events", "tail", "--since", "yesterday"), "since"),
        (("replay", "everything"), "everything"),
    ],
    ids=["bad-email", "duplicate-email", "bad-org", "unknown-tier", "bad-since", "unknown-target"],
)
def test_cli_bad_input_exits_non_zero_with_one_readable_line(
    platform: Platform, args: tuple[str, ...], mentions: str
) -> None:
    done = platform.cli(*args)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert mentions.lower() in lines[0].lower(), lines[0]
    assert done.stdout == ""


def test_cli_without_a_platform_says_so_in_one_line(tmp_path: Path) -> None:
    empty = Platform(tmp_path)
    done = empty.cli("audit", "verify")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gatehouse up" in lines[0], done.stderr
