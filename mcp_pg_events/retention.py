"""Retention: expired events go, partitions are kept ahead of the sequence, ended sessions end.

The work is the SQL procedure ``mcp_events_retention`` (migration 0002), so that
``mcp-pg-events retention``, this module and a ``pg_cron`` job do exactly the same
thing. It commits after every step, so a run may be killed at any point: the
next one finishes the job. This module adds what SQL cannot do well: a Python
API with a typed report, progress from the procedure's NOTICEs, and a dry run
inside a read-only transaction, which proves that it changes nothing.

What goes, oldest first, is always a prefix of the sequence and of every stream,
so a surviving replay cursor never has a hole after it: a cursor whose event is
gone gives ``None`` (expired), never a partial replay.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from . import metrics, sql
from .database import Database, check_schema, connect_one
from .dsn import resolve_dsn
from .settings import RetentionSettings

if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.pool import PoolConnectionProxy
    from typing_extensions import Unpack

    from .settings import RetentionOptions

    _Conn: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

logger = logging.getLogger(__name__)

# The procedure's NOTICEs count in plurals ("created 1 partitions ahead"): one reads as one.
_ONE = re.compile(r"\b1 ((?:expired |empty )?(?:partition|event|stream|session|worker|task|row))s\b")


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


@dataclass(frozen=True)
class RetentionReport:
    """What a run did (or, with ``dry_run``, would do).

    Attributes:
        locked_out: another run held the lock; nothing was done.
        dry_run: nothing was changed; the numbers say what would go.
        complete: False when a lock was not granted in time and some work was
            left for the next run.
        partitions_dropped: whole partitions detached and dropped, including
            ones a killed run had left detached.
        rows_deleted: events deleted row by row (expired ones in partitions that
            stay, and those of ended sessions); not the rows of dropped partitions.
        bytes_freed: the dropped partitions' size, plus the size of the deleted
            rows (an estimate: that space is reused after VACUUM, not returned).
        streams_removed: streams left empty, or of ended sessions.
        sessions_removed: sessions left with no stream.
        partitions_created: partitions created ahead of the sequence.
        rolled_over_to: the seq the sequence jumped to (roll-over by time), or None.
        seconds: how long the run took.
    """

    locked_out: bool
    dry_run: bool
    complete: bool
    partitions_dropped: int
    rows_deleted: int
    bytes_freed: int
    streams_removed: int
    sessions_removed: int
    partitions_created: int
    rolled_over_to: int | None
    seconds: float

    @property
    def outcome(self) -> str:
        """``locked_out``, ``dry_run``, ``complete`` or ``incomplete`` (a lock not granted in time)."""
        if self.locked_out:
            return "locked_out"
        if self.dry_run:
            return "dry_run"
        return "complete" if self.complete else "incomplete"

    def summary(self) -> str:
        """One line for a log."""
        if self.locked_out:
            return "another retention run holds the lock on this database: nothing done"
        done = (
            ("to drop", "to delete", "to remove", "would free")
            if self.dry_run
            else ("dropped", "deleted", "removed", "freed")
        )
        line = (
            f"{'dry run' if self.dry_run else 'retention'} in {self.seconds:.1f}s: "
            f"{counted(self.partitions_dropped, 'partition')} {done[0]}, "
            f"{counted(self.rows_deleted, 'row')} {done[1]}, "
            f"{counted(self.streams_removed, 'stream')} and "
            f"{counted(self.sessions_removed, 'session')} {done[2]}, "
            f"{done[3]} {format_bytes(self.bytes_freed)}"
        )
        if self.rolled_over_to is not None:
            line += f"; {'would roll' if self.dry_run else 'rolled'} over to seq {self.rolled_over_to}"
        if self.partitions_created:
            line += f"; {counted(self.partitions_created, 'partition')} created ahead"
        if not self.complete:
            line += "; a lock was not granted in time, the rest is left for the next run"
        return line


def counted(count: int, noun: str) -> str:
    """``1 stream``, ``2,000 rows``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@asynccontextmanager
