"""Signed checkpoints and retention: the use cases that make truncation and deletion visible.

The notary signs each org's chain head when it moved (every `checkpoint_interval_s`, and on
demand), applies retention (a signed `retention` checkpoint first, then the deletion of the
prefix it covers), re-applies recorded retention after a rebuild, and verifies the trail
against its checkpoints. One instance's loop may race another's: every write is idempotent
(checkpoints are keyed by org, kind and seq; sweeps take an advisory lock).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec

from services.audit.adapters.checkpoints import CheckpointStore
from services.audit.adapters.signing import CheckpointSigner
from services.audit.config import AuditSettings
from services.audit.domain import HEAD, ChainBreak, Checkpoint, CheckpointedVerifier, Marks
from services.audit.domain.checkpoint import due, stamp
from services.kit.tasks import stop_task

log = logging.getLogger(__name__)


class Verification(msgspec.Struct, frozen=True):
    broken: ChainBreak | None
    checkpoints: int
    newest: Checkpoint | None
    signing: bool  # a key is configured: checkpoints are being made

    def note(self) -> str:
        if self.newest is None:
            return "no signed checkpoints yet" if self.signing else "checkpoints are off (no signing key)"
        return (
            f"{self.checkpoints} signed checkpoints hold, newest {stamp(self.newest.at)} "
            f"({self.newest.org_id} up to seq {self.newest.seq})"
        )


class Signed(msgspec.Struct, frozen=True):
    heads: list[Checkpoint]
    retention: list[Checkpoint]


class Notary:
    def __init__(
        self, checkpoints: CheckpointStore, signer: CheckpointSigner, settings: AuditSettings
    ) -> None:
        self.checkpoints, self.signer, self.settings = checkpoints, signer, settings
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()  # held by a rebuild: no checkpoint of a half-rebuilt chain

    # -- lifecycle (a host component, started after the audit store) ------------------------
    async def start(self) -> None:
        await self.checkpoints.create()
        if self.signer.can_sign:
            log.info("audit checkpoints are signed with key %s", self.signer.key_id)
        else:
            log.warning("audit checkpoints are off: no signing key (GATEHOUSE_AUDIT_SIGNING_KEY)")
        if self.signer.can_sign and self.settings.checkpoint_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="audit-notary")

    async def stop(self) -> None:
        await stop_task(self._task, patience_s=5)
        self._task = None

    # -- use cases --------------------------------------------------------------------------
    async def sign(self, sweep: bool = True, now: datetime | None = None) -> Signed:
        """Applies retention (when configured and `sweep`), then signs every head that moved."""
        if not self.signer.can_sign:
            return Signed([], [])
        now = now or datetime.now(UTC)
        async with self._busy:
            retention: list[Checkpoint] = []
            if sweep and self.settings.retention_days > 0:
                cutoff = now - timedelta(days=self.settings.retention_days)
                retention = await self.checkpoints.sweep(cutoff, now, self.signer.sign)
                for cp in retention:
                    log.info(
                        "audit retention: %s entries up to seq %d deleted, hash %s",
                        cp.org_id,
                        cp.seq,
                        cp.hash,
                    )
            heads, newest = await self.checkpoints.heads_and_newest()
            made = [
                self.signer.sign(Checkpoint(org_id=h.org_id, seq=h.seq, hash=h.hash, at=now, kind=HEAD))
                for h in heads
                if due(h, newest.get(h.org_id))
            ]
            await self.checkpoints.record(made)
            for cp in made:  # a copy outside the database, for whoever keeps logs elsewhere
                log.info(
                    "audit checkpoint %s seq %d hash %s key %s signature %s",
                    cp.org_id,
                    cp.seq,
                    cp.hash,
                    cp.key_id,
                    cp.signature,
                )
            return Signed(made, retention)

    async def verify(self) -> Verification:
        """The first problem of any chain, checked against every checkpoint, or none."""
        async with self.checkpoints.snapshot() as (checkpoints, heads, entries):
            marks = Marks(checkpoints)
            verifier = CheckpointedVerifier(marks)
            broken = verifier.check_signatures(checkpoints, self.signer.problem_with)
            if broken is None:
                async for entry in entries:
                    broken = verifier.check(entry)
                    if broken is not None:
                        break
                else:
                    broken = verifier.finish(heads)
        return Verification(broken, marks.count, marks.newest_overall(), self.signer.can_sign)

    @contextlib.asynccontextmanager
    async def rebuilding(self) -> AsyncIterator[None]:
        """Around a rebuild: nothing is signed meanwhile, and recorded retention is re-applied after."""
        async with self._busy:
            yield
            removed = await self.checkpoints.reapply()
            if removed:
                log.info("audit rebuild: retention re-applied, %d entries deleted again", removed)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval_s)
            try:
                await self.sign()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("audit checkpoint round failed: %r", err)
