"""`/v1/builds` and `/v1/sessions`: coding-agent builds started by a product backend.

Every route forwards to the dispatcher (`cmd.dispatcher.<verb>`) on behalf of the caller,
whose identity comes from their key. Another user's build is a plain 404.
"""

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from contracts.commands import builds as cmd
from services.gateway.adapters.http.build_schemas import (
    BuildAccepted,
    BuildInfo,
    LogPageInfo,
    NewBuild,
    SessionInfo,
    build_info,
    line_info,
)
from services.gateway.adapters.http.build_stream import BuildStream
from services.gateway.adapters.http.context import caller, gateway_of, meta

SERVICE = "dispatcher"
SUBMIT_TIMEOUT_S = 15.0


class BuildsController(Controller):
    path = "/v1/builds"
    tags = ["builds"]

    @post("/", status_code=HTTP_202_ACCEPTED, summary="Start a build (its prompts run one after another)")
    async def start(self, request: Request[Any, Any, Any], data: NewBuild) -> BuildAccepted:
        p = caller(request)
        ask = cmd.SubmitBuild(
            meta=meta(request),
            org_id=p.org_id,
            user_id=p.user_id,
            prompts=data.prompts,
            agent=data.agent,
            env=data.env,
        )
        accepted = await gateway_of(request).client.call(
            SERVICE, "submit", ask, cmd.BuildAccepted, timeout=SUBMIT_TIMEOUT_S
        )
        return BuildAccepted(build_id=accepted.build_id, status="queued")

    @get("/{build_id:str}", summary="A build: status, steps, exit code, error")
    async def read(self, request: Request[Any, Any, Any], build_id: str) -> BuildInfo:
        p = caller(request)
        ask = cmd.GetBuild(meta=meta(request), org_id=p.org_id, user_id=p.user_id, build_id=build_id)
        return build_info(await gateway_of(request).client.call(SERVICE, "get", ask, cmd.BuildView))

    @get("/{build_id:str}/logs", summary="A build's log lines after line `after` (numbered from 1)")
    async def logs(
        self,
        request: Request[Any, Any, Any],
        build_id: str,
        after: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=cmd.MAX_LOG_PAGE)] = 1000,
    ) -> LogPageInfo:
        p = caller(request)
        ask = cmd.GetLogs(
            meta=meta(request),
            org_id=p.org_id,
            user_id=p.user_id,
            build_id=build_id,
            after=after,
            limit=limit,
        )
        page = await gateway_of(request).client.call(SERVICE, "logs", ask, cmd.LogPage, timeout=10)
        return LogPageInfo(
            build_id=page.build_id,
            status=page.status,
            lines=[line_info(line) for line in page.lines],
            next_after=page.next_after,
            more=page.more,
        )

    @get(
        "/{build_id:str}/stream",
        summary="Live log lines and status changes (SSE; resumes after Last-Event-ID)",
    )
    async def stream(
        self,
        request: Request[Any, Any, Any],
        build_id: str,
        after: Annotated[int, Parameter(ge=0)] = 0,
    ) -> ServerSentEvent:
        p = caller(request)
        gateway = gateway_of(request)
        ask = cmd.GetBuild(meta=meta(request), org_id=p.org_id, user_id=p.user_id, build_id=build_id)
        await gateway.client.call(SERVICE, "get", ask, cmd.BuildView)  # 404 before the stream opens
        resume = request.headers.get("last-event-id", "").strip()
        start = int(resume) if resume.isdigit() else after
        events = BuildStream(gateway, p, build_id, meta(request)).events(start)
        return ServerSentEvent(
            events, headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
        )


class SessionsController(Controller):
    path = "/v1/sessions"
    tags = ["builds"]

    @get("/", summary="My running build sessions")
    async def list_sessions(self, request: Request[Any, Any, Any]) -> list[SessionInfo]:
        p = caller(request)
        ask = cmd.ListSessions(meta=meta(request), org_id=p.org_id, user_id=p.user_id)
        found = await gateway_of(request).client.call(SERVICE, "sessions", ask, cmd.SessionList)
        return [
            SessionInfo(
                build_id=s.build_id, pid=s.pid, node=s.node, started_at=s.started_at, uptime_s=s.uptime_s
            )
            for s in found.sessions
        ]

    @post(
        "/{build_id:str}/stop", status_code=HTTP_200_OK, summary="Stop a build (idempotent): status canceled"
    )
    async def stop(self, request: Request[Any, Any, Any], build_id: str) -> BuildInfo:
        p = caller(request)
        ask = cmd.StopBuild(meta=meta(request), org_id=p.org_id, user_id=p.user_id, build_id=build_id)
        return build_info(await gateway_of(request).client.call(SERVICE, "stop", ask, cmd.BuildView))


HANDLERS = [BuildsController, SessionsController]
