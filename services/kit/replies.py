"""Request/reply with one reply subscription per NATS connection, and no per-request task.

`Client.request` in nats-py makes a random token and runs `asyncio.wait_for` on every call;
on Python 3.11 that timeout machinery is a large share of a command's CPU. Here a request
is a future in a dict, found again by a counter token (the inbox prefix is already unique
per connection), and its timeout is a plain `loop.call_later`.
"""

import asyncio
import weakref
from collections.abc import Sequence

from nats.aio.client import NO_RESPONDERS_STATUS, Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import Header


class Replies:
    """The replies awaited on one connection: `<inbox>.<token>` -> the caller's future."""

    def __init__(self, nc: Client) -> None:
        self._nc = weakref.ref(nc)  # not strong: this object is the value of a weak-keyed dict
        self._base = ""  # `<inbox>.` once subscribed (no Subscription kept: it holds the Client)
        self._subscribing = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Msg | None]] = {}
        self._count = 0

    def __len__(self) -> int:
        """How many requests are waiting for their reply."""
        return len(self._waiting)

    async def request(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """The reply; NoRespondersError when nobody listens, nats' TimeoutError after `timeout`."""
        nc = await self._connection()
        loop = asyncio.get_running_loop()
        token, future = self._expect(loop)
        timer = loop.call_later(timeout, _expire, future)
        try:
            await nc.publish(subject, payload, reply=self._base + token, headers=headers)
            msg = await future
        finally:  # reply, timeout, failed publish or a cancelled caller
            timer.cancel()
            del self._waiting[token]
        if msg is None:
            raise NatsTimeout
        if msg.headers and msg.headers.get(Header.STATUS) == NO_RESPONDERS_STATUS:
            raise NoRespondersError
        return msg

    async def request_all(
        self, messages: Sequence[tuple[str, bytes, dict[str, str] | None]], timeout: float
    ) -> list[Msg | None]:
        """Sends every (subject, payload, headers) with a reply subject of its own, then waits
        up to `timeout` for all the replies: each message's reply, or None where none came.

        For JetStream publishes, whose acks are replies: nats-py's `publish_async` runs an
        `asyncio.wait_for` task and a done callback per message. Here a batch costs a future
        per message and one wait; the publishes leave together through the flusher.
        """
        nc = await self._connection()
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        futures: list[asyncio.Future[Msg | None]] = []
        try:
            for subject, payload, headers in messages:
                token, future = self._expect(loop)
                tokens.append(token)
                futures.append(future)
                await nc.publish(subject, payload, reply=self._base + token, headers=headers)
            if futures:
                await asyncio.wait(futures, timeout=timeout)
        finally:  # all answered, timed out, a failed publish or a cancelled caller
            for token in tokens:
                del self._waiting[token]
        return [f.result() if f.done() else None for f in futures]

    async def _connection(self) -> Client:
        """The connection, its reply subscription made on first use."""
        nc = self._nc()
        if nc is None:
            raise ConnectionClosedError
        if not self._base:
            await self._subscribe(nc)
        return nc

    def _expect(self, loop: asyncio.AbstractEventLoop) -> tuple[str, "asyncio.Future[Msg | None]"]:
        """A new token, and the future its reply will complete."""
        self._count += 1
        token = str(self._count)
        future: asyncio.Future[Msg | None] = loop.create_future()
        self._waiting[token] = future
        return token, future

    async def _subscribe(self, nc: Client) -> None:
        async with self._subscribing:  # concurrent first calls subscribe once
            if not self._base:
                base = nc.new_inbox() + "."
                await nc.subscribe(base + "*", cb=self._deliver)
                self._base = base

    async def _deliver(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._base) :])
        if future is not None and not future.done():
            future.set_result(msg)


def _expire(future: "asyncio.Future[Msg | None]") -> None:
    if not future.done():
        future.set_result(None)  # not an exception: a caller cancelled meanwhile would not read it


_replies: "weakref.WeakKeyDictionary[Client, Replies]" = weakref.WeakKeyDictionary()


def replies(nc: Client) -> Replies:
    """This connection's Replies; a replaced connection (a new Client) gets its own."""
    found = _replies.get(nc)
    if found is None:
        found = _replies[nc] = Replies(nc)
    return found
