"""A runner node: takes orders from the queue up to its capacity and runs one worker each.

For each order: claim it from the dispatcher (queued -> running on this node), reveal the
user's agent key from the secrets service for this build, start the worker with the key in
its environment, then relay what the worker reports: log batches to the log stream, steps
and the end to the dispatcher (retried until the dispatcher has them). A stop (the user's,
or this node shutting down) asks the worker to stop; the worker takes its agent's process
group down (SIGTERM, grace, SIGKILL) and the node kills the worker if it does not end.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from contracts.commands import builds as cmd
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor
from services.session_runner.config import RunnerSettings
from services.session_runner.domain.agent import build_env
from services.session_runner.domain.protocol import Began, Done, End, Lines, Report, Tick, WorkerSpec

log = logging.getLogger(__name__)
SERVICE = Actor(kind="service", id="session_runner")
NODE_STOPPING = "the runner node {node} stopped while the build ran"


class Unreachable(Exception):
    """The dispatcher did not answer; the order goes back on the queue."""


class KeyRefused(Exception):
    """The secrets service would not reveal the agent key; the message names the secret."""


# -- ports -----------------------------------------------------------------------------------------
class Dispatcher(Protocol):
    async def claim(self, build_id: str, node: str, meta: CommandMeta) -> cmd.Go: ...
    async def attached(self, build_id: str, node: str, pid: int, meta: CommandMeta) -> cmd.Go: ...
    async def step(self, build_id: str, node: str, step: cmd.StepView, meta: CommandMeta) -> cmd.Go: ...
    async def finish(self, report: cmd.BuildFinished) -> None: ...


class Keys(Protocol):
    async def reveal(self, order: cmd.BuildOrder, meta: CommandMeta) -> str: ...


class WorkerHandle(Protocol):
    pid: int

    def reports(self) -> AsyncIterator[Report]: ...
    def stop(self, grace_s: float) -> None: ...
    async def wait(self) -> int: ...


class Workers(Protocol):
    async def launch(self, spec: WorkerSpec, env: dict[str, str], build_id: str) -> WorkerHandle: ...


class LogSink(Protocol):
    async def publish(self, build_id: str, lines: list[cmd.LogLine]) -> None: ...


# -- one build on this node ----------------------------------------------------------------------------
class Session:
    def __init__(self, order: cmd.BuildOrder) -> None:
        self.order = order
        self.build_id = order.build_id
        self.worker: WorkerHandle | None = None
        self.pid: int | None = None
        self.last_seen = time.monotonic()
        self.stop_reason: str | None = None
        self.lines = 0

    def alive(self, now: float, tick_s: float) -> bool:
        """Starting, or its worker ticked recently (a hung worker stops its heartbeat)."""
        return self.worker is None or now - self.last_seen < 3 * tick_s + 1


class Runner:
    def __init__(
        self,
        settings: RunnerSettings,
        dispatcher: Dispatcher,
        keys: Keys,
        workers: Workers,
        sink: LogSink,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.node = settings, settings.node
        self.dispatcher, self.keys, self.workers, self.sink = dispatcher, keys, workers, sink
        self.on_change = on_change  # heartbeats: a session began or ended
        self.sessions: dict[str, Session] = {}
        self.stopping = False

    def meta(self, order: cmd.BuildOrder) -> CommandMeta:
        return CommandMeta(actor=SERVICE, correlation_id=order.correlation_id, trace=order.trace)

    # -- an order from the queue --------------------------------------------------------------------------
    async def take(self, order: cmd.BuildOrder, settle: Callable[[bool], Awaitable[None]]) -> None:
        """Runs the order to its end; `settle(True)` acks it once claimed, `settle(False)` returns it."""
        meta = self.meta(order)
        try:
            go = await self.dispatcher.claim(order.build_id, self.node, meta)
        except Unreachable:
            await settle(False)
            return
        await settle(True)
        if not go.go:
            log.info("build %s not started: %s", order.build_id, go.reason or go.status)
            return
        session = Session(order)
        self.sessions[order.build_id] = session
        self.on_change()
        try:
            await self._run(session, meta)
        finally:
            self.sessions.pop(order.build_id, None)
            self.on_change()

    async def _run(self, session: Session, meta: CommandMeta) -> None:
        order = session.order
        try:
            key = await self.keys.reveal(order, meta)
        except KeyRefused as refused:
            await self._finish(session, "failed", None, f"The agent key could not be used: {refused}", meta)
            return
        if session.stop_reason is not None:
            await self._finish(session, "canceled", None, None, meta)
            return
        spec = self._spec(order)
        home = Path(spec.workdir)
        (home / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        env = build_env(self.settings.path, str(home), order.build_id, order.env, order.key_env, key)
        del key
        try:
            worker = await self.workers.launch(spec, env, order.build_id)
        except OSError as err:
            why = f"the worker process could not be started on node {self.node}: {err}"
            await self._finish(session, "failed", None, why, meta)
            return
        finally:
            env.clear()
        session.worker, session.pid, session.last_seen = worker, worker.pid, time.monotonic()
        if session.stop_reason is not None:
            worker.stop(self.settings.limits.kill_grace_s)
        go = await self.dispatcher.attached(order.build_id, self.node, worker.pid, meta)
        if not go.go:
            self.stop(order.build_id, "canceled")
        end = await self._relay(session, worker, meta)
        returncode = await worker.wait()
        if end is None:
            if session.stop_reason is not None:
                await self._finish(session, "canceled", None, None, meta)
            else:
                why = f"the worker process exited unexpectedly (exit code {returncode}) on node {self.node}"
                await self._finish(session, "failed", None, why, meta)
            return
        await self._finish(session, end.status, end.exit_code, end.error, meta, end.log_lines)

    async def _relay(self, session: Session, worker: WorkerHandle, meta: CommandMeta) -> End | None:
        end: End | None = None
        async for report in worker.reports():
            session.last_seen = time.monotonic()
            if isinstance(report, Lines):
                await self.sink.publish(session.build_id, report.lines)
                session.lines = report.lines[-1].n
            elif isinstance(report, Done):
                go = await self.dispatcher.step(session.build_id, self.node, report.step, meta)
                if not go.go:
                    self.stop(session.build_id, "canceled")
            elif isinstance(report, End):
                end = report
            elif isinstance(report, Began | Tick):
                pass
        return end

    async def _finish(
        self,
        session: Session,
        status: str,
        exit_code: int | None,
        error: str | None,
        meta: CommandMeta,
        log_lines: int = 0,
    ) -> None:
        if session.stop_reason == "node" and status != "completed":
            status, error = "failed", NODE_STOPPING.format(node=self.node)
        report = cmd.BuildFinished(
            meta=meta,
            build_id=session.build_id,
            node=self.node,
            status=status,  # type: ignore[arg-type]
            exit_code=exit_code,
            error=error,
            log_lines=log_lines or session.lines,
        )
        await self.dispatcher.finish(report)

    def _spec(self, order: cmd.BuildOrder) -> WorkerSpec:
        s = self.settings
        return WorkerSpec(
            build_id=order.build_id,
            node=self.node,
            prompts=order.prompts,
            command=s.agent_command,
            prompt_mode=s.prompt_mode,
            key_env=order.key_env,
            workdir=str(s.builds_dir / order.build_id),
            out_log=str(s.logs_dir / f"{order.build_id}.out.log"),
            err_log=str(s.logs_dir / f"{order.build_id}.err.log"),
            limits=s.limits,
        )

    # -- control ----------------------------------------------------------------------------------------
    def stop(self, build_id: str, reason: str = "canceled") -> bool:
        session = self.sessions.get(build_id)
        if session is None:
            return False
        if session.stop_reason is None:
            session.stop_reason = reason
        if session.worker is not None:
            session.worker.stop(self.settings.limits.kill_grace_s)
        return True

    async def shutdown(self, grace_s: float) -> None:
        """Stops every build (they are failed: the node stopped) and waits for them to end."""
        self.stopping = True
        for build_id in list(self.sessions):
            self.stop(build_id, "node")
        deadline = time.monotonic() + grace_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        with contextlib.suppress(Exception):
            if self.sessions:
                log.warning("%d builds still ending on node %s", len(self.sessions), self.node)
