"""The hash chain: one per org, so an org's trail can be checked without anyone else's.

hash = sha256(prev_hash + canonical(entry without its hash)); the first entry of a chain
links to 64 zeros. Changing, removing or reordering an entry breaks every later link, and
the chain head (kept apart from the entries) catches the removal of the newest ones.
"""

import hashlib
from collections.abc import Iterable
from datetime import UTC
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


def canonical(entry: Entry) -> bytes:
    """Sorted-key compact JSON of every hashed field (the stream position is not one)."""
    body: dict[str, Any] = {
        "id": entry.id,
        "org_id": entry.org_id,
        "seq": entry.seq,
        "at": entry.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": {
            "kind": entry.actor.kind,
            "id": entry.actor.id,
            "key_id": entry.actor.key_id,
            "ip": entry.actor.ip,
            "user_agent": entry.actor.user_agent,
        },
        "subject_user_id": entry.subject_user_id,
        "action": entry.action,
        "resource": {"type": entry.resource_type, "id": entry.resource_id},
        "outcome": entry.outcome,
        "metadata": entry.metadata,
        "correlation_id": entry.correlation_id,
        "trace_id": entry.trace_id,
        "prev_hash": entry.prev_hash,
    }
    return msgspec.json.encode(body, order="sorted")


def hash_of(entry: Entry) -> str:
    return hashlib.sha256(entry.prev_hash.encode() + canonical(entry)).hexdigest()


def seal(entry: Entry, head: Head) -> Entry:
    """The entry as the next link of `head`'s chain."""
    linked = msgspec.structs.replace(entry, org_id=head.org_id, seq=head.seq + 1, prev_hash=head.hash)
    return msgspec.structs.replace(linked, hash=hash_of(linked))


def advance(head: Head, entry: Entry) -> Head:
    return Head(head.org_id, entry.seq, entry.hash)


class ChainVerifier:
    """Checks entries fed in (org, seq) order, one at a time, so a long trail is streamed."""

    def __init__(self) -> None:
        self.reached: dict[str, Head] = {}
        self._current: Head | None = None

    def check(self, entry: Entry) -> ChainBreak | None:
        head = self._current
        if head is None or head.org_id != entry.org_id:
            if entry.org_id in self.reached:
                return ChainBreak(entry.org_id, entry.seq, entry.id, "entries are out of order")
            head = genesis(entry.org_id)
        org, seq = entry.org_id, entry.seq
        if seq != head.seq + 1:
            return ChainBreak(org, head.seq + 1, entry.id, f"entry {head.seq + 1} is missing")
        if entry.prev_hash != head.hash:
            return ChainBreak(org, seq, entry.id, "does not link to the entry before it")
        if hash_of(entry) != entry.hash:
            return ChainBreak(org, seq, entry.id, "content does not match its hash")
        self._current = self.reached[entry.org_id] = advance(head, entry)
        return None

    def finish(self, heads: Iterable[Head]) -> ChainBreak | None:
        """Compares the chains walked with their recorded heads."""
        expected = {head.org_id: head for head in heads}
        for org_id in sorted(expected.keys() | self.reached.keys()):
            want, got = expected.get(org_id), self.reached.get(org_id, genesis(org_id))
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
