"""Log batches onto `builds.<id>.log` (kept in GATEHOUSE_BUILD_LOGS, seen live by subscribers)."""

import asyncio
import logging
from datetime import UTC, datetime

import msgspec

from contracts.commands import builds as cmd
from contracts.subjects import BUILD_LOGS_STREAM, build_log
from services.kit.bus import Bus

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class StreamLogSink:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, build_id: str, lines: list[cmd.LogLine]) -> None:
        """Awaited in order (the stream keeps a build's lines in order); a batch the stream
        will not take after a few tries is dropped from the stream (the node's files have it)."""
        if not lines:
            return
        body = _encoder.encode(cmd.LogBatch(build_id=build_id, lines=lines, at=datetime.now(UTC)))
        headers = {"Nats-Msg-Id": f"{build_id}:{lines[0].n}"}
        for attempt in range(3):
            try:
                await self.bus.js.publish(
                    build_log(build_id), body, stream=BUILD_LOGS_STREAM, headers=headers, timeout=5
                )
                return
            except Exception as err:
                if attempt == 2:
                    log.warning("lines %d.. of build %s not stored: %s", lines[0].n, build_id, err)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
