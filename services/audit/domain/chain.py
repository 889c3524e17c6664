"""The hash chain: one per org, so an org's trail can be checked without anyone else's.

hash = sha256(prev_hash + canonical(entry without its hash)); the first entry of a chain
links to 64 zeros. Changing, removing or reordering an entry breaks every later link, and
the chain head (kept apart from the entries) catches the removal of the newest ones.
"""

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from services.audit.domain.entry import Entry

GENESIS = "0" * 64


class Head(msgspec.Struct, frozen=True):
    org_id: str
    seq: int  # also the number of entries in the chain
    hash: str


class ChainBreak(msgspec.Struct, frozen=True):
    org_id: str
    seq: int
    entry_id: str | None
    reason: str


class Digest(msgspec.Struct, frozen=True):
    entries: int
    orgs: int
    digest: str
    stream_seq: int


def genesis(org_id: str) -> Head:
    return Head(org_id, 0, GENESIS)


class _Actor(msgspec.Struct):
    kind: str
    id: str
    key_id: str | None
    ip: str | None
    user_agent: str | None


class _Resource(msgspec.Struct):
    type: str
    id: str


class _Canonical(msgspec.Struct):
    """The hashed fields; encoded with sorted keys (fields and dicts), as `json.dumps(...,
    sort_keys=True)` of the same dict would be, compactly. Never change: it defines every hash."""

    id: str
    org_id: str
    seq: int
    at: str
    actor: _Actor
    subject_user_id: str | None
    action: str
    resource: _Resource
    outcome: str
    metadata: dict[str, Any]
    correlation_id: str | None
    trace_id: str | None
    prev_hash: str


_canonical = msgspec.json.Encoder(order="sorted")


def _stamp(at: datetime) -> str:
    return (at if at.tzinfo is UTC else at.astimezone(UTC)).isoformat(timespec="microseconds")


def _body(entry: Entry, org_id: str, seq: int, prev_hash: str) -> bytes:
    a = entry.actor
    return _canonical.encode(
        _Canonical(
            entry.id,
            org_id,
            seq,
            _stamp(entry.at),
            _Actor(a.kind, a.id, a.key_id, a.ip, a.user_agent),
            entry.subject_user_id,
            entry.action,
            _Resource(entry.resource_type, entry.resource_id),
            entry.outcome,
            entry.metadata,
            entry.correlation_id,
            entry.trace_id,
            prev_hash,
        )
    )


def canonical(entry: Entry) -> bytes:
    """Sorted-key compact JSON of every hashed field (the stream position is not one)."""
    return _body(entry, entry.org_id, entry.seq, entry.prev_hash)


def hash_of(entry: Entry) -> str:
    return hashlib.sha256(entry.prev_hash.encode() + canonical(entry)).hexdigest()


def seal(entry: Entry, head: Head) -> Entry:
    """The entry as the next link of `head`'s chain."""
    seq, prev = head.seq + 1, head.hash
    digest = hashlib.sha256(prev.encode() + _body(entry, head.org_id, seq, prev)).hexdigest()
    return msgspec.structs.replace(entry, org_id=head.org_id, seq=seq, prev_hash=prev, hash=digest)


def advance(head: Head, entry: Entry) -> Head:
    return Head(head.org_id, entry.seq, entry.hash)


class ChainVerifier:
    """Checks entries fed in (org, seq) order, one at a time, so a long trail is streamed."""

    def __init__(self, bases: Mapping[str, Head] | None = None) -> None:
        self.reached: dict[str, Head] = {}
        self.bases = dict(bases or {})  # where a chain whose prefix was deleted now starts
        self._current: Head | None = None

    def start_of(self, entry: Entry) -> Head | ChainBreak:
        """The head the first entry of a chain links to: genesis, or a retention base."""
        base = self.bases.get(entry.org_id)
        if base is not None and entry.seq == base.seq + 1:
            return base
        if entry.seq == 1:
            return genesis(entry.org_id)
        if base is not None and entry.seq > base.seq + 1:
            gap = f"entries {base.seq + 1} to {entry.seq - 1} are missing"
            detail = f"{gap} (retention removed entries up to {base.seq} only)"
            return ChainBreak(entry.org_id, base.seq + 1, entry.id, detail)
        return ChainBreak(entry.org_id, 1, entry.id, "entry 1 is missing")

    def check(self, entry: Entry) -> ChainBreak | None:
        head = self._current
        if head is None or head.org_id != entry.org_id:
            if entry.org_id in self.reached:
                return ChainBreak(entry.org_id, entry.seq, entry.id, "entries are out of order")
            start = self.start_of(entry)
            if isinstance(start, ChainBreak):
                return start
            head = start
        org, seq = entry.org_id, entry.seq
        if seq != head.seq + 1:
            return ChainBreak(org, head.seq + 1, entry.id, f"entry {head.seq + 1} is missing")
        if entry.prev_hash != head.hash:
            return ChainBreak(org, seq, entry.id, "does not link to the entry before it")
        if hash_of(entry) != entry.hash:
            return ChainBreak(org, seq, entry.id, "content does not match its hash")
        self._current = self.reached[entry.org_id] = advance(head, entry)
        return None

    def end_of(self, org_id: str) -> Head:
        """Where the walk of a chain ended (its base when every entry was deleted by retention)."""
        return self.reached.get(org_id) or self.bases.get(org_id) or genesis(org_id)

    def finish(self, heads: Iterable[Head]) -> ChainBreak | None:
        """Compares the chains walked with their recorded heads."""
        expected = {head.org_id: head for head in heads}
        for org_id in sorted(expected.keys() | self.reached.keys() | self.bases.keys()):
            want, got = expected.get(org_id), self.end_of(org_id)
            if want is None:
                return ChainBreak(org_id, got.seq, None, "chain has no recorded head")
            if want.seq != got.seq or want.hash != got.hash:
                detail = f"chain ends at entry {got.seq}, head says {want.seq}"
                return ChainBreak(org_id, got.seq + 1, None, detail)
        return None


def verify_chain(entries: Iterable[Entry], heads: Iterable[Head] | None = None) -> ChainBreak | None:
    """The first break in entries sorted by (org, seq), or None when every link holds."""
    verifier = ChainVerifier()
    for entry in entries:
        broken = verifier.check(entry)
        if broken is not None:
            return broken
    return verifier.finish(heads) if heads is not None else None


def digest_of(heads: Iterable[Head], entries: int, stream_seq: int) -> Digest:
    """Identical for a live and a rebuilt projection: nothing here depends on when it ran."""
    ordered = sorted(heads, key=lambda head: head.org_id)
    h = hashlib.sha256()
    for head in ordered:
        h.update(f"{head.org_id}\t{head.seq}\t{head.hash}\n".encode())
    h.update(f"total\t{entries}\t{stream_seq}\n".encode())
    return Digest(entries=entries, orgs=len(ordered), digest=h.hexdigest(), stream_seq=stream_seq)
