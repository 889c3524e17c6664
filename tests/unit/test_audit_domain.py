"""The audit trail's rules, without servers: actions, redaction, chaining, tamper evidence."""

import uuid
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from contracts.envelope import Actor, Envelope, TraceContext, payload_bytes
from contracts.events import identity as ev
from services.audit.domain import (
    GENESIS,
    PLATFORM,
    UNDECODABLE,
    Entry,
    InvalidQuery,
    action_for,
    canonical,
    check_page,
    decode_cursor,
    digest_of,
    encode_cursor,
    entry_for,
    genesis,
    hash_of,
    scope_for,
    scrub,
    seal,
    verify_chain,
)
from services.audit.domain.chain import Head, advance
from services.kit.redaction import register_secret

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
ORG_A, ORG_B = str(uuid.uuid4()), str(uuid.uuid4())
USER = str(uuid.uuid4())
KEY = "mcp_" + "A" * 43
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def envelope(event_type: str, payload: object, org_id: str | None = ORG_A, n: int = 0) -> Envelope:
    return Envelope(
        event_id=str(uuid.uuid4()),
        type=event_type,
        schema_version=1,
        occurred_at=T0 + timedelta(seconds=n),
        org_id=org_id,
        actor=Actor(kind="user", id=USER, key_id="k1", ip="203.0.113.7", user_agent="cursor"),
        correlation_id="corr-1",
        trace=TraceContext(traceparent=TRACEPARENT),
        data=payload_bytes(payload),
    )


def issued(n: int = 0, org_id: str | None = ORG_A) -> Envelope:
    payload = ev.ApiKeyIssued(
        key_id=f"key-{n}",
        user_id=USER,
        name="laptop",
        prefix=KEY[:12],
        key_hash="ab" * 32,
        created_at=T0,
    )
    return envelope("identity.api_key_issued", payload, org_id, n)


def chain(envelopes: list[Envelope]) -> list[Entry]:
    """Seals entries the way the projection does, one chain per org."""
    heads: dict[str, Head] = {}
    out = []
    for seq, env in enumerate(envelopes, start=1):
        draft = entry_for(seq, f"events.{env.type}", env, None)
        head = heads.get(draft.org_id, genesis(draft.org_id))
        entry = seal(draft, head)
        heads[entry.org_id] = advance(head, entry)
        out.append(entry)
    return out


# -- actions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("event_type", "action"),
    [
        ("identity.api_key_issued", "api_key.issued"),
        ("identity.api_key_revoked", "api_key.revoked"),
        ("identity.api_key_used", "api_key.used"),
        ("identity.user_registered", "user.registered"),
        ("identity.org_created", "org.created"),
        ("identity.tier_changed", "user.tier_changed"),
        ("secrets.secret_stored", "secret.stored"),  # not catalogued: read from the name
        ("session_runner.build_started", "build.started"),
        ("quota.exceeded", "quota.exceeded"),
    ],
)
def test_action_of_each_event_type(event_type: str, action: str) -> None:
    assert action_for(event_type) == action


def test_entry_takes_actor_resource_subject_and_trace_from_the_envelope() -> None:
    entry = entry_for(7, "events.identity.api_key_issued", issued(), None)
    assert (entry.action, entry.resource_type) == ("api_key.issued", "api_key")
    assert entry.resource_id == "key-0"
    assert entry.subject_user_id == USER
    assert (entry.actor.id, entry.actor.key_id, entry.actor.ip) == (USER, "k1", "203.0.113.7")
    assert entry.outcome == "success"
    assert entry.org_id == ORG_A and entry.at == T0 and entry.stream_seq == 7
    assert entry.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_unknown_event_types_are_recorded_generically() -> None:
    env = envelope("builds.build_failed", {"build_id": "b-1", "outcome": "error"})
    entry = entry_for(1, "events.builds.build_failed", env, None)
    assert (entry.action, entry.resource_type) == ("build.failed", "build")
    assert entry.resource_id == "b-1"
    assert entry.outcome == "error"


def test_undecodable_message_is_kept_with_its_subject_and_seq() -> None:
    entry = entry_for(42, "events.junk.x", None, "undecodable envelope: bad", previous_at=T0)
    assert entry.action == UNDECODABLE and entry.org_id == PLATFORM
    assert entry.metadata["subject"] == "events.junk.x" and entry.metadata["stream_seq"] == 42
    assert entry.at == T0  # dated by the stream, not by the clock: rebuilds agree
    assert entry_for(42, "events.junk.x", None, "x").id == entry.id


