"""Runs each service as its own OS process, restarts one that dies, stops them all cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.kit.embedded import die_with_parent


class Child:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.log_dir = name, env, log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._next_start = 0.0

    def start(self) -> None:
        log = open(self.log_dir / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, names: list[str], env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children = [Child(n, env, log_dir) for n in names]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def watch(self) -> list[str]:
        """Restarts children that exited (with back-off); returns the names restarted."""
        restarted = []
        now = time.monotonic()
        for child in self.children:
            if child.alive() or now < child._next_start:
                continue
            child.restarts += 1
            child._next_start = now + min(2**child.restarts, 30)
            child.start()
            restarted.append(child.name)
        return restarted

    def stop(self, grace: float = 10.0) -> None:
        for child in self.children:
            if child.alive():
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
