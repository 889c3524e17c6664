"""The secrets service on real NATS and PostgreSQL, through the gateway's HTTP routes.

Every route; the tenancy walls (another user cannot list, read, use or even detect a
secret: the answer is the one for a name that never existed); org secrets; revocation
(crypto-shredding) with its message; reveals recorded in the audit trail with their
purpose and never a value; rotation, rewrap and the report of a retired key; corrupted
bytes reported as such; a missing master key stopping the service at start.
"""

import asyncio
import base64
from typing import Any

import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from contracts.commands import secrets as cmd
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor
from services.kit.config import ConfigError, load_settings
from services.kit.rpc import CommandFailed
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.bootstrap import build as secrets_build
from services.secrets.crypto import Keyring
from tests.helpers import OPERATOR, eventually, running
from tests.integration.secrets_world import World, world

pytestmark = pytest.mark.integration
__all__ = ["world"]

GH = "ghp_" + "A1b2C3d4" * 5
CURSOR = "key_" + "f00dfeed" * 5
PROBLEM_JSON = "application/problem+json"
FIELDS = {"name", "scope", "fingerprint", "key_id", "created_at", "updated_at", "last_used_at"}


def problem(response: Any, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    detail: str = response.json()["detail"]
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), detail
    return detail


async def refused(call: Any) -> cmd.RevealedSecret | CommandFailed:
    try:
        return await call  # type: ignore[no-any-return]
    except CommandFailed as err:
        return err


# -- routes -----------------------------------------------------------------------------
async def test_put_get_list_replace_delete(world: World) -> None:
    w, ann = world, world.ann
    put = await w.http.put("/v1/secrets/github_token", json={"value": GH}, headers=w.headers(ann))
    assert put.status_code == 200, put.text
    body = put.json()
    assert set(body) == FIELDS and GH not in put.text
    assert body["name"] == "github_token" and body["scope"] == "user" and body["key_id"] == "k1"
    assert body["fingerprint"].startswith("hmac-sha256:") and body["last_used_at"] is None

    got = await w.http.get("/v1/secrets/github_token", headers=w.headers(ann))
    assert got.status_code == 200 and got.json() == body
    listed = await w.http.get("/v1/secrets", headers=w.headers(ann))
    assert listed.status_code == 200 and listed.json() == [body]

    again = await w.http.put("/v1/secrets/github_token", json={"value": GH + "x"}, headers=w.headers(ann))
    replaced = again.json()
    assert replaced["created_at"] == body["created_at"] and replaced["updated_at"] > body["updated_at"]
    assert replaced["fingerprint"] != body["fingerprint"]
    assert (await w.reveal(ann, "github_token")).value == GH + "x"

    multi = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n"
    ssh = await w.http.put("/v1/secrets/ssh_key", json={"value": multi}, headers=w.headers(ann))
    assert ssh.status_code == 200, ssh.text
    assert (await w.reveal(ann, "ssh_key")).value == multi

    gone = await w.http.delete("/v1/secrets/github_token", headers=w.headers(ann))
    assert gone.status_code == 204 and gone.content == b""
    problem(
        await w.http.get("/v1/secrets/github_token", headers=w.headers(ann)),
        404,
        "`github_token` was revoked",
    )
    assert [s["name"] for s in (await w.http.get("/v1/secrets", headers=w.headers(ann))).json()] == [
        "ssh_key"
    ]
    err = await refused(w.reveal(ann, "github_token"))
    assert isinstance(err, CommandFailed) and err.problem.code == "secret_revoked"
    assert err.problem.status == 410 and "secret `github_token` was revoked on " in err.problem.detail
    assert err.problem.detail.endswith("; set it again in Settings")
    assert (await w.http.delete("/v1/secrets/github_token", headers=w.headers(ann))).status_code == 204

    back = await w.http.put("/v1/secrets/github_token", json={"value": GH}, headers=w.headers(ann))
    assert back.status_code == 200 and back.json()["last_used_at"] is None
    assert (await w.reveal(ann, "github_token")).value == GH


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/secrets/Upper", {"value": "v"}, "not a valid secret name"),
        ("/v1/secrets/_under", {"value": "v"}, "not a valid secret name"),
        ("/v1/secrets/" + "a" * 65, {"value": "v"}, "not a valid secret name"),
        ("/v1/secrets/a%20b", {"value": "v"}, "not a valid secret name"),
        ("/v1/secrets/ok", {"value": ""}, "empty"),
        ("/v1/secrets/ok", {"value": "x" * (16 * 1024 + 1)}, "16 kib"),
        ("/v1/secrets/ok", {"value": 42}, "expected `str`"),
        ("/v1/secrets/ok", {}, "value"),
        ("/v1/secrets/ok", {"valu": "v"}, "missing required field `value`"),
        ("/v1/secrets/cursor_api_key", {"value": "too-short"}, "must be an api key"),
        ("/v1/secrets/cursor_api_key", {"value": "key_with a space_1234567890"}, "no spaces"),
        ("/v1/secrets/cursor_api_key", {"value": CURSOR + "\n"}, "line breaks"),
    ],
)
async def test_bad_input_is_a_clear_400(world: World, path: str, body: dict[str, Any], fragment: str) -> None:
    response = await world.http.put(path, json=body, headers=world.headers(world.ann))
    problem(response, 400, fragment)


