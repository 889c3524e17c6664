"""Stopping a background task so that a stop can never hang.

On Python 3.11, `asyncio.wait_for` (used by nats-py's `next_msg`/`fetch` and by our own waits)
swallows a cancellation that coincides with the awaited thing completing: the task keeps
running, and a `stop()` that cancels once and awaits the task waits forever. CI hung for
600 s on exactly that in the runner's order queue. So a task is cancelled again until it ends,
for a bounded time.
"""

import asyncio
import logging
from typing import Any

log = logging.getLogger("gatehouse.kit.tasks")


async def stop_task(task: "asyncio.Task[Any] | None", patience_s: float = 10.0, every_s: float = 0.1) -> None:
    """Cancels `task` (again and again if a cancellation is swallowed) until it has ended.

    Gives up after `patience_s` with a warning rather than hang the caller's shutdown.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while not task.done():
        if loop.time() > deadline:
            log.warning("task %s did not stop within %.0f s", task.get_name(), patience_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())
