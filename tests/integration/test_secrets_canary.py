"""A planted canary value never shows up anywhere but in the reveal reply it is meant for.

The canary is stored through every route (user and org secrets, create and replace), then
every failure path is driven with it: bad names, oversized and malformed bodies, a
non-admin on the org routes, another user's reads and reveals, refused services and
purposes, a revoked secret, a tampered data key, a missing master key, rotation and rewrap,
and a database failure in the middle of a write (an exception trace). Then every captured
log record (formatted as the services write them, tracebacks included), stdout/stderr,
every HTTP response, every event on the stream, every audit entry, every row of every table
of the database (a "dump"), the NATS server log and every process's arguments are searched
for the canary, as text and in base64 (standard and URL-safe, at each byte alignment) and hex.
"""

import base64
import io
import logging
import sys
import uuid
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from contracts.commands import secrets as cmd
from contracts.subjects import STREAM
from services.kit.logs import JsonFormatter
from services.kit.rpc import CommandFailed
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.adapters.keystore import PostgresKeystore
from services.secrets.crypto import Keyring
from tests.helpers import OPERATOR, eventually
from tests.integration.secrets_world import World, world

pytestmark = pytest.mark.integration
__all__ = ["world"]


def forms(canary: bytes) -> list[bytes]:
    """The canary as it could leak: raw, hex, and base64 at every alignment (both alphabets)."""
    out = [canary, canary.hex().encode(), canary.hex().upper().encode()]
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * pad + canary)
            skip = 4 if pad else 0  # the first group mixes padding bytes with the canary's
            out.append(encoded[skip:-4])  # the last group may mix in what follows
    return [f for f in out if len(f) >= 16]


def leaks(canary: bytes, haystack: bytes) -> list[bytes]:
    return [f for f in forms(canary) if f in haystack]


