"""Commands answered by the quota service (`cmd.quota.<verb>`).

A reservation is keyed by an idempotency key chosen by the caller: the tool call's
request id, the build id, or a server registration key. The same (user, key) reserved
again answers with the same reservation; it is charged at most once.
"""

from datetime import datetime
from typing import Literal

import msgspec

from contracts.commands.common import CommandMeta

Kind = Literal["call", "build_slot", "server"]
State = Literal["held", "committed", "released", "refused"]


class Reserve(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    user_id: str
    org_id: str
    kind: Kind
    key: str  # idempotency key: request id, build id, server registration key
    amount: int = 1
    # A call's caller that can spend a lease (mcp_proxy) asks for one: when the user's
    # allowance has room, the answer is a lease of several calls instead of a hold of this
    # one (docs/quota.md, "Leases"); otherwise this call is held as usual.
    lease: bool = False


class Reservation(msgspec.Struct, kw_only=True, omit_defaults=True):
    granted: bool
    reservation_id: str | None  # None when refused (nothing was reserved)
    state: State
    kind: Kind
    used: int  # after this decision, in the reservation's period (calls) or now (slots)
    limit: int | None  # None: unlimited
    tier: str
    period_start: datetime | None = None  # calls only
    sentence: str | None = None  # set when refused: show it to the human / the agent
    retry_after_s: int | None = None  # set when refused: seconds before trying again makes sense
    # Set on a granted call of a user whose calls are unlimited: for this many seconds the
    # caller may run that user's calls (at this tier) without a hold and report each one that
    # reached its upstream with RecordUsage afterwards (docs/quota.md, "Unmetered calls").
    unmetered_for_s: float | None = None
    # Set when a lease was granted instead of a hold (Reserve.lease): `lease_units` calls,
    # this one included, may run without a hold each, for `lease_for_s` seconds; each that
    # reached its upstream is reported as a Use naming `lease_key`, then the lease is
    # returned (RecordUsage.returned) so its unspent units are freed.
    lease_key: str | None = None
    lease_units: int | None = None
    lease_for_s: float | None = None


class Commit(msgspec.Struct, kw_only=True):
    """The reserved work happened (the upstream answered): charge it. Idempotent."""

    meta: CommandMeta
    user_id: str
    key: str


class Release(msgspec.Struct, kw_only=True):
    """The reserved work did not happen, or a slot is no longer used. Idempotent."""

    meta: CommandMeta
    user_id: str
    key: str
    reason: str = "released"


class Settled(msgspec.Struct, kw_only=True):
    """The answer to Commit/Release: `changed` is False for an unknown or already-settled key."""

    changed: bool
    state: State | None  # None: no such reservation


class Use(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One call that reached its upstream: charge it. Idempotent per key.

    `held`: the call held a unit (Reserve): commit it, exactly like Commit (a no-op when it
    was settled or expired). Otherwise it ran without a hold (an unmetered user).
    """

    user_id: str
    org_id: str
    key: str  # the tool call's request id
    held: bool = False
    lease: str | None = None  # the lease key whose unit it spent (held is then false)


class Returned(msgspec.Struct, kw_only=True):
    """A lease its taker is done with: its unspent units are freed (after the uses before it)."""

    user_id: str
    key: str  # the lease key


class RecordUsage(msgspec.Struct, kw_only=True):
    """Charges calls that reached their upstream, many per message (mcp_proxy sends them in
    batches after the calls answered): held ones are committed, unmetered ones charged.

    Answered once every charge is recorded. A key already charged changes nothing; an
    unmetered use of a key still held commits it. Unmetered uses of a user the quota
    service does not know are skipped and named.
    """

    meta: CommandMeta
    uses: list[Use]
    returned: list[Returned] = msgspec.field(default_factory=list)  # applied after `uses`


class UsageReceipt(msgspec.Struct, kw_only=True):
    recorded: int  # uses that charged something (the others were charged before)
    unknown_users: list[str] = msgspec.field(default_factory=list)


class GetQuota(msgspec.Struct, kw_only=True):
    meta: CommandMeta
    user_id: str
    org_id: str


class QuotaView(msgspec.Struct, kw_only=True):
    tier: str
    period_start: datetime
    period_end: datetime
    calls_used: int
    calls_limit: int | None
    concurrent_builds_used: int
    concurrent_builds_limit: int | None
    servers_used: int
    servers_limit: int | None


class GetDigest(msgspec.Struct, kw_only=True):
    meta: CommandMeta


class QuotaDigest(msgspec.Struct, kw_only=True):
    """A fingerprint of every balance; identical for the live ledger and any rebuild of it."""

    users: int
    reservations: int  # reservations ever made (Reserved events)
    open: int  # reservations holding something now
    charged_calls: int
    digest: str
    position: int  # last notification id of the quota store folded in


class Rebuild(msgspec.Struct, kw_only=True):
    """Rebuilds every balance from the event log and compares it with the live ledger.

    `source`: "stream" folds `events.quota.>` from GATEHOUSE_EVENTS, "store" the quota
    service's own event store. Both stop at the live ledger's position.
    """

    meta: CommandMeta
    source: Literal["stream", "store"] = "stream"


class Verify(msgspec.Struct, kw_only=True):
    """Like Rebuild from the stream and the store; the report names every difference."""

    meta: CommandMeta


class QuotaRebuildReport(msgspec.Struct, kw_only=True):
    live: QuotaDigest
    rebuilt: QuotaDigest
    source: str
    seconds: float
    differences: list[str] = msgspec.field(default_factory=list)  # "user U, calls 2026-11: live 3, rebuilt 2"
