"""At most one message a window per key, and never the last change lost.

An upstream that flaps (sends `notifications/tools/list_changed` in bursts) must not flood the
bus: the first change of a quiet key goes out at once; further changes inside the window are
folded into one message sent when the window ends. Pure: the caller says what time it is and
schedules the trailing send.
"""

from collections.abc import Hashable
from typing import Final

_PRUNE_AT: Final = 4096  # keys remembered before quiet ones are forgotten


class Throttle:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[Hashable, float] = {}  # key -> when its last message went out
        self._pending: set[Hashable] = set()  # keys with a trailing message scheduled

    def offer(self, key: Hashable, now: float) -> float | None:
        """A change of `key`: 0.0 means send now; a positive delay, send once after it (and
        call `sent`); None, a message is already scheduled and covers this change."""
        if key in self._pending:
            return None
        last = self._last.get(key)
        if last is None or now - last >= self.interval_s:
            if len(self._last) >= _PRUNE_AT:
                self._prune(now)
            self._last[key] = now
            return 0.0
        self._pending.add(key)
        return last + self.interval_s - now

    def sent(self, key: Hashable, now: float) -> None:
        """The trailing message of `key` went out."""
        self._pending.discard(key)
        self._last[key] = now

    def _prune(self, now: float) -> None:
        for key in [
            k for k, t in self._last.items() if now - t >= self.interval_s and k not in self._pending
        ]:
            del self._last[key]
