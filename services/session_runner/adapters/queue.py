"""Pulls build orders from the work queue, one at a time, only while the node has a free slot.

Every runner node binds to the same durable pull consumer (`runners` on GATEHOUSE_BUILDS),
so nodes share the queue, each order goes to one node, and an order a node took but never
acknowledged (it died first) is delivered again after the consumer's ack wait.
"""

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext

from contracts.commands.builds import BuildOrder
from contracts.subjects import BUILD_CONSUMER, BUILDS_STREAM
from services.kit.buildbus import ensure_build_streams, ensure_queue_consumer
from services.kit.bus import Bus
from services.kit.tasks import stop_task
from services.session_runner.application import Runner

log = logging.getLogger(__name__)
_decoder = msgspec.json.Decoder(BuildOrder)
FETCH_WAIT_S = 5.0
RETRY_DELAY_S = 2.0


class OrderQueue:
    def __init__(self, bus: Bus, runner: Runner, shutdown_grace_s: float = 10.0) -> None:
        self.bus, self.runner, self.shutdown_grace_s = bus, runner, shutdown_grace_s
        self.slots = asyncio.Semaphore(runner.settings.capacity)
        self._task: asyncio.Task[None] | None = None
        self._orders: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await ensure_build_streams(self.bus, self.runner.settings.log_retention_s)
        await ensure_queue_consumer(self.bus)
        self._task = asyncio.create_task(self._run(), name="order-queue")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)
        await self.runner.shutdown(self.shutdown_grace_s)
        if self._orders:
            await asyncio.wait(self._orders, timeout=5)

    async def _run(self) -> None:
        backoff = 0.2
        sub: JetStreamContext.PullSubscription | None = None
        while True:
            await self.slots.acquire()
            taken = False
            try:
                if sub is None:
                    sub = await self.bus.js.pull_subscribe_bind(BUILD_CONSUMER, stream=BUILDS_STREAM)
                msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
                self._spawn(msgs[0])
                taken = True
                backoff = 0.2
            except (NatsTimeout, TimeoutError):
                pass
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("work queue unavailable: %s", err)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if not taken:
                    self.slots.release()

    def _spawn(self, msg: Msg) -> None:
        task = asyncio.create_task(self._take(msg))
        self._orders.add(task)
        task.add_done_callback(self._orders.discard)

    async def _take(self, msg: Msg) -> None:
        try:
            try:
                order = _decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                log.error("dropping an unreadable build order: %s", err)
                await msg.term()
                return

            async def settle(ok: bool) -> None:
                with contextlib.suppress(Exception):
                    await (msg.ack() if ok else msg.nak(delay=RETRY_DELAY_S))

            await self.runner.take(order, settle)
        except Exception:
            log.exception("build order failed on node %s", self.runner.node)
        finally:
            self.slots.release()