async def test_non_json_bodies_are_refused(world: World) -> None:
    for content in (b"not json", b'{"value": ', b"[1, 2]", b"\xff\xfe"):
        response = await world.http.put(
            "/v1/secrets/ok",
            content=content,
            headers={**world.headers(world.ann), "content-type": "application/json"},
        )
        problem(response, 400)
    assert (await world.http.get("/v1/secrets", headers=world.headers(world.ann))).json() == []


async def test_a_well_formed_cursor_api_key_is_stored(world: World) -> None:
    put = await world.http.put(
        "/v1/secrets/cursor_api_key", json={"value": CURSOR}, headers=world.headers(world.ann)
    )
    assert put.status_code == 200, put.text


# -- tenancy ----------------------------------------------------------------------------
async def test_another_user_cannot_list_read_use_or_detect(world: World) -> None:
    w, ann, bea = world, world.ann, world.bea
    assert (await w.http.put("/v1/secrets/gh", json={"value": GH}, headers=w.headers(ann))).status_code == 200

    assert (await w.http.get("/v1/secrets", headers=w.headers(bea))).json() == []
    for method in ("GET", "DELETE"):
        taken = await w.http.request(method, "/v1/secrets/gh", headers=w.headers(bea))
        never = await w.http.request(method, "/v1/secrets/gh", headers=w.headers(w.zed))
        assert taken.status_code == never.status_code == 404
        assert taken.json() == never.json(), (taken.text, never.text)
        assert taken.headers["content-type"] == never.headers["content-type"]
    taken_use = await refused(w.reveal(bea, "gh"))
    never_use = await refused(w.reveal(bea, "gx"))
    assert isinstance(taken_use, CommandFailed) and isinstance(never_use, CommandFailed)
    assert taken_use.problem.detail == never_use.problem.detail.replace("gx", "gh")
    assert taken_use.problem.status == never_use.problem.status == 404

    own = await w.http.put("/v1/secrets/gh", json={"value": "bea's own"}, headers=w.headers(bea))
    assert own.status_code == 200  # the same name is hers, separately
    assert (await w.reveal(bea, "gh")).value == "bea's own"
    assert (await w.reveal(ann, "gh")).value == GH  # ann's is untouched by all of that
    assert (await w.http.get("/v1/secrets/gh", headers=w.headers(ann))).json()["fingerprint"] != own.json()[
        "fingerprint"
    ]


