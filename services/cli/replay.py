"""`gatehouse replay audit --until T`: the audit trail as it stood at T, in a scratch schema."""

import argparse
import asyncio
from datetime import UTC, datetime

from contracts.commands import audit as audit_cmd
from contracts.commands.common import CommandMeta
from contracts.envelope import Actor
from services.kit.bus import Bus, connect
from services.kit.config import Settings
from services.kit.rpc import CommandClient

OPERATOR = Actor(kind="operator", id="cli")


def instant(text: str) -> datetime:
    """An ISO 8601 timestamp for argparse; a naive one is UTC."""
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timestamp; use ISO 8601, e.g. 2026-11-21T10:00:00Z"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def audit_until(settings: Settings, until: datetime) -> int:
    async def work() -> audit_cmd.RebuildReport:
        bus: Bus = await connect(settings, "cli")
        try:
            meta = CommandMeta(actor=OPERATOR, correlation_id=f"cli-{datetime.now().timestamp()}")
            request = audit_cmd.Rebuild(meta=meta, until=until)
            return await CommandClient(bus).call(
                "audit", "rebuild", request, audit_cmd.RebuildReport, timeout=3600
            )
        finally:
            await bus.close()

    report = asyncio.run(work())
    state = report.after
    print(f"audit: the trail as of {until.astimezone(UTC).isoformat()} is in schema {report.schema}")
    print(
        f"audit: rebuilt  entries={state.entries} orgs={state.orgs} digest={state.digest} "
        f"(up to stream seq {state.stream_seq}, {report.seconds:.2f}s); the live trail is unchanged"
    )
    return 0
