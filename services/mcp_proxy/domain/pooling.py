"""Which running upstream a call may use: never another user's, never stale credentials.

A process (stdio) or a session (http/sse) belongs to one user, one registration of one
server, and one set of resolved values: the key holds a sha256 of the env or headers after
secrets were injected, so a changed secret gets a fresh process and the old one idles out.
"""

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

import msgspec

_encoder = msgspec.json.Encoder(order="sorted")


class PoolKey(NamedTuple):
    user_id: str
    server_id: str  # Entry.server_id: catalog, name and revision
    credentials: str  # sha256 of the resolved env (stdio) or headers (http, sse)


def credentials_hash(values: Mapping[str, str]) -> str:
    return hashlib.sha256(_encoder.encode(values)).hexdigest()


def pool_key(user_id: str, server_id: str, resolved: Mapping[str, str]) -> PoolKey:
    return PoolKey(user_id, server_id, credentials_hash(resolved))
