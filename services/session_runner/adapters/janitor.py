"""Deletes build log files and working directories older than the log retention."""

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from services.kit.tasks import stop_task
from services.session_runner.application import Runner

log = logging.getLogger(__name__)


def sweep(logs_dir: Path, builds_dir: Path, retention_s: float, active: set[str], now: float) -> int:
    removed = 0
    for path in list(logs_dir.glob("*.log")) if logs_dir.exists() else []:
        with contextlib.suppress(OSError):
            if path.name.split(".", 1)[0] not in active and now - path.stat().st_mtime > retention_s:
                path.unlink()
                removed += 1
    for path in list(builds_dir.iterdir()) if builds_dir.exists() else []:
        with contextlib.suppress(OSError):
            if path.name not in active and now - path.stat().st_mtime > retention_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


class Janitor:
    def __init__(self, runner: Runner, every_s: float = 3600.0) -> None:
        self.runner, self.every_s = runner, every_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="janitor")

    async def stop(self) -> None:
        if self._task:
            await stop_task(self._task)

    async def _run(self) -> None:
        s = self.runner.settings
        every = min(self.every_s, max(1.0, s.log_retention_s / 4))
        while True:
            try:
                removed = await asyncio.to_thread(
                    sweep, s.logs_dir, s.builds_dir, s.log_retention_s, set(self.runner.sessions), time.time()
                )
                if removed:
                    log.info("removed %d build log files and working directories past retention", removed)
            except Exception as err:
                log.warning("log retention sweep failed: %s", err)
            await asyncio.sleep(every)
