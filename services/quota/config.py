"""The quota service's own settings (`GATEHOUSE_QUOTA_*`), listed in docs/configuration.md.

`GATEHOUSE_QUOTA_TIERS` is JSON that overrides the default limits tier by tier and field
by field, e.g. `{"free": {"calls": 100}, "team": {"servers": null}}` (null: unlimited).
"""

import os
from datetime import timedelta
from typing import Any

import msgspec

from contracts.commands.identity import TIERS
from services.kit.config import ConfigError
from services.quota.domain import DEFAULT_TIERS, Limits, PeriodKind, TierTable

FIELDS = ("calls", "builds", "servers")
LEASE_GRACE_S = 10.0  # after its use window: time for the last calls and uses to arrive


class QuotaSettings(msgspec.Struct, kw_only=True):
    tiers: dict[str, Limits]
    period: PeriodKind
    reservation_timeout: timedelta
    # How long mcp_proxy may run an unlimited user's calls without a hold (0: never).
    unmetered_grant_s: float = 30.0
    # Leases (docs/quota.md): at most this many calls each (0: no leases), spent by mcp_proxy
    # for `lease_for_s`; the quota service releases one not returned `LEASE_GRACE_S` later.
    lease_max: int = 100
    lease_for_s: float = 1.0

    def table(self) -> TierTable:
        return TierTable(self.tiers)

    @property
    def lease_timeout(self) -> timedelta:
        return timedelta(seconds=self.lease_for_s + LEASE_GRACE_S)


def _limit(tier: str, field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"GATEHOUSE_QUOTA_TIERS: {tier}.{field} must be a whole number >= 0 or null (unlimited), "
            f"got {value!r}"
        )
    return value


def parse_tiers(raw: str | None) -> dict[str, Limits]:
    tiers = dict(DEFAULT_TIERS)
    if not raw:
        return tiers
    try:
        overrides = msgspec.json.decode(raw)
    except msgspec.DecodeError as err:
        raise ConfigError(f"GATEHOUSE_QUOTA_TIERS is not valid JSON: {err}") from None
    if not isinstance(overrides, dict):
        raise ConfigError('GATEHOUSE_QUOTA_TIERS must be a JSON object like {"free": {"calls": 100}}')
    for tier, fields in overrides.items():
        if tier not in TIERS:
            raise ConfigError(f"GATEHOUSE_QUOTA_TIERS: unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"GATEHOUSE_QUOTA_TIERS: {tier} must be an object with {', '.join(FIELDS)}")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ConfigError(
                f"GATEHOUSE_QUOTA_TIERS: {tier} has unknown field(s) {', '.join(sorted(unknown))}; "
                f"fields are {', '.join(FIELDS)}"
            )
        current = msgspec.structs.asdict(tiers[tier])
        current.update({f: _limit(tier, f, v) for f, v in fields.items()})
        tiers[tier] = Limits(**current)
    return tiers


def load_quota_settings(env: dict[str, str] | None = None) -> QuotaSettings:
    env = dict(os.environ) if env is None else env
    period = env.get("GATEHOUSE_QUOTA_PERIOD", "month")
    if period not in ("month", "day"):
        raise ConfigError(f"GATEHOUSE_QUOTA_PERIOD must be month or day, got {period!r}")
    raw_timeout = env.get("GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S", "120")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        raise ConfigError(
            f"GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S must be a number, got {raw_timeout!r}"
        ) from None
    if not 0 < timeout <= 86400:
        raise ConfigError("GATEHOUSE_QUOTA_RESERVATION_TIMEOUT_S must be between 0 and 86400 seconds")
    return QuotaSettings(
        tiers=parse_tiers(env.get("GATEHOUSE_QUOTA_TIERS")),
        period=period,  # type: ignore[arg-type]
        reservation_timeout=timedelta(seconds=timeout),
        unmetered_grant_s=_number(env, "GATEHOUSE_QUOTA_UNMETERED_GRANT_S", 30.0, 0, 3600, "seconds"),
        lease_max=int(_number(env, "GATEHOUSE_QUOTA_LEASE_MAX", 100, 0, 1000, "calls", whole=True)),
        lease_for_s=_number(env, "GATEHOUSE_QUOTA_LEASE_S", 1.0, 0.01, 60, "seconds"),
    )


def _number(
    env: dict[str, str], name: str, default: float, low: float, high: float, unit: str, whole: bool = False
) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g} {unit}")
    return value
