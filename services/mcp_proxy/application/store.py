"""mcp_proxy's event store: server catalogs, tool calls and upstream processes.

Synchronous (eventsourcing); call it from a worker thread. Catalog changes are saved one
at a time (rare, and a conflict must reach the caller). Call and process facts go into the
same table in batches, through the recorder and adapters/fact_writer.py.
"""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from contracts.commands.mcp import Scope, ServerSpec
from services.kit import deadline
from services.kit.eventstore import retrying as kit_retrying
from services.mcp_proxy.domain.catalog import Entry, ServerCatalog, catalog_id
from services.mcp_proxy.domain.errors import Conflict, NotFound

T = TypeVar("T")
Meta = dict[str, Any]


def retrying(decide_and_save: Callable[[], T]) -> T:
    """The kit's load-decide-save retry; a clash that outlasts it is a Conflict for the caller."""
    try:
        return kit_retrying(decide_and_save)
    except IntegrityError:
        raise Conflict("the registry changed concurrently; try again") from None


class ProxyStore(Application[uuid.UUID]):
    name = "mcp_proxy"
    snapshotting_intervals = {ServerCatalog: 50}

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env=env)
        self.on_saved: Callable[[], None] = lambda: None

    def _notify(self, recordings: Any) -> None:  # called after every save
        super()._notify(recordings)
        self.on_saved()

    # -- catalogs ---------------------------------------------------------------------------
    def catalog(self, scope: Scope, owner_id: str) -> ServerCatalog | None:
        try:
            found: ServerCatalog = self.repository.get(catalog_id(scope, owner_id))
        except AggregateNotFoundError:
            return None
        return found

    def entries(self, scope: Scope, owner_id: str) -> dict[str, Entry]:
        catalog = self.catalog(scope, owner_id)
        return catalog.entries() if catalog is not None else {}

    def register(self, scope: Scope, owner_id: str, org_id: str, spec: ServerSpec, meta: Meta) -> Entry:
        def attempt() -> Entry:
            catalog = self.catalog(scope, owner_id) or ServerCatalog(scope, owner_id, org_id, meta)
            catalog.register(spec, datetime.now(UTC), meta)
            deadline.check()  # the caller may have given up: then nothing is recorded
            self.save(catalog)
            return catalog.entries()[spec.name]

        return retrying(attempt)

    def remove(self, scope: Scope, owner_id: str, name: str, meta: Meta) -> Entry:
        def attempt() -> Entry:
            catalog = self.catalog(scope, owner_id)
            entry = catalog.entries().get(name) if catalog is not None else None
            if catalog is None or entry is None:
                raise NotFound(f"no server named {name!r}")
            catalog.remove(name, meta)
            deadline.check()
            self.save(catalog)
            return entry

        return retrying(attempt)
