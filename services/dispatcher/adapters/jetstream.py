"""The dispatcher on the bus: the work queue, live status, heartbeats and stored log lines."""

import asyncio
import logging
from datetime import timedelta

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from contracts.commands import builds as cmd
from contracts.subjects import BUILD_LOGS_STREAM, BUILD_QUEUE, BUILDS_STREAM, build_log, build_status
from services.kit import telemetry
from services.kit.bus import Bus

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.json.Decoder(cmd.LogBatch)
FETCH = 256


class JetStreamQueue:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, order: cmd.BuildOrder) -> None:
        headers = telemetry.inject({"Nats-Msg-Id": order.build_id}, order.trace)
        await self.bus.js.publish(
            BUILD_QUEUE, _encoder.encode(order), stream=BUILDS_STREAM, headers=headers, timeout=5
        )


class NatsLive:
    """Status changes on `builds.<id>.status` (core NATS: whoever listens now sees them)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._sending: set[asyncio.Task[None]] = set()

    def status(self, change: cmd.StatusChange) -> None:
        task = asyncio.get_running_loop().create_task(self._send(change))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, change: cmd.StatusChange) -> None:
        try:
            await self.bus.nc.publish(build_status(change.build_id), _encoder.encode(change))
        except Exception as err:
            log.debug("status of %s not published: %s", change.build_id, err)


class KvHeartbeats:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def alive(self, build_id: str) -> bool:
        try:
            await self.kv.get(build_id)
            return True
        except KeyNotFoundError:  # expired, deleted or never written
            return False
        except Exception as err:  # the bus is away: do not fail builds on a doubt
            log.warning("heartbeat of %s unreadable: %s", build_id, err)
            return True


class StreamLogs:
    """Reads a build's lines from GATEHOUSE_BUILD_LOGS with a short-lived consumer."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._forgetting: set[asyncio.Task[None]] = set()

    async def page(self, build_id: str, after: int, limit: int) -> tuple[list[cmd.LogLine], bool]:
        subject = build_log(build_id)
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject,
            inactive_threshold=timedelta(seconds=5).total_seconds(),
            mem_storage=True,
        )
        try:
            info = await self.bus.js.add_consumer(BUILD_LOGS_STREAM, config)
        except NotFoundError:
            return [], False  # the stream is not there (yet)
        if not info.num_pending:
            return [], False
        sub = await self.bus.js.pull_subscribe_bind(stream=BUILD_LOGS_STREAM, name=info.name)
        lines: list[cmd.LogLine] = []
        more = False
        try:
            pending = info.num_pending
            while pending and not more:
                try:
                    msgs = await sub.fetch(min(FETCH, pending), timeout=2)
                except (NatsTimeout, TimeoutError):
                    break
                for msg in msgs:
                    pending = msg.metadata.num_pending
                    for line in _batch_decoder.decode(msg.data).lines:
                        if line.n <= after:
                            continue
                        if len(lines) >= limit:
                            more = True
                            break
                        lines.append(line)
                    if more:
                        break
            more = more or (len(lines) >= limit and pending > 0)
        finally:
            await sub.unsubscribe()
            task = asyncio.get_running_loop().create_task(self._forget(info.name))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)
        return lines, more

    async def _forget(self, name: str) -> None:
        try:
            await self.bus.js.delete_consumer(BUILD_LOGS_STREAM, name)
        except Exception:
            log.debug("log reader %s left to expire", name)