async def test_org_secrets(world: World) -> None:
    w, admin, ann, zed = world, world.admin, world.ann, world.zed
    put = await w.http.put("/v1/org/secrets/jira_token", json={"value": "org-jira"}, headers=w.headers(admin))
    assert put.status_code == 200 and put.json()["scope"] == "org"
    problem(
        await w.http.put("/v1/org/secrets/jira_token", json={"value": "x"}, headers=w.headers(ann)),
        403,
        "admins",
    )
    problem(await w.http.delete("/v1/org/secrets/jira_token", headers=w.headers(ann)), 403)

    mine = await w.http.get("/v1/secrets", headers=w.headers(ann))
    assert [(s["name"], s["scope"]) for s in mine.json()] == [("jira_token", "org")]
    org = await w.http.get("/v1/org/secrets/jira_token", headers=w.headers(ann))
    assert org.status_code == 200 and org.json()["scope"] == "org"
    problem(await w.http.get("/v1/secrets/jira_token", headers=w.headers(ann)), 404, "you have no secret")
    assert (await w.reveal(ann, "jira_token")).value == "org-jira"  # a member's server may use it

    assert (await w.http.get("/v1/org/secrets", headers=w.headers(zed))).json() == []
    problem(await w.http.get("/v1/org/secrets/jira_token", headers=w.headers(zed)), 404, "your org has no")
    outsider = await refused(w.reveal(zed, "jira_token"))
    assert isinstance(outsider, CommandFailed) and outsider.problem.status == 404

    assert (await w.http.delete("/v1/org/secrets/jira_token", headers=w.headers(admin))).status_code == 204
    err = await refused(w.reveal(ann, "jira_token"))
    assert isinstance(err, CommandFailed) and "org secret `jira_token` was revoked on" in err.problem.detail


# -- reveals ----------------------------------------------------------------------------
async def test_reveals_are_audited_with_purpose_and_update_last_used(world: World) -> None:
    w, ann = world, world.ann
    await w.http.put("/v1/secrets/cursor_api_key", json={"value": CURSOR}, headers=w.headers(ann))
    revealed = await w.reveal(ann, "cursor_api_key", service="session_runner", purpose="build:b-42")
    assert (revealed.value, revealed.scope, revealed.version) == (CURSOR, "user", 1)
    err = await refused(w.reveal(ann, "missing_one", purpose="tool_call:t-7"))
    assert isinstance(err, CommandFailed) and err.problem.code == "secret_not_found"

    async def last_used() -> Any:
        info = (await w.http.get("/v1/secrets/cursor_api_key", headers=w.headers(ann))).json()
        return info["last_used_at"]

    assert await eventually(last_used)

    async def entries() -> Any:
        items = await w.audit(ann)
        actions = {e["action"] for e in items}
        return items if {"secret.stored", "secret.revealed", "reveal.denied"} <= actions else None

    items = await eventually(entries, timeout=15)
    use = next(e for e in items if e["action"] == "secret.revealed")
    assert use["actor"]["kind"] == "service" and use["actor"]["id"] == "session_runner"
    assert use["metadata"]["purpose"] == "build:b-42" and use["metadata"]["name"] == "cursor_api_key"
    assert use["metadata"]["service"] == "session_runner" and use["resource"]["type"] == "secret"
    denied = next(e for e in items if e["action"] == "reveal.denied")
    assert denied["outcome"] == "denied" and denied["metadata"]["reason"] == "not_found"
    assert denied["metadata"]["purpose"] == "tool_call:t-7"
    stored = next(e for e in items if e["action"] == "secret.stored")
    assert stored["metadata"]["fingerprint"].startswith("hmac-sha256:")
    for entry in items:
        assert CURSOR not in str(entry)


async def test_only_revealers_with_a_purpose_are_answered(world: World) -> None:
    w, ann = world, world.ann
    await w.http.put("/v1/secrets/gh", json={"value": GH}, headers=w.headers(ann))
    for service, purpose in [
        ("gateway", "tool_call:1"),
        ("mcp_proxy", "build:1"),
        ("mcp_proxy", "because"),
        ("session_runner", "tool_call:1"),
    ]:
        err = await refused(w.reveal(ann, "gh", service=service, purpose=purpose))
        assert isinstance(err, CommandFailed) and err.problem.status == 403, (service, purpose)
        assert GH not in err.problem.detail


# -- keys -------------------------------------------------------------------------------
async def key_status(w: World, reload: bool = False) -> cmd.KeyReport:
    return await w.client.call(
        "secrets", "key_status", cmd.KeyStatus(meta=OPERATOR, reload=reload), cmd.KeyReport
    )


