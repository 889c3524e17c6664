"""The caller's deadline, carried in CommandMeta and checked right before anything is recorded.

CommandServer sets it for the handler; `asyncio.to_thread` copies context variables, so an
application's synchronous `save()` in a worker thread sees it too.
"""

import contextvars
import time

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class DeadlinePassed(Exception):
    """The caller stopped waiting: recording now would act on a request it was told failed."""


def set_deadline(deadline: float | None) -> contextvars.Token[float | None]:
    return _deadline.set(deadline)


def reset(token: contextvars.Token[float | None]) -> None:
    _deadline.reset(token)


def check() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.time() > deadline:
        raise DeadlinePassed("the caller's deadline passed before the change could be recorded")
