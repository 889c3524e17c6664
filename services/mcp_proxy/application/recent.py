"""Recent request ids and their outcomes, so a retried request runs once (per instance).

The same `(user, request_id)` within `ttl_s` gets the first call's outcome (or waits for
it while it runs) instead of calling the upstream again. The memory is this instance's:
a retry that lands on another instance runs again (its event is recorded again, and the
quota service sees the same request id twice; reservations are keyed by it). Entries are
bounded by count and by the bytes of the results they hold, oldest dropped first.
"""

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from contracts.commands.mcp import CallOutcome

Key = tuple[str, str]


class Recent:
    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_entries, self.max_bytes, self._clock = ttl_s, max_entries, max_bytes, clock
        self._items: OrderedDict[Key, tuple[float, asyncio.Future[CallOutcome], int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key) -> "asyncio.Future[CallOutcome] | None":
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < self._clock():
            self._drop(key)
            return None
        return item[1]

    def begin(self, key: Key, fut: "asyncio.Future[CallOutcome]") -> None:
        self._items[key] = (self._clock() + self.ttl_s, fut, 0)
        self._trim()

    def done(self, key: Key, outcome: CallOutcome) -> None:
        item = self._items.get(key)
        if item is None:
            return
        size = len(outcome.result)
        self._items[key] = (item[0], item[1], size)
        self._bytes += size
        self._trim()

    def forget(self, key: Key) -> None:
        if key in self._items:
            self._drop(key)

    def _drop(self, key: Key) -> None:
        _, _, size = self._items.pop(key)
        self._bytes -= size

    def _trim(self) -> None:
        items, now = self._items, self._clock()
        while items and (
            len(items) > self.max_entries
            or self._bytes > self.max_bytes
            or next(iter(items.values()))[0] < now
        ):
            key = next(iter(items))
            self._drop(key)
