"""Working ahead during a catch-up (a replay, or a restart after a long stop).

A projection that holds its lease is the only writer of its tables, so the CPU work of a
batch (decode, derive, encode the rows) does not have to wait for the batch before it to
be written: a `Stager` loaded from the tables once keeps its state in memory and stages
batch N+1 while PostgreSQL stores batch N. In a long catch-up the stager runs in a worker
process of its own, so this work and the writing use both cores of the machine.

If a write fails (a row the stager could not know of, the database away), the catch-up
ends and the staged batches are dropped; the durable consumer then applies the stream
batch by batch from the stored position, as in live operation.
"""

import asyncio
import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

import psycopg

from services.kit.redaction import register_secret, registered
from services.kit.stream_reader import Record


class Stager(Protocol):
    """Pure and picklable: stages batches given in stream order, each assuming the ones
    before it are written."""

    def stage(self, records: list[Record]) -> Any: ...


class Ahead(Protocol):
    async def stager(self, conn: psycopg.AsyncConnection[Any]) -> Stager:
        """A stager starting from what the tables hold now."""
        ...

    async def write(self, conn: psycopg.AsyncConnection[Any], staged: Any) -> None:
        """Stores a staged batch, in the transaction that also moves the position."""
        ...


_stager: Stager | None = None  # in a worker process: the one it was started with


def _worker_started(secrets: tuple[str, ...], stager: Stager) -> None:
    global _stager
    # Staging makes and drops ~20 objects a message and no reference cycles: the cyclic
    # collector only slowed it (by a third, measured), reference counting frees everything.
    gc.disable()
    for value in secrets:  # the worker redacts what the service does (passed over a pipe)
        register_secret(value)
    _stager = stager


def _stage_in_worker(messages: list[tuple[int, str, bytes]]) -> Any:
    assert _stager is not None
    return _stager.stage([Record(seq, subject, data, 0) for seq, subject, data in messages])


class StagingWorker:
    """One process that stages batches in the order they are given (a single worker, so the
    stager's state stays in one place); started by spawn: no fork of a threaded event loop."""

    def __init__(self, stager: Stager) -> None:
        self._pool = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_started,
            initargs=(registered(), stager),
        )

    def stage(self, records: list[Record]) -> "asyncio.Future[Any]":
        messages = [(r.seq, r.subject, r.data) for r in records]
        return asyncio.get_running_loop().run_in_executor(self._pool, _stage_in_worker, messages)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
