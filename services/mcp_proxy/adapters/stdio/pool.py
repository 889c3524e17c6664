"""The stdio upstream processes of one mcp_proxy instance, keyed, capped and reaped.

One process per (user, server registration, resolved env): started on first use, reused,
stopped after `idle_timeout_s` without calls, never shared between users. Two calls that
need the same new process wait for one start. Caps: `max_procs_per_user` and `max_procs`
(this node); at a cap the least recently used idle process makes room, and when none is
idle the call fails with a clear error. A process that crashed is dropped and the next call
starts a new one; one that timed out is retired (the hung process is never reused).
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import psutil

from services.kit.tasks import stop_task
from services.mcp_proxy.adapters.stdio.process import StdioProcess
from services.mcp_proxy.application.ports import LimitReached, Target
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain.calls import ProcessRecord
from services.mcp_proxy.domain.pooling import PoolKey

log = logging.getLogger(__name__)


class StdioPool:
    def __init__(
        self,
        settings: ProxySettings,
        node: str,
        record: Callable[[ProcessRecord], None],
        on_tools_changed: Callable[[Target], None] | None = None,
    ) -> None:
        self.settings, self.node, self._record = settings, node, record
        self._on_tools_changed = on_tools_changed  # an upstream's own list_changed (tool_changes.py)
        self.processes: dict[PoolKey, StdioProcess] = {}
        self._starting: dict[PoolKey, asyncio.Task[StdioProcess]] = {}
        self._draining: set[StdioProcess] = set()  # retired, still finishing calls
        self._tokens: dict[int, str] = {}  # id(process) -> its UpstreamProcess aggregate id
        self._stopping: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.started = 0  # processes started since this pool began (for tests and benches)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="stdio-pool-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            await stop_task(self._sweeper)
        for starting in list(self._starting.values()):
            starting.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        tasks = [p.stop("shutdown") for p in [*self.processes.values(), *self._draining]]
        tasks += list(self._stopping)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- use -------------------------------------------------------------------------------
    async def open(self, target: Target) -> StdioProcess:
        key = target.key
        process = self.processes.get(key)
        if process is not None:
            if process.usable:
                return process
            del self.processes[key]
            self._draining.add(process)
        starting = self._starting.get(key)
        if starting is None:
            self._make_room(key.user_id)
            # A task of its own: a caller that gives up (timeout, cancel) does not abort the
            # start that others may be waiting for, nor leave a half-started process behind.
            starting = asyncio.get_running_loop().create_task(self._start(target))
            self._starting[key] = starting
            starting.add_done_callback(lambda t: self._started_or_failed(key, t))
        return await asyncio.shield(starting)

    def _started_or_failed(self, key: PoolKey, task: "asyncio.Task[StdioProcess]") -> None:
        if self._starting.get(key) is task:
            del self._starting[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter re-raises it

    async def _start(self, target: Target) -> StdioProcess:
        key = target.key
        process = StdioProcess(target, self.settings, self._ended, self._on_tools_changed)
        await process.start()
        self.processes[key] = process
        self.started += 1
        token = str(uuid.uuid4())
        self._tokens[id(process)] = token
        self._record(
            ProcessRecord(
                token=token,
                server=target.server,
                user_id=target.user_id,
                org_id=target.org_id,
                pid=process.pid,
                node=self.node,
            )
        )
        return process

    async def retire_server(self, prefix: str, reason: str) -> None:
        """Stops every process started for one registration (removed server)."""
        for key, process in list(self.processes.items()):
            if key.server_id.startswith(prefix):
                process.retire(reason)

    def count(self, user_id: str | None = None) -> int:
        keys = [*self.processes, *self._starting]
        return len(keys) if user_id is None else sum(1 for k in keys if k.user_id == user_id)

    # -- internals -------------------------------------------------------------------------
    def _make_room(self, user_id: str) -> None:
        s = self.settings
        if self.count(user_id) >= s.max_procs_per_user and not self._evict(user_id):
            raise LimitReached(
                f"You already have {s.max_procs_per_user} upstream processes running, all busy "
                "(the per-user limit); try again when a call has finished."
            )
        if self.count() >= s.max_procs and not self._evict(None):
            raise LimitReached(
                f"This gateway node runs its maximum of {s.max_procs} upstream processes, all busy; "
                "try again shortly."
            )

    def _evict(self, user_id: str | None) -> bool:
        """Stops the least recently used idle process (of one user, or any); False if none is idle."""
        idle = [
            (p.last_used, k)
            for k, p in self.processes.items()
            if p.in_flight == 0 and (user_id is None or k.user_id == user_id)
        ]
        if not idle:
            return False
        _, key = min(idle)
        process = self.processes.pop(key)
        self._stop_later(process, "limit")
        return True

    def _stop_later(self, process: StdioProcess, reason: str) -> None:
        task = process.stop(reason)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _ended(self, process: StdioProcess, reason: str) -> None:
        key = process.target.key
        if self.processes.get(key) is process:
            del self.processes[key]
        self._draining.discard(process)
        token = self._tokens.pop(id(process), None)
        if token is None:
            return  # it never finished starting: no Started event was recorded
        t = process.target
        self._record(
            ProcessRecord(
                token=token,
                server=t.server,
                user_id=t.user_id,
                org_id=t.org_id,
                pid=process.pid,
                node=self.node,
                reason="crashed" if reason in ("flood", "protocol") else reason,
            )
        )

    async def _sweep(self) -> None:
        interval = min(max(self.settings.idle_timeout_s / 4, 0.1), 10.0)
        last_snapshot = 0.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key, process in list(self.processes.items()):
                if process.in_flight == 0 and now - process.last_used > self.settings.idle_timeout_s:
                    self.processes.pop(key, None)
                    self._stop_later(process, "idle")
            if self.processes and now - last_snapshot >= min(interval * 4, 10.0):
                last_snapshot = now
                await asyncio.to_thread(self._snapshot_descendants, list(self.processes.values()))

    @staticmethod
    def _snapshot_descendants(processes: list[StdioProcess]) -> None:
        """Remembers each process's descendants, so strays are found after their parent died."""
        children: dict[int, list[int]] = {}
        created: dict[int, float] = {}
        for proc in psutil.process_iter(["ppid", "create_time"]):
            children.setdefault(proc.info["ppid"] or 0, []).append(proc.pid)
            created[proc.pid] = proc.info["create_time"] or 0.0
        for process in processes:
            stack = list(children.get(process.pid, []))
            while stack:
                pid = stack.pop()
                if pid in created:
                    process.known_descendants[pid] = created[pid]
                stack += children.get(pid, [])
