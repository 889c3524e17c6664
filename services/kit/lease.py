"""A lease in a NATS KV bucket with a TTL: one holder at a time, lost when it stops renewing."""

import asyncio
import logging

from nats.js.api import KeyValueConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.kit.bus import Bus

log = logging.getLogger(__name__)
BUCKET = "gatehouse_leases"


async def lease_bucket(bus: Bus, ttl: float) -> KeyValue:
    try:
        return await bus.js.key_value(BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await bus.js.create_key_value(KeyValueConfig(bucket=BUCKET, ttl=ttl, history=1))
    except BadRequestError:
        # Another process created it first, with another TTL (relays and projections differ):
        # the bucket's TTL is the one every lease gets.
        return await bus.js.key_value(BUCKET)


class Lease:
    def __init__(self, bus: Bus, key: str, holder: str, ttl: float = 6.0) -> None:
        self.bus, self.key, self.holder, self.ttl = bus, key, holder, ttl
        self._revision: int | None = None

    async def acquire(self) -> None:
        """Waits until this process holds the lease."""
        kv = await lease_bucket(self.bus, self.ttl)
        while True:
            try:
                self._revision = await kv.create(self.key, self.holder.encode())
                return
            except KeyWrongLastSequenceError:
                await asyncio.sleep(self.ttl / 3)

    async def renew(self) -> bool:
        kv = await lease_bucket(self.bus, self.ttl)
        try:
            self._revision = await kv.update(self.key, self.holder.encode(), last=self._revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def release(self) -> None:
        if self._revision is None:
            return  # not held: a delete without `last` would drop another holder's lease
        revision, self._revision = self._revision, None
        try:
            kv = await lease_bucket(self.bus, self.ttl)
            await kv.delete(self.key, last=revision)
        except Exception:
            log.debug("lease %s not released (it will expire)", self.key)
