"""Liveness and readiness."""

import asyncio
from typing import Any

from litestar import Request, Response, get

from contracts.commands.common import Ping, Pong
from contracts.subjects import SERVICES
from services.gateway.adapters.http.context import gateway_of
from services.gateway.adapters.http.problems import problem
from services.gateway.adapters.http.schemas import Health
from services.kit.rpc import CommandFailed


@get("/health", summary="Liveness (no auth)")
async def health() -> Health:
    return Health(status="ok")


@get("/ready", summary="200 when NATS, PostgreSQL and every service answer")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway = gateway_of(request)
    missing: list[str] = []
    if not gateway.bus.nc.is_connected:
        missing.append("NATS")
    else:

        async def ask(service: str) -> tuple[str, Pong | None]:
            try:
                return service, await gateway.client.call(service, "ping", Ping(), Pong, timeout=1.0)
            except CommandFailed:
                return service, None

        answers = await asyncio.gather(*(ask(s) for s in SERVICES))
        for service, pong in answers:
            if pong is None:
                missing.append(f"{service} service")
            elif not pong.database and "PostgreSQL" not in missing:
                missing.append("PostgreSQL")
        if not request.app.state.feed.ready.is_set():
            missing.append("identity view (catching up)")
    if missing:
        return problem(503, "Not ready: " + ", ".join(missing) + " not answering.", missing=missing)
    return Response({"status": "ok", "services": list(SERVICES)})
