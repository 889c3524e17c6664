"""The NATS connection (through faststream) and the GATEHOUSE_EVENTS stream."""

import logging
from typing import Any

from faststream.nats import NatsBroker
from faststream.nats.security import NatsUserPassword
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from contracts.subjects import ALL_EVENTS, STREAM
from services.kit import natsauth
from services.kit.config import Settings
from services.kit.redaction import register_secret

log = logging.getLogger(__name__)


class Bus:
    """One NATS connection per process; `nc` for core NATS, `js` for JetStream."""

    def __init__(self, broker: NatsBroker) -> None:
        self.broker = broker

    @property
    def nc(self) -> Client:
        return self.broker.connection

    @property
    def js(self) -> JetStreamContext:
        js: JetStreamContext = self.broker.config.connection_state.stream
        return js

    async def close(self) -> None:
        await self.broker.stop()


async def connect(settings: Settings, name: str) -> Bus:
    """Connects and keeps reconnecting forever: an outage is survived without a restart.

    With NATS credentials (services/kit/natsauth.py) the connection is its own NATS user
    and uses that user's inbox prefix, so only it can read the replies it receives.
    """
    auth: dict[str, Any] = {}
    creds = natsauth.credentials(settings.nats_user, settings.nats_password, settings.data_dir, name)
    if creds is not None:
        register_secret(creds[1])
        auth = {
            "security": NatsUserPassword(creds[0], creds[1]),
            "inbox_prefix": natsauth.inbox_prefix(creds[0]),
        }
    broker = NatsBroker(
        settings.require_nats(),
        name=f"gatehouse-{name}",
        logger=None,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        connect_timeout=5,
        **auth,
    )
    await broker.connect()
    return Bus(broker)


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[ALL_EVENTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.stream_max_age_days * 86400 if settings.stream_max_age_days else None,
        max_bytes=settings.stream_max_bytes,
        duplicate_window=120,
        allow_direct=True,
    )


async def ensure_stream(bus: Bus, settings: Settings) -> None:
    """Creates the stream, or updates its limits; safe to run from every process at start."""
    config = stream_config(settings)
    try:
        await bus.js.add_stream(config)
    except BadRequestError:
        await bus.js.update_stream(config)
