"""`gatehouse up` in a throw-away data dir on a free port, for the length of a `with` block.

    with Platform.up() as platform:
        platform.url, platform.admin_key, platform.gateway()  # its psutil.Process
        with platform.another_gateway() as (url2, process2): ...

Both are stopped (SIGINT, as Ctrl-C would) when the block ends, and on Linux also if the
benchmark itself is killed.
"""

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

GATEHOUSE = Path(sys.executable).parent / "gatehouse"
REPO = Path(__file__).resolve().parent.parent
READY_LINE = "Press Ctrl-C to stop."
PR_SET_PDEATHSIG = 1
KEY_PATTERN = re.compile(r"Admin API key \(shown once, store it now\): (mcp_\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_running(parent_pid: int, module: str) -> psutil.Process:
    """The descendant of `parent_pid` started as `python -m <module>`."""
    for proc in psutil.Process(parent_pid).children(recursive=True):
        try:
            if proc.cmdline()[-2:] == ["-m", module]:
                return proc
        except psutil.Error:
            continue
    raise LookupError(f"no `python -m {module}` under pid {parent_pid}")


def listener_on(port: int) -> psutil.Process:
    """The process listening on 127.0.0.1:<port> (for a gateway we did not start)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise LookupError(f"no process listening on port {port}")


def _stop_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: Linux sends the child `sig` when we die, so nothing outlives a killed bench."""

    def arm() -> None:
        with suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)

    return arm


def clean_env() -> dict[str, str]:
    """Our environment without GATEHOUSE_* settings, so `up` embeds its own NATS and PostgreSQL."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}


@dataclass
class Platform:
    data_dir: Path
    port: int
    process: subprocess.Popen[str]
    admin_key: str
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gateway(self) -> psutil.Process:
        return child_running(self.process.pid, "services.gateway")

    @contextmanager
    def another_gateway(self, timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
        """A second `python -m services.gateway` on the same NATS and PostgreSQL; yields its URL
        once /ready answers 200 (its identity view has caught up)."""
        runtime = json.loads((self.data_dir / "runtime.json").read_text())
        port = free_port()
        env = clean_env() | {
            "GATEHOUSE_NATS_URL": runtime["nats_url"],
            "GATEHOUSE_DATABASE_URL": runtime["database_url"],
            "GATEHOUSE_KEY_PEPPER": (self.data_dir / "keys" / "api-key-pepper").read_text().strip(),
            "GATEHOUSE_DATA_DIR": str(self.data_dir),
            "GATEHOUSE_HTTP_PORT": str(port),
        }
        log_path = self.data_dir / "logs" / f"gateway-{port}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_stop_with_parent(signal.SIGTERM),
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, timeout, log_path)
            yield url, process
        finally:
            _stop(process)

    @classmethod
    @contextmanager
    def up(
        cls, timeout: float = 180.0, keep_dir: bool = False, env: dict[str, str] | None = None
    ) -> Iterator["Platform"]:
        """`gatehouse up` in a temporary data dir; `env` adds settings (GATEHOUSE_QUOTA_TIERS, ...)."""
        data_dir = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
        port = free_port()
        process = subprocess.Popen(
            [str(GATEHOUSE), "up", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env() | (env or {}),
            preexec_fn=_stop_with_parent(signal.SIGINT),
            start_new_session=True,  # a Ctrl-C at the terminal reaches us, not it: we stop it
        )
        output: list[str] = []
        try:
            key = _wait_until_ready(process, output, timeout)
            platform = cls(data_dir, port, process, key, output)
            # keep draining stdout so `up` never blocks on a full pipe
            threading.Thread(target=_drain, args=(process, output), daemon=True).start()
            yield platform
        finally:
            # `up` ignores Ctrl-C until its own start-up wait (≤ 150 s) is over
            _stop(process, grace=180.0)
            _reap(data_dir)
            if not keep_dir:
                shutil.rmtree(data_dir, ignore_errors=True)


def _wait_until_ready(process: subprocess.Popen[str], output: list[str], timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    key: str | None = None
    timer = threading.Timer(timeout, process.send_signal, (signal.SIGINT,))
    timer.start()  # readline() blocks; the timer unblocks it by stopping `up`
    try:
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if found := KEY_PATTERN.search(line):
                key = found.group(1)
            if line.startswith(READY_LINE):
                if key is None:
                    raise RuntimeError("`gatehouse up` is ready but printed no admin key")
                return key
    finally:
        timer.cancel()
    late = " (timed out)" if time.monotonic() >= deadline else ""
    raise RuntimeError(f"`gatehouse up` exited before it was ready{late}:\n" + "\n".join(output[-30:]))


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"the gateway at {url} was not ready after {timeout} s:\n{tail}")


def _drain(process: subprocess.Popen[str], output: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line.rstrip("\n"))


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGINT (what Ctrl-C sends), then SIGKILL to its session after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
            process.wait()


def _reap(data_dir: Path) -> None:
    """Ends what still runs from `data_dir`: NATS and PostgreSQL live in sessions of their own,
    so they outlive an `up` that had to be killed."""
    mark = str(data_dir)
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(mark in part for part in proc.info["cmdline"] or ()):
            left.append(proc)
    if not left:
        return
    print(f"bench: ending {len(left)} process(es) left running from {data_dir}", file=sys.stderr)
    for proc in left:
        with suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=15)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
