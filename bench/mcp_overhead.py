"""What Gatehouse adds to an MCP tool call: the upstream directly vs through the gateway's `/mcp`.

    python bench/mcp_overhead.py
    python bench/mcp_overhead.py --n1 4000 --n16 10000 --rounds 4

Starts `gatehouse up` in a temporary data dir (every service, embedded NATS and PostgreSQL,
the quota gate on), registers tests/upstreams/echo_server.py (the official SDK's `MCPServer`)
as an org stdio server, and also runs that same server on its own over Streamable HTTP.

- direct: `tools/call echo` on the HTTP upstream, in an MCP session (initialize first);
- gatehouse: `tools/call echo__echo` on the gateway's `/mcp`, in a session of a user's key:
  authentication, mcp_proxy over NATS, the quota reservation (commit after), the call's
  events (recorded, relayed, projected into history, audit and the quota ledger) and the
  stdio upstream.

Both paths use the same lean keep-alive HTTP client (bench/lean_http.py): httpx and the SDK
client each cost ~1 ms of CPU a call here and would hide the gateway.

Reported: p50/p99 at concurrency 1 (alternating rounds, A B B A, so drift hits both),
throughput at concurrency 16 (one connection per worker), the ratios, and the CPU per call
of Gatehouse's own processes (`python -m services.*`: utime + stime, all threads; upstreams,
NATS, PostgreSQL and this client excluded; NATS and PostgreSQL are shown beside it). CPU
is counted over the phase plus a settle second (the event pipeline runs after the reply),
minus what the platform burns idle over the same time. Then the stdio cold start (direct:
spawn + initialize + tools/list with mcp_proxy's lean stdio client; through the gateway: a
new user's first tools/call), and after 1,000 calls from 20 users (one session each, 50
rounds of 20 concurrent calls) the processes and their RSS.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/x.py`: make `bench.*` importable from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import msgspec
import psutil

from bench.gatehouse_platform import Platform, _stop_with_parent, clean_env, free_port
from bench.lean_http import Connection, Response, run
from bench.machine import speed_line
from bench.mcp_proxy_direct import ECHO, ORG, latencies, pct
from services.mcp_proxy.adapters.stdio.process import StdioProcess
from services.mcp_proxy.application.ports import Target
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain.pooling import pool_key

PROTOCOL = "2025-11-25"
ARGS = b'{"text":"hello gatehouse"}'
TARGET_ADDED_P50_MS = 1.0
TARGET_CPU_US = 500.0
TARGET_THROUGHPUT = 0.5
# --gil: only threads holding the GIL are sampled, so waits (epoll, PostgreSQL) do not show.
PY_SPY = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "--gil", "--format=raw"]
PY_SPY += ["-r250"]
_rpc = msgspec.json.Decoder(dict[str, object])


class McpError(Exception):
    pass


def _json_of(resp: Response) -> dict[str, object]:
    """A JSON-RPC answer, sent as JSON or as one SSE `message` event."""
    if resp.status != 200:
        raise McpError(f"HTTP {resp.status}: {resp.body[:300]!r}")
    body = resp.body
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        body = next(line[5:] for line in body.splitlines() if line.startswith(b"data:"))
    answer = _rpc.decode(body)
    result = answer.get("result")
    if "error" in answer or (isinstance(result, dict) and result.get("isError")):
        raise McpError(f"call failed: {body[:300]!r}")
    return answer


class McpClient:
    """One MCP session over one lean keep-alive connection; `call` sends prepared bytes."""

    def __init__(self, url: str, path: str, headers: dict[str, str], tool: str) -> None:
        self.conn = Connection.to(url)
        self.path, self.tool = path, tool
        self.headers = {
            **headers,
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        }
        self._call = b""

    async def open(self) -> "McpClient":
        await self.conn.open()
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "gatehouse-bench", "version": "1"},
            },
        }
        resp = await self.conn.post(self.path, init, self.headers)
        _json_of(resp)
        session = resp.headers.get("mcp-session-id")
        if session:
            self.headers["mcp-session-id"] = session
        self.headers["mcp-protocol-version"] = PROTOCOL
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await self.conn.post(self.path, note, self.headers)
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"%s","arguments":%s}}' % (
            self.tool.encode(),
            ARGS,
        )
        self._call = self.conn.prepare("POST", self.path, self.headers, body)
        return self

    async def call(self) -> None:
        _json_of(await self.conn.send(self._call))

    async def close(self) -> None:
        await self.conn.close()


# -- processes and their CPU --------------------------------------------------------------------
def kind_of(proc: psutil.Process) -> str:
    cmd = proc.cmdline()
    text = " ".join(cmd)
    if "echo_server" in text:
        return "upstream"
    if len(cmd) >= 2 and cmd[-2] == "-m" and cmd[-1].startswith("services."):
        return cmd[-1].removeprefix("services.")
    if "nats-server" in text:
        return "nats"
    if "postgres" in text or proc.name().startswith("postgres"):
        return "postgres"
    return proc.name()


class Tree:
    """The platform's processes, by kind; CPU of the live ones (re-listed at each sample)."""

    INFRA = ("nats", "postgres", "upstream")

    def __init__(self, root: psutil.Process, data_dir: Path) -> None:
        self.root, self.mark = root, str(data_dir)

    def processes(self) -> Iterator[tuple[str, psutil.Process]]:
        found = {p.pid: p for p in self.root.children(recursive=True)}
        for proc in psutil.process_iter(["cmdline"]):  # PostgreSQL daemonizes: not under `up`
            if proc.pid not in found and any(self.mark in part for part in proc.info["cmdline"] or ()):
                with suppress(psutil.Error):
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        for proc in found.values():
            with suppress(psutil.Error):
                yield kind_of(proc), proc

    def cpu(self) -> dict[str, float]:
        """kind -> user + system seconds, and "kind sys" -> the system (kernel) part alone."""
        by_kind: dict[str, float] = defaultdict(float)
        for kind, proc in self.processes():
            with suppress(psutil.Error):
                t = proc.cpu_times()
                by_kind[kind] += t.user + t.system
                by_kind[f"{kind} sys"] += t.system
        return by_kind

    def memory(self) -> dict[str, tuple[int, int]]:
        """kind -> (processes, RSS bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for kind, proc in self.processes():
            with suppress(psutil.Error):
                n, rss = out.get(kind, (0, 0))
                out[kind] = (n + 1, rss + proc.memory_info().rss)
        return out


def own(cpu: dict[str, float]) -> float:
    return sum(v for k, v in cpu.items() if k not in Tree.INFRA and not k.endswith(" sys"))


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


class Meter:
    """Gatehouse's CPU over a phase, net of what the platform burns idle."""

    def __init__(self, tree: Tree, idle_per_s: dict[str, float]) -> None:
        self.tree, self.idle_per_s = tree, idle_per_s
        self.total: dict[str, float] = defaultdict(float)

    @contextmanager
    def counting(self) -> Iterator[None]:
        before, t = self.tree.cpu(), time.perf_counter()
        yield
        wall = time.perf_counter() - t
        for k, v in minus(self.tree.cpu(), before).items():
            self.total[k] += v - self.idle_per_s.get(k, 0.0) * wall


