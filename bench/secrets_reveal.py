"""Secret reveals over real NATS and PostgreSQL, and the rewrap of 10,000 secrets.

    python bench/secrets_reveal.py                  # embedded NATS + PostgreSQL in a temp dir
    python bench/secrets_reveal.py --n1 3000 --n16 20000 --secrets 10000
    python bench/secrets_reveal.py --nats nats://... --database postgresql://...   # servers you run

The secrets service runs as its own process (`python -m services.secrets`) as in production,
connected as NATS user `secrets` (embedded NATS runs with the authorization `gatehouse up`
generates). The load generator is a raw nats-py client connected as `mcp_proxy` with
pre-encoded `cmd.secrets.reveal` requests, closed loop at concurrency 1 and 16: a round trip
is request over NATS -> keystore read -> unwrap -> decrypt -> reply. The reveal records
(events, audit) are written behind the reply, in batches; the script waits for them before
the next phase so they do not disturb it.

Then `--secrets` secrets are stored through `cmd.secrets.put` (16 in flight), a new master
key is made current (keyring file + `key_status reload`), and `cmd.secrets.rewrap` re-wraps
every data key under it: the time is the service's own (and the round trip).

Target: reveal p50 <= 1 ms (at c=1; at c=16 the p50 is queueing: 16 / throughput).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/secrets_reveal.py`: the repo root first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import msgspec
import nats
import psutil
import psycopg

from bench.stats import pct_ms as pct
from contracts.commands import secrets as cmd
from contracts.commands.common import CommandMeta, Ping
from contracts.envelope import Actor
from services.kit import natsauth
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres
from services.secrets.adapters.keyfile import write_keyring
from services.secrets.crypto import Keyring, new_master_key

P50_TARGET_MS = 1.0
ORG = "org-bench"
_encode = msgspec.json.Encoder().encode


class Reply(msgspec.Struct):
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")


_reply = msgspec.json.Decoder(Reply)


def meta(actor: str) -> CommandMeta:
    return CommandMeta(actor=Actor(kind="service", id=actor), correlation_id=f"bench-{uuid.uuid4().hex[:8]}")


async def call(nc: nats.NATS, verb: str, body: bytes, timeout: float = 10.0) -> bytes:
    msg = await nc.request(f"cmd.secrets.{verb}", body, timeout=timeout)
    reply = _reply.decode(msg.data)
    if not reply.ok:
        raise RuntimeError(msg.data.decode())
    return bytes(reply.value)


async def wait_ping(nc: nats.NATS, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await call(nc, "ping", _encode(Ping()), timeout=1.0)
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise RuntimeError("the secrets service did not answer its ping")


async def put_many(nc: nats.NATS, count: int, prefix: str, concurrency: int = 16) -> float:
    names = iter(range(count))
    began = time.perf_counter()

    async def worker() -> None:
        for i in names:
            body = cmd.PutSecret(
                meta=meta("bench"),
                org_id=ORG,
                user_id=f"user-{i % 50}",
                name=f"{prefix}{i}",
                value=f"ghp_{uuid.uuid4().hex}{uuid.uuid4().hex}",
            )
            await call(nc, "put", _encode(body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began


async def reveal_load(nc: nats.NATS, secrets: int, total: int, concurrency: int) -> tuple[list[int], float]:
    bodies = [
        _encode(
            cmd.RevealSecret(
                meta=meta("mcp_proxy"),
                service="mcp_proxy",
                purpose=f"tool_call:bench-{i}",
                org_id=ORG,
                user_id=f"user-{i % 50}",
                name=f"hot{i}",
                scope="user",
            )
        )
        for i in range(secrets)
    ]
    latencies: list[int] = []
    remaining = total

    async def worker(w: int) -> None:
        nonlocal remaining
        i = w
        clock = time.perf_counter_ns
        while remaining > 0:
            remaining -= 1
            body = bodies[i % len(bodies)]
            i += concurrency
            started = clock()
            msg = await nc.request("cmd.secrets.reveal", body, timeout=10)
            latencies.append(clock() - started)
            if not msg.data.startswith(b'{"ok":true'):
                raise RuntimeError(msg.data[:300].decode())

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return latencies, time.perf_counter() - began


ECHO = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], user=sys.argv[2] or None, password=sys.argv[3] or None,
                            inbox_prefix="_INBOX_secrets")
    async def echo(msg):
        await msg.respond(b'{"ok":true,"value":null}')
    await nc.subscribe("cmd.secrets.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def baseline(nc: nats.NATS, url: str, user: str, password: str, n: int) -> list[int]:
    """A bare nats-py responder in its own process: the floor any reveal stands on here."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO, url, user, password], stdout=subprocess.PIPE)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        latencies = []
        for _ in range(n):
            started = time.perf_counter_ns()
            await nc.request("cmd.secrets.echo", b"{}", timeout=5)
            latencies.append(time.perf_counter_ns() - started)
        return sorted(latencies[n // 10 :])
    finally:
        echo.terminate()
        echo.wait(5)


async def settle(process: psutil.Process, timeout: float = 120.0) -> None:
    """Until the service is idle again (reveal records and their events written)."""
    began = time.monotonic()
    process.cpu_percent(None)
    while time.monotonic() - began < timeout:
        await asyncio.sleep(0.5)
        if process.cpu_percent(None) < 10:
            return


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="gatehouse-bench-secrets-"))
    root.chmod(0o755)  # embedded PostgreSQL runs as its own system user when we are root
    nats_server = postgres = None
    service: subprocess.Popen[bytes] | None = None
    passwords = {user: uuid.uuid4().hex for user in natsauth.USERS}
    try:
        if args.nats:
            nats_url, auth = args.nats, False
        else:
            config = natsauth.authorization_config(passwords)
            nats_server = EmbeddedNats(root / "nats", extra_config=config).start()
            nats_url, auth = nats_server.url, True
        database_url = args.database or (postgres := EmbeddedPostgres(root / "pg").start()).url
        db = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        params = psycopg.conninfo.conninfo_to_dict(database_url)
        params["dbname"] = db
        keyring = root / "master-keys"
        write_keyring(keyring, new_master_key("k1"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")} | {
            "GATEHOUSE_NATS_URL": nats_url,
            "GATEHOUSE_DATABASE_URL": psycopg.conninfo.make_conninfo(**params),
            "GATEHOUSE_MASTER_KEYS_FILE": str(keyring),
            "GATEHOUSE_DATA_DIR": str(root / "data"),
            "GATEHOUSE_LOG_LEVEL": "WARNING",
        }
        if auth:
            env |= {"GATEHOUSE_NATS_USER": "secrets", "GATEHOUSE_NATS_PASSWORD": passwords["secrets"]}
        log = open(root / "secrets.log", "ab")
        service = subprocess.Popen(
            [sys.executable, "-m", "services.secrets"], env=env, stdout=log, stderr=log
        )
        process = psutil.Process(service.pid)

        def connect(user: str) -> "asyncio.Future[nats.NATS]":
            creds = {"user": user, "password": passwords[user]} if auth else {}
            return asyncio.ensure_future(
                nats.connect(nats_url, inbox_prefix=natsauth.inbox_prefix(user), **creds)  # type: ignore[arg-type]
            )

        operator, proxy = await connect("operator"), await connect("mcp_proxy")
        await wait_ping(operator)
        print(f"secrets service pid {service.pid}; servers in {root}" + (" (NATS with auth)" if auth else ""))

        load = os.getloadavg()[0]
        print(
            f"load average {load:.1f} on {os.cpu_count()} CPUs"
            + (" (busy: figures are inflated)" if load > 1 else "")
        )
        floor = await baseline(
            operator, nats_url, "secrets" if auth else "", passwords["secrets"] if auth else "", 2000
        )
        print(
            f"baseline (bare nats-py echo, c=1): p50 {pct(floor, 0.5):.3f} ms  p99 {pct(floor, 0.99):.3f} ms"
        )
        await put_many(operator, args.hot, "hot")
        for c, n in ((1, args.n1), (16, args.n16)):
            await reveal_load(proxy, args.hot, min(n, 500), c)  # warm-up
            await settle(process)
            cpu0 = sum(process.cpu_times()[:2])
            latencies, wall = await reveal_load(proxy, args.hot, n, c)
            cpu = sum(process.cpu_times()[:2]) - cpu0
            latencies.sort()
            p50 = pct(latencies, 0.5)
            verdict = "" if c > 1 else (" (target met)" if p50 <= P50_TARGET_MS else " (TARGET MISSED)")
            print(
                f"reveal c={c:<2} n={n}: p50 {p50:.3f} ms  p90 {pct(latencies, 0.9):.3f}  "
                f"p99 {pct(latencies, 0.99):.3f}  max {latencies[-1] / 1e6:.2f} ms  "
                f"{len(latencies) / wall:,.0f}/s  service CPU {cpu / len(latencies) * 1e6:.0f} us/reveal"
                + verdict
            )
            await settle(process)

        seconds = await put_many(operator, args.secrets, "s")
        print(
            f"stored {args.secrets} secrets in {seconds:.1f}s ({args.secrets / seconds:,.0f}/s, 16 in flight)"
        )
        write_keyring(keyring, Keyring.parse(keyring.read_text()).with_new_key("k2"))
        status = cmd.KeyReport
        reloaded = msgspec.json.decode(
            await call(operator, "key_status", _encode(cmd.KeyStatus(meta=meta("cli"), reload=True))),
            type=status,
        )
        assert reloaded.current_key_id == "k2", reloaded
        began = time.perf_counter()
        raw = await call(operator, "rewrap", _encode(cmd.Rewrap(meta=meta("cli"))), timeout=3600)
        round_trip = time.perf_counter() - began
        report = msgspec.json.decode(raw, type=cmd.RewrapReport)
        total = report.rewrapped + report.already_current
        print(
            f"rewrap: {report.rewrapped} data keys moved from {report.from_key_ids} to {report.key_id} "
            f"in {report.seconds:.2f}s service time ({round_trip:.2f}s round trip; "
            f"{report.rewrapped / report.seconds:,.0f} keys/s; {total} keys under k2 now)"
        )
        await proxy.close()
        await operator.close()
        return 0
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
        if nats_server is not None:
            nats_server.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats", help="a NATS server you run (no auth)")
    parser.add_argument("--database", help="a PostgreSQL server you run")
    parser.add_argument("--hot", type=int, default=100, help="secrets revealed in the latency phases")
    parser.add_argument("--n1", type=int, default=3000, help="reveals at concurrency 1")
    parser.add_argument("--n16", type=int, default=20000, help="reveals at concurrency 16")
    parser.add_argument("--secrets", type=int, default=10000, help="secrets to rewrap")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
