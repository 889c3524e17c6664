"""The secrets rules and use cases, on in-memory aggregates and an in-memory keystore."""

from datetime import UTC, datetime

import pytest

from services.secrets.adapters.keystore import MemoryKeystore
from services.secrets.adapters.outbox import translate
from services.secrets.adapters.usage import MemoryUsage
from services.secrets.application import FINGERPRINT_KEY_ID, RevealRequest, Secrets
from services.secrets.crypto import WrappedKey, new_master_key
from services.secrets.domain import (
    Invalid,
    KeyUnavailable,
    NotFound,
    Refused,
    Revoked,
    Secret,
    Unreadable,
    check_name,
    check_reveal,
    check_value,
    secret_id,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
META = {"actor": {"kind": "user", "id": "u-1"}, "correlation_id": "c-1"}
API_KEY = "key_" + "a1b2c3d4" * 4


# -- rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "cursor_api_key", "github.token", "x-1", "0" * 64, "a_b.c-d"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "_x", ".x", "-x", "a b", "a/b", "é", "a" * 65, "x\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(Invalid, match="not a valid secret name"):
        check_name(name)


def test_values_are_one_byte_to_16_kib_and_may_be_multi_line() -> None:
    assert check_value("k", "x") == b"x"
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    assert check_value("ssh_key", key) == key.encode()
    assert len(check_value("k", "é" * 8192)) == 16384
    with pytest.raises(Invalid, match="empty"):
        check_value("k", "")
    with pytest.raises(Invalid, match="16385 bytes") as err:
        check_value("k", "y" * 16385)
    assert "yyyy" not in str(err.value)


@pytest.mark.parametrize("value", ["short", "has space in it 1234567", "a" * 30 + "\n", "\t" + "a" * 30])
def test_cursor_api_key_must_look_like_an_api_key(value: str) -> None:
    with pytest.raises(Invalid, match="must be an API key") as err:
        check_value("cursor_api_key", value)
    assert value.strip() not in str(err.value)
    assert check_value("cursor_api_key", API_KEY) == API_KEY.encode()
    assert check_value("other", value)  # only the well-known name is checked


def test_only_mcp_proxy_and_session_runner_reveal_for_their_own_purposes() -> None:
    assert check_reveal("mcp_proxy", "tool_call:req-1") == "tool_call:req-1"
    assert check_reveal("session_runner", "build:5f0e") == "build:5f0e"
    for service, purpose in [
        ("gateway", "tool_call:1"),
        ("identity", "build:1"),
        ("mcp_proxy", "build:1"),
        ("session_runner", "tool_call:1"),
        ("mcp_proxy", "tool_call:"),
        ("mcp_proxy", "debugging"),
        ("mcp_proxy", "tool_call:" + "x" * 200),
    ]:
        with pytest.raises(Refused):
            check_reveal(service, purpose)


def test_secret_versions_and_revocation() -> None:
    secret = Secret(org_id="o", owner="u", name="gh", meta=META)
    with pytest.raises(NotFound):
        secret.check_usable()
    assert secret.store(1, "n", "c", "dk1", "k1", "fp", NOW, META) is None
    assert secret.store(2, "n", "c", "dk2", "k1", "fp", NOW, META) == "dk1"
    with pytest.raises(Invalid):
        secret.store(2, "n", "c", "dk3", "k1", "fp", NOW, META)
    assert secret.revoke(NOW, META) and not secret.revoke(NOW, META)
    with pytest.raises(Revoked, match=r"secret `gh` was revoked on 2026-11-21 12:00 UTC; set it again"):
        secret.check_usable()
    secret.store(3, "n", "c", "dk4", "k1", "fp", NOW, META)  # set again
    secret.check_usable()
    names = [type(e).__qualname__ for e in secret.collect_events()]
    assert names == ["Secret.Created", *["Secret.Stored"] * 2, "Secret.Revoked", "Secret.Stored"]


def test_ids_separate_owners_orgs_and_names() -> None:
    ids = {secret_id(o, u, n) for o in ("o1", "o2") for u in ("u1", "u2", "org") for n in ("a", "b")}
    assert len(ids) == 12


# -- use cases, in memory ---------------------------------------------------------------
@pytest.fixture
def store() -> MemoryKeystore:
    return MemoryKeystore()


@pytest.fixture
def app(store: MemoryKeystore) -> Secrets:
    return Secrets(
        new_master_key("k1"), store, MemoryUsage(), env={"PERSISTENCE_MODULE": "eventsourcing.popo"}
    )


def ask(name: str, user: str = "u1", org: str = "o1", lookup: str = "any") -> RevealRequest:
    return RevealRequest("mcp_proxy", "tool_call:t-1", org, user, name, lookup)


def test_put_reveal_replace_revoke(app: Secrets, store: MemoryKeystore) -> None:
    info = app.put("o1", "u1", "user", "gh", "first", META)
    assert info.secret.value_version == 1 and info.kid == "k1"
    assert app.reveal(ask("gh"))[1] == b"first"
    app.put("o1", "u1", "user", "gh", "second", META)
    sealing, value = app.reveal(ask("gh"))
    assert value == b"second" and sealing.version == 2
    assert len([r for r in store.rows.values() if r.id != FINGERPRINT_KEY_ID]) == 1  # v1 shredded
    app.revoke("o1", "u1", "user", "gh", META)
    assert [r.id for r in store.rows.values()] == [FINGERPRINT_KEY_ID]
    with pytest.raises(Revoked, match="secret `gh` was revoked on"):
        app.reveal(ask("gh"))
    with pytest.raises(Revoked):
        app.info("o1", "u1", "user", "gh")
    app.revoke("o1", "u1", "user", "gh", META)  # twice is fine
    app.put("o1", "u1", "user", "gh", "third", META)
    assert app.reveal(ask("gh"))[1] == b"third"


def test_fingerprints_follow_the_value(app: Secrets) -> None:
    a = app.put("o1", "u1", "user", "a", "same", META).secret.fingerprint
    b = app.put("o1", "u2", "user", "b", "same", META).secret.fingerprint
    c = app.put("o1", "u1", "user", "c", "different", META).secret.fingerprint
    assert a == b != c


def test_users_see_only_their_own_and_their_orgs(app: Secrets) -> None:
    app.put("o1", "u1", "user", "gh", "mine", META)
    app.put("o1", "admin", "org", "jira", "ours", META)
    app.put("o2", "admin2", "org", "jira", "theirs", META)
    with pytest.raises(NotFound) as other:
        app.reveal(ask("gh", user="u2"))
    with pytest.raises(NotFound) as never:
        app.reveal(ask("nope", user="u2"))
    assert str(other.value).replace("gh", "X") == str(never.value).replace("nope", "X")
    with pytest.raises(NotFound):
        app.info("o1", "u2", "user", "gh")
    assert app.reveal(ask("jira", user="u2"))[1] == b"ours"
    assert app.reveal(ask("jira", user="u9", org="o2"))[1] == b"theirs"
    assert [i.secret.name for i in app.listing("o1", "u2", "any")] == ["jira"]
    assert [(i.secret.name, i.secret.scope) for i in app.listing("o1", "u1", "any")] == [
        ("gh", "user"),
        ("jira", "org"),
    ]
    with pytest.raises(NotFound, match="your org has no secret named `gh`"):
        app.reveal(ask("gh", lookup="org"))


def test_a_users_secret_shadows_the_orgs(app: Secrets) -> None:
    app.put("o1", "admin", "org", "token", "org-value", META)
    app.put("o1", "u1", "user", "token", "own-value", META)
    assert app.reveal(ask("token"))[1] == b"own-value"
    assert app.reveal(ask("token", lookup="org"))[1] == b"org-value"
    app.revoke("o1", "u1", "user", "token", META)
    with pytest.raises(Revoked):  # revoking one's own does not silently switch to the org's
        app.reveal(ask("token"))


def test_tampered_and_misplaced_keys_are_reported_not_raised(app: Secrets, store: MemoryKeystore) -> None:
    a = app.put("o1", "u1", "user", "a", "value-a", META).secret
    b = app.put("o1", "u2", "user", "b", "value-b", META).secret
    row_a, row_b = store.rows[a.data_key_id], store.rows[b.data_key_id]
    store.rows[b.data_key_id] = type(row_b)(row_b.id, row_b.secret_id, row_b.version, row_a.wrapped)
    with pytest.raises(Unreadable, match="secret `b` is corrupted"):
        app.reveal(ask("b", user="u2"))
    flipped = bytes([row_a.wrapped.wrapped[0] ^ 1]) + row_a.wrapped.wrapped[1:]
    store.rows[a.data_key_id] = type(row_a)(
        row_a.id, row_a.secret_id, row_a.version, WrappedKey("k1", flipped)
    )
    with pytest.raises(Unreadable):
        app.reveal(ask("a"))


def test_rotate_rewrap_retire(app: Secrets, store: MemoryKeystore) -> None:
    for i in range(7):
        app.put("o1", "u1", "user", f"s{i}", f"value-{i}", META)
    app.keyring = app.keyring.with_new_key("k2")
    app.put("o1", "u1", "user", "new", "value-new", META)
    assert app.reveal(ask("s3"))[1] == b"value-3"  # still under k1
    done = app.rewrap_all(META, batch=3)
    assert (done.kid, done.rewrapped, done.already_current, done.moved) == ("k2", 8, 1, {"k1": 8})
    assert store.usage() == {"k2": 9}  # 8 data keys + the fingerprint key
    app.keyring = app.keyring.without("k1")
    assert [app.reveal(ask(f"s{i}"))[1] for i in range(7)] == [f"value-{i}".encode() for i in range(7)]
    assert app.rewrap_all(META).rewrapped == 0


def test_a_data_key_under_a_retired_master_key_is_reported(app: Secrets) -> None:
    app.put("o1", "u1", "user", "old", "value", META)
    app.keyring = app.keyring.with_new_key("k2").without("k1")
    with pytest.raises(KeyUnavailable, match="master key `k1`") as err:
        app.reveal(ask("old"))
    assert err.value.kid == "k1"
    assert ("k1", 2, False) in [(kid, n, known) for kid, n, known, _ in app.key_usage()]
    assert app.rewrap_all(META).unreadable == {"k1": 2}


def test_reveals_are_recorded_and_update_last_used(app: Secrets) -> None:
    from services.secrets.application import Denial, Reveal

    app.put("o1", "u1", "user", "gh", "v", META)
    sealing, _ = app.reveal(ask("gh"))
    app.record([Reveal(sealing, ask("gh"), NOW, META)], [Denial(ask("nope"), "not_found", NOW, META)])
    assert app.info("o1", "u1", "user", "gh").last_used_at == NOW
    recorded = app.recorder.select_notifications(1, 100)
    out = [translate(app.mapper.to_domain_event(n)) for n in recorded]
    kinds = [type(o.payload).__name__ for o in out if o is not None]
    assert kinds == ["SecretStored", "SecretRevealed", "RevealDenied"]
    revealed = next(o for o in out if o is not None and type(o.payload).__name__ == "SecretRevealed")
    assert revealed.org_id == "o1" and revealed.payload.secret_id == str(sealing.secret_id)  # type: ignore[attr-defined]
    app.revoke("o1", "u1", "user", "gh", META)
    app.put("o1", "u1", "user", "gh", "again", META)
    assert app.info("o1", "u1", "user", "gh").last_used_at is None  # a new life after revocation
