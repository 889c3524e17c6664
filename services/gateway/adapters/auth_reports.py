"""Publishes refused authentications as `events.gateway.auth_failed`, throttled.

The gateway has no store, so the stream is the record of these facts: each report is an
envelope published to JetStream with its event id as `Nats-Msg-Id` (a retried publish is
deduplicated), and the audit projection turns it into an `auth.failed` entry that a replay
reproduces. Publishing happens on a task of its own behind a bounded queue: a 401 never
waits for NATS, and a NATS outage costs reports, not requests.
"""

import asyncio
import contextlib
import logging
import os
import time
import uuid
from datetime import UTC, datetime

from contracts.envelope import Actor, Envelope, encode_envelope, payload_bytes
from contracts.events.gateway import AuthFailed
from contracts.subjects import STREAM, event_subject
from services.gateway.auth_failures import Failure, FailureThrottle, Summary
from services.kit import telemetry
from services.kit.bus import Bus
from services.kit.config import ConfigError
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)
EVENT_TYPE = "gateway.auth_failed"
WINDOW_ENV = "GATEHOUSE_AUTH_FAILURE_WINDOW_S"
PER_SOURCE_ENV = "GATEHOUSE_AUTH_FAILURE_REPORTS"
QUEUE_SIZE = 1000
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_TRIES = 3


def throttle_from_env(env: dict[str, str] | None = None) -> FailureThrottle:
    env = dict(os.environ) if env is None else env
    try:
        window = float(env.get(WINDOW_ENV, "60"))
        per_source = int(env.get(PER_SOURCE_ENV, "5"))
    except ValueError:
        raise ConfigError(f"{WINDOW_ENV} and {PER_SOURCE_ENV} must be numbers") from None
    if window <= 0 or per_source < 0:
        raise ConfigError(f"{WINDOW_ENV} must be positive and {PER_SOURCE_ENV} at least 0")
    return FailureThrottle(window_s=window, per_source=per_source)


class AuthFailureReporter:
    def __init__(self, bus: Bus, throttle: FailureThrottle | None = None) -> None:
        self.bus = bus
        self.throttle = throttle or throttle_from_env()
        self.published = 0
        self.dropped = 0
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None

    def report(self, failure: Failure, request_id: str | None = None) -> None:
        """Called on the 401 path: never blocks, never raises."""
        try:
            now_at = datetime.now(UTC)
            if self.throttle.admit(failure, time.monotonic(), now_at):
                self._enqueue(self._single(failure, now_at, request_id))
            self._ensure_running()
        except Exception:  # reporting must never turn a 401 into a 500
            log.exception("could not report a refused authentication")

    async def stop(self) -> None:
        """Publishes what is pending (summaries included), then stops the publisher."""
        for summary in self.throttle.close(time.monotonic(), force=True):
            self._enqueue(self._summary(summary))
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=PUBLISH_TIMEOUT_S)
            await stop_task(self._task, patience_s=2)
            self._task = None

    # -- internals -------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="auth-failure-reports")

    def _enqueue(self, envelope: Envelope) -> None:
        try:
            self._queue.put_nowait(envelope)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("auth failure reports dropped (queue full): %d so far", self.dropped)

    async def _run(self) -> None:
        while True:
            end = self.throttle.window_end
            wait = None if end is None else max(0.0, end - time.monotonic())
            try:
                envelope = await asyncio.wait_for(self._queue.get(), timeout=wait)
            except TimeoutError:
                for summary in self.throttle.close(time.monotonic()):
                    self._enqueue(self._summary(summary))
                continue
            try:
                await self._publish(envelope)
            finally:
                self._queue.task_done()

    async def _publish(self, envelope: Envelope) -> None:
        body = encode_envelope(envelope)
        for attempt in range(PUBLISH_TRIES):
            try:
                await self.bus.js.publish(
                    event_subject(EVENT_TYPE),
                    body,
                    timeout=PUBLISH_TIMEOUT_S,
                    stream=STREAM,
                    headers={"Nats-Msg-Id": envelope.event_id},
                )
                self.published += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if attempt == PUBLISH_TRIES - 1:
                    log.warning("could not publish an auth failure report: %r", err)
                else:
                    await asyncio.sleep(0.2 * (attempt + 1))

    def _single(self, failure: Failure, at: datetime, request_id: str | None) -> Envelope:
        payload = AuthFailed(
            reason=failure.reason,
            key_prefix=failure.key_prefix,
            key_id=failure.key_id,
            user_id=failure.user_id,
            method=failure.method,
            path=failure.path,
            first_at=at,
            last_at=at,
        )
        return self._envelope(payload, failure, at, request_id)

    def _summary(self, summary: Summary) -> Envelope:
        last = summary.last or Failure(ip=None, reason="unknown", key_prefix=None)
        payload = AuthFailed(
            reason=last.reason if summary.last else "many",
            key_prefix=last.key_prefix,
            key_id=last.key_id,
            user_id=last.user_id,
            method=last.method,
            path=last.path,
            attempts=summary.attempts,
            suppressed=True,
            sources=summary.sources,
            first_at=summary.first_at,
            last_at=summary.last_at,
            summary=summary.sentence(self.throttle.window_s),
        )
        return self._envelope(payload, last, summary.last_at, None)

    @staticmethod
    def _envelope(payload: AuthFailed, failure: Failure, at: datetime, request_id: str | None) -> Envelope:
        return Envelope(
            event_id=str(uuid.uuid4()),
            type=EVENT_TYPE,
            schema_version=1,
            occurred_at=at,
            org_id=failure.org_id,
            actor=Actor(kind="anonymous", id="anonymous", ip=failure.ip, user_agent=failure.user_agent),
            correlation_id=request_id or str(uuid.uuid4()),
            trace=telemetry.current_trace(),
            data=payload_bytes(payload),
        )
