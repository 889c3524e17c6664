"""Audit replay at scale: 1,000,000 events replayed into the trail, filtered queries, verify.

    /work/venv/bin/python bench/audit_replay.py                  # 1,000,000 events (minutes)
    /work/venv/bin/python bench/audit_replay.py --events 20000   # smoke run

Starts its own NATS (JetStream) and PostgreSQL (embedded, in a temp dir) and the audit service
as its own process (`python -m services.audit`), publishes N realistic envelopes (75 % tool
calls, 20 % key use, the rest key issue/revoke; 200 orgs, one of them holding 30 % of the
events) with async publishes in flight, waits for the live projection, then times:

- `gatehouse replay audit` (the CLI, as an operator runs it): events/s, and the audit
  process's peak RSS during the replay (VmHWM, reset just before);
- filtered pages through `cmd.audit.query`, the command `GET /v1/audit` forwards to: p50/p95;
- `gatehouse audit verify`: seconds.
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.machine import speed_line
from contracts.commands import audit as cmd
from contracts.commands.common import CommandMeta, Ping, Pong
from contracts.envelope import Actor, Envelope, TraceContext, encode_envelope, payload_bytes
from contracts.events import identity as idev
from contracts.events import mcp as mcpev
from contracts.subjects import STREAM
from services.kit.bus import Bus, connect, ensure_stream
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres
from services.kit.rpc import CommandClient, CommandFailed

NS = uuid.UUID("0b5c1d0e-8a53-4d3e-9f3a-6c1b2e7f9a10")
GATEHOUSE = Path(sys.executable).parent / "gatehouse"
OPERATOR = CommandMeta(actor=Actor(kind="operator", id="bench"), correlation_id="bench")
ORGS = 200


def make(n: int, orgs: int = ORGS, seed: int = 7):
    rnd = random.Random(seed)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    users = {o: [str(uuid.uuid5(NS, f"u{o}:{i}")) for i in range(10 if o else 200)] for o in range(orgs)}
    for i in range(n):
        o = 0 if rnd.random() < 0.3 else rnd.randrange(1, orgs)
        org = str(uuid.uuid5(NS, f"org{o}"))
        user = rnd.choice(users[o])
        key = str(uuid.uuid5(NS, f"k{user}"))
        at = t0 + timedelta(milliseconds=i * 3)
        r = rnd.random()
        actor = Actor(
            kind="user", id=user, key_id=key, ip=f"10.0.{o % 250}.{i % 250}", user_agent="Cursor/1.7"
        )
        if r < 0.75:
            typ = "mcp_proxy.tool_call_completed"
            ok = rnd.random() < 0.95
            payload = mcpev.ToolCallCompleted(
                request_id=str(uuid.uuid5(NS, f"r{i}")),
                user_id=user,
                server=rnd.choice(("github", "jira", "spark")),
                tool_name=rnd.choice(("search", "get_issue", "list_jobs", "create_pr")),
                status="success" if ok else "error",
                outcome="success" if ok else "failure",
                duration_ms=round(rnd.random() * 900, 3),
                arguments_sha256=uuid.uuid5(NS, f"a{i}").hex * 2,
                arguments_bytes=rnd.randrange(20, 4000),
                result_bytes=rnd.randrange(20, 40000),
                reached_upstream=True,
                started_at=at,
                error=None if ok else "upstream said no",
            )
        elif r < 0.95:
            typ = "identity.api_key_used"
            payload = idev.ApiKeyUsed(key_id=key, user_id=user, used_at=at)
        elif r < 0.98:
            typ = "identity.api_key_issued"
            payload = idev.ApiKeyIssued(
                key_id=str(uuid.uuid5(NS, f"nk{i}")),
                user_id=user,
                name="laptop",
                prefix="mcp_abcdefgh",
                key_hash="ab" * 32,
                created_at=at,
                expires_at=None,
            )
        else:
            typ = "identity.api_key_revoked"
            payload = idev.ApiKeyRevoked(key_id=key, user_id=user, revoked_at=at)
        env = Envelope(
            event_id=str(uuid.uuid5(NS, f"e{seed}:{i}")),
            type=typ,
            schema_version=1,
            occurred_at=at,
            org_id=org,
            actor=actor,
            correlation_id=str(uuid.uuid5(NS, f"c{i}")),
            trace=TraceContext(
                traceparent=f"00-{uuid.uuid5(NS, f't{i}').hex}-{uuid.uuid5(NS, f's{i}').hex[:16]}-01"
            ),
            data=payload_bytes(payload),
        )
        yield "events." + typ, env.event_id, encode_envelope(env)


def org_id(o: int) -> str:
    return str(uuid.uuid5(NS, f"org{o}"))


def user_id(o: int, i: int) -> str:
    return str(uuid.uuid5(NS, f"u{o}:{i}"))


async def publish(bus: Bus, n: int) -> float:
    started = time.monotonic()
    for i, (subject, event_id, body) in enumerate(make(n)):
        await bus.js.publish_async(subject, body, headers={"Nats-Msg-Id": event_id})
        if i % 100_000 == 99_999:
            print(f"  published {i + 1}", flush=True)
    await bus.js.publish_async_completed()
    return time.monotonic() - started


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) a process has used; with `children`, also those of its
    children that ended (the audit's staging worker, once a replay is over)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    used = sum(int(v) for v in fields[11 : 15 if children else 13])  # utime stime [cutime cstime]
    return used / os.sysconf("SC_CLK_TCK")


def waited_s(pid: int) -> float:
    """Seconds the process's threads were runnable but waited for a CPU (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def servers_cpu_s(root: Path, nats_pid: int) -> dict[str, float]:
    """CPU seconds of this benchmark's PostgreSQL (postmaster and every backend) and NATS server."""
    postmaster = int((root / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    out = {"postgres": 0.0, "nats": cpu_s(nats_pid)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(proc.name) == postmaster:  # itself, and the backends that ended (reaped)
            out["postgres"] += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        elif int(fields[1]) == postmaster:
            out["postgres"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_cpu_s() -> float:
    """CPU seconds every process on the machine has used (busy time from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(values) - values[3] - values[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: resets VmHWM


async def wait_for(client: CommandClient, bus: Bus, timeout: float = 7200) -> float:
    started = time.monotonic()
    last = (await bus.js.stream_info(STREAM)).state.last_seq
    while time.monotonic() - started < timeout:
        try:
            d = await client.call(
                "audit", "digest", cmd.GetDigest(meta=OPERATOR), cmd.ProjectionDigest, timeout=60
            )
            if d.stream_seq >= last:
                return time.monotonic() - started
        except CommandFailed:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("the live projection did not catch up")


async def queries(client: CommandClient, rounds: int) -> list[tuple[str, float, float, int]]:
    big, small = org_id(0), org_id(7)
    rnd = random.Random(3)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    cases = {
        "big org, no filter": lambda: (big, user_id(0, 1), True, cmd.AuditFilter()),
        "big org, action=api_key.issued": lambda: (
            big,
            user_id(0, 1),
            True,
            cmd.AuditFilter(action="api_key.issued"),
        ),
        "big org, actor=<user>": lambda: (
            big,
            user_id(0, 1),
            True,
            cmd.AuditFilter(actor=user_id(0, rnd.randrange(200))),
        ),
        "big org, outcome=failure": lambda: (big, user_id(0, 1), True, cmd.AuditFilter(outcome="failure")),
        "big org, resource_type=api_key, since/until 1 h": lambda: (
            big,
            user_id(0, 1),
            True,
            cmd.AuditFilter(
                resource_type="api_key",
                since=t0 + timedelta(minutes=rnd.randrange(0, 40)),
                until=t0 + timedelta(minutes=rnd.randrange(41, 100)),
            ),
        ),
        "member (own entries), action=tool_call.completed": lambda: (
            big,
            user_id(0, rnd.randrange(200)),
            False,
            cmd.AuditFilter(action="tool_call.completed"),
        ),
        "small org, action=api_key.used": lambda: (
            small,
            user_id(7, 1),
            True,
            cmd.AuditFilter(action="api_key.used"),
        ),
    }
    out = []
    for name, case in cases.items():
        times, items = [], 0
        for _ in range(rounds):
            org, user, admin, where = case()
            q = cmd.QueryAudit(
                meta=OPERATOR, org_id=org, user_id=user, is_admin=admin, filter=where, limit=50
            )
            started = time.perf_counter()
            page = await client.call("audit", "query", q, cmd.AuditPage, timeout=30)
            times.append((time.perf_counter() - started) * 1000)
            items += len(page.items)
        times.sort()
        out.append((name, statistics.median(times), times[int(0.95 * (len(times) - 1))], items // rounds))
    return out


def cli(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run([str(GATEHOUSE), *args], env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"gatehouse {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return seconds, done.stdout.strip()


async def main(events: int, rounds: int, root: Path) -> None:
    print(speed_line(), flush=True)
    nats = EmbeddedNats(root / "nats").start()
    pg = EmbeddedPostgres(root / "pg" / "data").start()
    audit: subprocess.Popen[bytes] | None = None
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")},
            "GATEHOUSE_NATS_URL": nats.url,
            "GATEHOUSE_DATABASE_URL": pg.url,
            "GATEHOUSE_DATA_DIR": str(root / "data"),
            "GATEHOUSE_LOG_LEVEL": "WARNING",
        }
        settings = load_settings(env)
        bus = await connect(settings, "bench")
        await ensure_stream(bus, settings)
        print(f"publishing {events} envelopes …", flush=True)
        seconds = await publish(bus, events)
        print(f"published {events} in {seconds:.1f}s ({events / seconds:,.0f}/s, incl. making them)")
        log = open(root / "audit.log", "ab")
        audit = subprocess.Popen([sys.executable, "-m", "services.audit"], env=env, stdout=log, stderr=log)
        client = CommandClient(bus)
        while True:
            try:
                await client.call("audit", "ping", Ping(), Pong, timeout=2)
                break
            except CommandFailed:
                await asyncio.sleep(0.2)
        live = await wait_for(client, bus)
        print(f"live projection caught up: {events / live:,.0f} events/s ({live:.1f}s)")

        reset_peak(audit.pid)
        assert nats.process is not None
        nats_pid = nats.process.pid
        own, everything, servers = cpu_s(audit.pid, True), machine_cpu_s(), servers_cpu_s(root, nats_pid)
        waited = waited_s(audit.pid)
        seconds, out = await asyncio.to_thread(cli, env, "replay", "audit")
        await asyncio.sleep(1)  # the staging worker is reaped
        own, everything = cpu_s(audit.pid, True) - own, machine_cpu_s() - everything
        waited = waited_s(audit.pid) - waited
        servers = {k: v - servers[k] for k, v in servers_cpu_s(root, nats_pid).items()}
        print(out)
        print(
            f"REPLAY: {events:,} events in {seconds:.1f}s = {events / seconds:,.0f} events/s "
            f"(CLI wall time); audit peak RSS during replay {peak_rss_mb(audit.pid):.0f} MB"
        )
        print(
            f"  CPU: audit process and its staging worker {own / events * 1e6:.1f} µs/event "
            f"({own / seconds:.2f} cores); "
            f"PostgreSQL {servers['postgres'] / events * 1e6:.1f} µs/event "
            f"({servers['postgres'] / seconds:.2f} cores); "
            f"NATS {servers['nats'] / events * 1e6:.1f} µs/event; "
            f"everything else on the machine {(everything - own - sum(servers.values())) / seconds:.2f} cores"
        )
        print(f"  the audit process waited {waited:.1f}s of {seconds:.1f}s for a CPU (runnable, not running)")
        for line in (root / "audit.log").read_text(errors="replace").splitlines():
            if "audit rebuilt:" in line:  # the service's own split of the time
                print("  " + line[line.find("audit rebuilt:") :].rstrip('"}'))
        print(f"QUERIES ({rounds} each, limit 50, through cmd.audit.query):")
        for name, p50, p95, items in await queries(client, rounds):
            print(f"  {name:52s} p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  ({items} items)")
        seconds, out = await asyncio.to_thread(cli, env, "audit", "verify")
        print(out)
        print(f"VERIFY: {events:,} entries in {seconds:.1f}s")
        await bus.close()
    finally:
        if audit is not None:
            audit.terminate()
            audit.wait(30)
        nats.stop()
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200, help="queries per filter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatehouse-audit-bench-") as tmp:
        asyncio.run(main(args.events, args.rounds, Path(tmp)))
