"""Quota periods: UTC calendar months by default (UTC days for short-period deployments)."""

import functools
from datetime import UTC, datetime, timedelta

from services.quota.domain.limits import PeriodKind


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        return at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def period_start(at: datetime, kind: PeriodKind = "month") -> datetime:
    at = _utc(at)
    if kind == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def period_end(start: datetime, kind: PeriodKind = "month") -> datetime:
    """The start of the next period (exclusive end of this one)."""
    start = period_start(start, kind)
    if kind == "day":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def seconds_until_next(at: datetime, kind: PeriodKind = "month") -> int:
    """Whole seconds (rounded up, at least 1) until the next period starts."""
    remaining = (period_end(at, kind) - _utc(at)).total_seconds()
    return max(1, int(-(-remaining // 1)))


@functools.lru_cache(maxsize=64)  # asked for every charged call; a deployment has a few periods
def label(start: datetime, kind: PeriodKind = "month") -> str:
    """`2026-11` for a month, `2026-11-21` for a day."""
    return start.strftime("%Y-%m") if kind == "month" else start.strftime("%Y-%m-%d")