@contextmanager
def profiling(tree: Tree, into: Path | None) -> Iterator[None]:
    """`--profile DIR`: py-spy samples every Gatehouse process during the c=16 phase
    (`--profile-c1`: the c=1 phase)."""
    if into is None:
        yield
        return
    into.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [*PY_SPY, "-p", str(proc.pid), "-o", str(into / f"{kind}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for kind, proc in tree.processes()
        if kind not in Tree.INFRA
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)


async def idle_rate(tree: Tree, seconds: float = 3.0) -> dict[str, float]:
    before = tree.cpu()
    await asyncio.sleep(seconds)
    return {k: v / seconds for k, v in minus(tree.cpu(), before).items()}


# -- load --------------------------------------------------------------------------------------
async def throughput(clients: list[McpClient], n: int) -> float:
    left = [n]

    async def worker(client: McpClient) -> None:
        while left[0] > 0:
            left[0] -= 1
            await client.call()

    t = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    return n / (time.perf_counter() - t)


async def admin_post(url: str, key: str, path: str, body: object) -> dict[str, object]:
    async with Connection.to(url) as conn:
        resp = await conn.post(path, body, {"authorization": f"Bearer {key}"})
    if resp.status >= 300:
        raise RuntimeError(f"POST {path}: {resp.status} {resp.body[:300]!r}")
    answer: dict[str, object] = resp.json()
    return answer


async def stdio_cold_start(root: Path) -> float:
    """spawn + initialize + tools/list of echo_server.py with mcp_proxy's own lean client (ms)."""
    target = Target(
        key=pool_key("direct", "s", {}),
        server="echo",
        user_id="direct",
        org_id=ORG,
        transport="stdio",
        command=sys.executable,
        args=(ECHO,),
    )
    t = time.perf_counter()
    process = StdioProcess(target, ProxySettings(data_dir=root / "direct"), lambda p, r: None)
    await process.start()
    took = (time.perf_counter() - t) * 1000
    await process.terminate("shutdown")
    return took


# -- the run -----------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, platform: Platform, upstream_url: str) -> None:
    url, admin = platform.url, platform.admin_key
    tree = Tree(psutil.Process(platform.process.pid), platform.data_dir)
    await admin_post(
        url,
        admin,
        "/v1/mcp/servers",
        {"name": "echo", "transport": "stdio", "command": sys.executable, "args": [ECHO], "scope": "org"},
    )
    keys = []
    for i in range(21):
        user = await admin_post(
            url, admin, "/v1/admin/users", {"email": f"bench-{i}@example.com", "tier": args.tier}
        )
        keys.append(str(user["api_key"]))
    await asyncio.sleep(0.5)  # new keys reach the gateway's view through the stream

    def through(key: str) -> McpClient:
        return McpClient(url, "/mcp", {"authorization": f"Bearer {key}"}, "echo__echo")

    def direct() -> McpClient:
        return McpClient(upstream_url, "/mcp", {}, "echo")

    # -- cold starts -----------------------------------------------------------------------------
    cold_direct = await stdio_cold_start(platform.data_dir / "bench")
    first = await through(keys[0]).open()
    t = time.perf_counter()
    await first.call()
    cold_gateway = (time.perf_counter() - t) * 1000

    # -- warm-up, idle baseline, then latency at c=1 ---------------------------------------------
    one_direct = await direct().open()
    await latencies(one_direct.call, 300)
    await latencies(first.call, 500)
    await asyncio.sleep(1.5)
    idle = await idle_rate(tree)
    meter1 = Meter(tree, idle)
    lat_direct: list[float] = []
    lat_gateway: list[float] = []
    with meter1.counting(), profiling(tree, args.profile if args.profile_c1 else None):
        for i in range(args.rounds):
            order = ("d", "g") if i % 2 == 0 else ("g", "d")
            for which in order:
                if which == "d":
                    lat_direct += await latencies(one_direct.call, args.n1 // args.rounds)
                else:
                    lat_gateway += await latencies(first.call, args.n1 // args.rounds)
        await asyncio.sleep(1.0)  # the event pipeline finishes after the replies
    cpu1 = dict(meter1.total)  # incl. pipeline work that spilled into the direct rounds

    # -- throughput at c=16 ----------------------------------------------------------------------
    directs = [await direct().open() for _ in range(16)]
    gateways = [await through(keys[0]).open() for _ in range(16)]
    await throughput(directs, 500)
    await throughput(gateways, 500)
    await asyncio.sleep(1.0)
    tput_direct = await throughput(directs, args.n16)
    meter16 = Meter(tree, idle)
    with meter16.counting(), profiling(tree, None if args.profile_c1 else args.profile):
        wall = time.perf_counter()
        tput_gateway = await throughput(gateways, args.n16)
        wall = time.perf_counter() - wall
        await asyncio.sleep(1.0)
    cpu16 = dict(meter16.total)
    for c in (*directs, *gateways, one_direct, first):
        await c.close()

    # -- 1,000 calls from 20 users ---------------------------------------------------------------
    users = [await through(k).open() for k in keys[1:]]
    t = time.perf_counter()
    await asyncio.gather(*(u.call() for u in users))  # 20 cold starts at once
    cold20 = (time.perf_counter() - t) * 1000
    for _ in range(1000 // len(users) - 1):
        await asyncio.gather(*(u.call() for u in users))
    await asyncio.sleep(1.0)
    memory = tree.memory()
    for u in users:
        await u.close()

    report(args, lat_direct, lat_gateway, tput_direct, tput_gateway, wall, cpu1, cpu16)
    print(
        f"\nstdio cold start        direct {cold_direct:.0f} ms (spawn + initialize + tools/list)"
        f"   first tools/call of a new user through /mcp {cold_gateway:.0f} ms"
        f"   20 new users at once {cold20:.0f} ms"
    )
    print("\nafter 1,000 calls from 20 users (+1 user of the phases above), processes under `gatehouse up`:")
    total_n = total_rss = 0
    for kind, (n, rss) in sorted(memory.items(), key=lambda kv: -kv[1][1]):
        total_n, total_rss = total_n + n, total_rss + rss
        print(f"  {kind:16}{n:4} processes {rss / 2**20:8.0f} MiB RSS")
    print(f"  {'total':16}{total_n:4} processes {total_rss / 2**20:8.0f} MiB RSS (shared pages: each time)")


def report(
    args: argparse.Namespace,
    lat_direct: list[float],
    lat_gateway: list[float],
    tput_direct: float,
    tput_gateway: float,
    wall16: float,
    cpu1: dict[str, float],
    cpu16: dict[str, float],
) -> None:
    n1, n16 = len(lat_gateway), args.n16
    added = pct(lat_gateway, 0.5) - pct(lat_direct, 0.5)
    own1, own16 = own(cpu1) / n1 * 1e6, own(cpu16) / n16 * 1e6
    ratio = tput_gateway / tput_direct
    print(
        "\ntools/call echo: direct (Streamable HTTP upstream) vs Gatehouse /mcp (stdio upstream), "
        f"{os.cpu_count()} cores, callers on the {args.tier} tier"
    )
    print(f"{'':22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'c=16 calls/s':>14}")
    paths = (("direct", lat_direct, tput_direct), ("through Gatehouse", lat_gateway, tput_gateway))
    for name, lat, tput in paths:
        print(f"{name:22}{pct(lat, 0.5):9.3f}{pct(lat, 0.99):9.3f}{sum(lat) / len(lat):9.3f}{tput:14,.0f}")
    print(
        f"{'ratio':22}{pct(lat_gateway, 0.5) / pct(lat_direct, 0.5):8.2f}x"
        f"{pct(lat_gateway, 0.99) / pct(lat_direct, 0.99):8.2f}x{'':9}{ratio:13.0%}"
    )
    print()
    print(f"{'target':44}{'measured':>12}{'':4}")
    rows = (
        ("added p50 at c=1 <= 1.0 ms", f"{added:.3f} ms", added <= TARGET_ADDED_P50_MS),
        ("Gatehouse CPU per call <= 500 us (c=1)", f"{own1:.0f} us", own1 <= TARGET_CPU_US),
        ("Gatehouse CPU per call <= 500 us (c=16)", f"{own16:.0f} us", own16 <= TARGET_CPU_US),
        ("throughput >= 50 % of direct (c=16)", f"{ratio:.0%}", ratio >= TARGET_THROUGHPUT),
    )
    for name, value, ok in rows:
        print(f"{name:44}{value:>12}    {'met' if ok else 'MISSED'}")
    busy = own(cpu16) / wall16
    print(f"\nCPU per call by process (us, idle subtracted; services busy {busy:.2f} cores at c=16):")
    kinds = [k for k in set(cpu1) | set(cpu16) if not k.endswith(" sys") and k != "upstream"]
    kinds.sort(key=lambda k: (k in Tree.INFRA, -cpu16.get(k, 0.0)))
    print(f"  {'':16}{'c=1':>8}{'c=16':>8}   {'of which in the kernel (c=1, c=16)':>12}")
    for kind in kinds:
        per1, per16 = cpu1.get(kind, 0.0) / n1 * 1e6, cpu16.get(kind, 0.0) / n16 * 1e6
        sys1, sys16 = cpu1.get(f"{kind} sys", 0.0) / n1 * 1e6, cpu16.get(f"{kind} sys", 0.0) / n16 * 1e6
        print(f"  {kind:16}{per1:8.0f}{per16:8.0f}   {sys1:8.0f}{sys16:8.0f}")
    print(f"  {'Gatehouse (sum)':16}{own1:8.0f}{own16:8.0f}   (services only, without NATS and PostgreSQL)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=4000, help="calls per path at concurrency 1")
    parser.add_argument("--n16", type=int, default=10000, help="calls per path at concurrency 16")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds at concurrency 1")
    parser.add_argument("--profile", type=Path, help="py-spy (raw folded stacks) of each service at c=16")
    parser.add_argument(
        "--profile-c1", action="store_true", help="with --profile: sample the c=1 phase instead"
    )
    parser.add_argument(
        "--tier",
        choices=("enterprise", "team"),
        default="enterprise",
        help="the callers' tier: enterprise has unlimited calls (charged after each call, no hold); "
        "team holds a unit before each call (its limit raised so the bench never runs out)",
    )
    parser.add_argument(
        "--no-quota",
        action="store_true",
        help="mcp_proxy without the quota gate (GATEHOUSE_MCP_QUOTA=off): what the quota hop costs",
    )
    args = parser.parse_args()
    extra = {"GATEHOUSE_QUOTA_TIERS": '{"team": {"calls": 100000000}}'} if args.tier == "team" else {}
    if args.no_quota:
        extra["GATEHOUSE_MCP_QUOTA"] = "off"
    print(speed_line(), flush=True)
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, ECHO, "--http", "--port", str(port)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        preexec_fn=_stop_with_parent(signal.SIGTERM),
    )
    try:
        with Platform.up(env=extra) as platform:
            run(measure(args, platform, f"http://127.0.0.1:{port}"))
    finally:
        upstream.terminate()
        try:
            upstream.wait(10)
        except subprocess.TimeoutExpired:
            upstream.kill()


if __name__ == "__main__":
    main()
