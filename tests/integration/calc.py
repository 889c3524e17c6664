"""The `calc` test service's vocabulary, shared by the command tests (test_rpc*.py)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from services.kit.bus import Bus, connect
from services.kit.config import load_settings


class Add(msgspec.Struct, kw_only=True):
    a: int
    b: int


class Sum(msgspec.Struct):
    total: int


@asynccontextmanager
async def connected(nats_url: str, name: str) -> AsyncIterator[Bus]:
    """A bus on `nats_url` for a test connection named `name`."""
    bus = await connect(load_settings({"GATEHOUSE_NATS_URL": nats_url}), name)
    try:
        yield bus
    finally:
        await bus.close()
