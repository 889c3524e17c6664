"""The use cases: submit, read, stop and list builds; take runner nodes' reports; reap."""

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from contracts.commands import builds as cmd
from services.dispatcher.application.book import BuildBook, now
from services.dispatcher.application.ports import (
    Heartbeats,
    Index,
    KeyDirectory,
    Live,
    LogStore,
    MissingKey,
    Nodes,
    Slots,
    Unavailable,
    WorkQueue,
)
from services.dispatcher.application.views import change_of, meta_of
from services.dispatcher.domain import WORKER_LOST, Build, Meta, check_request

log = logging.getLogger(__name__)
T = TypeVar("T")


class Builds:
    def __init__(
        self,
        book: BuildBook,
        keys: KeyDirectory,
        slots: Slots,
        queue: WorkQueue,
        live: Live,
        nodes: Nodes,
        index: Index,
        logs: LogStore,
        heartbeats: Heartbeats,
    ) -> None:
        self.book, self.keys, self.slots, self.queue = book, keys, slots, queue
        self.live, self.nodes, self.index, self.log_store = live, nodes, index, logs
        self.heartbeats = heartbeats

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # -- the product backend's verbs (through the gateway) ----------------------------------------
    async def submit(self, c: cmd.SubmitBuild) -> Build:
        agent = check_request(c.prompts, c.agent, c.env)
        meta = meta_of(c.meta)
        if not await self.keys.has_key(c.org_id, c.user_id, agent.key_name, c.meta):
            await self._in_thread(self.book.refuse, c.user_id, c.org_id, agent, "agent_key_missing", meta)
            raise MissingKey(agent.missing_key_sentence())
        build_id = str(uuid.uuid4())
        await self.slots.reserve(c.org_id, c.user_id, build_id, c.meta)
        try:
            build = await self._in_thread(
                self.book.queue, build_id, c.user_id, c.org_id, agent.name, c.prompts, c.env, meta
            )
        except BaseException:
            try:
                await self.slots.release(c.user_id, build_id, "not recorded")
            except Exception as err:  # quota will not free it by itself: say so loudly
                log.error("slot of unrecorded build %s not released: %s", build_id, err)
            raise
        order = cmd.BuildOrder(
            build_id=build_id,
            user_id=c.user_id,
            org_id=c.org_id,
            agent=agent.name,
            key_name=agent.key_name,
            key_env=agent.key_env,
            prompts=c.prompts,
            env=c.env,
            queued_at=build.queued_at,
            correlation_id=c.meta.correlation_id,
            trace=c.meta.trace,
        )
        try:
            await self.queue.publish(order)
        except Exception as err:
            log.warning("build %s could not be queued: %s", build_id, err)
            why = "the build could not be put on the work queue (NATS unavailable)"
            await self._in_thread(self.book.lose, build_id, why, meta)  # its slot is released with it
            raise Unavailable("The build could not be queued; try again shortly.") from None
        return build

    async def get(self, c: cmd.GetBuild) -> Build:
        return await self._in_thread(self.book.owned, c.build_id, c.user_id)

    async def stop(self, c: cmd.StopBuild) -> Build:
        build = await self._in_thread(self.book.owned, c.build_id, c.user_id)
        if build.ended:
            return build  # idempotent: the final state stands
        build, changed = await self._in_thread(self.book.cancel, c.build_id, c.user_id, meta_of(c.meta))
        if changed:
            self.live.status(change_of(build))
            if build.node is not None:
                try:
                    await self.nodes.stop(build.node, build.build_id, c.meta)
                except Exception as err:  # the node is gone: the reaper finds nothing to do
                    log.warning("node %s did not take the stop of %s: %s", build.node, build.build_id, err)
        return build

    async def sessions(self, c: cmd.ListSessions) -> cmd.SessionList:
        at = now()
        rows = await self.index.running(c.user_id)
        return cmd.SessionList(
            [
                cmd.SessionView(
                    build_id=r.build_id,
                    pid=r.pid,
                    node=r.node or "",
                    started_at=r.started_at or r.queued_at,
                    uptime_s=round(max(0.0, (at - (r.started_at or at)).total_seconds()), 3),
                )
                for r in rows
            ]
        )

    async def logs(self, c: cmd.GetLogs) -> cmd.LogPage:
        build = await self._in_thread(self.book.owned, c.build_id, c.user_id)
        limit = max(1, min(c.limit, cmd.MAX_LOG_PAGE))
        lines, more = await self.log_store.page(c.build_id, max(0, c.after), limit)
        next_after = lines[-1].n if lines else max(0, c.after)
        return cmd.LogPage(
            build_id=c.build_id,
            status=build.status,  # type: ignore[arg-type]
            lines=lines,
            next_after=next_after,
            more=more,
        )

    # -- runner nodes' verbs ------------------------------------------------------------------------
    async def claim(self, c: cmd.ClaimBuild) -> cmd.Go:
        build, go, reason = await self._in_thread(self.book.claim, c.build_id, c.node, meta_of(c.meta))
        if go:
            self.live.status(change_of(build))
        return cmd.Go(go=go, status=build.status, reason=reason)  # type: ignore[arg-type]

    async def attach(self, c: cmd.WorkerAttached) -> cmd.Go:
        build, go = await self._in_thread(self.book.attach, c.build_id, c.node, c.pid, meta_of(c.meta))
        return cmd.Go(go=go, status=build.status)  # type: ignore[arg-type]

    async def step(self, c: cmd.StepFinished) -> cmd.Go:
        step: dict[str, Any] = msgspec.structs.asdict(c.step)
        build, go, recorded = await self._in_thread(self.book.step, c.build_id, c.node, step, meta_of(c.meta))
        if recorded:
            self.live.status(change_of(build, step))
        return cmd.Go(go=go, status=build.status)  # type: ignore[arg-type]

    async def finish(self, c: cmd.BuildFinished) -> cmd.Go:
        build, changed = await self._in_thread(
            self.book.finish, c.build_id, c.node, c.status, c.exit_code, c.error, c.log_lines, meta_of(c.meta)
        )
        if changed:
            self.live.status(change_of(build))
        return cmd.Go(go=False, status=build.status)  # type: ignore[arg-type]

    # -- the reaper ------------------------------------------------------------------------------
    async def reap(self, grace_s: float, queue_timeout_s: float, meta: Meta) -> list[str]:
        """Fails running builds whose heartbeat expired, and builds no node took in time."""
        at = now()
        reaped = []
        for row in await self.index.active():
            if row.status == "running" and row.started_at is not None:
                young = (at - row.started_at).total_seconds() < grace_s
                if young or await self.heartbeats.alive(row.build_id):
                    continue
                why = f"{WORKER_LOST}: its heartbeat from node {row.node} expired"
            elif row.status == "queued" and (at - row.queued_at).total_seconds() > queue_timeout_s:
                why = f"no runner node started the build within {queue_timeout_s:g} s"
            else:
                continue
            build, changed = await self._in_thread(self.book.lose, row.build_id, why, meta)
            if changed:
                log.warning("build %s failed: %s", row.build_id, why)
                self.live.status(change_of(build))
                reaped.append(row.build_id)
        return reaped
