"""The COPY text rows a catch-up's stager makes: one line per entry, every value recoverable."""

from datetime import UTC, datetime

import msgspec
import pytest

from contracts.envelope import Actor
from services.audit.adapters.store import _COLUMNS, encode_copy_rows
from services.audit.domain import Entry

pytestmark = pytest.mark.unit

_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def entry(user_agent: str | None, metadata: dict[str, object], key_id: str | None = "k1") -> Entry:
    return Entry(
        id="e1",
        org_id="org",
        stream_seq=7,
        at=datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC),
        actor=Actor(kind="user", id="u1", key_id=key_id, ip=None, user_agent=user_agent),
        subject_user_id=None,
        action="tool_call.completed",
        resource_type="tool_call",
        resource_id="r1",
        outcome="success",
        metadata=metadata,
        correlation_id="c1",
        trace_id=None,
        seq=3,
        prev_hash="0" * 64,
        hash="f" * 64,
    )


def fields(line: str) -> list[str | None]:
    """A COPY text line read back as PostgreSQL reads it."""
    out: list[str | None] = []
    for raw in line.split("\t"):
        if raw == "\\N":
            out.append(None)
            continue
        value, i = "", 0
        while i < len(raw):
            pair = raw[i : i + 2]
            if pair in _UNESCAPE:
                value, i = value + _UNESCAPE[pair], i + 2
            else:
                value, i = value + raw[i], i + 1
        out.append(value)
    return out


@pytest.mark.parametrize(
    ("user_agent", "metadata", "key_id"),
    [
        ("Cursor/1.7", {"server": "github", "n": 3}, "k1"),  # the plain path
        ("tab\there\nnew line\\slash", {"error": 'said "no"\tat\\once'}, None),  # escaped
        ("\\N", {"literal": "\\N"}, "\\N"),  # the NULL marker as a value stays a value
    ],
)
def test_each_value_comes_back_as_it_went_in(
    user_agent: str | None, metadata: dict[str, object], key_id: str | None
) -> None:
    e = entry(user_agent, metadata, key_id)
    data = encode_copy_rows([e, e]).decode()
    lines = data.split("\n")
    assert lines[-1] == "" and len(lines) == 3  # two rows, each ended by a newline
    got = fields(lines[0])
    assert len(got) == len(_COLUMNS.split(","))
    assert got[:5] == ["e1", "org", "3", "7", "2026-11-21T10:00:00.123456+00:00"]
    assert got[5:10] == ["user", "u1", key_id, None, user_agent]
    assert msgspec.json.decode(got[15] or "") == metadata
    assert got[16:] == ["c1", None, "0" * 64, "f" * 64]
