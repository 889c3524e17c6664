"""One quota instance decides at a time: the holder of the `quota.ledger` lease.

The holder loads the ledger from its store, then serves `cmd.quota.*`, expires held
reservations past their timeout and forgets old settled ones. Other instances wait as
hot standbys (they do not even subscribe to the commands). A lost lease stops the serving
at once; a failed write makes the holder reload the ledger from the store before serving
again (the store is the truth; memory may hold facts that were never recorded).
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable

from services.kit.bus import Bus
from services.kit.lease import Lease
from services.kit.rpc import CommandServer
from services.kit.tasks import stop_task
from services.quota.adapters.identity import IdentityFeed
from services.quota.adapters.sources import load
from services.quota.adapters.store import QuotaStore
from services.quota.adapters.writer import GroupWriter
from services.quota.application import Quota

log = logging.getLogger(__name__)
LEASE_KEY = "quota.ledger"
PRUNE_EVERY_S = 60.0


class LeaseLost(Exception):
    pass


class Leader:
    def __init__(
        self,
        bus: Bus,
        quota: Quota,
        store: QuotaStore,
        writer: GroupWriter,
        server: CommandServer,
        feed: IdentityFeed,
        reap_every_s: float = 1.0,
    ) -> None:
        self.quota, self.store, self.writer, self.server, self.feed = quota, store, writer, server, feed
        self.reap_every_s = reap_every_s
        self.holder = str(uuid.uuid4())
        self.leading = asyncio.Event()
        self._lease = Lease(bus, LEASE_KEY, holder=self.holder)
        self._reload = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        writer.holder = self.holder
        writer.on_failure = self.on_write_failure

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quota-leader")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    def on_write_failure(self, _: BaseException) -> None:
        self.quota.serving = False
        self._reload.set()

    # -- leadership ------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._lease.acquire()
                log.info("quota: this instance now decides (lease %s)", LEASE_KEY)
                await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("quota: stepped down: %s", err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _lead(self) -> None:
        keeper = asyncio.create_task(self._keep_lease(), name="quota-lease")
        reaper: asyncio.Task[None] | None = None
        try:
            await self._unless_lost(self.feed.ready.wait(), keeper)
            await self._load(keeper)
            await self.server.start()
            self.leading.set()
            reaper = asyncio.create_task(self._reap(), name="quota-reaper")
            while True:
                await self._unless_lost(self._reload.wait(), keeper)
                log.warning("quota: reloading the ledger from the store after a failed write")
                await self._load(keeper)
        finally:
            self.leading.clear()
            self.quota.serving = False
            self.writer.halt("this instance no longer decides")
            for task in (keeper, reaper):
                if task is not None:
                    task.cancel()
            with contextlib.suppress(Exception):
                await self.server.stop()
            await self._lease.release()

    async def _unless_lost(self, work: Awaitable[object], keeper: asyncio.Task[None]) -> None:
        waiting = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({waiting, keeper}, return_when=asyncio.FIRST_COMPLETED)
        if keeper in done:
            waiting.cancel()
            keeper.result()  # raises LeaseLost
            raise LeaseLost("the lease keeper stopped")

    async def _keep_lease(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self._lease.ttl / 3)
            try:
                if not await self._lease.renew():
                    raise LeaseLost("another instance holds the quota lease")
                renewed = loop.time()
            except LeaseLost:
                raise
            except Exception as err:  # NATS away: keep trying until the lease would have expired
                if loop.time() - renewed > self._lease.ttl:
                    raise LeaseLost(f"the quota lease could not be renewed ({err})") from None

    async def _load(self, keeper: asyncio.Task[None]) -> None:
        backoff = 0.2
        self.quota.serving = False
        while True:
            self._reload.clear()
            ledger = self.quota.new_ledger()
            try:
                loaded = await asyncio.to_thread(load, self.store, ledger)
            except Exception as err:
                log.warning("quota: loading the ledger failed (%s); retrying", err)
                await self._unless_lost(asyncio.sleep(backoff), keeper)
                backoff = min(backoff * 2, 5.0)
                continue
            self.writer.reset(loaded.fence, loaded.position)
            self.quota.adopt(ledger)
            log.info(
                "quota: ledger loaded: %d events up to notification %d, %d open reservations",
                loaded.events,
                loaded.position,
                ledger.open,
            )
            return

    async def _reap(self) -> None:
        since_prune = 0.0
        while True:
            await asyncio.sleep(self.reap_every_s)
            try:
                expired = self.quota.expire_due()
                if expired:
                    log.info("quota: released %d reservations past their timeout", expired)
                since_prune += self.reap_every_s
                if since_prune >= PRUNE_EVERY_S:
                    since_prune = 0.0
                    self.quota.prune()
            except Exception:
                log.exception("quota: housekeeping failed")
