"""Named places where a test can make a process stall, so crash windows can be hit on purpose.

Set `GATEHOUSE_FAILPOINTS=relay.before_publish` (comma-separated) in a process's
environment; production never sets it and the check is one set lookup.
"""

import asyncio
import os

_active = frozenset(p for p in os.environ.get("GATEHOUSE_FAILPOINTS", "").split(",") if p)


def active(name: str) -> bool:
    return name in _active


async def stall_if(name: str) -> None:
    """Blocks forever when the failpoint is set: the test then kills the process."""
    if name in _active:
        await asyncio.Event().wait()
