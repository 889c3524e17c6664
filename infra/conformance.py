#!/usr/bin/env python3
"""Runs the official MCP conformance suite (server scenarios) against Gatehouse.

    python infra/conformance.py                     # every server scenario, through Gatehouse
    python infra/conformance.py --scenario ping     # one scenario
    python infra/conformance.py --direct            # the fixture upstream alone (baseline)

Through Gatehouse: starts `gatehouse up` in a throw-away data dir, registers
`tests/upstreams/conformance_server.py` (the suite's fixture tools, resources and prompts)
as a stdio server named `conformance` for the admin, and points the suite at
`/servers/conformance/mcp`. The suite cannot send an API key (its client is built from the
URL alone), so it talks to a small local proxy that adds `Authorization: Bearer <key>` to
every request and forwards everything else, `Host` and `Origin` included, untouched.

The suite needs Node >= 22: when the `node` on PATH is older, the npm package
`node-linux-<arch>@22` is installed with npm into the cache dir (default
`~/.cache/gatehouse/node22`, or $GATEHOUSE_CONFORMANCE_CACHE), next to the pinned suite.
Downloads from the npm registry, so it is an operator tool and not part of CI.

Writes `<out>/raw/server-<scenario>-<time>/checks.json` (the suite's own files), the suite's
output in `<out>/suite.log`, and `<out>/summary.json` + `<out>/summary.md` (a per-scenario
table). Exit status: the suite's, which with the baseline
`infra/conformance-baseline.yml` (the failures docs/mcp-conformance.md explains) is 0 unless
a scenario regressed or a listed failure now passes.
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform as host
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python infra/conformance.py`: import the repo's packages
    sys.path.insert(0, str(REPO))

from bench.gatehouse_platform import Platform, free_port  # noqa: E402

SUITE = "@modelcontextprotocol/conformance"
SUITE_VERSION = "0.1.16"
NODE_MAJOR = 22
SERVER_NAME = "conformance"
FIXTURE = REPO / "tests" / "upstreams" / "conformance_server.py"
BASELINE = REPO / "infra" / "conformance-baseline.yml"
SCENARIO_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


def say(line: str) -> None:
    print(f"conformance: {line}", flush=True)


# -- Node and the suite ----------------------------------------------------------------------------
def cache_dir() -> Path:
    configured = os.environ.get("GATEHOUSE_CONFORMANCE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "gatehouse" / "node22"


def node_major(node: str) -> int:
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    found = re.match(r"v(\d+)", version.strip())
    return int(found.group(1)) if found else 0


def node_package() -> str:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(host.machine().lower())
    system = {"linux": "linux", "darwin": "darwin"}.get(sys.platform)
    if arch is None or system is None:
        raise SystemExit(
            f"conformance: no npm Node package for {sys.platform}/{host.machine()}; install Node 22+"
        )
    return f"node-{system}-{arch}"


def ensure_tools(cache: Path) -> dict[str, str]:
    """The environment to run the suite in (Node >= 22 first on PATH); installs what is missing."""
    system_node = shutil.which("node")
    wanted = [f"{SUITE}@{SUITE_VERSION}"]
    node_bin = cache / "node_modules" / node_package() / "bin"
    use_system = system_node is not None and node_major(system_node) >= NODE_MAJOR
    if not use_system and node_major(str(node_bin / "node")) < NODE_MAJOR:
        wanted.append(f"{node_package()}@{NODE_MAJOR}")
    installed = cache / "node_modules" / "@modelcontextprotocol" / "conformance" / "package.json"
    have = json.loads(installed.read_text()).get("version") if installed.exists() else None
    if have == SUITE_VERSION and len(wanted) == 1:
        wanted = []
    if wanted:
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(
                "conformance: npm is needed to install Node 22 and the suite (or put them on PATH)"
            )
        cache.mkdir(parents=True, exist_ok=True)
        say(f"installing {', '.join(wanted)} into {cache}")
        subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--loglevel=error", *wanted],
            check=True,
        )
    env = dict(os.environ)
    if not use_system:
        env["PATH"] = str(node_bin) + os.pathsep + env.get("PATH", "")
    env["PATH"] = str(cache / "node_modules" / ".bin") + os.pathsep + env["PATH"]
    node = shutil.which("node", path=env["PATH"]) or "node"
    say(f"node {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()}")
    return env


# -- the key-adding proxy --------------------------------------------------------------------------
DROPPED = (b"authorization:", b"x-mcp-api-key:", b"connection:", b"keep-alive:", b"proxy-")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


async def _relay(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int], key: bytes
) -> None:
    """One request: its head with our key and `Connection: close`, then bytes both ways."""
    try:
        head = await client_r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        client_w.close()
        return
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0], *(line for line in lines[1:] if not line.lower().startswith(DROPPED))]
    kept += [b"Authorization: Bearer " + key, b"Connection: close"]
    try:
        upstream_r, upstream_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        client_w.close()
        return
    upstream_w.write(b"\r\n".join(kept) + b"\r\n\r\n")
    body = asyncio.create_task(_pipe(client_r, upstream_w))
    try:
        await _pipe(upstream_r, client_w)  # the upstream closes after its answer
    finally:
        body.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await body
        for writer in (upstream_w, client_w):
            writer.close()


@contextlib.asynccontextmanager
async def key_proxy(target: tuple[str, int], key: str) -> AsyncIterator[int]:
    port = free_port()
    relays: set[asyncio.Task[None]] = set()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = asyncio.create_task(_relay(reader, writer, target, key.encode()))
        relays.add(relay)
        relay.add_done_callback(relays.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", port, limit=1 << 20)
    try:
        yield port
    finally:
        server.close()
        for relay in list(relays):  # idle keep-alive connections the suite left open
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


# -- Gatehouse -------------------------------------------------------------------------------------
def _post(url: str, key: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 gateway
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
        return json.loads(answer.read() or b"null")


def register_fixture(url: str, key: str) -> None:
    spec = {"name": SERVER_NAME, "transport": "stdio", "command": sys.executable, "args": [str(FIXTURE)]}
    _post(f"{url}/v1/mcp/servers", key, spec)
    say(f"registered {SERVER_NAME!r} (stdio: {FIXTURE.relative_to(REPO)})")
    view = _post(f"{url}/v1/mcp/servers/{SERVER_NAME}/test", key, timeout=90)  # starts it once
    say(f"probe: status {view.get('status')}, {view.get('tools_count')} tools")


# -- the suite -------------------------------------------------------------------------------------
async def run_suite(env: dict[str, str], url: str, out: Path, args: argparse.Namespace) -> int:
    command = ["conformance", "server", "--url", url, "-o", str(out / "raw")]
    command += ["--scenario", args.scenario] if args.scenario else ["--suite", args.suite]
    if args.baseline and not args.scenario:
        command += ["--expected-failures", str(args.baseline)]
    say(f"running {' '.join(command)}")
    with open(out / "suite.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        return await process.wait()


def summarize(out: Path, target: str, code: int) -> dict[str, Any]:
    scenarios: list[dict[str, Any]] = []
    runs = sorted((out / "raw").glob("server-*/checks.json"), key=lambda p: p.parent.name[-24:])
    for checks_file in runs:
        found = SCENARIO_DIR.match(checks_file.parent.name)
        checks = json.loads(checks_file.read_text())
        counts = {
            s: sum(1 for c in checks if c.get("status") == s) for s in ("SUCCESS", "FAILURE", "WARNING")
        }
        scenarios.append(
            {
                "scenario": found.group("scenario") if found else checks_file.parent.name,
                "passed": counts["SUCCESS"],
                "failed": counts["FAILURE"],
                "warnings": counts["WARNING"],
                "errors": [c.get("errorMessage") for c in checks if c.get("status") == "FAILURE"],
            }
        )
    summary: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "suite": f"{SUITE}@{SUITE_VERSION}",
        "target": target,
        "exit_code": code,
        "scenarios": scenarios,
        "scenarios_passed": sum(1 for s in scenarios if not s["failed"]),
        "checks_passed": sum(s["passed"] for s in scenarios),
        "checks_failed": sum(s["failed"] for s in scenarios),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = ["| scenario | result | checks passed/failed |", "|---|---|---|"]
    for s in scenarios:
        result = "pass" if not s["failed"] else "**fail**"
        rows.append(f"| `{s['scenario']}` | {result} | {s['passed']}/{s['failed']} |")
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    return summary


# -- main ------------------------------------------------------------------------------------------
async def through_gatehouse(env: dict[str, str], out: Path, args: argparse.Namespace) -> tuple[str, int]:
    say("starting `gatehouse up` in a temporary data dir (NATS and PostgreSQL from their wheels)")
    with Platform.up() as platform:
        say(f"Gatehouse is ready at {platform.url}")
        await asyncio.to_thread(register_fixture, platform.url, platform.admin_key)
        async with key_proxy(("127.0.0.1", platform.port), platform.admin_key) as port:
            url = f"http://127.0.0.1:{port}/servers/{SERVER_NAME}/mcp"
            code = await run_suite(env, url, out, args)
        say("stopping Gatehouse")
    return f"Gatehouse /servers/{SERVER_NAME}/mcp (stdio upstream)", code


async def direct(env: dict[str, str], out: Path, args: argparse.Namespace) -> tuple[str, int]:
    port = free_port()
    with open(out / "fixture.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(FIXTURE), "--http", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                await asyncio.open_connection("127.0.0.1", port)
                break
            await asyncio.sleep(0.2)
        args.baseline = None  # the baseline lists Gatehouse's failures, not the fixture's
        return "the fixture upstream alone (Streamable HTTP)", await run_suite(
            env, f"http://127.0.0.1:{port}/mcp", out, args
        )
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", help="one server scenario (default: the whole suite)")
    parser.add_argument("--suite", default="all", help="all (default), active or pending")
    parser.add_argument("--direct", action="store_true", help="test the fixture upstream alone, no Gatehouse")
    parser.add_argument("--out", type=Path, help="results directory (default: a new temporary one)")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="expected failures (YAML)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_const", const=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gatehouse-conformance-"))
    out.mkdir(parents=True, exist_ok=True)
    env = ensure_tools(cache_dir())
    target, code = asyncio.run((direct if args.direct else through_gatehouse)(env, out, args))
    summary = summarize(out, target, code)
    print((out / "summary.md").read_text(), end="")
    say(
        f"{summary['scenarios_passed']}/{len(summary['scenarios'])} scenarios passed "
        f"({summary['checks_passed']} checks passed, {summary['checks_failed']} failed) against {target}"
    )
    say(f"suite exit code {code}; results in {out} (suite.log, summary.json, summary.md, raw/)")
    return code


if __name__ == "__main__":
    sys.exit(main())
