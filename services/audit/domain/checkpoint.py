"""Signed checkpoints: what an org's chain looked like at a moment, in a form no one can forge.

A checkpoint states (org, seq, hash at seq, when, kind) and carries an Ed25519 signature over
that statement. Because every hash commits to all the entries before it, a checkpoint at
seq M vouches for the whole chain up to M, so `verify` can tell:

- the tail was cut: the chain now ends before M ("entries after seq N are missing");
- the chain was rewritten and re-hashed: entry M no longer has the signed hash;
- a prefix was removed: only a `retention` checkpoint may say where the chain now starts.

Signing and checking signatures is an adapter's job (adapters/signing.py); this module only
says what is signed and what a valid set of checkpoints means.
"""

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import msgspec

from services.audit.domain.chain import ChainBreak, ChainVerifier, Head
from services.audit.domain.entry import Entry

HEAD = "head"  # the chain's head, signed periodically or on demand
RETENTION = "retention"  # entries up to seq were deleted by retention; the chain resumes after it
KINDS = (HEAD, RETENTION)
_LABEL = b"gatehouse audit checkpoint v1\n"


class Checkpoint(msgspec.Struct, kw_only=True, frozen=True):
    org_id: str
    seq: int  # the chain's size at the checkpoint
    hash: str  # the hash of entry `seq` (64 zeros for an empty chain)
    at: datetime
    kind: str
    key_id: str = ""
    signature: str = ""  # base64 Ed25519 signature of `statement(...)`

    @property
    def head(self) -> Head:
        return Head(self.org_id, self.seq, self.hash)

    def describe(self) -> str:
        return f"{self.kind} checkpoint at {stamp(self.at)} (seq {self.seq})"


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def statement(checkpoint: Checkpoint) -> bytes:
    """The exact bytes that are signed: every field but the key id and the signature."""
    body = {
        "org_id": checkpoint.org_id,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "at": stamp(checkpoint.at),
        "kind": checkpoint.kind,
    }
    return _LABEL + msgspec.json.encode(body, order="sorted")


class Marks:
    """The checkpoints of every chain, arranged for a walk: bases, hashes to meet, newest."""

    def __init__(self, checkpoints: Iterable[Checkpoint]) -> None:
        self.bases: dict[str, Checkpoint] = {}  # newest retention checkpoint per org
        self.newest: dict[str, Checkpoint] = {}  # highest seq per org, any kind
        self.at_seq: dict[tuple[str, int], Checkpoint] = {}
        self.count = 0
        for cp in checkpoints:
            self.count += 1
            self.at_seq.setdefault((cp.org_id, cp.seq), cp)
            if cp.kind == RETENTION and (cp.org_id not in self.bases or cp.seq > self.bases[cp.org_id].seq):
                self.bases[cp.org_id] = cp
            if cp.org_id not in self.newest or cp.seq > self.newest[cp.org_id].seq:
                self.newest[cp.org_id] = cp

    def newest_overall(self) -> Checkpoint | None:
        return max(self.newest.values(), key=lambda cp: cp.at, default=None)


def due(head: Head, newest: Checkpoint | None) -> bool:
    """A head is signed again only when the chain moved since its newest checkpoint."""
    return head.seq > 0 and (newest is None or head.seq > newest.seq)


SignatureCheck = Callable[[Checkpoint], str | None]  # what is wrong with its signature, or None


class CheckpointedVerifier(ChainVerifier):
    """A chain walk that also holds each chain to its signed checkpoints.

    Feed `check` entries in (org, seq) order after `check_signatures`, then call `finish`.
    """

    def __init__(self, marks: Marks) -> None:
        super().__init__({org: cp.head for org, cp in marks.bases.items()})
        self.marks = marks

    def check_signatures(
        self, checkpoints: Iterable[Checkpoint], problem_with: SignatureCheck
    ) -> ChainBreak | None:
        for cp in checkpoints:
            problem = problem_with(cp)
            if problem is not None:
                return ChainBreak(cp.org_id, cp.seq, None, f"{cp.describe()} {problem}")
        return None

    def check(self, entry: Entry) -> ChainBreak | None:
        broken = super().check(entry)
        if broken is not None:
            return broken
        signed = self.marks.at_seq.get((entry.org_id, entry.seq))
        if signed is not None and signed.hash != entry.hash:
            detail = f"differs from the {signed.describe()}: the chain was rewritten up to here"
            return ChainBreak(entry.org_id, entry.seq, entry.id, detail)
        return None

    def finish(self, heads: Iterable[Head]) -> ChainBreak | None:
        """Every chain must still reach its newest checkpoint; then the recorded heads are compared."""
        for org_id, newest in sorted(self.marks.newest.items()):
            end = self.end_of(org_id)
            if end.seq < newest.seq:
                detail = (
                    f"entries after seq {end.seq} are missing: {newest.kind} checkpoint at "
                    f"{stamp(newest.at)} covered up to seq {newest.seq}"
                )
                return ChainBreak(org_id, end.seq + 1, None, detail)
        return super().finish(heads)
