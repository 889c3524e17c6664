"""mcp_proxy's commands on NATS (`cmd.mcp_proxy.<verb>`), and the cancel listener.

Every verb is served by whichever instance of the queue group gets it, except `cancel`:
it is published (no reply), and every instance listens, because only the one running the
call can cancel it.
"""

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts.commands import mcp as cmd
from contracts.commands.audit import GetDigest, ProjectionDigest, Rebuild, RebuildReport
from contracts.commands.common import Empty
from contracts.subjects import command
from services.kit.bus import Bus
from services.kit.rpc import CommandServer, refuse
from services.mcp_proxy.application.calls import Calls
from services.mcp_proxy.application.history import CallHistory
from services.mcp_proxy.application.requests import Forwarding
from services.mcp_proxy.application.servers import Servers
from services.mcp_proxy.domain.errors import Conflict, Forbidden, Invalid, NotFound, ProxyError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def _refusals(handler: Callable[[T], Awaitable[R]]) -> Callable[[T], Awaitable[R]]:
    """Turns the domain's refusals into Problems with an HTTP status."""

    async def wrapped(request: T) -> R:
        try:
            return await handler(request)
        except NotFound as err:
            raise refuse(404, "Not found", str(err), code="not_found") from None
        except Forbidden as err:
            raise refuse(403, "Forbidden", str(err), code="forbidden") from None
        except Conflict as err:
            raise refuse(409, "Conflict", str(err), code="conflict") from None
        except Invalid as err:
            raise refuse(400, "Invalid request", str(err), code="invalid") from None
        except ProxyError as err:
            raise refuse(400, "Refused", str(err)) from None

    return wrapped


def routes(
    server: CommandServer, servers: Servers, calls: Calls, forwarding: Forwarding, history: CallHistory
) -> None:
    async def register_server(c: cmd.RegisterServer) -> cmd.ServerView:
        return await servers.register(c)

    async def list_servers(c: cmd.ListServers) -> cmd.ServerList:
        return await servers.list_servers(c.caller)

    async def remove_server(c: cmd.RemoveServer) -> Empty:
        await servers.remove(c)
        return Empty()

    async def test_server(c: cmd.TestServer) -> cmd.ServerView:
        return await servers.test(c)

    async def list_tools(c: cmd.ListTools) -> cmd.ToolCatalog:
        return await servers.tools(c)

    async def page(c: cmd.History) -> cmd.HistoryPage:
        return await history.page(c)

    async def digest(c: GetDigest) -> ProjectionDigest:
        return await history.digest()

    async def rebuild(c: Rebuild) -> RebuildReport:
        return await history.rebuild()

    server.route("register_server", cmd.RegisterServer, _refusals(register_server))
    server.route("list_servers", cmd.ListServers, _refusals(list_servers))
    server.route("remove_server", cmd.RemoveServer, _refusals(remove_server))
    server.route("test_server", cmd.TestServer, _refusals(test_server))
    server.route("list_tools", cmd.ListTools, _refusals(list_tools))
    server.route("call", cmd.CallTool, calls.call)  # the hot path: refusals are raised as Problems
    server.route("request", cmd.ForwardRequest, forwarding.forward)  # refusals raised as Problems
    server.route("history", cmd.History, _refusals(page))
    server.route("history_digest", GetDigest, digest)
    server.route("rebuild_history", Rebuild, rebuild)


class CancelListener:
    """`cmd.mcp_proxy.cancel` (CancelCall, no reply), heard by every instance."""

    def __init__(self, bus: Bus, calls: Calls) -> None:
        self.bus, self.calls = bus, calls
        self._sub: Subscription | None = None
        self._decode = msgspec.json.Decoder(cmd.CancelCall).decode

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(command("mcp_proxy", "cancel"), cb=self._on)
        await self.bus.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on(self, msg: Msg) -> None:
        try:
            request: Any = self._decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.warning("invalid cancel request: %s", err)
            return
        self.calls.cancel(request)
