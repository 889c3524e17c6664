"""Composition root: the audit trail's store, its projection of the stream, its commands."""

import hashlib
import hmac

from contracts.subjects import ALL_EVENTS
from services.audit.adapters.checkpoints import CheckpointStore
from services.audit.adapters.commands import routes
from services.audit.adapters.scratch import ScratchReplays
from services.audit.adapters.signing import CheckpointSigner
from services.audit.adapters.store import AuditStore
from services.audit.application import Audit, ChainsAhead, prepared_entry
from services.audit.config import load_audit_settings
from services.audit.notary import Notary
from services.kit.bus import Bus
from services.kit.config import Settings
from services.kit.history import StoredHistory
from services.kit.host import Component, add_ping
from services.kit.projection import LIVE_LINGER_S, ProjectionConsumer
from services.kit.rpc import CommandServer

SCHEMA = "audit"


def cursor_key(settings: Settings) -> bytes:
    """Shared by every instance so any of them continues a page another one started.

    Without a pepper the key is public: cursors still catch garbling, and forging one gains
    nothing because every page re-applies the reader's scope.
    """
    label = b"gatehouse audit cursor v1"
    if settings.key_pepper:
        return hmac.new(settings.key_pepper, label, hashlib.sha256).digest()
    return hashlib.sha256(label).digest()


async def build(bus: Bus, settings: Settings) -> list[Component]:
    url = settings.require_database()
    store = AuditStore(url, SCHEMA)  # started first: it creates the schema the consumer needs
    own = load_audit_settings(settings.data_dir)  # GATEHOUSE_AUDIT_*: checkpoints, retention
    audit = Audit(store, cursor_key(settings), scratch=ScratchReplays(bus, url))
    projection = ProjectionConsumer(
        bus=bus,
        database_url=url,
        schema=SCHEMA,
        name="audit",
        filter_subject=ALL_EVENTS,
        apply_batch=audit.apply_batch,
        prepare=prepared_entry,
        ahead=ChainsAhead(store),  # a catch-up seals batch N+1 while batch N is written,
        worker_from=own.replay_worker_from,  # in a worker process when it is a long one
        history=StoredHistory(bus),  # events the stream's retention dropped
        linger_s=LIVE_LINGER_S,
    )
    server = CommandServer(bus, "audit")
    add_ping(server, settings)
    notary = Notary(CheckpointStore(store), CheckpointSigner(own.signing_key, own.trusted_keys), own)
    routes(server, audit, projection, notary)
    return [store, notary, projection, server]
