"""Assembles the Litestar application: routes, auth, problem details, OpenAPI, tracing."""

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import Receive, Scope, Send

from services.gateway.adapters.http import (
    admin,
    audit,
    builds,
    health,
    keys,
    mcp_endpoint,
    mcp_rest,
    mcp_sse,
    quota,
    secrets,
)
from services.gateway.adapters.http.auth import AuthMiddleware
from services.gateway.adapters.http.mcp_asgi import NO_HTTP_SPAN_PATHS
from services.gateway.adapters.http.mcp_fast import McpFastLane, endpoint_of
from services.gateway.adapters.http.problems import HANDLERS
from services.gateway.adapters.identity_feed import IdentityFeed
from services.gateway.adapters.mcp_face import McpFace
from services.gateway.application import Gateway


class GatewayApp(Litestar):
    """Litestar, with the MCP tool-call lane in front of its routing (mcp_fast.py)."""

    lane: McpFastLane | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if self.lane is not None:
            fast, server = endpoint_of(scope)
            if fast:
                return await self.lane(scope, receive, send, server, super().__call__)
        await super().__call__(scope, receive, send)


def create_app(gateway: Gateway, feed: IdentityFeed, max_body_bytes: int) -> Litestar:
    openapi = OpenAPIConfig(
        title="Gatehouse",
        version="1.0.0",
        path="/schema",
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", description="mcp_… API key"),
                "apiKeyHeader": SecurityScheme(
                    type="apiKey", name="X-MCP-API-Key", security_scheme_in="header"
                ),
            }
        ),
        security=[{"bearer": []}, {"apiKeyHeader": []}],
    )
    auth = AuthMiddleware(gateway)
    app = GatewayApp(
        route_handlers=[
            health.health,
            health.ready,
            keys.me,
            keys.KeysController,
            admin.AdminUsersController,
            audit.audit,
            audit.export,
            quota.quota,
            secrets.SecretsController,
            secrets.OrgSecretsController,
            *mcp_rest.HANDLERS,
            *mcp_endpoint.HANDLERS,
            *mcp_sse.HANDLERS,
            *builds.HANDLERS,
        ],
        middleware=[auth],
        # W3C trace context from the caller (or a new trace) follows the request onto NATS.
        # The MCP transports join the caller's trace themselves (mcp_asgi.continue_trace).
        plugins=[
            OpenTelemetryPlugin(
                OpenTelemetryConfig(exclude_spans=["receive", "send"], exclude=NO_HTTP_SPAN_PATHS)
            )
        ],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi,
        request_max_body_size=max_body_bytes,
        debug=False,
        logging_config=None,  # the kit's JSON logging stays in charge
    )
    app.state.gateway = gateway
    app.state.feed = feed
    app.state.auth_failures = auth.failures  # stopped (flushed) by bootstrap.serve
    app.state.mcp = McpFace(gateway)
    app.lane = McpFastLane(app, gateway)
    return app
