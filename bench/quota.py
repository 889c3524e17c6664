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

Two phases: closed loop (`--concurrency` callers, each sending its next request when the
last is answered: the most the service sustains) and open loop (`--rate` requests a second
on a fixed schedule, at most `--concurrency` in flight; latency counted from the scheduled
time, so a stall is not hidden). In a closed loop latency is concurrency / throughput
(Little's law), so the latency target is read from the open-loop phase.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/quota.py`: make `bench.*` importable from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import base64
import math
import os
import subprocess
import tempfile
import time
import uuid
from typing import Any

import msgspec
import nats
import psutil
import psycopg

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


def pct(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[max(0, math.ceil(p * len(sorted_ns)) - 1)] / 1e6


def spawn(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    out = open(logs / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, stdout=out, stderr=out)


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
    nc: nats.NATS, users: list[UserCreated], rate: float, concurrency: int, seconds: float
) -> tuple[list[int], float]:
    """Open loop: a request every 1/rate s (at most `concurrency` in flight)."""
    latencies: list[int] = []
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: int) -> None:
        user = users[i % len(users)]
        body = _encode(
            q.Reserve(
                meta=META,
                user_id=user.user_id,
                org_id=user.org_id,
                kind="call",
                key=f"p{i}-{uuid.uuid4().hex}",
            )
        )
        try:
            if not _reservation.decode(await call(nc, "cmd.quota.reserve", body)).granted:
                raise RuntimeError("refused")
            latencies.append(time.perf_counter_ns() - scheduled)
        finally:
            slots.release()

    began = time.perf_counter_ns()
    interval = int(1e9 / rate)
    total = int(rate * seconds)
    for i in range(total):
        scheduled = began + i * interval
        delay = (scheduled - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
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


def report(title: str, latencies: list[int], wall: float, cpu: float, what: str) -> tuple[float, float]:
    latencies.sort()
    rate = len(latencies) / wall
    print(title)
    print(f"  {rate:,.0f} {what}/s")
    print(
        f"  latency ms: p50 {pct(latencies, 0.50):.2f}  p90 {pct(latencies, 0.90):.2f}  "
        f"p99 {pct(latencies, 0.99):.2f}  max {latencies[-1] / 1e6:.2f}"
    )
    print(f"  quota process CPU: {cpu / len(latencies) * 1e6:.0f} us each ({cpu / wall:.0%} of a core)")
    return rate, pct(latencies, 0.5)


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="gatehouse-bench-quota-"))
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
        logs = root / "logs"
        logs.mkdir()
        processes = [spawn("identity", env, logs), spawn("quota", env, logs)]
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
        await load(nc, users, args.mode, args.concurrency, 1.0)  # warm-up
        await settle(quota_process)
        what = "reservations" if args.mode == "reserve" else "reserve+commit pairs"

        cpu_before = sum(quota_process.cpu_times()[:2])
        latencies, wall = await paced(nc, users, args.rate, args.concurrency, args.seconds)
        drained = await settle(quota_process)
        cpu = sum(quota_process.cpu_times()[:2]) - cpu_before
        _, open_p50 = report(
            f"open loop: reserve at {args.rate:,.0f}/s scheduled, at most {args.concurrency} in flight "
            f"(CPU includes publishing every event; the outbox drained {drained:.1f}s after the load):",
            latencies,
            wall,
            cpu,
            "reservations",
        )

        cpu_before = sum(quota_process.cpu_times()[:2])
        latencies, wall = await load(nc, users, "reserve", 1, min(args.seconds, 5.0))
        cpu = sum(quota_process.cpu_times()[:2]) - cpu_before
        report("one caller (c=1), reserve:", latencies, wall, cpu, "reservations")
        await settle(quota_process)

        cpu_before = sum(quota_process.cpu_times()[:2])
        latencies, wall = await load(nc, users, args.mode, args.concurrency, args.seconds)
        cpu = sum(quota_process.cpu_times()[:2]) - cpu_before
        closed_rate, _ = report(
            f"closed loop: {args.mode} at c={args.concurrency} for {wall:.1f}s over {len(users)} users:",
            latencies,
            wall,
            cpu,
            what,
        )
        print(f"  the outbox relay then needed {await settle(quota_process):.1f}s to publish the backlog")
        if args.mode == "reserve":
            print(
                f"targets: >= {RATE_TARGET:,.0f} reservations/s at c={args.concurrency}: "
                f"{'met' if closed_rate >= RATE_TARGET else 'NOT met'} ({closed_rate:,.0f}/s); "
                f"p50 <= {P50_TARGET_MS} ms at {args.rate:,.0f}/s: "
                f"{'met' if open_p50 <= P50_TARGET_MS else 'NOT met'} ({open_p50:.2f} ms)"
            )
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
    parser.add_argument("--rate", type=float, default=RATE_TARGET, help="open-loop phase, requests/s")
    parser.add_argument("--nats")
    parser.add_argument("--database")
    try:
        import uvloop

        raise SystemExit(uvloop.run(main(parser.parse_args())))
    except ImportError:
        raise SystemExit(asyncio.run(main(parser.parse_args()))) from None
