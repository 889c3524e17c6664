"""W3C trace context crosses HTTP -> NATS command -> recorded event -> audit entry."""

import httpx
import pytest

from contracts.commands.identity import CreateUser, UserCreated
from services.audit.bootstrap import build as build_audit
from services.gateway.bootstrap import assemble
from services.identity.bootstrap import build as build_identity
from services.kit.config import Settings
from services.kit.rpc import CommandClient
from services.kit.telemetry import configure_tracing
from tests.helpers import OPERATOR, eventually, running, stream_envelopes

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_trace_context_follows_a_request_into_events_and_audit(settings: Settings) -> None:
    configure_tracing("gateway")
    async with (
        running(build_identity, settings, "identity") as bus,
        running(build_audit, settings, "audit"),
    ):
        created = await CommandClient(bus).call(
            "identity", "create_user", CreateUser(meta=OPERATOR, email="tracer@example.com"), UserCreated
        )
        app, feed = await assemble(settings, bus)
        await feed.ready.wait()
        headers = {"Authorization": f"Bearer {created.api_key}", "traceparent": TRACEPARENT}
        transport = httpx.ASGITransport(app=app)  # same event loop as the services' NATS client
        async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse") as client:

            async def known() -> bool:
                return (await client.get("/v1/me", headers=headers)).status_code == 200

            await eventually(known)
            issued = await client.post("/v1/users/me/mcp-keys", json={"name": "traced"}, headers=headers)
            assert issued.status_code == 201, issued.text
            key_id = issued.json()["id"]

            async def issued_event() -> list[str]:
                return [
                    e.trace.traceparent or ""
                    for e in await stream_envelopes(bus, "events.identity.api_key_issued")
                    if key_id in bytes(e.data).decode()
                ]

            traceparents = await eventually(issued_event)
            assert traceparents[0].split("-")[1] == TRACE_ID

            async def audited() -> list[dict[str, object]]:
                page = await client.get("/v1/audit", params={"action": "api_key.issued"}, headers=headers)
                return [i for i in page.json()["items"] if i["resource"]["id"] == key_id]

            entry = (await eventually(audited))[0]
            assert entry["trace_id"] == TRACE_ID
        await feed.stop()
