"""The reaper: one dispatcher instance at a time (a lease) fails builds whose worker is lost.

Every `interval_s` it reads the index of active builds: a running build whose heartbeat key
has expired (its node stopped renewing it: the worker or the whole node vanished) and that
has been running longer than `grace_s` is failed with "worker lost"; a queued build that no
node started within the queue timeout is failed too. Either way the slot keeper then
releases its slot. With the default 10 s heartbeat TTL, a 15 s grace and a 2 s interval, a
killed node's builds are failed well within 30 s.
"""

import asyncio
import logging
import uuid

from services.dispatcher.application import Builds
from services.kit.bus import Bus
from services.kit.lease import Lease
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)
REAPER = {"actor": {"kind": "service", "id": "dispatcher"}, "correlation_id": "reaper"}


class Reaper:
    def __init__(
        self, builds: Builds, bus: Bus, grace_s: float, queue_timeout_s: float, interval_s: float = 2.0
    ) -> None:
        self.builds, self.grace_s, self.queue_timeout_s, self.interval_s = (
            builds,
            grace_s,
            queue_timeout_s,
            interval_s,
        )
        self._lease = Lease(bus, "dispatcher.reaper", holder=str(uuid.uuid4()))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reaper")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        await self._lease.release()

    async def _run(self) -> None:
        held = False
        loop = asyncio.get_running_loop()
        renewed_at = 0.0
        while True:
            try:
                if not held:
                    await self._lease.acquire()
                    held, renewed_at = True, loop.time()
                elif loop.time() - renewed_at > self._lease.ttl / 3:
                    held = await self._lease.renew()
                    renewed_at = loop.time()
                    if not held:
                        continue
                await self.builds.reap(self.grace_s, self.queue_timeout_s, REAPER)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("reaper pass failed: %s", err)
            await asyncio.sleep(self.interval_s)
