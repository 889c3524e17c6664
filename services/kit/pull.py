"""Batches from a durable JetStream pull consumer, on one inbox subscription.

nats-py's `PullSubscription.fetch` reads each message after the first with `next_msg`, which
makes two tasks per message (`create_task` of a getter, and on Python 3.11 `wait_for`'s own):
about a third of what a projection spends to take an event (`bench/floors.py`). Here the
messages land through a subscription callback in a list, and `fetch` waits on one future.

The protocol is JetStream's (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`), used as
nats-py uses it, so that no request is left outstanding once `fetch` returns (a projection
naks a failed batch and backs off with nothing in flight, so that no newer message can
overtake a redelivered one):

1. a `no_wait` request for up to `batch` messages: the server sends what it has, then, when
   that is fewer, a status (404 no messages, 408) that ends the request;
2. only when that brought nothing, a request for one message that expires with `timeout`:
   the first new message, or a 408 at expiry. The caller lingers and fetches the rest.

A 409 (the consumer was deleted, a server limit) or a 503 (no JetStream) fails the fetch, as
it does in nats-py, so that the caller re-attaches its consumer.

Each request has its own reply subject, which the server's statuses come to, so a status of
an earlier request (say, one the client gave up on) cannot end a later one. Messages are
never dropped: one that arrives for an earlier request is kept for the next `fetch`, since
acking a later message would ack it too (`AckPolicy.ALL`).
"""

import asyncio
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

_STATUS = "Status"
_DESCRIPTION = "Description"
_ENDS_REQUEST = {"404", "408"}  # no messages, request expired
_MARGIN_S = 0.5  # how long past its expiry the client still waits for the server's 408


class PullFailed(Exception):
    """The server ended a pull request with an error (409): the caller should re-attach."""


class Puller:
    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._base = ""
        self._sub: Subscription | None = None
        self._count = 0
        self._token = ""  # the request being waited for
        self._wanted = 0  # how many messages it may still bring
        self._ready: asyncio.Future[None] | None = None
        self._buffer: list[Msg] = []
        self._failed: Exception | None = None  # what ended the last request, if it failed

    async def start(self) -> None:
        self._base = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._base + "*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages, in delivery order; nats' TimeoutError when none came,
        PullFailed or NoRespondersError when the server refused the request."""
        if not self._buffer:
            await self._request({"batch": batch, "no_wait": True}, batch, timeout)
        if not self._buffer:
            expires = max(int((timeout - 0.05) * 1e9), 1_000_000)
            await self._request({"batch": 1, "expires": expires}, 1, timeout + _MARGIN_S)
        if not self._buffer:
            raise NatsTimeout
        taken, self._buffer = self._buffer[:batch], self._buffer[batch:]
        return taken

    async def _request(self, body: dict[str, object], wanted: int, timeout: float) -> None:
        """Sends one pull request and waits until it has brought `wanted` messages, or a
        status ends it, or `timeout` passes."""
        if self._sub is None:
            raise RuntimeError("the puller is not started")
        self._count += 1
        self._token, self._wanted = str(self._count), wanted
        loop = asyncio.get_running_loop()
        ready = self._ready = loop.create_future()
        timer = loop.call_later(timeout, _settle, ready)
        try:
            await self._nc.publish(self._next, json.dumps(body).encode(), reply=self._base + self._token)
            await ready
        finally:
            timer.cancel()
            self._token, self._ready = "", None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            # Delivered messages keep their own subjects (only the subscription tells where
            # they go), so each counts for the request in flight. One of an earlier request
            # can only end a wait early; it is kept either way.
            self._buffer.append(msg)
            if self._ready is not None:
                self._wanted -= 1
                if self._wanted <= 0:
                    _settle(self._ready)
        elif self._ready is not None and msg.subject[len(self._base) :] == self._token:
            if status == "503":  # JetStream is not there (or not enabled) for this account
                self._failed = NoRespondersError()
            elif status == "409":  # the consumer was deleted, a server limit, a leader change
                detail = headers.get(_DESCRIPTION, "") if headers else ""
                self._failed = PullFailed(f"pull request refused: 409 {detail}".strip())
            elif status not in _ENDS_REQUEST:
                return  # 100: a heartbeat
            _settle(self._ready)
        # Other statuses (100 heartbeats, a late 408 of an earlier request) change nothing.


def _settle(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)
