"""Names of tools on the merged endpoint, and the opaque cursor of `tools/list` (pure).

`/mcp` shows every server's tools as `<server>__<tool>`. Clients accept only
`[A-Za-z0-9_-]{1,64}`, so a name that would break that rule (a long tool name, a dot in it)
is cleaned and shortened, and ends in `_` plus 8 hex digits of a hash of the server and tool
names. The hash depends on nothing else, so a name never changes when servers come and go.

Server names cannot contain `__` (see `SERVER_NAME_PATTERN`), so a plain name splits back at
its first `__`; a name ending in the hash shape is looked up in the caller's catalog instead.
"""

import base64
import binascii
import hashlib
import re
from typing import Final

SEPARATOR: Final = "__"
MAX_LENGTH: Final = 64
# A server name: letters and digits in runs joined by single `-` or `_` (so never `__`).
SERVER_NAME_PATTERN: Final = r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$"
SERVER_NAME_MAX: Final = 32
RESERVED_SERVER_NAMES: Final = frozenset({"servers", "requests"})  # REST path segments

_VALID = re.compile(r"^[A-Za-z0-9_-]+$")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_HASHED = re.compile(r"_[0-9a-f]{8}$")


def exposed_name(server: str, tool: str) -> str:
    plain = f"{server}{SEPARATOR}{tool}"
    if len(plain) <= MAX_LENGTH and _VALID.match(tool):
        return plain
    digest = hashlib.sha256(f"{server}\x00{tool}".encode()).hexdigest()[:8]
    cleaned = _INVALID_CHARS.sub("_", plain)
    return f"{cleaned[: MAX_LENGTH - 9]}_{digest}"


def may_be_shortened(name: str) -> bool:
    """Whether `name` could be a cleaned/shortened one (only the catalog can tell)."""
    return _HASHED.search(name) is not None


def split(name: str) -> tuple[str, str] | None:
    """`github__search` -> (`github`, `search`); None when `name` has no server part."""
    server, separator, tool = name.partition(SEPARATOR)
    if not separator or not server or not tool:
        return None
    return server, tool


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"tools:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    kind, _, offset = text.partition(":")
    if kind != "tools" or not offset.isdigit():
        return None
    return int(offset)
