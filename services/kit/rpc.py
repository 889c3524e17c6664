"""Commands as request/reply on `cmd.<service>.<verb>`, with msgspec bodies.

This runs on the nats-py connection that faststream opened: faststream sends no reply at
all when a body fails validation (the caller only sees a timeout), and every refusal here
must come back as a `Problem` the gateway can show to a human.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts.commands.common import CommandMeta, Problem
from contracts.subjects import command
from services.kit import deadline as deadlines
from services.kit import telemetry
from services.kit.bus import Bus
from services.kit.replies import replies

log = logging.getLogger(__name__)
T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R")

_encoder = msgspec.json.Encoder()
_problem_decoder = msgspec.json.Decoder(Problem)


class CommandFailed(Exception):
    """A command was refused or could not be delivered; `problem` says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


def refuse(status: int, title: str, detail: str, code: str = "") -> CommandFailed:
    return CommandFailed(Problem(status=status, title=title, detail=detail, code=code))


class _Reply(msgspec.Struct):
    ok: bool
    value: msgspec.Raw = msgspec.Raw(b"null")
    problem: Problem | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


def _ok(value: Any) -> bytes:
    return b'{"ok":true,"value":' + _encoder.encode(value) + b"}"


def _failed(problem: Problem) -> bytes:
    return b'{"ok":false,"problem":' + _encoder.encode(problem) + b"}"


Handler = Callable[[Any], Awaitable[Any]]


class CommandServer:
    """Serves one service's commands; instances of the same service share a queue group."""

    def __init__(self, bus: Bus, service: str, max_in_flight: int = 256) -> None:
        self.bus = bus
        self.service = service
        self._routes: dict[str, tuple[msgspec.json.Decoder[Any], Handler]] = {}
        self._subs: list[Subscription] = []
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    def route(self, verb: str, request_type: type[T], handler: Callable[[T], Awaitable[Any]]) -> None:
        self._routes[command(self.service, verb)] = (msgspec.json.Decoder(request_type), handler)

    async def start(self) -> None:
        for subject in self._routes:
            self._subs.append(await self.bus.nc.subscribe(subject, queue=self.service, cb=self._dispatch))
        await self.bus.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _dispatch(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        decoder, handler = self._routes[msg.subject]
        token = telemetry.attach(telemetry.incoming(msg.headers))
        try:
            if telemetry.recording():
                with telemetry.tracer("gatehouse.rpc").start_as_current_span(f"cmd {msg.subject}"):
                    body = await self._answer(msg, decoder, handler)
            else:
                body = await self._answer(msg, decoder, handler)
        finally:
            telemetry.detach(token)
        if msg.reply:
            try:
                await msg.respond(body)
            except Exception:  # the caller went away; nothing to tell it
                log.warning("reply to %s could not be sent", msg.subject)

    async def _answer(self, msg: Msg, decoder: msgspec.json.Decoder[Any], handler: Handler) -> bytes:
        try:
            request = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return _failed(Problem(status=400, title="Bad request", detail=f"Invalid command: {err}"))
        meta = getattr(request, "meta", None)
        deadline = meta.deadline if isinstance(meta, CommandMeta) else None
        if deadline is not None and time.time() > deadline:
            return _failed(
                Problem(
                    status=503,
                    title="Service unavailable",
                    detail="The request arrived after its caller stopped waiting.",
                )
            )
        deadlines.set_deadline(deadline)  # this task only: each command runs in its own task
        try:
            return _ok(await handler(request))
        except CommandFailed as refused:
            return _failed(refused.problem)
        except deadlines.DeadlinePassed:
            return _failed(
                Problem(
                    status=503,
                    title="Service unavailable",
                    detail=f"The {self.service} service was too slow; nothing was changed.",
                )
            )
        except Exception:
            log.exception("command %s failed", msg.subject)
            return _failed(
                Problem(
                    status=503,
                    title="Service unavailable",
                    detail=f"The {self.service} service could not complete the request; try again shortly.",
                )
            )


class CommandClient:
    """Calls other services' commands; replies come through `services.kit.replies` (cheaper in CPU)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    async def call(
        self,
        service: str,
        verb: str,
        request: msgspec.Struct,
        reply_type: type[R],
        timeout: float = 5.0,
    ) -> R:
        subject = command(service, verb)
        if not self.bus.nc.is_connected:
            raise refuse(
                503, "Service unavailable", "The message bus (NATS) is not reachable; try again shortly."
            )
        meta = getattr(request, "meta", None)
        if isinstance(meta, CommandMeta) and meta.deadline is None:
            # Nothing may be recorded once we stop waiting. Stamp a copy: callers reuse metas.
            stamped = msgspec.structs.replace(meta, deadline=time.time() + timeout)
            request = msgspec.structs.replace(request, meta=stamped)  # type: ignore[type-var]
        try:
            msg = await replies(self.bus.nc).request(
                subject, _encoder.encode(request), timeout, telemetry.inject({})
            )
        except (NoRespondersError, NatsTimeout, ConnectionClosedError, TimeoutError) as err:
            # One sentence for every caller; the chained cause says which of the four it was
            # (nobody subscribed, no reply in time, a closed connection) where a trace is kept.
            if not self.bus.nc.is_connected:
                raise refuse(
                    503, "Service unavailable", "The message bus (NATS) is not reachable; try again shortly."
                ) from err
            raise refuse(
                503,
                "Service unavailable",
                f"The {service} service is not answering; try again shortly.",
            ) from err
        except Exception as err:  # reconnecting, outbound buffer full, ...
            raise refuse(
                503,
                "Service unavailable",
                f"The message bus is not reachable ({type(err).__name__}).",
            ) from None
        reply = _reply_decoder.decode(msg.data)
        if not reply.ok:
            assert reply.problem is not None
            raise CommandFailed(reply.problem)
        decoder = self._decoders.get(reply_type)
        if decoder is None:
            decoder = self._decoders[reply_type] = msgspec.json.Decoder(reply_type)
        result: R = decoder.decode(reply.value)
        return result

    async def send(self, service: str, verb: str, request: msgspec.Struct) -> None:
        """Fire-and-forget (no reply expected)."""
        try:
            await self.bus.nc.publish(command(service, verb), _encoder.encode(request))
        except Exception:
            log.warning("could not send %s.%s", service, verb)
