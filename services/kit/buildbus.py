"""The JetStream pieces builds share: the work queue, the log stream, the heartbeat bucket.

- `GATEHOUSE_BUILDS` (subject `builds.queue`): work-queue retention, so an order leaves the
  stream once a runner node acknowledges it; the durable pull consumer `runners` is shared
  by every node, each pulling only when it has a free slot.
- `GATEHOUSE_BUILD_LOGS` (subjects `builds.*.log`): batches of redacted log lines, kept for
  the log retention (`GATEHOUSE_BUILD_LOG_RETENTION_DAYS`); plain NATS subscribers of a
  build's subject see them live too.
- KV `gatehouse_build_heartbeats`: a key per running build (and per node) that expires
  after `GATEHOUSE_BUILD_HEARTBEAT_TTL_S` unless its node renews it.

Every process that uses one creates it if needed, so start order does not matter.
"""

import os
from collections.abc import Mapping

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from contracts.subjects import BUILD_CONSUMER, BUILD_HEARTBEATS, BUILD_LOGS_STREAM, BUILD_QUEUE, BUILDS_STREAM
from services.kit.bus import Bus
from services.kit.config import ConfigError

DAY = 86400.0


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name) or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def log_retention_s(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    return _seconds(env, "GATEHOUSE_BUILD_LOG_RETENTION_DAYS", 7, 0.0001, 3650) * DAY


def heartbeat_ttl_s(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    return _seconds(env, "GATEHOUSE_BUILD_HEARTBEAT_TTL_S", 10, 2, 300)


async def _ensure(bus: Bus, config: StreamConfig) -> None:
    try:
        await bus.js.add_stream(config)
    except BadRequestError:
        await bus.js.update_stream(config)


async def ensure_build_streams(bus: Bus, retention_s: float) -> None:
    await _ensure(
        bus,
        StreamConfig(
            name=BUILDS_STREAM,
            subjects=[BUILD_QUEUE],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
            max_age=7 * DAY,
        ),
    )
    await _ensure(
        bus,
        StreamConfig(
            name=BUILD_LOGS_STREAM,
            subjects=["builds.*.log"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=retention_s,
            duplicate_window=120,
            allow_direct=True,
        ),
    )


async def ensure_queue_consumer(bus: Bus, ack_wait_s: float = 30.0) -> None:
    config = ConsumerConfig(
        durable_name=BUILD_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=20,
        max_ack_pending=-1,
        filter_subject=BUILD_QUEUE,
    )
    try:
        await bus.js.add_consumer(BUILDS_STREAM, config)
    except BadRequestError:
        pass  # another node created it first, maybe with other timings: theirs stand


async def heartbeat_bucket(bus: Bus, ttl_s: float) -> KeyValue:
    try:
        return await bus.js.key_value(BUILD_HEARTBEATS)
    except BucketNotFoundError:
        pass
    try:
        return await bus.js.create_key_value(KeyValueConfig(bucket=BUILD_HEARTBEATS, ttl=ttl_s, history=1))
    except BadRequestError:
        return await bus.js.key_value(BUILD_HEARTBEATS)
