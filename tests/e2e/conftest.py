"""`gatehouse up` as a user runs it: a subprocess in a temporary directory, with no
GATEHOUSE_* settings (so NATS and PostgreSQL come from their wheels), driven over HTTP.

Every process a test starts is stopped by a finalizer: SIGINT first (Ctrl-C reaches the
whole foreground process group, so that is where it is sent), then SIGKILL on timeout.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from services.kit.embedded import free_port
from tests.helpers import eventually_sync

GATEHOUSE = str(Path(sys.executable).parent / "gatehouse")
READY_LINE = "Press Ctrl-C to stop."
ADMIN_KEY = re.compile(r"Admin API key \(shown once, store it now\): (mcp_\S+)")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any GATEHOUSE_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    env.update(extra)
    return env


def tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"({path}: {err})"
    return text[-chars:]


def logs_of(data_dir: Path) -> str:
    logs = sorted((data_dir / "logs").glob("*.log")) if (data_dir / "logs").exists() else []
    return "\n".join(f"--- {log.name} ---\n{tail(log)}" for log in logs) or "(no logs)"


def mentions(process: psutil.Process, needle: str) -> bool:
    """Whether a process's command line or environment names `needle` (our data dir)."""
    try:
        if any(needle in part for part in process.cmdline()):
            return True
        return any(needle in value for value in process.environ().values())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def processes_of(data_dir: Path) -> list[psutil.Process]:
    """Every live process (but this one) whose command line or environment names the data dir."""
    needle = str(data_dir)
    me = os.getpid()
    found = []
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if mentions(process, needle):
            found.append(process)
    return found


class Platform:
    """One `gatehouse up` on one data dir; `start` and `stop` may be repeated."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.output_file: Path | None = None
        self.output = ""
        self.runs = 0
        self.descendants: list[psutil.Process] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> str:
        """Runs `gatehouse up` and waits for "Press Ctrl-C to stop."; returns its output."""
        self.runs += 1
        self.output_file = self.root / f"up-{self.runs}.out"
        with open(self.output_file, "wb") as out:
            self.process = subprocess.Popen(
                [GATEHOUSE, "up", "--data-dir", str(self.data_dir), "--port", str(self.port)],
                env=clean_env(),
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, like a shell job
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.output = self.output_file.read_text(errors="replace")
            if READY_LINE in self.output or self.process.poll() is not None:
                break
            time.sleep(0.2)
        if READY_LINE not in self.output:
            exited = self.process.poll()
            self.kill()
            raise AssertionError(
                f"`gatehouse up` did not print {READY_LINE!r} within {START_TIMEOUT:.0f}s "
                f"(exit code {exited}).\n--- output ---\n{self.output}\n{logs_of(self.data_dir)}"
            )
        self.descendants = self._descendants()
        return self.output

    def stop(self) -> int:
        """Ctrl-C: SIGINT to the process group; SIGKILL if it does not end in time."""
        assert self.process is not None
        if self.process.poll() is None:
            self.descendants = self._descendants() or self.descendants
            try:
                os.killpg(self.process.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        assert self.output_file is not None
        self.output = self.output_file.read_text(errors="replace")
        return self.process.returncode

    def kill(self) -> None:
        """Last resort: the process group, its known descendants, anything on the data dir."""
        if self.process is not None and self.process.poll() is None:
            self.descendants = self._descendants() or self.descendants
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        for process in [*self.descendants, *processes_of(self.data_dir)]:
            try:
                process.kill()
            except psutil.Error:
                pass

    def leftovers(self) -> list[str]:
        """Descriptions of processes still alive from the last run (should be none)."""
        alive = [p for p in self.descendants if _alive(p)]
        alive += [p for p in processes_of(self.data_dir) if p.pid not in {a.pid for a in alive}]
        out = []
        for p in alive:
            try:
                out.append(f"{p.pid}: {' '.join(p.cmdline())}")
            except psutil.Error:
                out.append(f"{p.pid}: (gone)")
        return out

    def _descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    # -- what a user has ---------------------------------------------------------------------
    @property
    def admin_key(self) -> str:
        found = ADMIN_KEY.search(self.first_output())
        assert found, f"no admin key in the output of the first run:\n{self.first_output()}"
        return found.group(1)

    def first_output(self) -> str:
        return (self.root / "up-1.out").read_text(errors="replace")

    def runtime(self) -> dict[str, Any]:
        runtime: dict[str, Any] = json.loads((self.data_dir / "runtime.json").read_text())
        return runtime

    def pepper(self) -> str:
        return (self.data_dir / "keys" / "api-key-pepper").read_text().strip()

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """`gatehouse ARGS` against this platform, found through GATEHOUSE_DATA_DIR."""
        return subprocess.run(
            [GATEHOUSE, *args],
            env=clean_env(GATEHOUSE_DATA_DIR=str(self.data_dir)),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A running `gatehouse up` for the module, stopped (and checked for leftovers) after it."""
    platform = Platform(tmp_path_factory.mktemp("gatehouse-up"))
    try:
        platform.start()
        yield platform
    finally:
        if platform.process is not None:
            platform.stop()
            platform.kill()


class Gateway:
    """A second gateway process next to the platform's own, like a horizontally scaled replica."""

    def __init__(self, platform: Platform, log: Path) -> None:
        runtime = platform.runtime()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = clean_env(
            GATEHOUSE_NATS_URL=runtime["nats_url"],
            GATEHOUSE_DATABASE_URL=runtime["database_url"],
            GATEHOUSE_KEY_PEPPER=platform.pepper(),
            GATEHOUSE_DATA_DIR=str(platform.data_dir),
            GATEHOUSE_HTTP_PORT=str(self.port),
            GATEHOUSE_INSTANCE="second-gateway",
        )
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.gateway"],
                env=env,
                cwd=platform.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"the second gateway exited:\n{tail(self.log)}"
            try:
                return httpx.get(self.url + "/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            eventually_sync(ready, timeout=timeout, step=0.2)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- second gateway log ---\n{tail(self.log)}") from None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
