"""What authentication costs: `GET /v1/me` (key checked) against `GET /health` (public).

    python bench/auth.py                         # starts `gatehouse up` in a temp dir
    python bench/auth.py --url http://127.0.0.1:8080 --key mcp_...   # an already running gateway

Both routes go through the same Litestar app; the difference is the auth middleware (HMAC of
the key, a dict lookup in the identity view) and building the `Me` body. Each concurrency
level runs the two in alternating order (A B B A ...) so drift hits both alike.
"""

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python bench/auth.py`: import `bench.*` from the repo root,
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import psutil

from bench import lean_http
from bench.gatehouse_platform import Platform, listener_on
from bench.lean_http import Connection
from bench.stats import pct_ms

P50_TARGET_MS = 0.2
THROUGHPUT_TARGET = 0.70


@dataclass
class Stats:
    """Latencies and costs of one route at one concurrency, summed over its rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # every other process on the machine: noise

    def pct_ms(self, q: float) -> float:
        return pct_ms(self.latencies_ns, q)

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies_ns) / len(self.latencies_ns) / 1e6

    @property
    def rps(self) -> float:
        return len(self.latencies_ns) / self.wall_s

    def per_request_us(self, cpu_s: float) -> float:
        return cpu_s / len(self.latencies_ns) * 1e6


def cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return math.nan
    times = process.cpu_times()  # utime + stime from /proc/<pid>/stat, all threads
    return float(times.user + times.system)


def machine_busy() -> float:
    """CPU seconds all processes spent, from /proc/stat."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


async def load(
    url: str,
    path: str,
    headers: dict[str, str],
    total: int,
    concurrency: int,
    stats: Stats | None,
    gateway: psutil.Process | None,
) -> None:
    """`total` requests over `concurrency` keep-alive connections; adds to `stats` if given."""
    conns = [Connection.to(url) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    raw = conns[0].prepare("GET", path, headers)
    remaining = total
    latencies: list[int] = []

    async def worker(conn: Connection) -> None:
        nonlocal remaining
        clock = time.perf_counter_ns
        while remaining > 0:
            remaining -= 1
            start = clock()
            resp = await conn.send(raw)
            latencies.append(clock() - start)
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {resp.body[:200]!r}")

    gw0, client0, busy0, wall0 = (
        cpu_seconds(gateway),
        time.process_time(),
        machine_busy(),
        time.perf_counter(),
    )
    try:
        await asyncio.gather(*(worker(c) for c in conns))
        wall, client = time.perf_counter() - wall0, time.process_time() - client0
        gw, busy = cpu_seconds(gateway) - gw0, machine_busy() - busy0
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    if stats is not None:
        stats.wall_s += wall
        stats.client_cpu_s += client
        stats.gateway_cpu_s += gw
        stats.other_cpu_s += busy - gw - client
        stats.latencies_ns += latencies


async def measure(
    url: str,
    key: str,
    gateway: psutil.Process | None,
    levels: list[tuple[int, int]],
    warmup: int,
    rounds: int,
) -> dict[tuple[str, int], Stats]:
    routes = {"/health": {}, "/v1/me": {"authorization": f"Bearer {key}"}}
    results: dict[tuple[str, int], Stats] = {}
    for concurrency, total in levels:
        for path, headers in routes.items():
            await load(url, path, headers, warmup, concurrency, None, gateway)
            results[path, concurrency] = Stats()
        for r in range(rounds):
            order = list(routes) if r % 2 == 0 else list(reversed(routes))
            for path in order:
                share = total // rounds
                await load(url, path, routes[path], share, concurrency, results[path, concurrency], gateway)
    return results


NOISY_CORES = 0.2  # other processes busier than this during a level make its figures suspect


def report(results: dict[tuple[str, int], Stats], levels: list[tuple[int, int]]) -> None:
    print(
        f"{'route':<9}{'c':>4}{'n':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'mean ms':>8}{'req/s':>8}"
        f"{'gw cores':>10}{'gw µs/req':>11}{'client µs/req':>15}{'other cores':>13}"
    )
    for concurrency, _ in levels:
        for path in ("/health", "/v1/me"):
            s = results[path, concurrency]
            print(
                f"{path:<9}{concurrency:>4}{len(s.latencies_ns):>8}{s.pct_ms(0.5):>8.3f}{s.pct_ms(0.9):>8.3f}"
                f"{s.pct_ms(0.99):>8.3f}{s.mean_ms:>8.3f}{s.rps:>8.0f}{s.gateway_cpu_s / s.wall_s:>10.2f}"
                f"{s.per_request_us(s.gateway_cpu_s):>11.0f}{s.per_request_us(s.client_cpu_s):>15.0f}"
                f"{s.other_cpu_s / s.wall_s:>13.2f}"
            )
    print()
    for concurrency, _ in levels:
        health, me = results["/health", concurrency], results["/v1/me", concurrency]
        added = me.pct_ms(0.5) - health.pct_ms(0.5)
        ratio = me.rps / health.rps
        cpu_added = me.per_request_us(me.gateway_cpu_s) - health.per_request_us(health.gateway_cpu_s)
        print(
            f"c={concurrency}: auth adds {added:.3f} ms at p50 (target ≤ {P50_TARGET_MS} ms) "
            f"{'OK' if added <= P50_TARGET_MS else 'MISSED'}; "
            f"authenticated throughput is {ratio:.0%} of /health (target ≥ {THROUGHPUT_TARGET:.0%}) "
            f"{'OK' if ratio >= THROUGHPUT_TARGET else 'MISSED'}; "
            f"gateway CPU {cpu_added:+.0f} µs/request"
        )
        other = max(s.other_cpu_s / s.wall_s for s in (health, me))
        if other > NOISY_CORES:
            print(
                f"  note: other processes kept {other:.2f} cores busy at c={concurrency}: figures disturbed"
            )
    print(
        f"(with c requests in flight p50 ≈ c / throughput, so at c={levels[-1][0]} "
        "the p50 gap restates the throughput gap)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running gateway (default: start `gatehouse up`)")
    parser.add_argument("--key", help="an API key for --url")
    parser.add_argument("--gateway-pid", type=int, help="for CPU figures with --url (default: port owner)")
    parser.add_argument("--n1", type=int, default=5000, help="requests per route at c=1")
    parser.add_argument("--n16", type=int, default=20000, help="requests per route at c=16")
    parser.add_argument("--warmup", type=int, default=1000, help="requests per route before each level")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two routes per level")
    args = parser.parse_args()
    if bool(args.url) != bool(args.key):
        parser.error("--url and --key go together")
    levels = [(1, args.n1), (16, args.n16)]

    def bench(url: str, key: str, gateway: psutil.Process | None) -> None:
        print(
            f"gateway {url} (pid {gateway.pid if gateway else '?'}), {psutil.cpu_count()} CPUs, "
            f"warm-up {args.warmup}, rounds {args.rounds}\n"
        )
        report(lean_http.run(measure(url, key, gateway, levels, args.warmup, args.rounds)), levels)

    if args.url:
        port = urlsplit(args.url).port or 80
        gateway = psutil.Process(args.gateway_pid) if args.gateway_pid else _port_owner(port)
        bench(args.url, args.key, gateway)
    else:
        with Platform.up() as platform:
            bench(platform.url, platform.admin_key, platform.gateway())


def _port_owner(port: int) -> psutil.Process | None:
    try:
        return listener_on(port)
    except (LookupError, psutil.Error):
        return None


if __name__ == "__main__":
    main()
