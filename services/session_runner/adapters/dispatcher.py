"""The runner's partners over their commands: the dispatcher (claims and reports, retried
while it is away) and the secrets service (the agent key, revealed for one build)."""

import asyncio
import logging
from typing import TypeVar

import msgspec

from contracts.commands import builds as cmd
from contracts.commands import secrets as sec
from contracts.commands.common import CommandMeta
from services.kit.rpc import CommandClient, CommandFailed
from services.session_runner.application import KeyRefused, Unreachable

log = logging.getLogger(__name__)
SERVICE = "dispatcher"


R = TypeVar("R", bound=msgspec.Struct)


def fresh(request: R) -> R:
    """A copy without a deadline: the client sets one per call (a retry must not inherit it)."""
    meta = request.meta  # type: ignore[attr-defined]
    return msgspec.structs.replace(request, meta=msgspec.structs.replace(meta, deadline=None))  # type: ignore[call-arg]


class DispatcherClient:
    def __init__(self, client: CommandClient, patience_s: float = 300.0) -> None:
        self.client, self.patience_s = client, patience_s

    async def _call(self, verb: str, request: msgspec.Struct, patience_s: float) -> cmd.Go:
        """Retries while the dispatcher is away (503); any other refusal answers "stop"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience_s
        backoff = 0.1
        while True:
            try:
                return await self.client.call(SERVICE, verb, fresh(request), cmd.Go, timeout=5)
            except CommandFailed as failed:
                p = failed.problem
                if p.status != 503 or loop.time() + backoff > deadline:
                    if p.status == 503:
                        raise Unreachable(p.detail) from None
                    log.warning("dispatcher refused %s: %s", verb, p.detail)
                    return cmd.Go(go=False, status="failed", reason=p.detail)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def claim(self, build_id: str, node: str, meta: CommandMeta) -> cmd.Go:
        return await self._call("claim", cmd.ClaimBuild(meta=meta, build_id=build_id, node=node), 5.0)

    async def attached(self, build_id: str, node: str, pid: int, meta: CommandMeta) -> cmd.Go:
        request = cmd.WorkerAttached(meta=meta, build_id=build_id, node=node, pid=pid)
        try:
            return await self._call("attached", request, 30.0)
        except Unreachable:
            return cmd.Go(go=True, status="running")  # not worth stopping the build for

    async def step(self, build_id: str, node: str, step: cmd.StepView, meta: CommandMeta) -> cmd.Go:
        request = cmd.StepFinished(meta=meta, build_id=build_id, node=node, step=step)
        try:
            return await self._call("step_finished", request, self.patience_s)
        except Unreachable:
            log.error("step %d of build %s could not be reported", step.index, build_id)
            return cmd.Go(go=True, status="running")

    async def finish(self, report: cmd.BuildFinished) -> None:
        try:
            await self._call("build_finished", report, self.patience_s)
        except Unreachable:
            log.error("the end of build %s could not be reported (the reaper will fail it)", report.build_id)


class SecretsKeys:
    """`cmd.secrets.reveal` for purpose `build:<id>`: only this service may send it (NATS auth)."""

    def __init__(self, client: CommandClient) -> None:
        self.client = client

    async def reveal(self, order: cmd.BuildOrder, meta: CommandMeta) -> str:
        ask = sec.RevealSecret(
            meta=meta,
            service="session_runner",
            purpose=f"build:{order.build_id}",
            org_id=order.org_id,
            user_id=order.user_id,
            name=order.key_name,
            scope="user",
        )
        for attempt in range(3):
            try:
                revealed = await self.client.call(
                    "secrets", sec.REVEAL_VERB, fresh(ask), sec.RevealedSecret, timeout=10
                )
                return revealed.value
            except CommandFailed as failed:
                if failed.problem.status != 503 or attempt == 2:
                    raise KeyRefused(failed.problem.detail) from None
            await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")
