"""Identity's rules, run on in-memory aggregates (no database, no bus)."""

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest

from services.identity.domain import (
    MAX_ACTIVE_KEYS,
    MAX_EXPIRY_DAYS,
    PREFIX_LENGTH,
    TIERS,
    Conflict,
    EmailClaim,
    Invalid,
    NotFound,
    Org,
    User,
    check_tier,
    hash_key,
    looks_like_key,
    mint_key,
    normalize_email,
    normalize_org,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
META = {"actor": {"kind": "operator", "id": "test"}, "correlation_id": "c-1"}
PEPPER = b"p" * 32


def new_user(tier: str = "free") -> User:
    return User(email="ada@example.com", org_id="org-1", tier=tier, is_admin=False, meta=META)


def issue(user: User, expires_in_days: int | None = None, name: str = "laptop") -> str:
    key = mint_key()
    key_hash, prefix = hash_key(key, PEPPER), key[:PREFIX_LENGTH]
    return user.issue_key(name, key_hash, prefix, NOW, expires_in_days, META)


def event_names(user: User) -> list[str]:
    return [type(e).__name__ for e in user.collect_events()]


# -- keys -------------------------------------------------------------------------------
def test_key_is_mcp_prefix_and_43_chars_of_base64url() -> None:
    key = mint_key()
    assert re.fullmatch(r"mcp_[A-Za-z0-9_-]{43}", key)
    raw = base64.urlsafe_b64decode(key[4:] + "=")
    assert len(raw) * 8 >= 256
    assert looks_like_key(key)


def test_keys_do_not_repeat() -> None:
    keys = {mint_key() for _ in range(1000)}
    assert len(keys) == 1000


def test_hash_key_is_deterministic_and_depends_on_the_pepper() -> None:
    key = mint_key()
    assert hash_key(key, PEPPER) == hash_key(key, PEPPER)
    assert hash_key(key, PEPPER) != hash_key(key, b"q" * 32)
    assert hash_key(key, PEPPER) != hash_key(mint_key(), PEPPER)
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(key, PEPPER))
    assert key not in hash_key(key, PEPPER)


@pytest.mark.parametrize("text", ["", "mcp_short", "sk_" + "a" * 43, "mcp_" + "a" * 70])
def test_looks_like_key_rejects_other_shapes(text: str) -> None:
    assert not looks_like_key(text)


# -- users, orgs, tiers -----------------------------------------------------------------
@pytest.mark.parametrize(
    "email", ["", "no-at-sign", "@example.com", "ada@", "a b@example.com", "a@" + "x" * 260]
)
def test_invalid_email_is_refused(email: str) -> None:
    with pytest.raises(Invalid):
        normalize_email(email)


def test_email_is_normalized() -> None:
    assert normalize_email("  Ada@Example.COM ") == "ada@example.com"


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "slash/name"])
def test_invalid_org_name_is_refused(name: str) -> None:
    with pytest.raises(Invalid):
        normalize_org(name)


def test_unknown_tier_is_refused() -> None:
    with pytest.raises(Invalid):
        check_tier("platinum")
    user = new_user()
    user.collect_events()
    with pytest.raises(Invalid):
        user.set_tier("platinum", META)
    assert user.tier == "free"
    assert event_names(user) == []


def test_tier_change_is_recorded_once() -> None:
    user = new_user()
    user.collect_events()
    assert user.set_tier("pro", META)
    assert not user.set_tier("pro", META)
    events = user.collect_events()
    assert [type(e).__name__ for e in events] == ["TierChanged"]
    assert events[0].previous_tier == "free"  # type: ignore[attr-defined]
    assert events[0].meta["org_id"] == "org-1"  # type: ignore[attr-defined]
    assert set(TIERS) >= {"free", "pro"}


def test_org_and_email_claim_ids_derive_from_their_names() -> None:
    assert Org.create_id("acme", False, META) == Org.create_id("acme", True, {})
    assert Org.create_id("acme", False, META) != Org.create_id("other", False, META)
    claim_id = EmailClaim.create_id("a@example.com", "u-1")
    assert claim_id == EmailClaim.create_id("a@example.com", "u-2")
    org = Org(name="acme", personal=False, meta=META)
    assert org.id == Org.create_id("acme", False, META)
    org.add_member(user_id="u-1", meta=META)
    assert org.members == ["u-1"]


