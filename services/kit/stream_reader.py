"""Reads a long stretch of the event stream fast: for catch-up, rebuilds and investigations.

nats-py's `fetch` makes two asyncio tasks per message (~3-12k messages/s here). This reader
asks an ephemeral consumer for whole batches itself (`$JS.API.CONSUMER.MSG.NEXT`), collects
the replies in a subscription callback, and keeps the next request in flight while the
caller works on the current batch (~50k messages/s). The consumer acknowledges nothing
(`AckPolicy.NONE`): the caller's own position (in PostgreSQL) says how far it got.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.subjects import STREAM
from services.kit.bus import Bus

_V1_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>


class Record(NamedTuple):
    """One message as stored in the stream."""

    seq: int
    subject: str
    data: bytes
    time_ns: int  # when the stream stored it


class _Batch(NamedTuple):
    records: list[Record]
    exhausted: bool  # the consumer had nothing more after the last record


def _position(reply: str) -> tuple[int, int, int]:
    """(stream seq, stored at in ns, pending) from a JetStream reply subject (v1 or v2 form)."""
    tokens = reply.split(".")
    if len(tokens) == _V1_TOKENS:
        return int(tokens[5]), int(tokens[7]), int(tokens[8])
    return int(tokens[7]), int(tokens[9]), int(tokens[10])


class _Puller:
    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.ready: asyncio.Queue[_Batch | Exception] = asyncio.Queue()
        self._records: list[Record] = []

    async def on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers and not msg.data else None
        if status is not None:
            if status == "100":  # heartbeat / flow control: not the end of anything
                return
            if status in ("404", "408"):  # no more messages / request expired
                self._close(exhausted=False)
                return
            description = (msg.headers or {}).get("Description", "")
            self.ready.put_nowait(RuntimeError(f"stream read refused: {status} {description}"))
            return
        seq, time_ns, pending = _position(msg.reply)
        self._records.append(Record(seq, msg.subject, msg.data, time_ns))
        if pending == 0:
            self._close(exhausted=True)
        elif len(self._records) >= self.batch:
            self._close(exhausted=False)

    def _close(self, exhausted: bool) -> None:
        records, self._records = self._records, []
        self.ready.put_nowait(_Batch(records, exhausted))


async def read_stream(
    bus: Bus, filter_subject: str, start_seq: int, batch: int = 2000, expires_s: float = 2.0
) -> AsyncGenerator[list[Record], None]:
    """Batches of the messages matching `filter_subject`, from `start_seq` on, in stream order,
    until the consumer has nothing pending (what arrives later is left to the caller)."""
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(start_seq, 1),
        filter_subject=filter_subject,
        inactive_threshold=30.0,
        mem_storage=True,
    )
    info = await bus.js.add_consumer(STREAM, config)
    name = info.name
    puller = _Puller(batch)
    sub = await bus.nc.subscribe(
        bus.nc.new_inbox(), cb=puller.on_msg, pending_msgs_limit=4 * batch, pending_bytes_limit=-1
    )
    request: dict[str, Any] = {"batch": batch, "expires": int(expires_s * 1e9)}
    body = json.dumps(request).encode()

    async def ask() -> None:
        await bus.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{name}", body, reply=sub.subject)

    try:
        if info.num_pending == 0:
            return
        await ask()
        await ask()  # one more in flight while the caller works on a batch
        while True:
            got = await puller.ready.get()
            if isinstance(got, Exception):
                raise got
            if got.records:
                yield got.records
            if got.exhausted:
                return
            await ask()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(NotFoundError, Exception):
            await bus.js.delete_consumer(STREAM, name)
