"""Records reveals and refusals in batches, after the reply (write-behind).

A reveal answers in well under a millisecond; recording it is a PostgreSQL transaction. So
the reply goes first and the facts follow within `flush_s` (one transaction per batch, many
events each). A stop flushes what is pending; a hard crash can lose at most the last
`flush_s` of records (docs/secrets.md weighs this). A failing flush keeps its batch and
tries again, up to `max_pending` records, beyond which the oldest are dropped with an error
in the log (never silently).
"""

import asyncio
import logging

from services.kit.tasks import stop_task
from services.secrets.application import Denial, Reveal, Secrets

log = logging.getLogger(__name__)


class RevealLog:
    def __init__(
        self, app: Secrets, flush_s: float = 0.05, max_batch: int = 500, max_pending: int = 100_000
    ) -> None:
        self.app, self.flush_s, self.max_batch, self.max_pending = app, flush_s, max_batch, max_pending
        self._reveals: list[Reveal] = []
        self._denials: list[Denial] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.recorded = 0

    def revealed(self, reveal: Reveal) -> None:
        self._reveals.append(reveal)
        self._nudge()

    def denied(self, denial: Denial) -> None:
        self._denials.append(denial)
        self._nudge()

    def _nudge(self) -> None:
        if len(self._reveals) + len(self._denials) >= self.max_batch:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="secrets-reveal-log")

    async def stop(self) -> None:
        """Stops the loop, then records what is pending (until done, or the store fails)."""
        await stop_task(self._task)
        while (self._reveals or self._denials) and await self.flush():
            pass

    async def flush(self) -> bool:
        reveals, denials = self._reveals[: self.max_batch], self._denials[: self.max_batch]
        if not reveals and not denials:
            return True
        del self._reveals[: len(reveals)]
        del self._denials[: len(denials)]
        try:
            await asyncio.to_thread(self.app.record, reveals, denials)
        except Exception as err:
            pending = len(reveals) + len(denials)
            log.warning("could not record %d reveals yet: %s", pending, type(err).__name__)
            self._reveals[:0], self._denials[:0] = reveals, denials
            self._bound()
            return False
        self.recorded += len(reveals) + len(denials)
        return True

    def _bound(self) -> None:
        excess = len(self._reveals) + len(self._denials) - self.max_pending
        if excess > 0:
            log.error("dropping %d unrecorded reveal records: the event store is unavailable", excess)
            del self._reveals[:excess]

    async def _run(self) -> None:
        """One batch per `flush_s` (sooner when a full batch waits): few, large transactions."""
        backoff = self.flush_s
        while True:
            try:  # not `wait_for`: on 3.11 it can swallow the cancellation that stops this loop
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._reveals or self._denials:
                backoff = self.flush_s if await self.flush() else min(backoff * 2, 5.0)
                self._nudge()  # a full batch still waiting goes at once