# -- key rules --------------------------------------------------------------------------
@pytest.mark.parametrize("days", [0, -1, MAX_EXPIRY_DAYS + 1])
def test_expiry_out_of_bounds_is_refused(days: int) -> None:
    user = new_user()
    with pytest.raises(Invalid):
        issue(user, expires_in_days=days)
    assert user.keys == {}


@pytest.mark.parametrize("days", [1, MAX_EXPIRY_DAYS])
def test_expiry_at_the_bounds_is_accepted(days: int) -> None:
    user = new_user()
    key_id = issue(user, expires_in_days=days)
    assert user.keys[key_id]["expires_at"] == NOW + timedelta(days=days)


def test_key_without_expiry_never_expires() -> None:
    user = new_user()
    key_id = issue(user)
    assert user.keys[key_id]["expires_at"] is None
    assert user.active_keys(NOW + timedelta(days=100 * 365)) == 1


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_key_name_is_required_and_bounded(name: str) -> None:
    with pytest.raises(Invalid):
        issue(new_user(), name=name)


def test_active_key_limit() -> None:
    user = new_user()
    for _ in range(MAX_ACTIVE_KEYS):
        issue(user)
    with pytest.raises(Conflict):
        issue(user)
    user.revoke_key(next(iter(user.keys)), NOW, META)
    issue(user)  # a revoked key frees a slot
    assert user.active_keys(NOW) == MAX_ACTIVE_KEYS


def test_issued_key_keeps_only_the_hash() -> None:
    user = new_user()
    key = mint_key()
    key_id = user.issue_key("laptop", hash_key(key, PEPPER), key[:PREFIX_LENGTH], NOW, None, META)
    stored = user.keys[key_id]
    assert stored["key_hash"] == hash_key(key, PEPPER)
    assert stored["prefix"] == key[:PREFIX_LENGTH]
    assert key not in repr(stored)
    assert key not in repr(user.collect_events())


def test_revoke_twice_is_idempotent() -> None:
    user = new_user()
    key_id = issue(user)
    user.collect_events()
    assert user.revoke_key(key_id, NOW, META) is True
    assert user.revoke_key(key_id, NOW + timedelta(hours=1), META) is False
    assert event_names(user) == ["KeyRevoked"]
    assert user.keys[key_id]["revoked_at"] == NOW
    assert user.active_keys(NOW) == 0


def test_revoke_unknown_key_is_not_found() -> None:
    user = new_user()
    issue(user)
    user.collect_events()
    with pytest.raises(NotFound):
        user.revoke_key("no-such-key", NOW, META)
    assert event_names(user) == []


def test_touch_key_at_most_once_per_minute() -> None:
    user = new_user()
    key_id = issue(user)
    user.collect_events()
    assert user.touch_key(key_id, NOW) is True
    assert user.touch_key(key_id, NOW + timedelta(seconds=1)) is False
    assert user.touch_key(key_id, NOW + timedelta(seconds=59)) is False
    assert user.touch_key(key_id, NOW + timedelta(seconds=60)) is True
    assert user.touch_key(key_id, NOW + timedelta(seconds=61)) is False
    assert event_names(user) == ["KeyUsed", "KeyUsed"]
    assert user.keys[key_id]["last_used_at"] == NOW + timedelta(seconds=60)


def test_touch_of_revoked_or_unknown_key_records_nothing() -> None:
    user = new_user()
    key_id = issue(user)
    user.revoke_key(key_id, NOW, META)
    user.collect_events()
    assert user.touch_key(key_id, NOW) is False
    assert user.touch_key("no-such-key", NOW) is False
    assert event_names(user) == []


def test_touch_is_attributed_to_the_user_and_key() -> None:
    user = new_user()
    key_id = issue(user)
    user.collect_events()
    user.touch_key(key_id, NOW)
    (used,) = user.collect_events()
    assert used.meta["actor"] == {"kind": "user", "id": str(user.id), "key_id": key_id}  # type: ignore[attr-defined]
    assert used.meta["org_id"] == "org-1"  # type: ignore[attr-defined]