def test_events_without_an_org_go_to_the_platform_chain() -> None:
    entry = entry_for(1, "events.identity.api_key_issued", issued(org_id=None), None)
    assert entry.org_id == PLATFORM


# -- metadata -----------------------------------------------------------------------------
def test_metadata_drops_secrets_and_redacts_keys() -> None:
    entry = entry_for(1, "events.identity.api_key_issued", issued(), None)
    assert "key_hash" not in entry.metadata
    assert entry.metadata["prefix"] == KEY[:12]  # a prefix is not a secret

    cleaned = scrub(
        {
            "note": f"user pasted {KEY} here",
            "client_secret": "s3cr3t",
            "access_token": "t",
            "password": "p",
            "value": "v",
            "env": {"GITHUB_TOKEN": "ghp_x", "HOME": "/home/u"},
            "nul": "a\x00b",
        }
    )
    assert KEY not in cleaned["note"] and "[REDACTED]" in cleaned["note"]
    assert not {"client_secret", "access_token", "password", "value"} & cleaned.keys()
    assert cleaned["env"] == {"HOME": "/home/u"}
    assert "\x00" not in cleaned["nul"]


def test_metadata_numbers_survive_a_jsonb_round_trip() -> None:
    cleaned = scrub({"big": 1e16, "neg_zero": -0.0, "nan": float("nan"), "small": 0.5, "n": 3})
    assert cleaned == {"big": 10**16, "neg_zero": 0.0, "nan": None, "small": 0.5, "n": 3}
    assert isinstance(cleaned["big"], int)


def test_a_message_with_nothing_to_redact_makes_the_same_entry_without_asking_redact() -> None:
    """`entry_for(..., raw=)` skips string-by-string redaction only when it would change nothing."""
    register_secret("s3cret-registered")
    payloads: list[object] = [
        {"user_id": USER, "outcome": "failure", "n": 1.5, "deep": {"a": [1, {"b": None}]}},
        {"note": f"pasted {KEY}", "password": "p", "key_id": "k"},  # a key: redacted the slow way
        {"note": "mcp_proxy.tool_call", "x" * 300: "y" * 5000, "big": 1e16, "neg": -0.0},
        {"quote": 'say "hi"', "nul": "a\x00b"},  # escapes: the slow way
        {"leak": "s3cret-registered", "id": "i" * 250},
        {"level": {"level": {"level": {"level": {"level": {"level": {"level": {"x": 1}}}}}}}},
    ]
    for n, payload in enumerate(payloads):
        env = msgspec.structs.replace(
            envelope("mcp_proxy.tool_call_completed", payload, n=n), correlation_id="c" * 300
        )
        raw = msgspec.json.encode(env)
        slow = entry_for(n + 1, "events.x", env, None)
        assert entry_for(n + 1, "events.x", env, None, raw=raw) == slow
    assert "[REDACTED]" in str(entry_for(5, "events.x", envelope("x.y_z", payloads[4]), None).metadata)


def test_the_canonical_encoding_is_frozen() -> None:
    """Every stored hash depends on these exact bytes: a change here breaks existing chains."""
    entry = Entry(
        id="e-1",
        org_id="org-ø",
        stream_seq=9,
        at=datetime(2026, 11, 21, 13, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))),
        actor=Actor(kind="user", id="u-1", key_id=None, ip="203.0.113.7", user_agent="ü/1"),
        subject_user_id=None,
        action="api_key.issued",
        resource_type="api_key",
        resource_id="k-1",
        outcome="success",
        metadata={"z": [1, 0.5, None, True], "a": {"y": '"q"\n', "b": "é"}},
        correlation_id="c",
        trace_id=None,
        seq=3,
        prev_hash="ab" * 32,
    )
    assert canonical(entry).decode() == (
        '{"action":"api_key.issued","actor":{"id":"u-1","ip":"203.0.113.7","key_id":null,'
        '"kind":"user","user_agent":"ü/1"},"at":"2026-11-21T12:00:00.000005+00:00",'
        '"correlation_id":"c","id":"e-1","metadata":{"a":{"b":"é","y":"\\"q\\"\\n"},'
        '"z":[1,0.5,null,true]},"org_id":"org-ø","outcome":"success","prev_hash":"' + "ab" * 32 + '",'
        '"resource":{"id":"k-1","type":"api_key"},"seq":3,"subject_user_id":null,"trace_id":null}'
    )
    assert hash_of(entry) == "8438c4473b51931d51d3365e64aec1bde65ee90e5bd07e5a2555e6cc8b1a9a70"
    sealed = seal(msgspec.structs.replace(entry, seq=0, prev_hash=""), Head("org-ø", 2, "ab" * 32))
    assert sealed.hash == hash_of(entry) and sealed.seq == 3


