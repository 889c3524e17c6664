"""How fast this machine is right now, so benchmark figures from different days can be compared.

The shared 2-vCPU machines here have run the same code up to ~1.8x slower on one day than on
another (docs/replay.md, docs/quota.md). Each benchmark prints `speed_line()` first: a fixed
pure-Python workload (the interpreter is what Gatehouse's services spend their CPU in) timed on
one core, best of five.
"""

import hashlib
import time


def _workload() -> int:
    total = 0
    table: dict[int, int] = {}
    for i in range(300_000):
        table[i & 1023] = table.get(i & 1023, 0) + i
        total += len(str(i))
    total += len(hashlib.sha256(b"x" * 4_000_000).digest())
    return total


def speed_ms(rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        _workload()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def speed_line() -> str:
    took = speed_ms()
    return f"machine speed: a fixed Python workload took {took:.1f} ms on one core (best of 5; lower: faster)"


if __name__ == "__main__":
    print(speed_line())
