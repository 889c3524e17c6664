"""The floors under a tool call's CPU: what the bare parts of Gatehouse's stack cost here.

A call through Gatehouse crosses, at the least: an HTTP request and response in the gateway
(uvicorn with httptools on uvloop), a NATS request from the gateway and its reply from
mcp_proxy (nats-py), and a JSON-RPC line written to a stdio upstream and one read back
(asyncio pipes). This script times each of those parts alone, with no Gatehouse code around
it, and reports the CPU per operation of the process that does it:

- `http`: uvicorn serving a trivial ASGI app that answers a `tools/call`-sized POST with a
  result-sized JSON body; the load comes from `bench/lean_http.py`; the server's CPU.
- `nats`: a nats-py responder (`subscribe` with a callback, `msg.respond`) answering a
  requester that uses the kit's lean request/reply (`services/kit/replies.py`, one inbox
  subscription and no timeout task per request); the requester's and the responder's CPU.
- `stdio`: an asyncio parent writing a line to a child's stdin and reading the child's line
  back, one child per worker (the child is the upstream, not counted); the parent's CPU.
- `chain`: the same parts put together, still with no Gatehouse code: a uvicorn app that
  sends each POST as a NATS request (lean requester) and answers with the reply, and a nats-py
  responder that passes each request to a stdio child of its worker (a task per request,
  as mcp_proxy's command server does) and replies with the child's line. Each child burns
  `--burn-us` of CPU per line (700 µs by default, the SDK's own server per the issue), so at
  16 workers the chain is bounded by its upstreams, as `bench/mcp_overhead.py` is; the CPU
  per call of the two chain processes.
- `jetstream`: what one event costs the pipeline on its way: published in batches of 20
  with a `Nats-Msg-Id` and its ack checked (the outbox relay; nats-py's `publish_async`
  and the kit's `Replies.request_all`, which the relay uses), and taken by a pull consumer
  in fetches of 100 with one ack per fetch (a projection); the CPU per event of each.

    python bench/floors.py [--n1 3000] [--n16 12000]

The gateway's floor is `http` + the NATS requester; mcp_proxy's hot path floor is the NATS
responder + `stdio`. Compare their sum with the 500 µs budget of `bench/mcp_overhead.py`,
which also pays for authentication, routing, the quota gate, and recording, relaying and
projecting the call's events.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/floors.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from bench.gatehouse_platform import free_port
from bench.lean_http import Connection, run
from bench.machine import speed_line
from services.kit.embedded import EmbeddedNats, wait_for_port

REQUEST = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo__echo", "arguments": {"text": "hello from the floors bench"}},
    }
).encode()
RESULT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "content": [{"type": "text", "text": "hello from the floors bench"}],
            "structuredContent": {"result": "hello from the floors bench"},
            "isError": False,
        },
    }
).encode()
ECHO_CHILD = (
    "import sys\n"
    "out = sys.stdout.buffer\n"
    "for line in sys.stdin.buffer:\n"
    f"    out.write({RESULT!r} + b'\\n')\n"
    "    out.flush()\n"
)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Op = Callable[[], Awaitable[Any]]


async def closed_loop(ops: list[Op], n: int) -> float:
    """Runs `n` operations over one sequential worker per op; the wall time."""
    per = n // len(ops)

    async def loop(op: Op) -> None:
        for _ in range(per):
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(loop(op) for op in ops))
    return time.perf_counter() - start


# -- roles, each its own process -------------------------------------------------------------


def http_server(port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(RESULT))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": RESULT})

    uvicorn.run(app, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def nats_responder(url: str) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(url)

        async def answer(msg: Any) -> None:
            await msg.respond(RESULT)

        await nc.subscribe("floors.echo", queue="floors", cb=answer)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()

    run(main())


def nats_requester(url: str, workers: int, n: int) -> None:
    import nats

    from services.kit.replies import replies

    async def main() -> None:
        nc = await nats.connect(url)
        lean = replies(nc)
        await lean.request("floors.echo", REQUEST, 5.0)  # subscribes the inbox

        ops: list[Op] = [lambda: lean.request("floors.echo", REQUEST, 5.0)] * workers
        before = own_cpu()
        wall = await closed_loop(ops, n)
        print(json.dumps({"cpu": own_cpu() - before, "wall": wall}), flush=True)
        await nc.close()

    run(main())


def stdio_parent(workers: int, n: int) -> None:
    async def main() -> None:
        async def make() -> Op:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                ECHO_CHILD,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                limit=2**20,
            )
            assert child.stdin is not None and child.stdout is not None
            stdin, stdout = child.stdin, child.stdout
            line = REQUEST + b"\n"

            async def exchange() -> bytes:
                stdin.write(line)
                await stdin.drain()
                return await stdout.readline()

            await exchange()  # the child is up
            return exchange

        ops = [await make() for _ in range(workers)]
        before = own_cpu()
        wall = await closed_loop(ops, n)
        print(json.dumps({"cpu": own_cpu() - before, "wall": wall}), flush=True)

    run(main())


STREAM = "FLOORS"
EVENT = b'{"type": "mcp.tool_call.completed", "payload": "' + b"x" * 400 + b'"}'
PUBLISH_BATCH, FETCH_BATCH = 20, 100


def js_publisher(url: str, n: int, mode: str) -> None:
    import uuid

    import nats

    from services.kit.replies import replies

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        lean = replies(nc)
        await lean.request_all([], 1.0)  # subscribes the inbox
        before = own_cpu()
        start = time.perf_counter()
        for _ in range(n // PUBLISH_BATCH):
            ids = [str(uuid.uuid4()) for _ in range(PUBLISH_BATCH)]
            if mode == "publish_async":
                acks = [
                    await js.publish_async(f"{STREAM}.ev", EVENT, stream=STREAM, headers={"Nats-Msg-Id": i})
                    for i in ids
                ]
                await asyncio.wait(acks, timeout=5.0)
                assert all(a.done() and a.exception() is None for a in acks)
            else:
                headers = [{"Nats-Msg-Id": i, "Nats-Expected-Stream": STREAM} for i in ids]
                replies_ = await lean.request_all([(f"{STREAM}.ev", EVENT, h) for h in headers], 5.0)
                assert all(r is not None and b'"seq"' in r.data for r in replies_)
        wall = time.perf_counter() - start
        print(json.dumps({"cpu": own_cpu() - before, "wall": wall}), flush=True)
        await nc.close()

    run(main())


def js_consumer(url: str, n: int, mode: str) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from services.kit.pull import Puller

    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            f"{STREAM}.ev", durable=mode, config=ConsumerConfig(ack_policy=AckPolicy.ALL)
        )
        puller = Puller(nc, STREAM, mode)
        await puller.start()
        fetch = puller.fetch if mode == "puller" else sub.fetch
        before = own_cpu()
        start = time.perf_counter()
        taken = 0
        while taken < n:
            msgs = await fetch(FETCH_BATCH, timeout=5.0)
            taken += len(msgs)
            await msgs[-1].ack()
        wall = time.perf_counter() - start
        print(json.dumps({"cpu": own_cpu() - before, "wall": wall}), flush=True)
        await nc.close()

    run(main())


def burning_child(burn_us: int) -> str:
    return (
        "import sys, time\n"
        "out = sys.stdout.buffer\n"
        "for line in sys.stdin.buffer:\n"
        "    t = time.process_time()\n"
        f"    while time.process_time() - t < {burn_us / 1e6!r}:\n"
        "        pass\n"
        f"    out.write({RESULT!r} + b'\\n')\n"
        "    out.flush()\n"
    )


def chain_gateway(port: int, url: str) -> None:
    import nats
    import uvicorn

    from services.kit.replies import replies

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["nc"] = await nats.connect(url)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["nc"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        worker = scope["path"].rsplit("/", 1)[-1]
        reply = await replies(state["nc"]).request(f"floors.chain.{worker}", body, 5.0)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(reply.data))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply.data})

    uvicorn.run(app, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def chain_proxy(url: str, workers: int, burn_us: int) -> None:
    import nats

    async def main() -> None:
        children = []
        for _ in range(workers):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", burning_child(burn_us), stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            children.append(child)
        tasks: set[asyncio.Task[None]] = set()

        async def handle(msg: Any) -> None:
            child = children[int(msg.subject.rsplit(".", 1)[-1])]
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(msg.data + b"\n")
            await child.stdin.drain()
            await msg.respond((await child.stdout.readline()).rstrip(b"\n"))

        async def dispatch(msg: Any) -> None:
            task = asyncio.create_task(handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        nc = await nats.connect(url)
        await nc.subscribe("floors.chain.*", queue="floors", cb=dispatch)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()

    run(main())


# -- the measurements ------------------------------------------------------------------------


def role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", *args]


def child_result(args: list[str]) -> dict[str, float]:
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure_http(workers: int, n: int) -> tuple[float, float]:
    port = free_port()
    server = subprocess.Popen(role("http-server", str(port)))
    try:
        wait_for_port(port)
        proc = psutil.Process(server.pid)

        async def load() -> tuple[float, float]:
            async def make() -> Op:
                conn = Connection("127.0.0.1", port)
                await conn.open()
                raw = conn.prepare("POST", "/mcp", {"content-type": "application/json"}, REQUEST)
                for _ in range(50):  # warm
                    await conn.send(raw)
                return lambda: conn.send(raw)

            ops = [await make() for _ in range(workers)]
            t = proc.cpu_times()
            before = t.user + t.system
            wall = await closed_loop(ops, n)
            t = proc.cpu_times()
            return (t.user + t.system - before) / n * 1e6, n / wall

        return run(load())
    finally:
        server.terminate()
        server.wait(10)


def measure_nats(url: str, workers: int, n: int) -> tuple[float, float, float]:
    responder = subprocess.Popen(role("nats-responder", url), stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout is not None
        responder.stdout.readline()  # "ready"
        proc = psutil.Process(responder.pid)
        t = proc.cpu_times()
        before = t.user + t.system
        result = child_result(role("nats-requester", url, str(workers), str(n)))
        t = proc.cpu_times()
        answered = (t.user + t.system - before) / n * 1e6
        return result["cpu"] / n * 1e6, answered, n / result["wall"]
    finally:
        responder.terminate()
        responder.wait(10)


def measure_stdio(workers: int, n: int) -> tuple[float, float]:
    result = child_result(role("stdio-parent", str(workers), str(n)))
    return result["cpu"] / n * 1e6, n / result["wall"]


def measure_chain(url: str, workers: int, n: int, burn_us: int) -> tuple[float, float, float]:
    """(gateway-side CPU, proxy-side CPU) per call in µs, and calls per second."""
    port = free_port()
    proxy = subprocess.Popen(role("chain-proxy", url, str(workers), str(burn_us)), stdout=subprocess.PIPE)
    gateway = subprocess.Popen(role("chain-gateway", str(port), url))
    try:
        assert proxy.stdout is not None
        proxy.stdout.readline()  # "ready"
        wait_for_port(port)
        procs = [psutil.Process(gateway.pid), psutil.Process(proxy.pid)]

        def cpu() -> list[float]:
            return [p.cpu_times().user + p.cpu_times().system for p in procs]

        async def load() -> tuple[float, float, float]:
            async def make(worker: int) -> Op:
                conn = Connection("127.0.0.1", port)
                await conn.open()
                path = f"/mcp/{worker}"
                raw = conn.prepare("POST", path, {"content-type": "application/json"}, REQUEST)
                for _ in range(20):  # warm
                    await conn.send(raw)
                return lambda: conn.send(raw)

            ops = [await make(w) for w in range(workers)]
            before = cpu()
            wall = await closed_loop(ops, n)
            after = cpu()
            return (after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6, n / wall

        return run(load())
    finally:
        for p in (gateway, proxy):
            p.terminate()
            p.wait(10)


def measure_jetstream(url: str, n: int) -> dict[str, float]:
    import nats

    async def make_stream() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        with contextlib.suppress(Exception):  # not there yet
            await js.delete_stream(STREAM)
        await js.add_stream(name=STREAM, subjects=[f"{STREAM}.>"])
        await nc.close()

    out: dict[str, float] = {}
    for mode in ("publish_async", "request_all"):
        run(make_stream())
        out[mode] = child_result(role("js-publish", url, str(n), mode))["cpu"] / n * 1e6
    for mode in ("fetch", "puller"):
        out[mode] = child_result(role("js-consume", url, str(n), mode))["cpu"] / n * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=3000, help="operations at concurrency 1")
    parser.add_argument("--n16", type=int, default=12000, help="operations at concurrency 16")
    parser.add_argument(
        "--burn-us", type=int, default=700, help="CPU each chain upstream burns per call (µs)"
    )
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        name, rest = args.role[0], args.role[1:]
        if name == "http-server":
            http_server(int(rest[0]))
        elif name == "nats-responder":
            nats_responder(rest[0])
        elif name == "nats-requester":
            nats_requester(rest[0], int(rest[1]), int(rest[2]))
        elif name == "stdio-parent":
            stdio_parent(int(rest[0]), int(rest[1]))
        elif name == "chain-gateway":
            chain_gateway(int(rest[0]), rest[1])
        elif name == "chain-proxy":
            chain_proxy(rest[0], int(rest[1]), int(rest[2]))
        elif name == "js-publish":
            js_publisher(rest[0], int(rest[1]), rest[2])
        elif name == "js-consume":
            js_consumer(rest[0], int(rest[1]), rest[2])
        return

    print(speed_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedNats(Path(tmp)).start()
        try:
            rows: dict[str, list[float]] = {}
            rates: dict[str, list[float]] = {}
            for workers, n in ((1, args.n1), (16, args.n16)):
                http_cpu, http_rate = measure_http(workers, n)
                asker, answerer, nats_rate = measure_nats(broker.url, workers, n)
                stdio_cpu, stdio_rate = measure_stdio(workers, n)
                for name, value in (
                    ("HTTP in and out (uvicorn, httptools)", http_cpu),
                    ("NATS request (lean requester)", asker),
                    ("NATS reply (nats-py responder)", answerer),
                    ("stdio line out and in (parent)", stdio_cpu),
                ):
                    rows.setdefault(name, []).append(value)
                for name, value in (("http", http_rate), ("nats", nats_rate), ("stdio", stdio_rate)):
                    rates.setdefault(name, []).append(value)
            chains = [
                measure_chain(broker.url, workers, n, args.burn_us)
                for workers, n in ((1, args.n1), (16, args.n16 // 4))
            ]
            events = measure_jetstream(broker.url, args.n16)
        finally:
            broker.stop()

    print("\nCPU per operation (us) of the process doing it:")
    print(f"  {'part':40}{'c=1':>8}{'c=16':>8}")
    for name, (one, sixteen) in rows.items():
        print(f"  {name:40}{one:8.0f}{sixteen:8.0f}")
    values = list(rows.values())
    gateway = [values[0][i] + values[1][i] for i in range(2)]
    proxy = [values[2][i] + values[3][i] for i in range(2)]
    print(f"  {'gateway floor (HTTP + NATS request)':40}{gateway[0]:8.0f}{gateway[1]:8.0f}")
    print(f"  {'mcp_proxy floor (NATS reply + stdio)':40}{proxy[0]:8.0f}{proxy[1]:8.0f}")
    total = [gateway[i] + proxy[i] for i in range(2)]
    print(f"  {'a call floor (both)':40}{total[0]:8.0f}{total[1]:8.0f}   budget: 500")
    print(f"\nThe chain put together, upstreams burning {args.burn_us} us a call (CPU per call, us):")
    print(f"  {'':40}{'c=1':>8}{'c=16':>8}")
    print(f"  {'gateway side (HTTP, NATS request)':40}{chains[0][0]:8.0f}{chains[1][0]:8.0f}")
    print(f"  {'proxy side (NATS reply, stdio)':40}{chains[0][1]:8.0f}{chains[1][1]:8.0f}")
    both = [c[0] + c[1] for c in chains]
    print(f"  {'both':40}{both[0]:8.0f}{both[1]:8.0f}   budget: 500")
    print(f"  {'calls per second':40}{chains[0][2]:8.0f}{chains[1][2]:8.0f}")
    print(f"\nCPU per event of the event pipeline (us; {args.n16} events):")
    print(f"  {'relay: publish_async, batches of 20':40}{events['publish_async']:8.0f}")
    print(f"  {'relay: Replies.request_all, batches of 20':40}{events['request_all']:8.0f}")
    print(f"  {'projection: nats-py fetch 100, one ack':40}{events['fetch']:8.0f}")
    print(f"  {'projection: kit Puller 100, one ack':40}{events['puller']:8.0f}")
    print("\nOperations per second (closed loop, c=1 / c=16):")
    for name, (one, sixteen) in rates.items():
        print(f"  {name:8}{one:10.0f}{sixteen:10.0f}")


if __name__ == "__main__":
    main()