# -- the hash chain -----------------------------------------------------------------------
def test_chain_hashing_is_deterministic() -> None:
    envs = [issued(0), issued(1), issued(2, ORG_B), issued(3)]
    first, again = chain(envs), chain(envs)
    assert [e.hash for e in first] == [e.hash for e in again]
    a = [e for e in first if e.org_id == ORG_A]
    assert [e.seq for e in a] == [1, 2, 3]
    assert a[0].prev_hash == GENESIS and a[1].prev_hash == a[0].hash
    b = next(e for e in first if e.org_id == ORG_B)
    assert b.seq == 1 and b.prev_hash == GENESIS  # one chain per org
    assert canonical(a[0]) == canonical(msgspec.structs.replace(a[0], stream_seq=99))


def test_an_intact_chain_verifies() -> None:
    entries = sorted(
        chain([issued(n, ORG_A if n % 2 else ORG_B) for n in range(6)]),
        key=lambda e: (e.org_id, e.seq),
    )
    heads = [Head(e.org_id, e.seq, e.hash) for e in entries if e.seq == 3]
    assert verify_chain(entries, heads) is None


def test_tampering_is_detected_by_recomputing() -> None:
    entries = chain([issued(n) for n in range(4)])
    heads = [Head(ORG_A, 4, entries[-1].hash)]

    edited = list(entries)
    edited[1] = msgspec.structs.replace(entries[1], metadata={**entries[1].metadata, "name": "x"})
    broken = verify_chain(edited, heads)
    assert broken is not None and broken.entry_id == entries[1].id and "hash" in broken.reason

    rehashed = list(edited)  # re-sealing the edit still breaks the next link
    rehashed[1] = msgspec.structs.replace(edited[1], hash=hash_of(edited[1]))
    broken = verify_chain(rehashed, heads)
    assert broken is not None and broken.entry_id == entries[2].id

    broken = verify_chain(entries[:1] + entries[2:], heads)
    assert broken is not None and broken.seq == 2 and "missing" in broken.reason

    broken = verify_chain(entries[:3], heads)  # the newest entry dropped: only the head knows
    assert broken is not None and "head" in broken.reason


def test_digest_depends_only_on_the_chains() -> None:
    heads = [Head(ORG_B, 1, "b" * 64), Head(ORG_A, 3, "a" * 64)]
    one = digest_of(heads, 4, 9)
    assert one == digest_of(list(reversed(heads)), 4, 9)
    assert (one.entries, one.orgs, one.stream_seq) == (4, 2, 9)
    assert one.digest != digest_of(heads, 4, 10).digest


# -- paging -------------------------------------------------------------------------------
def test_cursor_round_trip_and_refusals() -> None:
    key = b"k" * 32
    scope = scope_for(ORG_A, USER, is_admin=False)
    cursor = encode_cursor(scope, {"action": "api_key.issued"}, 17, key)
    assert decode_cursor(cursor, scope, {"action": "api_key.issued"}, key) == 17
    for bad in ("garbage", cursor[:-2] + "AA", "x" + cursor, "", cursor + "." + cursor):
        with pytest.raises(InvalidQuery):
            decode_cursor(bad, scope, {"action": "api_key.issued"}, key)
    with pytest.raises(InvalidQuery):  # another filter
        decode_cursor(cursor, scope, {}, key)
    with pytest.raises(InvalidQuery):  # another reader
        admin = scope_for(ORG_A, USER, is_admin=True)
        decode_cursor(cursor, admin, {"action": "api_key.issued"}, key)
    with pytest.raises(InvalidQuery):  # another key
        decode_cursor(cursor, scope, {"action": "api_key.issued"}, b"z" * 32)


@pytest.mark.parametrize("limit", [0, -1, 501])
def test_limit_out_of_range_is_refused(limit: int) -> None:
    with pytest.raises(InvalidQuery):
        check_page(limit, None, None)
