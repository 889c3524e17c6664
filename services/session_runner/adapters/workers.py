"""Worker processes: `python -I -m services.session_runner.worker`, one per build.

Each starts in a session (and process group) of its own, in the build's working directory,
with only the environment the runner gives it (`-I` also keeps PYTHON* variables and the
user site from touching the worker). The spec goes in on stdin; reports come back on
stdout; the worker's own stderr (already redacted by the worker) goes to this service's
log. If the worker does not end within the grace period after a stop, it is killed, and
so is its current agent's process group.
"""

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import msgspec

from services.session_runner.domain.protocol import (
    STOP,
    Began,
    Report,
    WorkerSpec,
    decode_report,
    encode_line,
)

log = logging.getLogger(__name__)
WORKER_MODULE = "services.session_runner.worker"
READ_LIMIT = 16 * 1024 * 1024
EXTRA_GRACE_S = 5.0


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, build_id: str) -> None:
        self.proc, self.build_id = proc, build_id
        self.pid = proc.pid
        self.agent_pgid: int | None = None
        self._escalation: asyncio.Task[None] | None = None
        self._stderr = asyncio.create_task(self._log_stderr())

    async def reports(self) -> AsyncIterator[Report]:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                report = decode_report(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                log.warning("worker of %s sent an unreadable report: %s", self.build_id, err)
                continue
            if isinstance(report, Began):
                self.agent_pgid = report.pid
            yield report

    def stop(self, grace_s: float) -> None:
        if self.proc.returncode is not None or self._escalation is not None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write(STOP)
        self._escalation = asyncio.get_running_loop().create_task(self._escalate(grace_s + EXTRA_GRACE_S))

    async def _escalate(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        if self.proc.returncode is None:
            log.warning("worker of %s did not stop within %g s: killing it", self.build_id, after_s)
            self.kill()

    def kill(self) -> None:
        for pgid in (self.pid, self.agent_pgid):
            if pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)

    async def wait(self) -> int:
        code = await self.proc.wait()
        if self._escalation is not None:
            self._escalation.cancel()
        if self.agent_pgid:  # the worker takes its agents down; if it was killed, do it for it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.agent_pgid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stderr, 2)
        return code

    async def _log_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            log.warning("worker of %s: %s", self.build_id, line.decode(errors="replace").rstrip())


class ProcessWorkers:
    async def launch(self, spec: WorkerSpec, env: dict[str, str], build_id: str) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-m",
            WORKER_MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=spec.workdir,
            start_new_session=True,
            limit=READ_LIMIT,
        )
        assert proc.stdin is not None
        proc.stdin.write(encode_line(spec))
        await proc.stdin.drain()
        return WorkerProcess(proc, build_id)
