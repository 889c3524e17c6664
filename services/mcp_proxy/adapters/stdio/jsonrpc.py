"""A lean JSON-RPC 2.0 client for MCP's stdio transport: one JSON message per line.

Why not the SDK's `mcp.Client` on this path: the SDK validates every message into pydantic
models on the way in and out, runs each session on anyio memory streams with a task per
reader and writer, and re-serialises results. That costs several hundred microseconds of
CPU per call, more than the whole budget of the gateway (0.5 ms/call). A gateway only
routes: it needs the id of each response, not a model of it. So this client writes the
request line by concatenating bytes (the caller's arguments are forwarded as received,
never parsed), and reads each line with one msgspec decode into a struct that keeps
`result` as raw JSON, which is what the caller gets back. The SDK is still used where its
work pays off: HTTP and SSE upstreams (adapters/remote.py) and the test upstreams.

The peer is fed bytes (`feed`) by whoever reads the pipe and writes through a callback, so
it knows nothing about processes. A line longer than `max_line` is a flood: the peer stops
reading and reports it (`on_fatal`); its owner kills the process.
"""

import asyncio
import logging
from collections.abc import Callable

import msgspec

from services.kit.redaction import redact
from services.mcp_proxy.application.ports import CallCanceled, UpstreamFailed

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
MAX_JUNK_LINES = 1000  # non-JSON lines tolerated on stdout (banners, stray prints) before giving up


