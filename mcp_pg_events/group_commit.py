"""Group commit: concurrent appends share one multi-row INSERT and one commit.

The SDK awaits every ``store_event`` before it delivers the message, so a commit
(a WAL flush) per event would bound every session's throughput. Appends that
arrive while a batch is being written wait and go together in the next one; a
lone append is written at once, so light load adds no latency. Each caller is
answered only after its batch committed, with its own seq.

Order: a stream never has two appends in flight (the caller holds the stream's
in-process lock until it is answered, and a batch takes ``pg_advisory_xact_lock``
on each of its streams before ``nextval``, against other processes), so within
a stream seq order is commit order and a reader resuming after seq ``n`` cannot
miss an event committed later with a smaller seq.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import asyncpg

from . import metrics, sql
from .database import NOT_MIGRATED, Backoff, Database, answer_lost, no_partition, not_migrated
from .errors import SchemaNotReadyError
from .settings import StoreSettings
from .wakeups import Notifier

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)


class StreamGoneError(Exception):
    """The stream row was removed (retention) while the stream was idle: resolve it again."""


class _Append:
    __slots__ = ("after", "data", "future", "stream_key")

    def __init__(self, stream_key: int, data: bytes | None, after: int, future: asyncio.Future[int]) -> None:
        self.stream_key = stream_key
        self.data = data
        # The stream's newest acknowledged seq: tells a lost answer's row from older ones.
        self.after = after
        self.future = future


class GroupCommitWriter:
    """Writes appends in shared transactions on up to ``max_inflight`` connections.

    Args:
        db: where connections come from, and the retry policy.
        notifier: told which streams changed after each commit.
        settings: ``max_batch``, ``max_batch_bytes``, ``max_inflight``,
            ``max_pending``, ``writer_linger`` and ``synchronous_commit`` (see ``StoreSettings``).
    """

    def __init__(self, db: Database, notifier: Notifier | None, settings: StoreSettings) -> None:
        self._db = db
        self._notifier = notifier
        self._max_batch = settings.max_batch
        self._max_batch_bytes = settings.max_batch_bytes
        self._max_inflight = settings.max_inflight
        self._linger = settings.writer_linger
        self._synchronous_commit = settings.synchronous_commit
        # Appends queued or in flight, and the signal that there is room for more.
        self._max_pending = settings.max_pending
        self._pending = 0
        self._room = asyncio.Event()
        self._queue: deque[_Append] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections kept between batches while appends keep coming: acquiring and
        # releasing one per batch costs up to a round trip more (asyncpg's reset
        # query). They go back to the pool after ``writer_linger`` seconds without
        # use, so a pool closed under an idle store is not kept waiting.
        self._connections: list[PoolConnectionProxy[Any]] = []
        self._last_write = 0.0
        self._release_timer: asyncio.TimerHandle | None = None

    async def append(self, stream_key: int, data: bytes | None, after: int) -> int:
        """Write one event and return its seq once committed.

        The caller must not append to ``stream_key`` again before this returns.
        Raises ``StreamGoneError`` when the stream row no longer exists.
        """
        while self._pending >= self._max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending += 1
        try:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._queue.append(_Append(stream_key, data, after, future))
            if self._inflight == 0:
                # Alone: write in the caller's own task, saving the hops through a
                # new task; whoever arrives meanwhile is handed to a drain task.
                self._inflight += 1
                await self._drain(inline=True)
            elif self._inflight < self._max_inflight:
                self._spawn_drain()
            return await future
        finally:
            self._pending -= 1
            self._room.set()

    async def close(self) -> None:
        """Wait for the batches in flight and give the writer's connections back."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        connections, self._connections = self._connections, []
        for conn in connections:
            await self._db.release(conn)

    def _keep(self, conn: PoolConnectionProxy[Any]) -> None:
        self._connections.append(conn)
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        if self._release_timer is None:
            self._release_timer = loop.call_later(self._linger, self._release_idle)

    def _release_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self._last_write
        if idle_for < self._linger:
            self._release_timer = loop.call_later(self._linger - idle_for, self._release_idle)
            return
        self._release_timer = None
        connections, self._connections = self._connections, []
        for conn in connections:
            task = loop.create_task(self._db.release(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _spawn_drain(self) -> None:
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, *, inline: bool = False) -> None:
        try:
            while self._queue:
                batch = self._take_batch()
                try:
                    await self._write(batch)
                except Exception as exc:  # a bug of ours must not leave callers waiting forever
                    logger.exception("store_event: writing a batch failed")
                    self._fail(batch, exc, None)
                if inline:
                    break
        finally:
            self._inflight -= 1
            if self._queue and self._inflight < self._max_inflight:
                self._spawn_drain()

    def _take_batch(self) -> list[_Append]:
        batch: list[_Append] = []
        # Two appends to one stream (two views of a session) go in separate batches,
        # so that each row of a batch is told apart by its stream.
        later: list[_Append] = []
        keys: set[int] = set()
        size = 0
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            item = queue[0]
            if item.future.done():  # its caller was cancelled before it was written
                queue.popleft()
                continue
            length = len(item.data) if item.data is not None else 0
            if batch and size + length > self._max_batch_bytes:
                break
            queue.popleft()
            if item.stream_key in keys:
                later.append(item)
                continue
            keys.add(item.stream_key)
            batch.append(item)
            size += length
        queue.extendleft(reversed(later))
        return batch

    async def _write(self, batch: list[_Append]) -> None:
        backoff: Backoff | None = None
        # The server process of a batch whose answer was lost: it may have committed, or may still.
        unsure: int | None = None
        repairs = 0
        started = time.perf_counter()
        while batch:
            keys = [item.stream_key for item in batch]
            messages = [item.data for item in batch]
            conn: PoolConnectionProxy[Any] | None = None
            try:
                seqs = None
                if unsure is not None:
                    seqs = await self._committed_seqs(batch, unsure)
                    unsure = None
                if seqs is None:
                    conn = self._connections.pop() if self._connections else await self._db.acquire()
                    pid = conn.get_server_pid()
                    try:
                        rows = await conn.fetch(sql.APPEND_BATCH, keys, messages, self._synchronous_commit)
                    except Exception as exc:
                        if answer_lost(exc):
                            unsure = pid
                        raise
                    except asyncio.CancelledError:
                        # A lone append writes in its caller's task, and is cancelled
                        # with it: the connection still goes back (asyncpg cancels the
                        # statement), or the pool's close waits for it for ever.
                        await self._db.release(conn)
                        raise
                    self._keep(conn)
                    conn = None
                    seqs = {row[0]: row[1] for row in rows}
            except Exception as exc:
                transient = self._db.is_transient(exc, conn)
                if conn is not None:
                    await self._db.release(conn)  # the pool replaces it if it broke
                if repairs < 3 and no_partition(exc):
                    # Partition maintenance is late: create what the sequence needs, retry.
                    repairs += 1
                    created = await self._db.fetchval(sql.ENSURE_PARTITIONS, retry=False)
                    metrics.partitions_created(created or 0, "append")
                    logger.warning(
                        "store_event: no partition for the next events (is retention scheduled? it keeps "
                        "partitions ahead): created %s, retrying a batch of %d",
                        created,
                        len(batch),
                    )
                    continue
                if repairs < 3 and isinstance(exc, asyncpg.ForeignKeyViolationError):
                    repairs += 1
                    batch = await self._drop_gone_streams(batch)
                    continue
                if not_migrated(exc):
                    self._fail(batch, SchemaNotReadyError(NOT_MIGRATED), exc)
                    return
                if not transient:
                    if len(batch) > 1:
                        # One bad row (say, a message over a server limit) must not fail
                        # the other sessions' appends: write each on its own.
                        for item in batch:
                            await self._write([item])
                        return
                    self._fail(batch, exc, None)
                    return
                logger.warning("store_event: transient database error, retrying: %r", exc)
                backoff = backoff or self._db.backoff()
                if not await backoff.wait():
                    self._fail(batch, backoff.gave_up(exc, "event not stored: "), exc)
                    return
                metrics.retrying(exc)
                continue
            metrics.batch_committed(messages, time.perf_counter() - started)
            for item in batch:
                if not item.future.done():
                    item.future.set_result(seqs[item.stream_key])
            if self._notifier is not None:
                self._notifier.wake(keys)
            return

    @staticmethod
    def _fail(batch: list[_Append], error: BaseException, cause: BaseException | None) -> None:
        if cause is not None:
            error.__cause__ = cause
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    async def _drop_gone_streams(self, batch: list[_Append]) -> list[_Append]:
        """Fail the appends whose stream row is gone (their callers resolve it again); keep the rest."""
        rows = await self._db.fetch(sql.EXISTING_STREAMS, [item.stream_key for item in batch], retry=False)
        present = {row[0] for row in rows}
        kept = []
        for item in batch:
            if item.stream_key in present:
                kept.append(item)
            elif not item.future.done():
                item.future.set_exception(StreamGoneError(item.stream_key))
        return kept

    async def _committed_seqs(self, batch: list[_Append], pid: int) -> dict[int, int] | None:
        """The seqs of a batch whose answer was lost, if it committed; None if it never will.

        Its server process may still be running (waiting for a stream's lock, or
        for a slow disk) and commit later: end it first, so that what the streams
        hold afterwards is final. A batch commits whole, and each of its streams
        has no other append in flight, so the batch committed exactly when every
        stream's newest row is past its last acknowledged seq and holds its message.
        """
        ended = await self._db.fetchval(sql.END_BACKEND, pid, retry=False)
        if ended is False:
            raise asyncio.TimeoutError(f"the server process {pid} of a lost append did not end within 10 s")
        newest = {
            row["stream_key"]: row
            for row in await self._db.fetch(
                sql.NEWEST_EVENTS, [item.stream_key for item in batch], retry=False
            )
        }
        seqs = {}
        for item in batch:
            row = newest.get(item.stream_key)
            if row is None or row["seq"] <= item.after or row["message"] != item.data:
                return None
            seqs[item.stream_key] = int(row["seq"])
        return seqs
