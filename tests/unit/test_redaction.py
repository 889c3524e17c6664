"""Secrets never reach a log line: API keys by shape, other secrets once registered."""

import logging
import sys
import uuid

import msgspec
import pytest

from services.identity.domain import mint_key
from services.kit.logs import JsonFormatter
from services.kit.redaction import REDACTED, redact, register_secret

pytestmark = pytest.mark.unit


def record(msg: str, *args: object, exc: BaseException | None = None, **fields: object) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("gatehouse.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    if fields:
        rec.fields = fields
    return rec


def formatted(rec: logging.LogRecord) -> str:
    line = JsonFormatter("test").format(rec)
    msgspec.json.decode(line)  # still one valid JSON object
    return line


def test_key_in_message_is_redacted_but_prefix_kept() -> None:
    key = mint_key()
    out = formatted(record(f"GET /sse?api_key={key} 200"))
    assert key not in out
    assert key[12:] not in out
    assert key[:12] in out  # the listing prefix is not secret
    assert REDACTED in out


def test_key_in_arguments_and_fields_is_redacted() -> None:
    key = mint_key()
    out = formatted(record("auth header %s", f"Bearer {key}", header=key, nested={"k": key}))
    assert key not in out
    assert key[-20:] not in out


def test_key_in_exception_traceback_is_redacted() -> None:
    key = mint_key()
    out = formatted(record("request failed", exc=ValueError(f"bad key {key}")))
    decoded = msgspec.json.decode(out)
    assert "ValueError" in decoded["error"]
    assert key not in out
    assert key[-20:] not in out


def test_key_in_chained_exception_is_redacted() -> None:
    key = mint_key()
    try:
        try:
            raise KeyError(key)
        except KeyError as inner:
            raise RuntimeError("lookup failed") from inner
    except RuntimeError as outer:
        out = formatted(record("oops", exc=outer))
    assert "lookup failed" in out
    assert key not in out
    assert key[-20:] not in out


@pytest.mark.parametrize("tail", range(3940, 4010, 3))
def test_key_cut_by_traceback_truncation_is_not_leaked(tail: int) -> None:
    """Long tracebacks are shortened; the cut must never leave part of a key unredacted."""
    key = mint_key()
    out = formatted(record("long failure", exc=ValueError("x" * 5000 + key + "y" * tail)))
    secret = key[12:]
    assert not any(secret[i : i + 12] in out for i in range(len(secret) - 11)), (
        "a fragment of the key survived truncation"
    )


def test_registered_secret_is_replaced_everywhere() -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    register_secret(secret)
    out = formatted(
        record("connecting with %s", secret, exc=RuntimeError(f"auth {secret} rejected"), token=secret)
    )
    assert secret not in out
    assert out.count(REDACTED) >= 3


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    assert redact("abc and abcdef") == "abc and abcdef"


def test_text_without_secrets_is_unchanged() -> None:
    text = "user u-1 listed 3 keys (prefix mcp_abcd)"
    assert redact(text) == text


def test_a_secret_inside_a_longer_secret_does_not_leave_pieces_of_the_longer_one() -> None:
    register_secret("n3sted")
    register_secret("outer-n3sted-value")
    assert redact("x outer-n3sted-value y n3sted") == "x [REDACTED] y [REDACTED]"