class RpcError(Exception):
    """The upstream answered a request with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: bytes | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class _Error(msgspec.Struct):
    code: int = -32603
    message: str = ""
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: absent


class _Incoming(msgspec.Struct):
    id: int | str | None = None
    method: str | None = None
    params: msgspec.Raw = msgspec.Raw(b"")  # a notification's, kept raw
    result: msgspec.Raw = msgspec.Raw(b"")  # empty: absent
    error: _Error | None = None


_decode_incoming = msgspec.json.Decoder(_Incoming).decode


class JsonRpcPeer:
    def __init__(
        self,
        write: Callable[[bytes], None],
        max_line: int,
        on_fatal: Callable[[str], None],
        on_notification: Callable[[str, bytes], None] = lambda method, params: None,
        label: str = "upstream",
        on_request: Callable[[int | str, str, bytes], bool] = lambda rid, method, params: False,
    ) -> None:
        self._write, self.max_line = write, max_line
        self._on_fatal, self._on_notification = on_fatal, on_notification
        self._on_request = on_request  # True: taken, answered later with respond()/respond_error()
        self.label = label
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[msgspec.Raw]] = {}
        self._buffer = bytearray()
        self._junk = 0
        self.closed: str | None = None  # why the peer stopped, once it has

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- writing ---------------------------------------------------------------------------
    def request_line(self, method: str, params: bytes | None) -> tuple[int, bytes]:
        self._next_id += 1
        rid = self._next_id
        head = b'{"jsonrpc":"2.0","id":%d,"method":' % rid + _encoder.encode(method)
        if params is None:
            return rid, head + b"}\n"
        return rid, head + b',"params":' + params + b"}\n"

    def notify(self, method: str, params: bytes | None = None) -> None:
        if self.closed is not None:
            return
        line = b'{"jsonrpc":"2.0","method":' + _encoder.encode(method)
        self._write(line + (b',"params":' + params + b"}\n" if params is not None else b"}\n"))

    async def request(self, method: str, params: bytes | None, timeout: float) -> msgspec.Raw:
        """The raw `result`; RpcError for an error answer, TimeoutError, or UpstreamFailed."""
        rid, fut = self.send(method, params)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pending.pop(rid, None)

    def send(self, method: str, params: bytes | None) -> tuple[int, "asyncio.Future[msgspec.Raw]"]:
        if self.closed is not None:
            raise UpstreamFailed(self.closed)
        rid, line = self.request_line(method, params)
        fut: asyncio.Future[msgspec.Raw] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._write(line)
        return rid, fut

    def cancel(self, rid: int, reason: str) -> bool:
        """Sends notifications/cancelled and fails the waiting caller with CallCanceled."""
        fut = self._pending.pop(rid, None)
        if fut is None:
            return False
        self.notify("notifications/cancelled", _encoder.encode({"requestId": rid, "reason": reason}))
        if not fut.done():
            fut.set_exception(CallCanceled())
        return True

    def abandon(self, rid: int, reason: str) -> None:
        """Tells the upstream to stop working on a request nobody waits for any more."""
        self._pending.pop(rid, None)
        self.notify("notifications/cancelled", _encoder.encode({"requestId": rid, "reason": reason}))

    # -- reading ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.closed is not None:
            return
        buffer = self._buffer
        start = 0
        end = data.find(b"\n")
        if end < 0:
            buffer += data
        else:
            if buffer:
                buffer += data[:end]
                self._line(bytes(buffer))
                buffer.clear()
            else:
                self._line(data[:end])
            start = end + 1
            while self.closed is None:
                end = data.find(b"\n", start)
                if end < 0:
                    buffer += data[start:]
                    break
                self._line(data[start:end])
                start = end + 1
        if len(buffer) > self.max_line:
            buffer.clear()
            self.close(
                f"The {self.label} sent a message larger than {self.max_line} bytes (output flood); "
                "its process was stopped."
            )
            self._on_fatal("flood")

    def _line(self, line: bytes) -> None:
        if len(line) > self.max_line:
            self.close(
                f"The {self.label} sent a message larger than {self.max_line} bytes (output flood); "
                "its process was stopped."
            )
            self._on_fatal("flood")
            return
        try:
            msg = _decode_incoming(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            if line.strip():
                self._junk_line(line)
            return
        if msg.method is not None:
            if msg.id is not None:
                if not self._on_request(msg.id, msg.method, msg.params):
                    self._answer_request(msg.id, msg.method)
            else:
                self._on_notification(msg.method, msg.params)
            return
        if not isinstance(msg.id, int):
            return  # not one of ours
        fut = self._pending.pop(msg.id, None)
        if fut is None or fut.done():
            return  # answered after a timeout or a cancel
        if msg.error is not None:
            data = bytes(msg.error.data) or None
            fut.set_exception(RpcError(msg.error.code, msg.error.message, data))
        elif msg.result:
            fut.set_result(msg.result)
        else:
            fut.set_exception(
                UpstreamFailed(
                    f"The {self.label} sent a malformed JSON-RPC response (neither result nor error)."
                )
            )

    def _junk_line(self, line: bytes) -> None:
        self._junk += 1
        if self._junk <= 3:
            log.warning("%s wrote a non-JSON-RPC line on stdout: %s", self.label, redact(repr(line[:200])))
        if self._junk > MAX_JUNK_LINES:
            self.close(f"The {self.label} keeps writing lines that are not JSON-RPC on stdout.")
            self._on_fatal("protocol")

    def respond(self, rid: int | str, result: bytes) -> None:
        """Answers a request of the upstream's (one line of raw JSON as `result`)."""
        if self.closed is None:
            self._write(b'{"jsonrpc":"2.0","id":' + _encoder.encode(rid) + b',"result":' + result + b"}\n")

    def respond_error(self, rid: int | str, code: int, message: str, data: bytes | None = None) -> None:
        if self.closed is None:
            error = b'{"code":%d,"message":' % code + _encoder.encode(message)
            error += (b',"data":' + data if data else b"") + b"}"
            self._write(b'{"jsonrpc":"2.0","id":' + _encoder.encode(rid) + b',"error":' + error + b"}\n")

    def _answer_request(self, rid: int | str, method: str) -> None:
        """Requests from the upstream that nobody takes (roots; sampling or elicitation when the
        caller's client did not declare it): only ping is served, the rest is -32601."""
        ident = _encoder.encode(rid)
        if method == "ping":
            self._write(b'{"jsonrpc":"2.0","id":' + ident + b',"result":{}}\n')
            return
        self._write(
            b'{"jsonrpc":"2.0","id":'
            + ident
            + b',"error":{"code":-32601,"message":"Gatehouse does not serve '
            + _encoder.encode(method)[1:-1]
            + b' to upstream servers"}}\n'
        )

    # -- ending ----------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Fails every waiting caller with `reason`; later requests fail at once."""
        if self.closed is not None:
            return
        self.closed = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(UpstreamFailed(reason))
