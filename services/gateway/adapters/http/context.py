"""Per-request helpers: the gateway, the caller, and the command meta built from both."""

from typing import Any

from litestar import Request
from litestar.exceptions import PermissionDeniedException

from contracts.commands.common import CommandMeta
from services.gateway.adapters.http.auth import client_ip
from services.gateway.application import Gateway
from services.gateway.domain import Principal


def gateway_of(request: Request[Any, Any, Any]) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def caller(request: Request[Any, Any, Any]) -> Principal:
    principal: Principal = request.scope["user"]
    return principal


def admin(request: Request[Any, Any, Any]) -> Principal:
    principal = caller(request)
    if not principal.is_admin:
        raise PermissionDeniedException("This route is for org admins.")
    return principal


def meta(request: Request[Any, Any, Any]) -> CommandMeta:
    return Gateway.meta(
        request.scope.get("user"),
        client_ip(request.scope),
        request.headers.get("user-agent"),
        request.headers.get("x-request-id"),
    )
