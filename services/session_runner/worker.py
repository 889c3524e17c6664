"""`python -I -m services.session_runner.worker`: one build's worker process.

Started by a runner node with the build's `WorkerSpec` on stdin and a minimal environment
holding the user's agent key (never on a command line). It runs each prompt with the agent
CLI, one after another, each in a process group of its own, and
- writes every output line, redacted, to `<build>.out.log` / `<build>.err.log` and, in
  small batches, to the runner (domain/protocol.py);
- enforces the limits: a wall-clock limit per step and per build, an output cap over the
  whole build, a memory limit over the agent's process tree (and RLIMIT_AS if set);
- stops a step with SIGTERM to its process group, then SIGKILL after the grace period, and
  then kills whatever the step left behind: it is a child subreaper, so descendants that
  left the group (`setsid`, double fork) are re-parented to it and found;
- stops when the runner says `stop`, on SIGTERM, or when the runner goes away (its stdin
  closes, or its stdout breaks), and exits once the build has ended.
"""

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from contracts.commands.builds import LogLine, StepView
from services.kit.redaction import redact, register_secret
from services.session_runner.domain.agent import invocation
from services.session_runner.domain.lines import LineSplitter
from services.session_runner.domain.outcomes import (
    Trouble,
    byte_size,
    exit_code_of,
    launch_failure,
    megabytes,
    step_outcome,
)
from services.session_runner.domain.protocol import (
    Began,
    Done,
    End,
    Lines,
    Tick,
    WorkerSpec,
    decode_spec,
    encode_line,
)

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
CHUNK = 64 * 1024
BATCH_LINES = 200
BATCH_BYTES = 64 * 1024
BATCH_DELAY_S = 0.02
MEMORY_EVERY_S = 0.5
DRAIN_S = 0.5  # after the agent exits, how long its pipes may stay open before the tree is killed


def read_spec() -> tuple[WorkerSpec, bytes]:
    """The first line of stdin, read without buffering past it (the rest is control input)."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit("gatehouse worker: no build spec on stdin")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return decode_spec(line), rest


class Reporter:
    """JSON lines to the runner; a broken pipe means the runner is gone."""

    def __init__(self, on_broken: Any) -> None:
        self.on_broken = on_broken
        self.broken = False

    def send(self, message: Any) -> None:
        if self.broken:
            return
        try:
            sys.stdout.buffer.write(encode_line(message))
            sys.stdout.buffer.flush()
        except OSError:
            self.broken = True
            self.on_broken()


class Output:
    """Numbered, redacted lines: into the build's files at once, to the runner in batches."""

    def __init__(self, spec: WorkerSpec, reporter: Reporter) -> None:
        self.reporter = reporter
        self.files = {"out": open(spec.out_log, "ab"), "err": open(spec.err_log, "ab")}
        self.cap = spec.limits.max_output_bytes
        self.n = 0
        self.seen = 0  # raw bytes received from the agents
        self.over = False
        self._pending: list[LogLine] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: str, text: str) -> None:
        self.n += 1
        self.files[stream].write(text.encode() + b"\n")
        self._pending.append(LogLine(self.n, stream, text))  # type: ignore[arg-type]
        self._pending_bytes += len(text)
        if self.n == 1 or len(self._pending) >= BATCH_LINES or self._pending_bytes >= BATCH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_DELAY_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            for f in self.files.values():
                f.flush()
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self.reporter.send(Lines(lines=batch))

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()


def _descendants() -> list[Any]:
    import psutil  # imported late: not needed before the first output

    try:
        return list(psutil.Process().children(recursive=True))
    except psutil.Error:
        return []


def _signal_tree(pgid: int, sig: signal.Signals) -> None:
    """The step's process group, and every other descendant (strays that left the group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for proc in _descendants():
        with contextlib.suppress(Exception):
            proc.send_signal(sig)


def _reap_orphans() -> None:
    """Collects the exit status of adopted descendants (asyncio already waited for its own)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


