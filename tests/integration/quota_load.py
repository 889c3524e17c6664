"""A gateway-like client process for the quota tests: many concurrent Reserve (+ Commit) calls.

    python -m tests.integration.quota_load --user U --org O --prefix p1 --count 60 --start-at T

Prints one JSON line: {"granted": [keys], "refused": [keys], "sentences": [...], "errors": n}.
With --retry, a request that gets no answer (the quota service is down or restarting) is
sent again with the same key until it is answered, as the MCP path would retry a call.
With --gate TIER, each key goes through mcp_proxy's own quota gate (adapters/quota.py) as a
call of a TIER user that reached its upstream: leases, uses and returns as in production;
"leased" counts the calls that spent a lease's unit.
"""

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable

import msgspec

from contracts.commands import quota as q
from contracts.commands.common import CommandMeta
from contracts.commands.mcp import Caller
from contracts.envelope import Actor
from services.kit.bus import connect
from services.kit.config import load_settings
from services.kit.rpc import CommandClient, CommandFailed
from services.mcp_proxy.adapters.quota import QuotaService
from services.mcp_proxy.application.ports import QuotaExceeded


def meta() -> CommandMeta:
    """A fresh meta per command: the client stamps its deadline on the one it sends."""
    return CommandMeta(actor=Actor(kind="service", id="quota-load"), correlation_id="quota-load")


async def main(args: argparse.Namespace) -> None:
    bus = await connect(load_settings(dict(os.environ)), f"quota-load-{args.prefix}")
    client = CommandClient(bus)
    granted: list[str] = []
    refused: list[str] = []
    sentences: set[str] = set()
    errors = 0
    leased = 0
    slots = asyncio.Semaphore(args.concurrency)
    gate = QuotaService(client, timeout_s=args.timeout) if args.gate else None
    if gate is not None:
        await gate.start()

    async def answered(verb: str, request: Callable[[], msgspec.Struct], reply: type) -> object:
        """A new request (new meta, so a new deadline) for every attempt."""
        nonlocal errors
        while True:
            try:
                return await client.call("quota", verb, request(), reply, timeout=args.timeout)
            except CommandFailed as failed:
                if failed.problem.status != 503 or not args.retry:
                    raise
                errors += 1
                await asyncio.sleep(0.2)

    async def through_gate(key: str) -> None:
        nonlocal leased
        assert gate is not None
        caller = Caller(user_id=args.user, org_id=args.org, tier=args.gate)
        async with slots:
            try:
                r = await gate.reserve(caller, key, "echo", "echo")
            except QuotaExceeded as over:
                refused.append(key)
                sentences.add(over.detail)
                return
            await asyncio.sleep(0.001)  # the upstream call
            await gate.commit(r)
            leased += r.lease is not None
            granted.append(key)

    async def one(key: str) -> None:
        if gate is not None:
            return await through_gate(key)
        async with slots:
            for _ in range(args.repeat):
                r = await answered(
                    "reserve",
                    lambda: q.Reserve(meta=meta(), user_id=args.user, org_id=args.org, kind="call", key=key),
                    q.Reservation,
                )
                assert isinstance(r, q.Reservation)
                if not r.granted:
                    refused.append(key)
                    sentences.add(r.sentence or "")
                    return
                if args.commit:
                    await answered(
                        "commit", lambda: q.Commit(meta=meta(), user_id=args.user, key=key), q.Settled
                    )
            granted.append(key)

    keys = [f"{args.prefix}-{i}" for i in range(args.count)]
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    if gate is not None:
        await gate.stop()  # delivers the last uses and returns the leases
    print(
        json.dumps(
            {
                "granted": granted,
                "refused": refused,
                "sentences": sorted(sentences),
                "errors": errors,
                "leased": leased,
                "failures": failures[:5],
            }
        ),
        flush=True,
    )
    await bus.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", required=True)
    parser.add_argument("--org", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="send each key this many times")
    parser.add_argument("--commit", action="store_true")
    parser.add_argument("--retry", action="store_true")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--gate", metavar="TIER", help="through mcp_proxy's quota gate, as a TIER user")
    asyncio.run(main(parser.parse_args()))
