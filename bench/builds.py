"""Builds over real NATS, PostgreSQL and processes: start latency, idle memory, a burst of 50.

    python bench/builds.py                      # embedded NATS + PostgreSQL in a temp dir
    python bench/builds.py --latency-runs 60 --burst 50

identity, secrets, quota, dispatcher, one runner node and the gateway run as their own
processes (`python -m services.<name>`), as in production; the agent is
tests/agents/fake_agent.py (a Python process, like the real CLI a program to start). The
client is bench/lean_http.py plus a raw nats-py subscription to `builds.*.log`.

1. Start latency, one build at a time (an idle platform): from just before `POST /v1/builds`
   to (a) the agent's first line, by the agent's own clock, and (b) that line on the bus
   (`builds.<id>.log`, what the SSE stream relays). Target: p50 <= 300 ms.
2. Memory of an idle session: builds whose agent sleeps; the worker process's RSS and USS
   (what it alone holds), and the agent's, per session.
3. A burst: `--burst` one-step builds posted at once to a node with that capacity; all must
   complete (none lost); the time until the last one ended.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/builds.py`: make `bench.*` importable from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import base64
import json
import math
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

from bench.lean_http import Connection
from bench.stats import pct
from contracts.commands import secrets as sec
from contracts.commands.builds import LogBatch
from contracts.commands.common import CommandMeta, Ping
from contracts.commands.identity import CreateUser, UserCreated
from contracts.envelope import Actor
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.crypto import new_master_key

REPO = Path(__file__).resolve().parent.parent
FAKE_AGENT = REPO / "tests" / "agents" / "fake_agent.py"
P50_TARGET_MS = 300.0
SERVICES = ("identity", "secrets", "quota", "dispatcher", "session_runner", "gateway")
_encode = msgspec.json.Encoder().encode
_batch = msgspec.json.Decoder(LogBatch)


class Reply(msgspec.Struct):
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")


_reply = msgspec.json.Decoder(Reply)


def meta() -> CommandMeta:
    return CommandMeta(
        actor=Actor(kind="operator", id="bench"), correlation_id=f"bench-{uuid.uuid4().hex[:8]}"
    )


async def call(nc: nats.NATS, subject: str, body: bytes, timeout: float = 10.0) -> bytes:
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


class Bus:
    """First arrival of each build's log lines on `builds.*.log`."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, float]] = {}  # build id -> (perf time, agent's time.time())
        self.waiters: dict[str, asyncio.Future[None]] = {}

    async def on_log(self, msg: Any) -> None:
        batch = _batch.decode(msg.data)
        if batch.build_id in self.first:
            return
        agent_t = math.nan
        for line in batch.lines:
            try:
                item = json.loads(line.text)
            except ValueError:
                continue
            if isinstance(item, dict) and "t" in item:
                agent_t = float(item["t"])
                break
        self.first[batch.build_id] = (time.perf_counter(), agent_t)
        waiter = self.waiters.pop(batch.build_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def post_build(conn: Connection, headers: dict[str, str], prompts: list[str]) -> str:
    resp = await conn.post("/v1/builds", {"prompts": prompts}, headers)
    if resp.status != 202:
        raise RuntimeError(f"POST /v1/builds: {resp.status} {resp.body[:300]!r}")
    build_id: str = resp.json()["build_id"]
    return build_id


async def wait_ended(
    conn: Connection, headers: dict[str, str], build_id: str, timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = (await conn.get(f"/v1/builds/{build_id}", headers)).json()
        if body["status"] in ("completed", "failed", "canceled"):
            return body
        await asyncio.sleep(0.05)
    raise RuntimeError(f"build {build_id} did not end within {timeout} s")


async def latency(url: str, headers: dict[str, str], bus: Bus, runs: int) -> None:
    posted: list[float] = []
    seen: list[float] = []
    by_agent: list[float] = []
    async with Connection.to(url) as conn:
        for i in range(runs + 3):  # the first few warm the path up
            build_id_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            t_wall, t0 = time.time(), time.perf_counter()
            build_id = await post_build(conn, headers, [f"hello {i}"])
            t_posted = time.perf_counter()
            if build_id not in bus.first:
                bus.waiters[build_id] = build_id_future
                await asyncio.wait_for(build_id_future, 30)
            t_seen, t_agent = bus.first[build_id]
            await wait_ended(conn, headers, build_id)
            if i >= 3:
                posted.append((t_posted - t0) * 1000)
                seen.append((t_seen - t0) * 1000)
                by_agent.append((t_agent - t_wall) * 1000)
    print(f"1. start latency, {runs} builds one at a time (ms)")
    for name, values in (
        ("POST /v1/builds answered (202)", posted),
        ("agent's first line, agent's clock", by_agent),
        ("first line on builds.<id>.log", seen),
    ):
        p50, p90, p99 = pct(values, 0.5), pct(values, 0.9), pct(values, 0.99)
        print(f"   {name:36s} p50 {p50:7.1f}  p90 {p90:7.1f}  p99 {p99:7.1f}")
    verdict = "meets" if pct(seen, 0.5) <= P50_TARGET_MS else "MISSES"
    print(f"   {verdict} the target p50 <= {P50_TARGET_MS:.0f} ms (first line on the bus)")


async def idle_memory(url: str, headers: dict[str, str], sessions: int) -> None:
    async with Connection.to(url) as conn:
        ids = [await post_build(conn, headers, ["sleep:30"]) for _ in range(sessions)]
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(pids) < sessions and time.monotonic() < deadline:
            for s in (await conn.get("/v1/sessions", headers)).json():
                if s["pid"]:
                    pids[s["build_id"]] = s["pid"]
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # let them settle (the worker's first memory check imports psutil)
        workers, agents = [], []
        for pid in pids.values():
            proc = psutil.Process(pid)
            workers.append(proc.memory_full_info())
            agents += [c.memory_full_info() for c in proc.children()]
        for build_id in ids:
            await conn.post(f"/v1/sessions/{build_id}/stop", b"", headers)
    mib = 1024 * 1024

    def avg(items: list[Any], field: str) -> float:
        return sum(getattr(m, field) for m in items) / len(items) / mib

    print(f"2. idle sessions ({len(workers)}): memory per session (MiB)")
    rss, uss, pss = avg(workers, "rss"), avg(workers, "uss"), avg(workers, "pss")
    print(f"   worker process: RSS {rss:.1f}  USS {uss:.1f}  PSS {pss:.1f}")
    print(f"   its agent (fake_agent.py, Python): RSS {avg(agents, 'rss'):.1f}  USS {avg(agents, 'uss'):.1f}")


async def burst(url: str, headers: dict[str, str], n: int) -> None:
    began = time.perf_counter()
    posted: list[float] = []

    async def one(i: int) -> dict[str, Any]:
        async with Connection.to(url) as conn:  # a connection carries one request at a time
            build_id = await post_build(conn, headers, [f"quick {i}"])
            posted.append(time.perf_counter() - began)
            return await wait_ended(conn, headers, build_id)

    ended = await asyncio.gather(*(one(i) for i in range(n)))
    total = time.perf_counter() - began
    statuses: dict[str, int] = {}
    for body in ended:
        statuses[body["status"]] = statuses.get(body["status"], 0) + 1
    print(f"3. burst of {n} one-step builds on one node (capacity {n})")
    lost = n - len(ended)
    print(f"   all posted in {max(posted):.2f} s; all ended in {total:.2f} s; {statuses}; lost: {lost}")


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="gatehouse-bench-builds-"))
    nats_server = EmbeddedNats(root / "nats").start()
    postgres = EmbeddedPostgres(root / "pg").start()
    processes: list[subprocess.Popen[bytes]] = []
    logs = root / "logs"
    logs.mkdir()
    try:
        db = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        params: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(postgres.url)
        params["dbname"] = db
        database_url = psycopg.conninfo.make_conninfo(**params)
        keyring = root / "keys" / "master-keys"
        write_keyring(keyring, new_master_key("k1"))
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")},
            "GATEHOUSE_NATS_URL": nats_server.url,
            "GATEHOUSE_DATABASE_URL": database_url,
            "GATEHOUSE_KEY_PEPPER": base64.b64encode(os.urandom(32)).decode(),
            "GATEHOUSE_DATA_DIR": str(root / "data"),
            "GATEHOUSE_MASTER_KEYS_FILE": str(keyring),
            "GATEHOUSE_HTTP_PORT": str(port),
            "GATEHOUSE_LOG_LEVEL": "WARNING",
            "GATEHOUSE_AGENT_COMMAND": f"{sys.executable} {FAKE_AGENT}",
            "GATEHOUSE_RUNNER_CAPACITY": str(max(args.burst, args.idle_sessions)),
            "GATEHOUSE_RUNNER_NODE": "bench-node",
        }
        for name in SERVICES:
            out = open(logs / f"{name}.log", "ab")  # the child keeps it
            processes.append(
                subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env, stdout=out, stderr=out)
            )
        nc = await nats.connect(nats_server.url)
        for name in SERVICES[:-1]:
            await wait_ping(nc, name)
        url = f"http://127.0.0.1:{port}"
        request = CreateUser(meta=meta(), email="bench@bench.test", org="bench", tier="enterprise")
        user = msgspec.json.decode(
            await call(nc, "cmd.identity.create_user", _encode(request)), type=UserCreated
        )
        put = sec.PutSecret(
            meta=meta(),
            org_id=user.org_id,
            user_id=user.user_id,
            name="cursor_api_key",
            value="key_bench_" + "ab" * 16,
        )
        await call(nc, "cmd.secrets.put", _encode(put))
        headers = {"authorization": f"Bearer {user.api_key}", "content-type": "application/json"}
        async with Connection.to(url) as conn:
            deadline = time.monotonic() + 60
            while (await conn.get("/v1/me", headers)).status != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway does not know the bench user")
                await asyncio.sleep(0.2)
        bus = Bus()
        await nc.subscribe("builds.*.log", cb=bus.on_log)
        print(f"platform in {root}: {', '.join(SERVICES)} as processes; 2 CPUs shared with the client")
        await latency(url, headers, bus, args.latency_runs)
        await idle_memory(url, headers, args.idle_sessions)
        await asyncio.sleep(8)  # the idle sessions' stops (grace period) finish first
        await burst(url, headers, args.burst)
        await nc.close()
        return 0
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats_server.stop()
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--idle-sessions", type=int, default=10)
    parser.add_argument("--burst", type=int, default=50)
    sys.exit(asyncio.run(main(parser.parse_args())))
