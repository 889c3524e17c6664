"""Which recorded build events become public facts, and in what shape.

Prompts, environment values and output never leave the dispatcher's store: the facts carry
counts, names, exit codes and errors. `Build.Attached` (the worker's pid) is bookkeeping.
"""

from typing import Any

import msgspec

from contracts.events import builds as ev
from services.kit.outbox import Outgoing

_SERVICE_META: dict[str, Any] = {"actor": {"kind": "service", "id": "dispatcher"}}


def _ended(oid: str, e: Any, user_id: str) -> msgspec.Struct:
    steps = int(getattr(e, "steps", 0))
    if e.status == "completed":
        return ev.BuildCompleted(
            build_id=oid,
            user_id=user_id,
            exit_code=e.exit_code,
            steps=steps,
            finished_at=e.finished_at,
            log_lines=e.log_lines,
        )
    if e.status == "failed":
        return ev.BuildFailed(
            build_id=oid,
            user_id=user_id,
            exit_code=e.exit_code,
            error=e.error or "the build failed",
            steps=steps,
            finished_at=e.finished_at,
            log_lines=e.log_lines,
        )
    actor = (getattr(e, "meta", None) or {}).get("actor") or {}
    return ev.BuildCanceled(
        build_id=oid, user_id=user_id, steps=steps, finished_at=e.finished_at, by=str(actor.get("id", ""))
    )


def _payload(kind: str, oid: str, e: Any) -> msgspec.Struct | None:
    meta = getattr(e, "meta", None) or {}
    user_id = str(meta.get("user_id", ""))
    if kind == "Build.Queued":
        return ev.BuildQueued(
            build_id=oid,
            user_id=e.user_id,
            agent=e.agent,
            prompts=len(e.prompts),
            env_names=sorted(e.env),
            queued_at=e.queued_at,
        )
    if kind == "BuildRefusal.Refused":
        return ev.BuildRefused(
            user_id=e.user_id, agent=e.agent, key_name=e.key_name, reason=e.reason, refused_at=e.refused_at
        )
    if kind == "Build.Started":
        return ev.BuildStarted(build_id=oid, user_id=user_id, node=e.node, started_at=e.started_at)
    if kind == "Build.StepFinished":
        s = e.step
        return ev.BuildStepFinished(
            build_step_id=f"{oid}:{s['index']}",
            build_id=oid,
            user_id=user_id,
            index=s["index"],
            status=s["status"],
            exit_code=s["exit_code"],
            duration_ms=s["duration_ms"],
            started_at=s["started_at"],
            finished_at=s["finished_at"],
            error=s.get("error"),
            outcome="success" if s["status"] == "completed" else "failure",
        )
    if kind == "Build.Finished":
        return _ended(oid, e, user_id)
    return None


def translate(event: Any) -> Outgoing | None:
    oid = str(event.originator_id)
    payload = _payload(type(event).__qualname__, oid, event)
    if payload is None:
        return None
    meta: dict[str, Any] = getattr(event, "meta", None) or _SERVICE_META
    return Outgoing(payload, meta.get("org_id") or getattr(event, "org_id", None), meta)