class _AgentProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Says when the agent exited, even while a descendant still holds its pipes open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec, self.limits = spec, spec.limits
        self.reporter = Reporter(lambda: self.stop("lost"))
        self.output = Output(spec, self.reporter)
        self.stopped: Trouble | None = None
        self._trouble: asyncio.Future[Trouble] | None = None

    def stop(self, reason: Trouble) -> None:
        if self.stopped is None:
            self.stopped = reason
        self._raise(reason)

    def _raise(self, reason: Trouble) -> None:
        if self._trouble is not None and not self._trouble.done():
            self._trouble.set_result(reason)

    # -- the build ---------------------------------------------------------------------------------
    async def main(self, control: bytes) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, "canceled")
        tasks = [asyncio.create_task(self._control(control)), asyncio.create_task(self._tick())]
        try:
            end = await self.run()
        finally:
            for task in tasks:
                task.cancel()
        self.output.close()
        self.reporter.send(end)

    async def run(self) -> End:
        deadline = time.monotonic() + self.limits.build_timeout_s
        status, exit_code, error = "completed", None, None
        for index, prompt in enumerate(self.spec.prompts):
            if self.stopped is not None:
                status = "canceled"
                break
            step = await self.step(index, prompt, deadline)
            self.output.flush()
            self.reporter.send(Done(step=step))
            exit_code = step.exit_code
            if step.status != "completed":
                status, error = step.status, step.error
                break
        return End(
            status=status,  # type: ignore[arg-type]
            exit_code=exit_code,
            error=error,
            log_lines=self.output.n,
            finished_at=datetime.now(UTC),
        )

    async def step(self, index: int, prompt: str, build_deadline: float) -> StepView:
        argv, stdin_data = invocation(self.spec.command, self.spec.prompt_mode, prompt)
        started_at, t0 = datetime.now(UTC), time.monotonic()
        self._trouble = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _AgentProtocol(loop),
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.spec.workdir,
                process_group=0,
                preexec_fn=self._limit if self.limits.address_space_mb else None,
            )
        except OSError as err:
            code, why = launch_failure(index, argv[0], self.spec.node, err)
            self.output.add("err", f"[gatehouse] {why}")
            return self._view(index, "failed", code, why, started_at, t0)
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        self.reporter.send(Began(index=index, pid=proc.pid))
        assert proc.stdout is not None and proc.stderr is not None
        helpers = [
            asyncio.create_task(self._pump(proc.stdout, "out")),
            asyncio.create_task(self._pump(proc.stderr, "err")),
        ]
        readers = list(helpers)
        if stdin_data is not None and proc.stdin is not None:
            helpers.append(asyncio.create_task(self._feed(proc.stdin, stdin_data)))
        if self.limits.memory_mb:
            helpers.append(asyncio.create_task(self._watch_memory()))
        exited = asyncio.ensure_future(protocol.exited)  # not proc.wait(): it waits for the pipes too
        step_deadline = t0 + self.limits.step_timeout_s
        wait_s = max(0.0, min(step_deadline, build_deadline) - time.monotonic())
        watched: set[asyncio.Future[Any]] = {exited, self._trouble}
        done, _ = await asyncio.wait(watched, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        trouble: Trouble | None = None
        if exited not in done:
            if self._trouble.done():
                trouble = self._trouble.result()
            else:
                trouble = "build_timeout" if build_deadline <= step_deadline else "step_timeout"
            await self._terminate(proc.pid, exited)
        await exited
        returncode = transport.get_returncode()
        assert returncode is not None
        await asyncio.wait(readers, timeout=DRAIN_S)  # descendants may hold the pipes open
        _signal_tree(proc.pid, signal.SIGKILL)  # whatever the step left behind goes with it
        await asyncio.wait(readers, timeout=2.0)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        _reap_orphans()
        if trouble is None and self._trouble.done():
            trouble = self._trouble.result()  # e.g. the output cap, hit as the agent exited
        status, error = step_outcome(index, returncode, trouble, self._limit_text(trouble))
        if error:
            self.output.add("err", f"[gatehouse] {error}")
        return self._view(index, status, exit_code_of(returncode), error, started_at, t0)

    def _view(
        self, index: int, status: str, code: int | None, error: str | None, started_at: datetime, t0: float
    ) -> StepView:
        return StepView(
            index=index,
            status=status,  # type: ignore[arg-type]
            exit_code=code,
            duration_ms=int((time.monotonic() - t0) * 1000),
            started_at=started_at,
            finished_at=datetime.now(UTC),
            error=error,
        )

    def _limit_text(self, trouble: Trouble | None) -> str:
        return {
            "step_timeout": f"{self.limits.step_timeout_s:g} s",
            "build_timeout": f"{self.limits.build_timeout_s:g} s",
            "output": byte_size(self.limits.max_output_bytes),
            "memory": megabytes(self.limits.memory_mb),
        }.get(trouble or "", "")

    def _limit(self) -> None:  # in the agent, before exec
        limit = self.limits.address_space_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    async def _terminate(self, pgid: int, exited: "asyncio.Future[None]") -> None:
        _signal_tree(pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), self.limits.kill_grace_s)
        _signal_tree(pgid, signal.SIGKILL)

    # -- helpers of a step --------------------------------------------------------------------------
    async def _pump(self, reader: asyncio.StreamReader, stream: str) -> None:
        splitter = LineSplitter(redact)
        out = self.output
        try:
            while chunk := await reader.read(CHUNK):
                if out.over:
                    continue  # keep draining, record nothing more
                out.seen += len(chunk)
                if out.seen > out.cap:
                    chunk = chunk[: len(chunk) - (out.seen - out.cap)]
                    out.over = True
                for text in splitter.feed(chunk):
                    out.add(stream, text)
                if out.over:
                    for text in splitter.flush():
                        out.add(stream, text)
                    self._raise("output")
        finally:
            for text in splitter.flush():
                out.add(stream, text)

    async def _feed(self, stdin: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(OSError):
            stdin.write(data)
            await stdin.drain()
            stdin.close()

    async def _watch_memory(self) -> None:
        limit = self.limits.memory_mb * 1024 * 1024
        while True:
            await asyncio.sleep(MEMORY_EVERY_S)
            total = 0
            for proc in _descendants():
                with contextlib.suppress(Exception):
                    total += proc.memory_info().rss
            if total > limit:
                self._raise("memory")
                return

    async def _control(self, early: bytes) -> None:
        if b"stop" in early:
            self.stop("canceled")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))
        while True:
            line = await reader.readline()
            if not line:
                self.stop("lost")  # the runner is gone: nothing may outlive it
                return
            if line.strip() == b"stop":
                self.stop("canceled")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.spec.tick_s)
            self.reporter.send(Tick())


def main() -> None:
    spec, control = read_spec()
    key = os.environ.get(spec.key_env, "")
    if key:
        register_secret(key)  # every line is redacted before it is written or sent
    parent = os.getppid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the runner died: stop (as its closed pipe says too)
    if os.getppid() != parent:
        raise SystemExit("gatehouse worker: the runner is gone")
    os.makedirs(os.path.join(spec.workdir, "tmp"), exist_ok=True)
    try:
        asyncio.run(Worker(spec).main(control))
    except BaseException as err:
        if isinstance(err, SystemExit | KeyboardInterrupt):
            raise
        sys.stderr.write(redact("".join(traceback.format_exception(err)))[-4000:])
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