class Capture(logging.Handler):
    """Every record of every logger, formatted by the services' own JSON formatter."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.buffer = io.StringIO()
        self.formatter_ = JsonFormatter("canary-test")
        self.plain = logging.Formatter("%(name)s %(levelname)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.buffer.write(self.formatter_.format(record) + "\n")
        self.buffer.write(self.plain.format(record) + "\n")  # unredacted, traceback included
        if record.exc_info:
            self.buffer.write(self.plain.formatException(record.exc_info) + "\n")


async def raw_stream(w: World) -> bytes:
    info = await w.bus.js.stream_info(STREAM)
    out = bytearray()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await w.bus.js.get_msg(STREAM, seq)
        out += (
            (msg.subject or "").encode()
            + b"\n"
            + repr(msg.headers).encode()
            + b"\n"
            + (msg.data or b"")
            + b"\n"
        )
    return bytes(out)


def database_dump(w: World) -> bytes:
    out = bytearray()
    with psycopg.connect(w.settings.require_database(), autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'"
        ).fetchall()
        assert ("secrets", "data_keys") in tables and ("secrets", "secrets_events") in tables
        for schema, table in tables:
            rows = conn.execute(
                SQL("SELECT t::text FROM {}.{} t").format(Identifier(schema), Identifier(table))
            )
            for (text,) in rows:
                out += text.encode() + b"\n"
        for schema, table in tables:  # bytea columns, also as raw bytes
            columns = conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s AND data_type = 'bytea'",
                [schema, table],
            ).fetchall()
            for (column,) in columns:
                values = conn.execute(
                    SQL("SELECT {} FROM {}.{}").format(
                        Identifier(column), Identifier(schema), Identifier(table)
                    )
                )
                for (value,) in values:
                    out += bytes(value or b"") + b"\n"
    return bytes(out)


async def test_the_canary_never_appears(
    world: World, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    w, ann, bea, admin = world, world.ann, world.bea, world.admin
    canary = f"CANARY{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
    raw = canary.encode()
    capture = Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    responses: list[httpx.Response] = []
    reveal_problems: list[str] = []

    async def send(method: str, path: str, who: Any, **kwargs: Any) -> httpx.Response:
        response = await w.http.request(method, path, headers=w.headers(who), **kwargs)
        responses.append(response)
        return response

    async def try_reveal(*args: Any, **kwargs: Any) -> None:
        try:
            await w.reveal(*args, **kwargs)
        except CommandFailed as err:
            reveal_problems.append(repr(err.problem))

    try:
        # stored through every route
        assert (
            await send("PUT", "/v1/secrets/cursor_api_key", ann, json={"value": canary})
        ).status_code == 200
        assert (await send("PUT", "/v1/secrets/canary", ann, json={"value": canary})).status_code == 200
        assert (await send("PUT", "/v1/secrets/canary", ann, json={"value": canary})).status_code == 200
        multi = f"-----BEGIN KEY-----\n{canary}\n-----END KEY-----\n"
        assert (await send("PUT", "/v1/secrets/ssh_key", ann, json={"value": multi})).status_code == 200
        assert (await send("PUT", "/v1/org/secrets/shared", admin, json={"value": canary})).status_code == 200
        extra = await send("PUT", "/v1/secrets/extra", ann, json={"value": canary, canary: canary})
        assert extra.status_code == 200  # unknown fields are ignored, never quoted back
        for path in ("/v1/secrets", "/v1/secrets/canary", "/v1/org/secrets", "/v1/org/secrets/shared"):
            assert (await send("GET", path, ann)).status_code == 200

        # the reveal reply is the one place the value goes; it is not part of what is searched
        assert (await w.reveal(ann, "canary")).value == canary
        assert (await w.reveal(bea, "shared")).value == canary
        assert (await w.reveal(ann, "ssh_key", service="session_runner", purpose="build:b1")).value == multi

        # every failure path, with the canary in the request
        bad = [
            ("PUT", "/v1/secrets/BAD", ann, {"json": {"value": canary}}),
            ("PUT", "/v1/secrets/cursor_api_key", ann, {"json": {"value": canary + " trailing words"}}),
            ("PUT", "/v1/secrets/big", ann, {"json": {"value": canary * 600}}),
            ("PUT", "/v1/secrets/x", ann, {"json": {"value": {"nested": canary}}}),
            ("PUT", "/v1/secrets/x", ann, {"json": {canary: canary}}),
            ("PUT", "/v1/secrets/x", ann, {"json": [canary]}),
            ("PUT", "/v1/secrets/x", ann, {"content": b'{"value": "' + raw, "headers": {}}),
            ("PUT", "/v1/secrets/x", ann, {"content": raw, "headers": {"content-type": "text/plain"}}),
            ("PUT", "/v1/org/secrets/shared", ann, {"json": {"value": canary}}),  # not an admin
        ]
        for method, path, who, kwargs in bad:
            extra_headers = kwargs.pop("headers", None)
            response = await w.http.request(
                method, path, headers={**w.headers(who), **(extra_headers or {})}, **kwargs
            )
            responses.append(response)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        for path in ("/v1/secrets/canary", "/v1/secrets/cursor_api_key"):  # another user
            assert (await send("GET", path, bea)).status_code == 404
            assert (await send("DELETE", path, bea)).status_code == 404
        await try_reveal(bea, "canary")
        await try_reveal(ann, "canary", service="gateway", purpose="tool_call:1")
        await try_reveal(ann, "canary", purpose="no purpose")
        await try_reveal(w.zed, "shared")

        # a database failure in the middle of a write: an exception trace in the logs
        def broken_add(self: Any, row: Any) -> bool:
            raise psycopg.OperationalError("the keystore is away")

        monkeypatch.setattr(PostgresKeystore, "add", broken_add)
        failed = await send("PUT", "/v1/secrets/during_outage", ann, json={"value": canary})
        assert failed.status_code == 503, failed.text
        monkeypatch.undo()

        # rotation and rewrap, then a retired key still in use, then tampering
        ring = Keyring.parse(w.keyring_file.read_text()).with_new_key("k2")
        write_keyring(w.keyring_file, ring)
        await w.client.call("secrets", "key_status", cmd.KeyStatus(meta=OPERATOR, reload=True), cmd.KeyReport)
        assert (await w.reveal(ann, "canary")).value == canary
        await w.client.call("secrets", "rewrap", cmd.Rewrap(meta=OPERATOR), cmd.RewrapReport)
        assert (await w.reveal(ann, "canary")).value == canary
        assert (await send("PUT", "/v1/secrets/under_k2", ann, json={"value": canary})).status_code == 200
        write_keyring(
            w.keyring_file, Keyring.parse(w.keyring_file.read_text()).with_new_key("k3").without("k2")
        )
        await w.client.call("secrets", "key_status", cmd.KeyStatus(meta=OPERATOR, reload=True), cmd.KeyReport)
        await try_reveal(ann, "under_k2")  # master key missing
        assert "master_key_missing" in reveal_problems[-1]
        write_keyring(w.keyring_file, ring)  # k2 is back
        await w.client.call("secrets", "key_status", cmd.KeyStatus(meta=OPERATOR, reload=True), cmd.KeyReport)
        with psycopg.connect(w.settings.require_database(), autocommit=True) as conn:
            conn.execute(
                "UPDATE secrets.data_keys SET wrapped = set_byte(wrapped, 12, get_byte(wrapped, 12) # 1) "
                "WHERE secret_id <> '00000000-0000-0000-0000-000000000000'"
            )
        await try_reveal(ann, "cursor_api_key")
        assert "secret_corrupted" in reveal_problems[-1]

        # revocation: later use fails
        assert (await send("DELETE", "/v1/secrets/canary", ann)).status_code == 204
        assert (await send("DELETE", "/v1/org/secrets/shared", admin)).status_code == 204
        assert (await send("GET", "/v1/secrets/canary", ann)).status_code == 404
        await try_reveal(ann, "canary")
        await try_reveal(bea, "shared")
        assert (await send("GET", "/v1/secrets", ann)).status_code == 200

        async def audit_caught_up() -> bool:
            info = await w.bus.js.stream_info(STREAM)
            with psycopg.connect(w.settings.require_database(), autocommit=True) as conn:
                row = conn.execute("SELECT max(stream_seq) FROM audit.entries").fetchone()
            return bool(row and row[0] == info.state.last_seq)

        await eventually(audit_caught_up, timeout=20)
        audit_pages = [await send("GET", "/v1/audit?limit=500", who) for who in (ann, bea, admin)]
        assert all(page.status_code == 200 for page in audit_pages)
        assert any(e["action"] == "secret.revealed" for e in audit_pages[0].json()["items"])
        assert len(reveal_problems) == 8, reveal_problems
    finally:
        root.removeHandler(capture)
        root.setLevel(previous_level)

    out, err = capfd.readouterr()
    searched: dict[str, bytes] = {
        "log records": capture.buffer.getvalue().encode(),
        "caplog": "\n".join(
            f"{r.getMessage()} {r.args!r} {r.exc_text or ''} {getattr(r, 'fields', '')}"
            for r in caplog.records
        ).encode(),
        "stdout/stderr": (out + err).encode(),
        "HTTP responses": b"\n".join(
            repr(r.headers.multi_items()).encode() + b"\n" + r.content for r in responses
        ),
        "reveal refusals": "\n".join(reveal_problems).encode(),
        "stream": await raw_stream(w),
        "database": database_dump(w),
        "process arguments": "\n".join(
            " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
        ).encode(),
        "argv": " ".join(sys.argv).encode(),
    }
    nats_log = w.settings.data_dir.parent / "nats" / "nats.log"
    if nats_log.exists():
        searched["NATS log"] = nats_log.read_bytes()
    assert len(searched["stream"]) > 1000 and len(searched["database"]) > 1000
    assert b"secrets.secret_revealed" in searched["stream"] and b"reveal_denied" in searched["stream"]
    assert b"could not complete the request" in searched["HTTP responses"]  # the outage was hit
    assert b"Traceback" in searched["log records"]  # and logged with its trace
    found = {where: leaks(raw, haystack) for where, haystack in searched.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    # the search itself works: the canary is found where it is meant to be
    assert leaks(raw, canary.encode()) and leaks(raw, base64.b64encode(b"xy" + raw))
