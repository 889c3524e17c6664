"""Register, list, find and remove upstream servers; catalogs cached for the hot path.

Loading an aggregate per call would cost a database round trip on every tool call, so each
instance keeps the catalogs it read for `ttl_s` seconds. Every instance also follows the
registry's own events on the stream (adapters/feeds.py) and drops a catalog as soon as
another instance changes it; the TTL bounds staleness if an event is missed. A name that
is not found is looked up again in the store (at most every 0.2 s per owner) before the
call is refused, so a server registered a moment ago elsewhere is found.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Any

from contracts.commands.mcp import Caller, Scope, ServerSpec
from services.mcp_proxy.application.ports import NoServerLimit, ServerSlots, Upstreams
from services.mcp_proxy.application.store import ProxyStore
from services.mcp_proxy.domain.addresses import Resolver, system_resolver
from services.mcp_proxy.domain.catalog import Entry, catalog_id, visible
from services.mcp_proxy.domain.errors import Conflict, Forbidden, NotFound
from services.mcp_proxy.domain.specs import SpecPolicy, check_server_name, check_spec

Owner = tuple[Scope, str]
RECHECK_S = 0.2


def server_key(name: str) -> str:
    """The quota reservation key of a user's own server: one name, one unit."""
    return f"server:user:{name}"


class Registry:
    def __init__(
        self,
        store: ProxyStore,
        policy: SpecPolicy,
        ttl_s: float,
        upstreams: Upstreams,
        resolve: Resolver = system_resolver,
        clock: Callable[[], float] = time.monotonic,
        slots: ServerSlots | None = None,
    ) -> None:
        self.store, self.policy, self.ttl_s = store, policy, ttl_s
        self.slots: ServerSlots = slots if slots is not None else NoServerLimit()
        self.upstreams, self._resolve, self._clock = upstreams, resolve, clock
        self._cache: dict[Owner, tuple[float, dict[str, Entry]]] = {}  # owner -> (loaded at, entries)
        self._loading: dict[Owner, asyncio.Future[dict[str, Entry]]] = {}

    # -- reads -----------------------------------------------------------------------------
    async def entries(self, scope: Scope, owner_id: str, max_age: float | None = None) -> dict[str, Entry]:
        owner = (scope, owner_id)
        cached = self._cache.get(owner)
        age = self.ttl_s if max_age is None else max_age
        if cached is not None and self._clock() - cached[0] < age:
            return cached[1]
        loading = self._loading.get(owner)
        if loading is not None:
            return await asyncio.shield(loading)
        fut: asyncio.Future[dict[str, Entry]] = asyncio.get_running_loop().create_future()
        self._loading[owner] = fut
        try:
            loaded_at = self._clock()
            found = await asyncio.to_thread(self.store.entries, scope, owner_id)
        except BaseException as err:
            fut.set_exception(err)
            fut.exception()
            raise
        finally:
            del self._loading[owner]
        self._cache[owner] = (loaded_at, found)
        fut.set_result(found)
        return found

    async def visible(self, caller: Caller) -> dict[str, Entry]:
        user = await self.entries("user", caller.user_id)
        org = await self.entries("org", caller.org_id)
        return visible(user, org)

    async def lookup(self, caller: Caller, name: str) -> Entry | None:
        """The server a name means for this caller (their own first), or None."""
        user = self._cache.get(("user", caller.user_id))
        org = self._cache.get(("org", caller.org_id))
        now = self._clock()
        if user is not None and org is not None and now - user[0] < self.ttl_s and now - org[0] < self.ttl_s:
            entry = user[1].get(name) or org[1].get(name)
            if entry is not None:
                return entry
            if now - user[0] < RECHECK_S and now - org[0] < RECHECK_S:
                return None
        user_entries = await self.entries("user", caller.user_id, max_age=RECHECK_S)
        org_entries = await self.entries("org", caller.org_id, max_age=RECHECK_S)
        return user_entries.get(name) or org_entries.get(name)

    # -- writes ----------------------------------------------------------------------------
    async def register(self, caller: Caller, scope: Scope, spec: ServerSpec, meta: dict[str, Any]) -> Entry:
        if scope == "org" and not caller.is_admin:
            raise Forbidden("only an org admin may register a server for the whole org")
        await asyncio.to_thread(check_spec, spec, self.policy, self._resolve)
        owner_id = caller.org_id if scope == "org" else caller.user_id
        if scope == "org":  # an org's servers are its admins'; they count against no user's limit
            entry = await asyncio.to_thread(self.store.register, scope, owner_id, caller.org_id, spec, meta)
        else:
            entry = await self._register_counted(caller, spec, meta)
        self.changed(scope, owner_id)
        return entry

    async def _register_counted(self, caller: Caller, spec: ServerSpec, meta: dict[str, Any]) -> Entry:
        """Reserve a unit of the server limit, record the registration, then commit the unit.

        A name already registered holds its unit (the commit is a no-op, or confirms a unit
        its registration never got); any other failure gives the unit back.
        """
        key = server_key(spec.name)
        await self.slots.reserve(caller, key)  # QuotaExceeded over the limit
        try:
            entry = await asyncio.to_thread(
                self.store.register, "user", caller.user_id, caller.org_id, spec, meta
            )
        except Conflict:
            await self.slots.commit(caller, key)
            raise
        except Exception:
            await self.slots.release(caller, key, "registration_failed")
            raise
        await self.slots.commit(caller, key)
        return entry

    async def remove(self, caller: Caller, name: str, scope: Scope | None, meta: dict[str, Any]) -> Entry:
        """Removes the caller's server of that name, else (for an admin) the org's."""
        check_server_name(name)
        user = await self.entries("user", caller.user_id, max_age=0)
        org = await self.entries("org", caller.org_id, max_age=0)
        if scope is None:
            scope = "user" if name in user else "org" if name in org else "user"
        if scope == "org":
            if name not in org:
                raise NotFound(f"no server named {name!r} is registered for your org")
            if not caller.is_admin:
                raise Forbidden(f"{name!r} is registered for the whole org; only an org admin may remove it")
        elif name not in user:
            await self.slots.release(caller, server_key(name), "removed")  # a unit left behind, if any
            raise NotFound(f"you have no server named {name!r}")
        owner_id = caller.org_id if scope == "org" else caller.user_id
        entry = await asyncio.to_thread(self.store.remove, scope, owner_id, name, meta)
        self.changed(scope, owner_id, removed=name)
        if scope == "user":
            await self.slots.release(caller, server_key(name), "removed")
        return entry

    def changed(self, scope: Scope, owner_id: str, removed: str | None = None) -> None:
        """A catalog changed (here or on another instance): forget it; stop what served a removed server."""
        self._cache.pop((scope, owner_id), None)
        if removed is not None:
            prefix = f"{catalog_id(scope, owner_id)}:{removed}:"
            task = asyncio.get_running_loop().create_task(self.upstreams.retire_server(prefix, "removed"))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
