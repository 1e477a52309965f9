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

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from . import sql
from .config import connection_error, resolve_dsn
from .errors import ConfigurationError
from .schema import check_schema

DEFAULT_TTL = timedelta(days=1)
DEFAULT_BATCH_SIZE = 2_000
DEFAULT_PARTITIONS_AHEAD = 2
# Roles other than the tables' owner may ask for at most 100 partitions ahead
# (migration 0003), and a roll-over asks for one more than this.
MAX_PARTITIONS_AHEAD = 99
DEFAULT_LOCK_TIMEOUT = timedelta(seconds=1)


# The whole run is one CALL: its steps commit one by one inside. A statement
# timeout meant for the application would cut a long run short (the CALL is one
# statement), so our own connection has none.
NO_STATEMENT_TIMEOUT = "SET statement_timeout = 0"

# $1 ttl, $2 batch size, $3 ended grace, $4 partition max age (NULL: a quarter of the ttl),
# $5 partitions ahead, $6 lock timeout, $7 dry run
RUN = """
CALL mcp_events_retention(
    ttl => $1, batch_size => $2, ended_grace => $3, partition_max_age => $4,
    partitions_ahead => $5, lock_timeout => $6, dry_run => $7
)
"""

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``7d``, ``1h30m``, ``500ms``, or a number of seconds."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        if not value or _DURATION_PART.sub("", value):
            raise ValueError(f"not a duration: {text!r} (expected e.g. 90s, 30m, 1h, 7d)") from None
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 90s, 30m, 1h, 7d)")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest of ``parse_duration``'s spellings, for messages: ``1h30m``, ``0s``."""
    left = round(value.total_seconds() * 1000)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


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
            f"{_n(self.partitions_dropped, 'partition')} {done[0]}, "
            f"{_n(self.rows_deleted, 'row')} {done[1]}, "
            f"{_n(self.streams_removed, 'stream')} and {_n(self.sessions_removed, 'session')} {done[2]}, "
            f"{done[3]} {format_bytes(self.bytes_freed)}"
        )
        if self.rolled_over_to is not None:
            line += f"; {'would roll' if self.dry_run else 'rolled'} over to seq {self.rolled_over_to}"
        if self.partitions_created:
            line += f"; {_n(self.partitions_created, 'partition')} created ahead"
        if not self.complete:
            line += "; a lock was not granted in time, the rest is left for the next run"
        return line


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.pool import PoolConnectionProxy

    _Conn: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]


@asynccontextmanager
async def _connection(target: asyncpg.Pool[Any] | str | None) -> AsyncIterator[_Conn]:
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as borrowed:
            yield borrowed
        return
    dsn = resolve_dsn(target)
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        # A PostgresError (a bad login, say) is left as it is: --loop retries it.
        raise connection_error(dsn, exc) from exc
    try:
        yield conn
    finally:
        # Closing also releases the run's advisory lock if the CALL failed.
        await conn.close()


async def run_retention(
    target: asyncpg.Pool[Any] | str | None = None,
    *,
    ttl: timedelta = DEFAULT_TTL,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ended_grace: timedelta = timedelta(0),
    partition_max_age: timedelta | None = None,
    partitions_ahead: int = DEFAULT_PARTITIONS_AHEAD,
    lock_timeout: timedelta = DEFAULT_LOCK_TIMEOUT,
    progress: Callable[[str], object] | None = None,
) -> RetentionReport:
    """Run retention once on a database; return what it did.

    Args:
        target: an asyncpg pool (one connection is borrowed for the run), or a
            DSN; ``$MCP_PG_EVENTS_DSN``, else ``$DATABASE_URL``, when None.
        ttl: events older than this go. Replaying from a cursor that went
            returns None, so this is how long a client may take to resume.
        dry_run: only report what would go, in a read-only transaction.
        batch_size: rows per delete transaction, and seqs per delete window;
            bounds how long each transaction holds its locks and how much WAL it
            writes at once.
        ended_grace: events of sessions ended (``end_session``) longer ago than
            this go too, whatever their age.
        partition_max_age: when the partition being written holds an event
            older than this, the sequence jumps to the next partition, so that
            low traffic still yields whole partitions to drop. Also how long
            expired events may wait for their partition to expire whole rather
            than be deleted row by row. None: a quarter of the ttl.
        partitions_ahead: partitions kept ready above the sequence, so appends
            never wait for one.
        lock_timeout: how long a detach, drop or roll-over waits for its lock
            before leaving the work to the next run. Appends queue behind a
            waiting DETACH, so keep it short.
        progress: called with a line of text at every step (each partition,
            each batch).
    """
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
    if not 1 <= partitions_ahead <= MAX_PARTITIONS_AHEAD:
        raise ConfigurationError(
            f"partitions_ahead must be between 1 and {MAX_PARTITIONS_AHEAD}, got {partitions_ahead}"
        )
    for name, value in (("ttl", ttl), ("ended_grace", ended_grace), ("partition_max_age", partition_max_age)):
        if value is not None and value < timedelta(0):
            raise ConfigurationError(f"{name} must not be negative, got -{format_duration(-value)}")
    if lock_timeout <= timedelta(0):
        raise ConfigurationError(f"lock_timeout must be more than 0, got {format_duration(lock_timeout)}")

    def forward(conn: object, message: asyncpg.PostgresLogMessage) -> None:
        if progress is not None:
            progress(str(message.message))

    started = time.monotonic()
    async with _connection(target) as conn:
        # Retention on an older schema would find no procedure, on a newer one
        # might do the wrong thing.
        await check_schema(conn)
        await conn.execute(NO_STATEMENT_TIMEOUT)
        args = (ttl, batch_size, ended_grace, partition_max_age, partitions_ahead, lock_timeout, dry_run)
        conn.add_log_listener(forward)
        try:
            if dry_run:
                async with conn.transaction(readonly=True):
                    row = await conn.fetchrow(RUN, *args)
            else:
                row = await conn.fetchrow(RUN, *args)
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
    await target.execute(sql.END_SESSION, session_key)
