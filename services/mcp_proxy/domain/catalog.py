"""Which upstream servers a user or an org has registered: one catalog aggregate per owner.

A user's catalog holds the servers they registered for themselves; an org's catalog holds
the servers its admins registered for every member, each member calling them with their
own secrets. A user sees their own servers plus their org's; a user server shadows an org
server of the same name (the user chose it explicitly), so a name always means one server.

One aggregate per owner (not per server) makes a name unique by construction (two
registrations of one name conflict on the aggregate's version, the loser gets 409), makes a
listing one load, and gives the quota issue a consistent count of an owner's servers.
Each registration gets a revision: processes and sessions are keyed by it, so a server
removed and registered again never reuses what was started for the old one.
"""

import uuid
from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.domain import Aggregate, event

from contracts.commands.mcp import Scope, ServerSpec
from services.mcp_proxy.domain.errors import Conflict, Invalid, NotFound
from services.mcp_proxy.domain.specs import secret_names

NAMESPACE = uuid.UUID("c3f7a1d2-5b8e-4f60-9a1c-7e2d4b6f8a90")
MAX_SERVERS = 200  # per owner, whatever the tier (tier limits are the quota service's)
Meta = dict[str, Any]


def catalog_id(scope: Scope, owner_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"{scope}:{owner_id}")


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One registered server as the rest of mcp_proxy reads it."""

    name: str
    scope: Scope
    owner_id: str  # the user (scope "user") or the org (scope "org")
    org_id: str
    catalog: str
    revision: int
    spec: ServerSpec
    secrets: tuple[str, ...]
    created_at: datetime

    @property
    def server_id(self) -> str:
        """Stable for this registration; a new registration of the same name gets a new one."""
        return f"{self.catalog}:{self.name}:{self.revision}"


class ServerCatalog(Aggregate):
    @staticmethod
    def create_id(scope: Scope, owner_id: str, org_id: str, meta: Meta) -> uuid.UUID:
        return catalog_id(scope, owner_id)

    @event("Opened")
    def __init__(self, scope: Scope, owner_id: str, org_id: str, meta: Meta) -> None:
        self.scope = scope
        self.owner_id = owner_id
        self.org_id = org_id
        self.servers: dict[str, dict[str, Any]] = {}
        self.revisions = 0

    def register(self, spec: ServerSpec, at: datetime, meta: Meta) -> None:
        if spec.name in self.servers:
            where = "your org" if self.scope == "org" else "you"
            raise Conflict(f"a server named {spec.name!r} is already registered for {where}")
        if len(self.servers) >= MAX_SERVERS:
            raise Invalid(f"at most {MAX_SERVERS} servers may be registered here; remove one first")
        self._registered(
            name=spec.name,
            spec=msgspec.to_builtins(spec),
            revision=self.revisions + 1,
            registered_at=at,
            scope=self.scope,
            owner_id=self.owner_id,
            meta=self._scoped(meta),
        )

    @event("ServerRegistered")
    def _registered(
        self,
        name: str,
        spec: dict[str, Any],
        revision: int,
        registered_at: datetime,
        scope: str,
        owner_id: str,
        meta: Meta,
    ) -> None:
        self.revisions = revision
        self.servers[name] = {"spec": spec, "revision": revision, "registered_at": registered_at}

    def remove(self, name: str, meta: Meta) -> None:
        if name not in self.servers:
            raise NotFound(f"no server named {name!r}")
        self._removed(name=name, scope=self.scope, owner_id=self.owner_id, meta=self._scoped(meta))

    @event("ServerRemoved")
    def _removed(self, name: str, scope: str, owner_id: str, meta: Meta) -> None:
        del self.servers[name]

    def entries(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for name, item in self.servers.items():
            spec = msgspec.convert(item["spec"], ServerSpec)
            out[name] = Entry(
                name=name,
                scope=self.scope,
                owner_id=self.owner_id,
                org_id=self.org_id,
                catalog=str(self.id),
                revision=item["revision"],
                spec=spec,
                secrets=tuple(secret_names(spec)),
                created_at=item["registered_at"],
            )
        return out

    def _scoped(self, meta: Meta) -> Meta:
        return {**meta, "org_id": self.org_id}


def visible(user: dict[str, Entry], org: dict[str, Entry]) -> dict[str, Entry]:
    """What a member sees: the org's servers, with their own of the same name in front."""
    return {**org, **user}
