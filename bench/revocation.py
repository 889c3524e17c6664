"""How soon a revoked key stops working on *another* gateway (target: within 1 s).

    python bench/revocation.py [--repeat 20]

Starts `gatehouse up` (gateway 1) and a second `python -m services.gateway` on the same NATS
and PostgreSQL (gateway 2). Each round: issue a key through gateway 1, use it on gateway 2
until it answers 200, revoke it through gateway 1, then poll gateway 2 every ~1 ms until 401.
The delay is counted from the moment the DELETE returned.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/revocation.py`: import `bench.*` from the repo root,
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.gatehouse_platform import Platform
from bench.lean_http import Connection, run
from bench.stats import pct

TARGET_S = 1.0
POLL_S = 0.001
GIVE_UP_S = 10.0


async def poll_until(conn: Connection, raw: bytes, status: int) -> tuple[float, int]:
    """Sends `raw` every ~1 ms until the answer is `status`: (monotonic time it came, polls)."""
    deadline = time.perf_counter() + GIVE_UP_S
    polls = 0
    while True:
        resp = await conn.send(raw)
        polls += 1
        if resp.status == status:
            return time.perf_counter(), polls
        if resp.status not in (200, 401) or time.perf_counter() > deadline:
            raise RuntimeError(f"waiting for {status}, got {resp.status} {resp.body[:200]!r}")
        await asyncio.sleep(POLL_S)


async def one_round(
    one: Connection, two: Connection, admin: dict[str, str], i: int
) -> tuple[float, float, int]:
    """(issue propagation s, revocation propagation s, polls until 401) for one fresh key."""
    resp = await one.post("/v1/users/me/mcp-keys", {"name": f"bench-revocation-{i}"}, admin)
    if resp.status != 201:
        raise RuntimeError(f"issuing a key: {resp.status} {resp.body[:200]!r}")
    issued = resp.json()
    issued_at = time.perf_counter()
    probe = two.prepare("GET", "/v1/me", {"authorization": f"Bearer {issued['api_key']}"})
    usable_at, _ = await poll_until(two, probe, 200)

    resp = await one.delete(f"/v1/users/me/mcp-keys/{issued['id']}", admin)
    if resp.status != 204:
        raise RuntimeError(f"revoking a key: {resp.status} {resp.body[:200]!r}")
    revoked_at = time.perf_counter()
    rejected_at, polls = await poll_until(two, probe, 401)
    return usable_at - issued_at, rejected_at - revoked_at, polls


async def measure(url1: str, url2: str, admin_key: str, repeat: int) -> None:
    admin = {"authorization": f"Bearer {admin_key}"}
    issue: list[float] = []
    revoke: list[float] = []
    first_poll = 0
    async with Connection.to(url1) as one, Connection.to(url2) as two:
        for i in range(repeat):
            issued_s, revoked_s, polls = await one_round(one, two, admin, i)
            issue.append(issued_s)
            revoke.append(revoked_s)
            first_poll += polls == 1
    ms = 1000
    print(f"{'propagation to gateway 2':<38}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, values in (
        ("key revoked -> 401 (after DELETE)", revoke),
        ("key issued -> 200 (after POST)", issue),
    ):
        print(
            f"{label:<38}{pct(values, 0.5) * ms:>9.2f}{pct(values, 0.99) * ms:>9.2f}{max(values) * ms:>9.2f}"
        )
    verdict = "OK" if max(revoke) <= TARGET_S else "MISSED"
    print(
        f"\n{repeat} revocations; {first_poll} already rejected at the first poll; "
        f"worst {max(revoke) * ms:.2f} ms (target ≤ {TARGET_S * ms:.0f} ms) {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20, help="keys issued and revoked")
    args = parser.parse_args()
    with Platform.up() as platform, platform.another_gateway() as (url2, process):
        print(f"gateway 1 {platform.url}, gateway 2 {url2} (pid {process.pid})\n")
        run(measure(platform.url, url2, platform.admin_key, args.repeat))


if __name__ == "__main__":
    main()
