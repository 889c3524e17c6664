"""Whose tool catalog a registry change touches: the tenant wall of `notifications/tools/list_changed`.

mcp_proxy records `server_registered` / `server_removed` with the scope of the catalog that
changed: a user's own servers (`owner_user_id`) or their org's (the envelope's `org_id`). A
caller sees their own servers plus their org's, so a change reaches exactly the streams of
that user, or of that org's members; never another user's or another org's.

An upstream's own `notifications/tools/list_changed` (`UpstreamChange`) comes from one user's
process or session (mcp_proxy runs them per user, org servers included): it reaches that
user's streams only (`hears`).
"""

from dataclasses import dataclass
from typing import Final

LIST_CHANGED: Final = b'{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}'


@dataclass(frozen=True, slots=True)
class CatalogChange:
    server: str
    scope: str  # "user" | "org"
    owner_user_id: str | None  # the user, for a user server
    org_id: str | None  # the org, for an org server (the event envelope's org)


@dataclass(frozen=True, slots=True)
class UpstreamChange:
    """The upstream `server` of `user_id` changed its tool list (contracts UpstreamToolsChanged)."""

    user_id: str
    server: str


@dataclass(frozen=True, slots=True)
class Audience:
    """Who holds a stream: its session's user and org, and its endpoint (None: `/mcp`)."""

    user_id: str
    org_id: str
    server: str | None


def affects(change: CatalogChange, audience: Audience) -> bool:
    if audience.server is not None and audience.server != change.server:
        return False  # `/servers/{name}/mcp` lists only that server's tools
    if change.scope == "user":
        return change.owner_user_id is not None and change.owner_user_id == audience.user_id
    if change.scope == "org":
        return change.org_id is not None and change.org_id == audience.org_id
    return False  # a scope this gateway does not know: nobody, rather than everybody


def hears(change: UpstreamChange, audience: Audience) -> bool:
    """Whether a stream is told of an upstream's own change: its user's, on `/mcp` (and `/sse`)
    or on that server's endpoint; never another user's, even one who uses the same org server."""
    if not change.user_id or change.user_id != audience.user_id:
        return False
    return audience.server is None or audience.server == change.server
