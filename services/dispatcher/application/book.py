"""The event-sourced store of builds: load, decide, save (synchronous)."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from eventsourcing.application import AggregateNotFoundError, Application

from services.dispatcher.domain import Agent, Build, BuildRefusal, Meta, NotFound, parse_build_id
from services.kit import deadline as deadlines
from services.kit.eventstore import retrying

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


class BuildBook(Application[uuid.UUID]):
    name = "dispatcher"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env=env)
        self.on_saved: Callable[[], None] = lambda: None

    def _save_in_time(self, *aggregates: Any) -> None:
        """Saves, unless the caller already stopped waiting (then it was told nothing happened)."""
        deadlines.check()
        self.save(*aggregates)

    def _notify(self, recordings: Any) -> None:  # called after every save
        super()._notify(recordings)
        self.on_saved()

    def queue(
        self,
        build_id: str,
        user_id: str,
        org_id: str,
        agent: str,
        prompts: list[str],
        env: dict[str, str],
        meta: Meta,
    ) -> Build:
        build = Build(
            build_id=build_id,
            user_id=user_id,
            org_id=org_id,
            agent=agent,
            prompts=prompts,
            env=env,
            queued_at=now(),
            meta={**meta, "org_id": org_id},
        )
        self._save_in_time(build)
        return build

    def refuse(self, user_id: str, org_id: str, agent: Agent, reason: str, meta: Meta) -> None:
        refusal = BuildRefusal(
            user_id=user_id,
            org_id=org_id,
            agent=agent.name,
            key_name=agent.key_name,
            reason=reason,
            refused_at=now(),
            meta={**meta, "org_id": org_id},
        )
        self._save_in_time(refusal)

    def get(self, build_id: str) -> Build:
        try:
            build: Build = self.repository.get(parse_build_id(build_id))
        except AggregateNotFoundError:
            raise NotFound(f"No build {build_id} belongs to you.") from None
        if not isinstance(build, Build):
            raise NotFound(f"No build {build_id} belongs to you.")
        return build

    def owned(self, build_id: str, user_id: str) -> Build:
        """Another user's build is answered exactly like one that does not exist."""
        build = self.get(build_id)
        if not build.owned_by(user_id):
            raise NotFound(f"No build {build_id} belongs to you.")
        return build

    def claim(self, build_id: str, node: str, meta: Meta) -> tuple[Build, bool, str | None]:
        def attempt() -> tuple[Build, bool, str | None]:
            build = self.get(build_id)
            before = build.version
            go, reason = build.claim(node, now(), meta)
            if build.version != before:
                self._save_in_time(build)
            return build, go, reason

        return retrying(attempt)

    def attach(self, build_id: str, node: str, pid: int, meta: Meta) -> tuple[Build, bool]:
        def attempt() -> tuple[Build, bool]:
            build = self.get(build_id)
            before = build.version
            go = build.attach(node, pid, meta)
            if build.version != before:
                self._save_in_time(build)
            return build, go

        return retrying(attempt)

    def step(self, build_id: str, node: str, step: dict[str, Any], meta: Meta) -> tuple[Build, bool, bool]:
        """(build, go, recorded now)."""

        def attempt() -> tuple[Build, bool, bool]:
            build = self.get(build_id)
            before = build.version
            go = build.record_step(node, step, meta)
            if build.version != before:
                self._save_in_time(build)
            return build, go, build.version != before

        return retrying(attempt)

    def finish(
        self,
        build_id: str,
        node: str | None,
        status: str,
        exit_code: int | None,
        error: str | None,
        log_lines: int,
        meta: Meta,
    ) -> tuple[Build, bool]:
        def attempt() -> tuple[Build, bool]:
            build = self.get(build_id)
            changed = build.finish(status, exit_code, error, now(), log_lines, meta, node=node)
            if changed:
                self._save_in_time(build)
            return build, changed

        return retrying(attempt)

    def cancel(self, build_id: str, user_id: str, meta: Meta) -> tuple[Build, bool]:
        def attempt() -> tuple[Build, bool]:
            build = self.owned(build_id, user_id)
            changed = build.cancel(now(), meta)
            if changed:
                self._save_in_time(build)
            return build, changed

        return retrying(attempt)

    def lose(self, build_id: str, why: str, meta: Meta) -> tuple[Build, bool]:
        def attempt() -> tuple[Build, bool]:
            build = self.get(build_id)
            changed = build.lose(now(), meta, why)
            if changed:
                self.save(build)
            return build, changed

        return retrying(attempt)
