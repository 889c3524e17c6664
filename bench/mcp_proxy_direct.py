"""What mcp_proxy adds to a tool call: through the proxy over NATS vs the stdio upstream directly.

    python bench/mcp_proxy_direct.py                   # embedded NATS + PostgreSQL in a temp dir
    python bench/mcp_proxy_direct.py --n1 3000 --n16 20000

Starts NATS and PostgreSQL (embedded) and `python -m services.mcp_proxy` as its own process,
registers tests/upstreams/echo_server.py (the official SDK's MCPServer over stdio) as an
org-wide server whose env takes each user's secret, and answers `cmd.secrets.reveal` itself.

- direct: the same lean JSON-RPC client mcp_proxy uses (adapters/stdio), in this process,
  on an echo_server of its own: the floor a gateway cannot beat.
- proxy: `CallTool` over NATS (CommandClient), as the gateway sends it.

Reported: p50/p99 at concurrency 1 (alternating rounds, A B B A, so drift hits both), the
throughput at concurrency 16, mcp_proxy's CPU per call (utime + stime of its process, all
threads: hot path, batched event recording, outbox relay and history projection), the stdio
cold start (spawn + initialize + tools/list, direct and through the proxy), and the number
of upstream processes and their RSS after 1,000 calls from 20 users.

BENCH_MCP_PROXY_COMMAND replaces `python -m services.mcp_proxy` (e.g. a script that runs it
under cProfile, or with parts of the event pipeline switched off to separate their cost).
GATEHOUSE_MCP_* variables from the shell are passed on; other GATEHOUSE_* ones are not.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/x.py`: make `bench.*` importable from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import psutil

from bench.stats import pct
from contracts.commands import mcp as cmd
from contracts.commands.common import CommandMeta, Ping, Pong
from contracts.commands.secrets import RevealedSecret, RevealSecret
from contracts.envelope import Actor
from services.kit.bus import Bus, connect
from services.kit.config import load_settings
from services.kit.embedded import EmbeddedNats, EmbeddedPostgres
from services.kit.rpc import CommandClient, CommandFailed, CommandServer
from services.mcp_proxy.adapters.stdio.process import StdioProcess
from services.mcp_proxy.application.ports import Target
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain.pooling import pool_key

REPO = Path(__file__).resolve().parent.parent
ECHO = str(REPO / "tests" / "upstreams" / "echo_server.py")
ORG = "bench-org"
ARGS = msgspec.Raw(b'{"text":"hello gatehouse"}')


def cpu(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def main_thread_cpu(process: psutil.Process) -> float:
    """CPU of the event loop's thread: hot path, relay and projection (not the recorder's saves)."""
    for t in process.threads():
        if t.id == process.pid:
            return float(t.user_time + t.system_time)
    return math.nan


def caller(user: str, admin: bool = False) -> cmd.Caller:
    return cmd.Caller(user_id=user, org_id=ORG, is_admin=admin)


META = CommandMeta(actor=Actor(kind="user", id="bench"), correlation_id="bench")


class Proxy:
    def __init__(self, bus: Bus) -> None:
        self.client = CommandClient(bus)

    async def call(
        self, who: cmd.Caller, tool: str = "echo", arguments: msgspec.Raw = ARGS
    ) -> cmd.CallOutcome:
        request = cmd.CallTool(
            meta=META, caller=who, request_id=uuid.uuid4().hex, server="echo", tool=tool, arguments=arguments
        )
        outcome = await self.client.call("mcp_proxy", "call", request, cmd.CallOutcome, timeout=30)
        if outcome.status != "success":
            raise RuntimeError(f"call failed: {outcome.error}")
        return outcome


async def latencies(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        await call()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return out


async def throughput(call: Callable[[], Awaitable[object]], n: int, concurrency: int) -> float:
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t)


async def serve_secrets(bus: Bus) -> CommandServer:
    server = CommandServer(bus, "secrets")

    async def reveal(r: RevealSecret) -> RevealedSecret:
        return RevealedSecret(name=r.name, scope="user", version=1, value=f"token-of-{r.user_id}")

    server.route("reveal", RevealSecret, reveal)
    await server.start()
    return server


def upstream_tree(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if "echo_server" in " ".join(p.cmdline())]


async def run(
    args: argparse.Namespace, env: dict[str, str], proxy_process: psutil.Process, data: Path
) -> None:
    settings = load_settings(env)
    bus = await connect(settings, "bench")
    secrets = await serve_secrets(bus)
    client = CommandClient(bus)
    for _ in range(300):
        try:
            if (await client.call("mcp_proxy", "ping", Ping(), Pong, timeout=1)).database:
                break
        except CommandFailed:
            await asyncio.sleep(0.1)
    proxy = Proxy(bus)
    admin = caller("admin", admin=True)
    spec = cmd.ServerSpec(
        name="echo",
        transport="stdio",
        command=sys.executable,
        args=[ECHO],
        env={"TEST_UPSTREAM_TOKEN": cmd.SecretRef("upstream_token")},
    )
    await client.call(
        "mcp_proxy",
        "register_server",
        cmd.RegisterServer(meta=META, caller=admin, scope="org", spec=spec),
        cmd.ServerView,
    )

    # -- cold starts ---------------------------------------------------------------------------
    settings_direct = ProxySettings(data_dir=data / "direct")
    t = time.perf_counter()
    direct = StdioProcess(
        Target(
            key=pool_key("direct", "s", {}),
            server="echo",
            user_id="direct",
            org_id=ORG,
            transport="stdio",
            command=sys.executable,
            args=(ECHO,),
        ),
        settings_direct,
        lambda p, r: None,
    )
    await direct.start()
    cold_direct = (time.perf_counter() - t) * 1000
    user = caller("user-0")
    t = time.perf_counter()
    await proxy.call(user)
    cold_proxy = (time.perf_counter() - t) * 1000

    async def via_direct() -> object:
        return await direct.call("echo", bytes(ARGS), 30, "x")

    async def via_proxy() -> object:
        return await proxy.call(user)

    # -- warm-up, then latency at c=1 (alternating rounds) -------------------------------------
    await latencies(via_direct, 300)
    await latencies(via_proxy, 500)
    lat_direct: list[float] = []
    lat_proxy: list[float] = []
    rounds = 4
    cpu_proxy_s = 0.0
    main_before = main_thread_cpu(proxy_process)
    for i in range(rounds):
        order = (via_direct, via_proxy) if i % 2 == 0 else (via_proxy, via_direct)
        for fn in order:
            before = cpu(proxy_process)
            got = await latencies(fn, args.n1 // rounds)
            if fn is via_proxy:
                cpu_proxy_s += cpu(proxy_process) - before
                lat_proxy += got
            else:
                lat_direct += got

    main_c1_s = main_thread_cpu(proxy_process) - main_before

    # -- throughput at c=16 ------------------------------------------------------------------------
    tput_direct = await throughput(via_direct, args.n16, 16)
    before = cpu(proxy_process)
    wall = time.perf_counter()
    tput_proxy = await throughput(via_proxy, args.n16, 16)
    wall = time.perf_counter() - wall
    cpu16 = cpu(proxy_process) - before
    await asyncio.sleep(1.0)  # let the recorder, relay and projection finish this load
    cpu16_settled = cpu(proxy_process) - before

    # -- 1,000 calls from 20 users ---------------------------------------------------------------
    users = [caller(f"user-{i}") for i in range(20)]
    t = time.perf_counter()
    await asyncio.gather(*(proxy.call(u) for u in users))  # 19 cold starts, concurrently
    cold20 = time.perf_counter() - t
    for _ in range(1000 // 20 - 1):
        await asyncio.gather(*(proxy.call(u) for u in users))
    tree = upstream_tree(proxy_process)
    rss = sum(p.memory_info().rss for p in tree)
    pids = {
        int(
            msgspec.json.decode((await proxy.call(u, "pid", msgspec.Raw(b"{}"))).result)["structuredContent"][
                "result"
            ]
        )
        for u in users
    }

    await direct.terminate("shutdown")
    await secrets.stop()
    await bus.close()

    n1 = len(lat_proxy)
    print(f"\nmcp_proxy vs direct stdio (echo_server.py, MCPServer), {os.cpu_count()} cores")
    print(f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, lat in (("direct (lean client)", lat_direct), ("through mcp_proxy", lat_proxy)):
        print(f"{name:24}{pct(lat, 0.5):9.3f}{pct(lat, 0.99):9.3f}{sum(lat) / len(lat):9.3f}")
    print(
        f"added by the gateway    p50 {pct(lat_proxy, 0.5) - pct(lat_direct, 0.5):.3f} ms "
        f"(target <= 1.0), p99 {pct(lat_proxy, 0.99) - pct(lat_direct, 0.99):.3f} ms"
    )
    print(
        f"mcp_proxy CPU per call  c=1: {cpu_proxy_s / n1 * 1e6:.0f} us "
        f"(event-loop thread {main_c1_s / n1 * 1e6:.0f} us)   "
        f"c=16: {cpu16 / args.n16 * 1e6:.0f} us ({cpu16_settled / args.n16 * 1e6:.0f} us incl. the "
        f"second after: recording, relay, history)   target <= 500 us"
    )
    print(
        f"throughput c=16         direct {tput_direct:,.0f} calls/s   "
        f"through mcp_proxy {tput_proxy:,.0f} calls/s "
        f"(mcp_proxy busy {cpu16 / wall:.2f} cores)"
    )
    print(
        f"stdio cold start        direct {cold_direct:.0f} ms (spawn + initialize + tools/list)   "
        f"first call through mcp_proxy {cold_proxy:.0f} ms   20 users at once {cold20 * 1000:.0f} ms"
    )
    print(
        f"after 1,000 calls from 20 users: {len(tree)} upstream processes ({len(pids)} distinct pids), "
        f"RSS {rss / 2**20:.0f} MiB total ({rss / max(1, len(tree)) / 2**20:.1f} MiB each); "
        f"mcp_proxy RSS {proxy_process.memory_info().rss / 2**20:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=4000, help="calls per path at concurrency 1")
    parser.add_argument("--n16", type=int, default=10000, help="calls per path at concurrency 16")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gatehouse-bench-mcp-"))
    nats = EmbeddedNats(root / "nats").start()
    pg = EmbeddedPostgres(root / "pg", delete_on_stop=True).start()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GATEHOUSE_") or k.startswith("GATEHOUSE_MCP_")
        },
        "GATEHOUSE_NATS_URL": nats.url,
        "GATEHOUSE_DATABASE_URL": pg.url,
        "GATEHOUSE_DATA_DIR": str(root / "data"),
        "GATEHOUSE_LOG_LEVEL": "WARNING",
    }
    log = open(root / "mcp_proxy.log", "wb")
    command = os.environ.get("BENCH_MCP_PROXY_COMMAND", f"{sys.executable} -m services.mcp_proxy").split()
    service = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=REPO)
    try:
        asyncio.run(run(args, env, psutil.Process(service.pid), root))
    finally:
        service.send_signal(signal.SIGTERM)
        stopping = time.perf_counter()
        try:
            service.wait(30)
            print(f"mcp_proxy stopped in {time.perf_counter() - stopping:.1f} s (SIGTERM)")
        except subprocess.TimeoutExpired:
            print("mcp_proxy did not stop within 30 s; killed")
            service.kill()
        nats.stop()
        pg.stop()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
