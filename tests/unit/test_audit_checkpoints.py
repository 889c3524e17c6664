"""Signed checkpoints, in memory: truncation, rewriting, retention bases and forged signatures."""

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from contracts.envelope import Actor
from services.audit.adapters.signing import CheckpointSigner
from services.audit.config import load_audit_settings
from services.audit.domain import (
    HEAD,
    RETENTION,
    ChainBreak,
    Checkpoint,
    CheckpointedVerifier,
    Entry,
    Head,
    Marks,
    advance,
    genesis,
    hash_of,
    seal,
)
from services.kit.config import ConfigError

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def chain(org: str, n: int) -> list[Entry]:
    head, out = genesis(org), []
    for i in range(n):
        draft = Entry(
            id=f"{org}-{i}",
            org_id=org,
            stream_seq=i + 1,
            at=T0 + timedelta(seconds=i),
            actor=Actor(kind="service", id="t"),
            subject_user_id=None,
            action="thing.done",
            resource_type="thing",
            resource_id=str(i),
            outcome="success",
            metadata={"i": i},
            correlation_id=None,
            trace_id=None,
        )
        entry = seal(draft, head)
        head = advance(head, entry)
        out.append(entry)
    return out


def head_of(entries: list[Entry]) -> Head:
    last = entries[-1]
    return Head(last.org_id, last.seq, last.hash)


def checkpoint(signer: CheckpointSigner, entry: Entry, kind: str = HEAD) -> Checkpoint:
    cp = Checkpoint(
        org_id=entry.org_id, seq=entry.seq, hash=entry.hash, at=T0 + timedelta(hours=1), kind=kind
    )
    return signer.sign(cp)


def verify(
    entries: list[Entry], heads: list[Head], checkpoints: list[Checkpoint], signer: CheckpointSigner
) -> ChainBreak | None:
    verifier = CheckpointedVerifier(Marks(checkpoints))
    broken = verifier.check_signatures(checkpoints, signer.problem_with)
    if broken:
        return broken
    for entry in entries:
        broken = verifier.check(entry)
        if broken:
            return broken
    return verifier.finish(heads)


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner(os.urandom(32))


def test_an_intact_chain_holds_to_its_checkpoints(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 6)
    cps = [checkpoint(signer, entries[2]), checkpoint(signer, entries[5])]
    assert verify(entries, [head_of(entries)], cps, signer) is None


def test_a_cut_tail_is_named_even_when_the_head_row_was_fixed_too(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 6)
    cps = [checkpoint(signer, entries[5])]
    kept = entries[:4]
    broken = verify(kept, [head_of(kept)], cps, signer)
    assert broken is not None and broken.org_id == "org-a" and broken.seq == 5
    assert broken.reason.startswith("entries after seq 4 are missing: head checkpoint at 2026-11-21T13:00")
    assert broken.reason.endswith("covered up to seq 6")


def test_a_rewritten_and_rehashed_chain_is_caught_at_the_checkpoint(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 4)
    cps = [checkpoint(signer, entries[3])]
    # Someone with database access edits entry 2 and recomputes every hash after it.
    forged, head = [], genesis("org-a")
    for i, e in enumerate(entries):
        draft = msgspec.structs.replace(e, metadata={"i": "edited"} if i == 1 else e.metadata)
        sealed = seal(draft, head)
        head = advance(head, sealed)
        forged.append(sealed)
    broken = verify(forged, [head_of(forged)], cps, signer)
    assert broken is not None and broken.seq == 4 and "rewritten" in broken.reason


def test_a_retention_checkpoint_is_where_the_chain_starts(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 6)
    cut = checkpoint(signer, entries[2], kind=RETENTION)
    rest = entries[3:]
    assert verify(rest, [head_of(entries)], [cut], signer) is None
    assert verify(entries, [head_of(entries)], [cut], signer) is None  # rebuilt, not yet cut again
    everything_gone = verify([], [head_of(entries)], [checkpoint(signer, entries[5], RETENTION)], signer)
    assert everything_gone is None
    broken = verify(entries[4:], [head_of(entries)], [cut], signer)  # one more deleted by hand
    assert broken is not None and "entries 4 to 4 are missing" in broken.reason


def test_a_prefix_deleted_without_a_retention_checkpoint_is_a_break(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 5)
    broken = verify(entries[2:], [head_of(entries)], [checkpoint(signer, entries[4])], signer)
    assert broken is not None and broken.reason == "entry 1 is missing"


def test_forged_or_foreign_signatures_are_refused(signer: CheckpointSigner) -> None:
    entries = chain("org-a", 5)
    good = checkpoint(signer, entries[1], kind=RETENTION)
    moved = msgspec.structs.replace(good, seq=4, hash=entries[3].hash)  # claims a bigger deletion
    broken = verify(entries[4:], [head_of(entries)], [moved], signer)
    assert broken is not None and "signature that does not match" in broken.reason
    stranger = checkpoint(CheckpointSigner(os.urandom(32)), entries[3], kind=RETENTION)
    broken = verify(entries[4:], [head_of(entries)], [stranger], signer)
    assert broken is not None and "does not trust" in broken.reason


def test_an_earlier_key_is_trusted_when_configured() -> None:
    old_seed, new_seed = os.urandom(32), os.urandom(32)
    old = CheckpointSigner(old_seed)
    entries = chain("org-a", 3)
    cp = checkpoint(old, entries[2])
    public = base64.b64decode(old.public_key or "")
    assert CheckpointSigner(new_seed).problem_with(cp) is not None
    assert CheckpointSigner(new_seed, [public]).problem_with(cp) is None


def test_hashes_are_unchanged_by_the_verifier_refactor() -> None:
    entries = chain("org-b", 2)
    assert all(hash_of(e) == e.hash for e in entries)


def test_audit_settings_from_the_environment(tmp_path: Path) -> None:
    assert load_audit_settings(tmp_path, {}).signing_key is None
    seed = os.urandom(32)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "audit-signing-key").write_text(base64.b64encode(seed).decode())
    got = load_audit_settings(tmp_path, {"GATEHOUSE_AUDIT_RETENTION_DAYS": "30"})
    assert got.signing_key == seed and got.retention_days == 30 and got.checkpoint_interval_s == 600
    with pytest.raises(ConfigError, match="needs a signing key"):
        load_audit_settings(tmp_path / "elsewhere", {"GATEHOUSE_AUDIT_RETENTION_DAYS": "1"})
    with pytest.raises(ConfigError, match="base64"):
        load_audit_settings(tmp_path, {"GATEHOUSE_AUDIT_SIGNING_KEY": "not base64!"})
    with pytest.raises(ConfigError, match="must not be negative"):
        load_audit_settings(tmp_path, {"GATEHOUSE_AUDIT_CHECKPOINT_INTERVAL_S": "-1"})