async def _connection(target: Database | asyncpg.Pool[Any] | str | None) -> AsyncIterator[_Conn]:
    if isinstance(target, Database):
        target = target.pool
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as borrowed:
            yield borrowed
        return
    conn = await connect_one(resolve_dsn(target))
    try:
        yield conn
    finally:
        # Closing also releases the run's advisory lock if the CALL failed.
        await conn.close()


async def run_retention(
    target: Database | asyncpg.Pool[Any] | str | None = None,
    *,
    settings: RetentionSettings | None = None,
    dry_run: bool = False,
    progress: Callable[[str], object] | None = None,
    **options: Unpack[RetentionOptions],
) -> RetentionReport:
    """Run retention once on a database; return what it did.

    Args:
        target: the store's ``Database``, an asyncpg pool (one connection is
            borrowed for the run), or a DSN; ``$MCP_PG_EVENTS_DSN``, else
            ``$DATABASE_URL``, when None.
        settings: what goes and how gently (``RetentionSettings``: ``ttl``,
            ``batch_size``, ``ended_grace``, ``partition_max_age``,
            ``partitions_ahead``, ``lock_timeout``); ``options`` override single
            fields. What neither gives comes from ``MCP_PG_EVENTS_<NAME>``, else
            the default.
        dry_run: only report what would go, in a read-only transaction.
        progress: called with a line of text at every step (each partition,
            each batch).
    """
    settings = RetentionSettings.from_env(**options) if settings is None else settings.replace(**options)

    def forward(conn: object, message: asyncpg.PostgresLogMessage) -> None:
        if progress is not None:
            progress(_ONE.sub(r"1 \1", str(message.message)))

    started = time.monotonic()
    try:
        report = await _run(target, settings, dry_run, forward, started)
    except Exception:
        metrics.retention_failed(time.monotonic() - started)
        raise
    metrics.retention_ran(report)
    logger.info("%s", report.summary())
    return report


async def _run(
    target: Database | asyncpg.Pool[Any] | str | None,
    settings: RetentionSettings,
    dry_run: bool,
    forward: Callable[[object, asyncpg.PostgresLogMessage], None],
    started: float,
) -> RetentionReport:
    async with _connection(target) as conn:
        # Retention on an older schema would find no procedure, on a newer one
        # might do the wrong thing.
        await check_schema(conn)
        await conn.execute(sql.NO_STATEMENT_TIMEOUT)
        args = (
            settings.ttl,
            settings.batch_size,
            settings.ended_grace,
            settings.partition_max_age,
            settings.partitions_ahead,
            settings.lock_timeout,
            dry_run,
        )
        conn.add_log_listener(forward)
        try:
            if dry_run:
                async with conn.transaction(readonly=True):
                    row = await conn.fetchrow(sql.RETENTION, *args)
            else:
                row = await conn.fetchrow(sql.RETENTION, *args)
        finally:
            conn.remove_log_listener(forward)
    assert row is not None
    return RetentionReport(
        locked_out=row["locked_out"],
        dry_run=dry_run,
        complete=row["complete"],
        partitions_dropped=row["partitions_dropped"],
        rows_deleted=row["rows_deleted"],
        bytes_freed=row["bytes_freed"],
        streams_removed=row["streams_removed"],
        sessions_removed=row["sessions_removed"],
        partitions_created=row["partitions_created"],
        rolled_over_to=row["rolled_over_to"],
        seconds=time.monotonic() - started,
    )


async def end_session(target: asyncpg.Pool[Any] | _Conn, session_key: str) -> None:
    """Mark the session ``session_key`` ended, now; a no-op for an unknown or already ended one.

    Retention then deletes its events once ``ended_grace`` has passed, whatever
    the TTL. Appending to an ended session still works, but those events go too.
    """
    await target.execute(sql.END_SESSION, session_key, None)