async def test_rotate_rewrap_retire_report(world: World) -> None:
    w, ann = world, world.ann
    for i in range(3):
        await w.http.put(f"/v1/secrets/s{i}", json={"value": f"value-{i}"}, headers=w.headers(ann))
    ring = Keyring.parse(w.keyring_file.read_text()).with_new_key("k2")
    write_keyring(w.keyring_file, ring)  # `gatehouse keys rotate`
    status = await key_status(w, reload=True)
    assert status.current_key_id == "k2"
    assert {(k.key_id, k.data_keys) for k in status.keys} >= {("k1", 4), ("k2", 0)}  # + fingerprint key
    assert "s0 (user " in " ".join(next(k for k in status.keys if k.key_id == "k1").secrets)

    fresh = await w.http.put("/v1/secrets/new", json={"value": "value-new"}, headers=w.headers(ann))
    assert fresh.json()["key_id"] == "k2"
    assert (await w.reveal(ann, "s1")).value == "value-1"  # old versions still decrypt

    report = await w.client.call("secrets", "rewrap", cmd.Rewrap(meta=OPERATOR), cmd.RewrapReport)
    assert (report.key_id, report.rewrapped, report.already_current) == ("k2", 4, 1)
    assert report.from_key_ids == {"k1": 4} and report.unreadable == {}
    listed = (await w.http.get("/v1/secrets", headers=w.headers(ann))).json()
    assert {s["key_id"] for s in listed} == {"k2"}

    write_keyring(w.keyring_file, ring.without("k1"))  # `gatehouse keys retire k1`
    status = await key_status(w, reload=True)
    assert [k.key_id for k in status.keys] == ["k2"]
    assert [(await w.reveal(ann, f"s{i}")).value for i in range(3)] == ["value-0", "value-1", "value-2"]

    async def audited() -> Any:
        items = await w.audit(w.admin, action="data_keys.rewrapped")
        return items or None

    # the rewrap is an operator action on the platform chain, not an org's: not in an org's trail
    await asyncio.sleep(0.3)
    assert not await audited()


async def test_a_retired_key_still_in_use_is_reported_not_silent(world: World) -> None:
    w, ann = world, world.ann
    await w.http.put("/v1/secrets/old", json={"value": "value-old"}, headers=w.headers(ann))
    ring = Keyring.parse(w.keyring_file.read_text()).with_new_key("k2")
    write_keyring(w.keyring_file, ring.without("k1"))  # retired without a rewrap
    status = await key_status(w, reload=True)
    k1 = next(k for k in status.keys if k.key_id == "k1")
    assert not k1.known and k1.data_keys == 2 and "the fingerprint key" in k1.secrets
    err = await refused(w.reveal(ann, "old"))
    assert isinstance(err, CommandFailed) and err.problem.code == "master_key_missing"
    assert "master key `k1`" in err.problem.detail
    report = await w.client.call("secrets", "rewrap", cmd.Rewrap(meta=OPERATOR), cmd.RewrapReport)
    assert report.unreadable == {"k1": 2} and report.rewrapped == 0


# -- corruption -------------------------------------------------------------------------
def execute(w: World, sql: Any, params: list[Any] | None = None) -> list[Any]:
    with psycopg.connect(w.settings.require_database(), autocommit=True) as conn:
        cur = conn.execute(sql, params or [])
        return cur.fetchall() if cur.description else []


async def test_tampered_or_moved_data_keys_are_reported_as_corrupted(world: World) -> None:
    w, ann, bea = world, world.ann, world.bea
    await w.http.put("/v1/secrets/a", json={"value": "value-a"}, headers=w.headers(ann))
    await w.http.put("/v1/secrets/b", json={"value": "value-b"}, headers=w.headers(bea))
    rows = execute(
        w,
        "SELECT id, wrapped FROM secrets.data_keys WHERE secret_id <> %s ORDER BY created_at",
        ["00000000-0000-0000-0000-000000000000"],
    )
    (a_id, a_wrapped), (b_id, _) = rows
    execute(w, "UPDATE secrets.data_keys SET wrapped = %s WHERE id = %s", [a_wrapped, b_id])  # copied row
    err = await refused(w.reveal(bea, "b"))
    assert isinstance(err, CommandFailed) and err.problem.code == "secret_corrupted"
    assert "secret `b` is corrupted" in err.problem.detail and err.problem.status == 422
    last = "length(wrapped) - 1"  # flip one bit of the GCM tag
    execute(
        w,
        f"UPDATE secrets.data_keys SET wrapped = set_byte(wrapped, {last}, get_byte(wrapped, {last}) # 1) "
        "WHERE id = %s",
        [a_id],
    )
    err = await refused(w.reveal(ann, "a"))
    assert isinstance(err, CommandFailed) and err.problem.code == "secret_corrupted"
    assert (await w.http.get("/v1/secrets/a", headers=w.headers(ann))).status_code == 200  # metadata stays


