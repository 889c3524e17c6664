"""The audit trail's rules, with no I/O: what an event means, what is kept, how it is chained."""

from services.audit.domain.catalogue import CATALOGUE, Meaning, action_for, meaning_of
from services.audit.domain.chain import (
    GENESIS,
    ChainBreak,
    ChainVerifier,
    Digest,
    Head,
    advance,
    canonical,
    digest_of,
    genesis,
    hash_of,
    seal,
    verify_chain,
)
from services.audit.domain.entry import PLATFORM, UNDECODABLE, Entry, entry_for, instant
from services.audit.domain.metadata import is_secret_field, scrub
from services.audit.domain.paging import (
    MAX_LIMIT,
    InvalidQuery,
    Scope,
    check_page,
    decode_cursor,
    encode_cursor,
    scope_for,
)

__all__ = [
    "CATALOGUE",
    "GENESIS",
    "MAX_LIMIT",
    "PLATFORM",
    "UNDECODABLE",
    "ChainBreak",
    "ChainVerifier",
    "Digest",
    "Entry",
    "Head",
    "InvalidQuery",
    "Meaning",
    "Scope",
    "action_for",
    "advance",
    "canonical",
    "check_page",
    "decode_cursor",
    "digest_of",
    "encode_cursor",
    "entry_for",
    "genesis",
    "hash_of",
    "instant",
    "is_secret_field",
    "meaning_of",
    "scope_for",
    "scrub",
    "seal",
    "verify_chain",
]
