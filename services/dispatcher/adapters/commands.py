"""The dispatcher's commands on NATS (`cmd.dispatcher.<verb>`): the product backend's verbs
(through the gateway) and the runner nodes' reports."""

from collections.abc import Awaitable
from typing import Any, TypeVar

from contracts.commands import builds as cmd
from contracts.commands.common import Problem
from services.dispatcher.application import Builds, MissingKey, OverLimit, Unavailable, build_view
from services.dispatcher.domain import BuildError, Conflict, Invalid, NotFound
from services.kit.rpc import CommandFailed, CommandServer, refuse

T = TypeVar("T")


async def _run(work: Awaitable[T]) -> T:
    try:
        return await work
    except MissingKey as err:
        raise refuse(409, "Agent key missing", str(err), "agent_key_missing") from None
    except OverLimit as err:
        problem = Problem(
            status=429,
            title="Too many requests",
            detail=str(err),
            code="build_limit",
            retry_after_s=err.retry_after_s,
        )
        raise CommandFailed(problem) from None
    except NotFound as err:
        raise refuse(404, "Not found", str(err), "build_not_found") from None
    except Invalid as err:
        raise refuse(400, "Invalid request", str(err), "invalid_build") from None
    except Conflict as err:
        raise refuse(409, "Conflict", str(err), "build_conflict") from None
    except Unavailable as err:
        raise refuse(503, "Service unavailable", str(err), "build_queue_unavailable") from None
    except BuildError as err:
        raise refuse(400, "Refused", str(err)) from None


def routes(server: CommandServer, builds: Builds) -> None:
    async def submit(c: cmd.SubmitBuild) -> cmd.BuildAccepted:
        build = await _run(builds.submit(c))
        return cmd.BuildAccepted(build_id=build.build_id, status="queued")

    async def get(c: cmd.GetBuild) -> cmd.BuildView:
        return build_view(await _run(builds.get(c)))

    async def stop(c: cmd.StopBuild) -> cmd.BuildView:
        return build_view(await _run(builds.stop(c)))

    async def sessions(c: cmd.ListSessions) -> cmd.SessionList:
        return await _run(builds.sessions(c))

    async def logs(c: cmd.GetLogs) -> cmd.LogPage:
        return await _run(builds.logs(c))

    async def claim(c: cmd.ClaimBuild) -> cmd.Go:
        return await _run(builds.claim(c))

    async def attached(c: cmd.WorkerAttached) -> cmd.Go:
        return await _run(builds.attach(c))

    async def step_finished(c: cmd.StepFinished) -> cmd.Go:
        return await _run(builds.step(c))

    async def build_finished(c: cmd.BuildFinished) -> cmd.Go:
        return await _run(builds.finish(c))

    handlers: dict[str, tuple[type[Any], Any]] = {
        "submit": (cmd.SubmitBuild, submit),
        "get": (cmd.GetBuild, get),
        "stop": (cmd.StopBuild, stop),
        "sessions": (cmd.ListSessions, sessions),
        "logs": (cmd.GetLogs, logs),
        "claim": (cmd.ClaimBuild, claim),
        "attached": (cmd.WorkerAttached, attached),
        "step_finished": (cmd.StepFinished, step_finished),
        "build_finished": (cmd.BuildFinished, build_finished),
    }
    for verb, (request_type, handler) in handlers.items():
        server.route(verb, request_type, handler)