async def test_a_tampered_ciphertext_in_the_event_store_is_reported_as_corrupted(
    service_env: dict[str, str], tmp_path: Any
) -> None:
    from tests.integration.secrets_world import secrets_settings

    settings, _ = secrets_settings(service_env, tmp_path)
    meta = CommandMeta(actor=Actor(kind="user", id="u1"), correlation_id="c")
    reveal = cmd.RevealSecret(
        meta=meta, service="mcp_proxy", purpose="tool_call:1", org_id="o1", user_id="u1", name="gh"
    )
    async with running(secrets_build, settings, "secrets") as bus:
        from services.kit.rpc import CommandClient

        client = CommandClient(bus)
        put = cmd.PutSecret(meta=meta, org_id="o1", user_id="u1", name="gh", value=GH)
        await client.call("secrets", "put", put, cmd.SecretView)
        assert (await client.call("secrets", "reveal", reveal, cmd.RevealedSecret)).value == GH

    with psycopg.connect(settings.require_database(), autocommit=True) as conn:
        table = SQL("{}.{}").format(Identifier("secrets"), Identifier("secrets_events"))
        rows = conn.execute(SQL("SELECT notification_id, state FROM {} ").format(table)).fetchall()
        stored = [(n, bytes(s)) for n, s in rows if b'"ciphertext":"' in bytes(s)]
        assert len(stored) == 1
        notification_id, state = stored[0]
        ciphertext = state.split(b'"ciphertext":"')[1].split(b'"')[0]
        raw = bytearray(base64.b64decode(ciphertext))
        raw[0] ^= 1
        tampered = state.replace(ciphertext, base64.b64encode(bytes(raw)))
        conn.execute(
            SQL("UPDATE {} SET state = %s WHERE notification_id = %s").format(table),
            [tampered, notification_id],
        )

    async with running(secrets_build, settings, "secrets") as bus:
        from services.kit.rpc import CommandClient

        err = await refused(CommandClient(bus).call("secrets", "reveal", reveal, cmd.RevealedSecret))
        assert isinstance(err, CommandFailed) and err.problem.code == "secret_corrupted"
        assert err.problem.status == 422 and "secret `gh` is corrupted" in err.problem.detail


async def test_a_missing_master_key_stops_the_service_at_start_naming_it(
    service_env: dict[str, str], tmp_path: Any
) -> None:
    from tests.integration.secrets_world import secrets_settings

    settings, keyring_file = secrets_settings(service_env, tmp_path)
    async with running(secrets_build, settings, "secrets"):
        pass  # the fingerprint key is wrapped under k1
    ring = Keyring.parse(keyring_file.read_text())
    write_keyring(keyring_file, ring.with_new_key("k2").without("k1"))
    with pytest.raises(ConfigError, match=r"`k1` \(1 data keys\)"):
        async with running(secrets_build, settings, "secrets"):
            pass
    bad = load_settings({**service_env, "GATEHOUSE_MASTER_KEYS": "k1:not-base64!"})
    with pytest.raises(ConfigError, match="GATEHOUSE_MASTER_KEYS: master key `k1` is not valid base64"):
        async with running(secrets_build, bad, "secrets"):
            pass
    none = load_settings({k: v for k, v in service_env.items() if "MASTER" not in k})
    with pytest.raises(ConfigError, match="no master keys"):
        async with running(secrets_build, none, "secrets"):
            pass
