"""Which refused authentications are reported one by one, and which are folded into a summary.

Pure bookkeeping, no I/O (the reporter in adapters/auth_reports.py publishes). Time is cut in
fixed windows. In a window, each source (IP, key prefix) has its first `per_source` failures
reported individually, and the whole gateway at most `overall`; every other failure is
counted. When the window ends, each source with counted failures gets one summary, the
`max_summaries` busiest of them at most, and everything else (more sources, or sources
beyond `max_sources` that were never tracked) one overall summary. So a window produces at
most `overall + max_summaries + 1` reports, whatever the flood.
"""

from datetime import UTC, datetime

import msgspec


class Failure(msgspec.Struct, frozen=True):
    """A refused authentication; nothing in it is the key itself."""

    ip: str | None
    reason: str
    key_prefix: str | None
    key_id: str | None = None
    user_id: str | None = None
    org_id: str | None = None
    user_agent: str | None = None
    method: str = ""
    path: str = ""

    @property
    def source(self) -> tuple[str | None, str | None]:
        return self.ip, self.key_prefix


class Summary(msgspec.Struct, frozen=True):
    """`attempts` failures that were not reported one by one; `last` stands for the rest."""

    last: Failure | None  # None: many sources, summed up
    attempts: int
    sources: int
    first_at: datetime
    last_at: datetime

    def sentence(self, window_s: float) -> str:
        if self.last is None:
            who = f"from {self.sources} sources"
        else:
            who = f"from {self.last.ip or 'an unknown address'} with key {self.last.key_prefix or '(none)'}"
        return (
            f"{self.attempts} further authentication failures {who} were suppressed "
            f"(more than the gateway reports one by one in {window_s:g} s)"
        )


class _Source:
    __slots__ = ("first_at", "last", "last_at", "reported", "suppressed")

    def __init__(self, failure: Failure, at: datetime) -> None:
        self.reported = 0
        self.suppressed = 0
        self.last = failure
        self.first_at = self.last_at = at


class FailureThrottle:
    def __init__(
        self,
        window_s: float = 60.0,
        per_source: int = 5,
        overall: int = 60,
        max_sources: int = 10_000,
        max_summaries: int = 20,
    ) -> None:
        self.window_s, self.per_source, self.overall = window_s, per_source, overall
        self.max_sources, self.max_summaries = max_sources, max_summaries
        self._window_end: float | None = None
        self._sources: dict[tuple[str | None, str | None], _Source] = {}
        self._reported = 0
        self._untracked = 0
        self._untracked_first: datetime | None = None
        self._untracked_last: datetime | None = None

    @property
    def window_end(self) -> float | None:
        """When the open window closes (monotonic seconds), None when nothing is pending."""
        return self._window_end

    def admit(self, failure: Failure, now: float, at: datetime | None = None) -> bool:
        """True: report this failure now. False: it is counted into a later summary."""
        at = at or datetime.now(UTC)
        if self._window_end is None:
            self._window_end = now + self.window_s
        source = self._sources.get(failure.source)
        if source is None:
            if len(self._sources) >= self.max_sources:
                self._count_untracked(at)
                return False
            source = self._sources[failure.source] = _Source(failure, at)
        source.last, source.last_at = failure, at
        if source.reported < self.per_source and self._reported < self.overall:
            source.reported += 1
            self._reported += 1
            return True
        source.suppressed += 1
        return False

    def close(self, now: float, force: bool = False) -> list[Summary]:
        """The summaries of a window that has ended (all pending ones with `force`)."""
        if self._window_end is None or (now < self._window_end and not force):
            return []
        counted = sorted(
            (s for s in self._sources.values() if s.suppressed),
            key=lambda s: s.suppressed,
            reverse=True,
        )
        summaries = [
            Summary(s.last, s.suppressed, 1, s.first_at, s.last_at) for s in counted[: self.max_summaries]
        ]
        rest = counted[self.max_summaries :]
        attempts = self._untracked + sum(s.suppressed for s in rest)
        if attempts:
            firsts = [s.first_at for s in rest] + ([self._untracked_first] if self._untracked_first else [])
            lasts = [s.last_at for s in rest] + ([self._untracked_last] if self._untracked_last else [])
            sources = len(rest) + (1 if self._untracked else 0)
            summaries.append(Summary(None, attempts, sources, min(firsts), max(lasts)))
        self._reset()
        return summaries

    def _count_untracked(self, at: datetime) -> None:
        self._untracked += 1
        self._untracked_first = self._untracked_first or at
        self._untracked_last = at

    def _reset(self) -> None:
        self._window_end = None
        self._sources.clear()
        self._reported = self._untracked = 0
        self._untracked_first = self._untracked_last = None
