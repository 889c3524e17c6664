"""What every command carries, and how a refusal comes back."""

import msgspec

from contracts.envelope import Actor, TraceContext


class CommandMeta(msgspec.Struct, omit_defaults=True):
    """Who asks, under which correlation id and trace; copied onto the events it causes."""

    actor: Actor
    correlation_id: str
    trace: TraceContext = msgspec.field(default_factory=TraceContext)
    # Unix time after which the caller has given up: a service must not record anything past it,
    # or a request answered "503, try again" would still happen (and happen twice on retry).
    deadline: float | None = None


class Problem(msgspec.Struct, omit_defaults=True):
    """A refusal the caller can show to a human: `status` follows HTTP semantics."""

    status: int
    title: str
    detail: str
    code: str = ""
    retry_after_s: int | None = None  # with 429/503: when trying again may help (`Retry-After`)


class Ping(msgspec.Struct):
    pass


class Pong(msgspec.Struct):
    service: str
    database: bool
    instance: str = ""


class Empty(msgspec.Struct):
    pass
