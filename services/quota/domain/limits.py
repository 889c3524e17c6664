"""Tiers and their limits, and the sentence a refused caller reads."""

from typing import Literal

import msgspec

Kind = Literal["call", "build_slot", "server"]
KINDS: tuple[Kind, ...] = ("call", "build_slot", "server")
PeriodKind = Literal["month", "day"]


class QuotaError(Exception):
    """A rule was broken; the message is for a human."""


class Invalid(QuotaError):
    pass


class UnknownUser(QuotaError):
    pass


class UnknownTier(QuotaError):
    pass


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """None means unlimited."""

    calls: int | None
    builds: int | None
    servers: int | None

    def of(self, kind: Kind) -> int | None:
        if kind == "call":
            return self.calls
        if kind == "build_slot":
            return self.builds
        return self.servers


DEFAULT_TIERS: dict[str, Limits] = {
    "free": Limits(calls=50, builds=1, servers=1),
    "pro": Limits(calls=500, builds=3, servers=10),
    "team": Limits(calls=5000, builds=10, servers=50),
    "enterprise": Limits(calls=None, builds=50, servers=None),
}


class TierTable:
    """The tiers in upgrade order (cheapest first) with their limits."""

    def __init__(self, tiers: dict[str, Limits]) -> None:
        if not tiers:
            raise Invalid("at least one tier is needed")
        for name, limits in tiers.items():
            for kind in KINDS:
                value = limits.of(kind)
                if value is not None and value < 0:
                    raise Invalid(f"tier {name!r}: the {kind} limit must be 0 or more, or null")
        self._tiers = dict(tiers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tiers)

    def limits(self, tier: str) -> Limits:
        limits = self._tiers.get(tier)
        if limits is None:
            known = ", ".join(self._tiers)
            raise UnknownTier(f"No quota is configured for tier {tier!r}; tiers are {known}.")
        return limits

    def upgrade(self, tier: str, kind: Kind) -> tuple[str, int | None] | None:
        """The first tier after `tier` that allows more of `kind` (None: there is none)."""
        names = list(self._tiers)
        current = self.limits(tier).of(kind)
        if current is None or tier not in names:
            return None
        for name in names[names.index(tier) + 1 :]:
            better = self._tiers[name].of(kind)
            if better is None or better > current:
                return name, better
        return None


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def over_limit_sentence(
    kind: Kind, limit: int, period: PeriodKind, upgrade: tuple[str, int | None] | None
) -> str:
    """ "Monthly quota exceeded (50 calls). Upgrade to Pro for 500 calls/month." and the like."""
    if kind == "call":
        unit = "month" if period == "month" else "day"
        which = "Monthly" if period == "month" else "Daily"
        head = f"{which} quota exceeded ({_plural(limit, 'call', 'calls')})."
        if upgrade is None:
            return f"{head} Ask your administrator to raise it."
        name, better = upgrade
        more = "unlimited calls" if better is None else f"{better} calls/{unit}"
        return f"{head} Upgrade to {name.capitalize()} for {more}."
    if kind == "build_slot":
        head = f"Concurrent build limit reached ({_plural(limit, 'build', 'builds')})."
        if upgrade is None:
            return f"{head} Wait for a build to finish, or stop one."
        name, better = upgrade
        more = "unlimited concurrent builds" if better is None else f"{better} concurrent builds"
        return f"{head} Upgrade to {name.capitalize()} for {more}."
    head = f"Server limit reached ({_plural(limit, 'server', 'servers')})."
    if upgrade is None:
        return f"{head} Remove a server first."
    name, better = upgrade
    more = "unlimited servers" if better is None else _plural(better, "server", "servers")
    return f"{head} Upgrade to {name.capitalize()} for {more}."
