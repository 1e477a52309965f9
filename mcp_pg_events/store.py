"""The PostgreSQL event store and its per-session views.

``PostgresEventStore`` owns (or borrows) the connection pool and does the I/O;
``SessionEventStore`` is the ``EventStore`` the SDK talks to, one per MCP
session. The SDK hands a single store to every session and never says which
session is calling, while it reuses stream ids (``"1"``, ``"_GET_stream"``)
across sessions: a store keyed by stream id alone would replay one session's
events to another. So the root store refuses to act as an ``EventStore`` itself.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, NamedTuple

import asyncpg
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from . import sql
from .config import redact, resolve_dsn
from .errors import (
    ConfigurationError,
    SchemaNotReadyError,
    StoreUnavailableError,
    StreamIdTooLongError,
    UnscopedEventStoreError,
)
from .event_ids import format_event_id, new_tag, parse_event_id
from .messages import dump_message, event_message
from .retry import Backoff, is_transient
from .schema import EVENTS, SCHEMA_REVISION

logger = logging.getLogger("mcp_pg_events")

# A btree entry must stay well under PostgreSQL's ~2.7 kB limit.
MAX_STREAM_ID_BYTES = 2048
MAX_SESSION_KEY_LENGTH = 512
# Streams whose key, tag and lock a session view keeps in memory.
MAX_CACHED_STREAMS = 256

_NOT_MIGRATED = (
    "the mcp-pg-events tables are missing or outdated in this database: "
    "run `mcp-pg-events migrate` (or `alembic upgrade head`) first"
)


class _Stream:
    """What a view knows of one of its streams. ``lock`` orders appends in-process."""

    __slots__ = ("key", "last_seq", "lock", "tag", "users")

    def __init__(self) -> None:
        self.key: int | None = None
        self.tag = ""
        self.last_seq = 0
        self.lock = asyncio.Lock()
        # Appends holding or waiting for the lock: a stream in use is never evicted.
        self.users = 0


class _UnsureAppend(NamedTuple):
    """An append sent on the connection of server process ``pid`` after seq ``after``."""

    pid: int
    after: int


def _encode_stream_id(stream_id: str) -> bytes:
    # surrogatepass: a JSON string may hold a lone surrogate, and so may a request id.
    name = stream_id.encode("utf-8", "surrogatepass")
    if len(name) > MAX_STREAM_ID_BYTES:
        raise StreamIdTooLongError(
            f"stream id is {len(name)} bytes long; the store indexes at most {MAX_STREAM_ID_BYTES}"
        )
    return name


def _not_migrated(exc: BaseException) -> bool:
    return isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError))


def _no_partition(exc: BaseException) -> bool:
    # "no partition of relation ... found for row": a check violation (23514) on the
    # events table with no constraint named. Matched on fields, not on the message,
    # which the server translates to its lc_messages.
    return (
        isinstance(exc, asyncpg.CheckViolationError)
        and getattr(exc, "table_name", None) == EVENTS
        and getattr(exc, "constraint_name", None) is None
    )


class PostgresEventStore(EventStore):
    """A durable MCP event store on PostgreSQL, shared by every session of a server.

    Give it to ``PostgresSessionManager`` (or ``scope_sessions`` a manager that
    already holds it), which calls ``session(key)`` for each MCP session. Used
    directly as an ``EventStore`` it raises ``UnscopedEventStoreError``.

    Args:
        pool: an asyncpg pool. The store borrows it and never closes it.
        retry_deadline: seconds for which a transient database error (restart,
            failover, dropped connection) is retried with backoff before
            ``store_event`` gives up with ``StoreUnavailableError``. The SDK ends
            a session whose store raises, so this is the outage a session survives.
        replay_batch_size: rows fetched per query while replaying; bounds the
            memory a replay holds, whatever the length of the stream.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        retry_deadline: float = 30.0,
        replay_batch_size: int = 500,
    ) -> None:
        if retry_deadline < 0:
            raise ConfigurationError(f"retry_deadline must be >= 0, got {retry_deadline}")
        if replay_batch_size < 1:
            raise ConfigurationError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        self._pool = pool
        self._owns_pool = False
        self.retry_deadline = retry_deadline
        self.replay_batch_size = replay_batch_size

    @classmethod
    async def connect(
        cls,
        dsn: str | None = None,
        *,
        min_pool_size: int = 1,
        max_pool_size: int = 10,
        check_schema: bool = True,
        retry_deadline: float = 30.0,
        replay_batch_size: int = 500,
    ) -> PostgresEventStore:
        """Open a pool that the store owns and closes.

        Args:
            dsn: ``postgresql://`` DSN; ``$MCP_PG_EVENTS_DSN``, else
                ``$DATABASE_URL``, when None.
            min_pool_size: connections kept open.
            max_pool_size: connections at most.
            check_schema: fail now, with a clear message, when the database has
                not been migrated, rather than at the first event.
            retry_deadline: see the class.
            replay_batch_size: see the class.
        """
        dsn = resolve_dsn(dsn)
        try:
            pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
                dsn, min_size=min_pool_size, max_size=max_pool_size
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailableError(f"cannot reach the database at {redact(dsn)}: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise ConfigurationError(f"cannot connect to {redact(dsn)}: {exc}") from exc
        store = cls(pool, retry_deadline=retry_deadline, replay_batch_size=replay_batch_size)
        store._owns_pool = True
        try:
            if check_schema:
                await store.check_schema()
        except BaseException:
            await pool.close()
            raise
        return store

    async def check_schema(self) -> None:
        """Raise ``SchemaNotReadyError`` unless the database is migrated to this code's revision."""
        try:
            version = await self._pool.fetchval(sql.SCHEMA_VERSION)
        except asyncpg.UndefinedTableError as exc:
            raise SchemaNotReadyError(_NOT_MIGRATED) from exc
        if version != SCHEMA_REVISION:
            raise SchemaNotReadyError(f"{_NOT_MIGRATED} (found revision {version}, need {SCHEMA_REVISION})")

    async def close(self) -> None:
        """Close the pool if the store opened it."""
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> PostgresEventStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def session(self, key: str) -> SessionEventStore:
        """The ``EventStore`` of the session ``key``: it sees only that session's events."""
        return SessionEventStore(self, key)

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        raise UnscopedEventStoreError(_UNSCOPED)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        raise UnscopedEventStoreError(_UNSCOPED)

    async def _append(self, session_key: str, stream_id: str, stream: _Stream, data: bytes | None) -> EventId:
        """Append one event and return its id once committed. Caller holds ``stream.lock``."""
        backoff: Backoff | None = None
        # An append whose answer was lost: it may have committed, or may still.
        unsure: _UnsureAppend | None = None
        needs_partition = False
        repairs = 0
        while True:
            try:
                if needs_partition:
                    await self._pool.fetchval(sql.ENSURE_PARTITIONS)
                    needs_partition = False
                if stream.key is None:
                    await self._resolve_stream(session_key, stream_id, stream)
                assert stream.key is not None
                seq = None
                if unsure is not None:
                    seq = await self._committed_seq(stream.key, unsure, data)
                    unsure = None
                if seq is None:
                    async with self._pool.acquire() as conn:
                        unsure = _UnsureAppend(conn.get_server_pid(), stream.last_seq)
                        seq = await conn.fetchval(sql.APPEND, stream.key, data)
                    unsure = None
            except Exception as exc:
                if isinstance(exc, asyncpg.PostgresError) and not is_transient(exc):
                    unsure = None  # the server refused the statement: nothing was written
                if repairs < 3 and (_no_partition(exc) or isinstance(exc, asyncpg.ForeignKeyViolationError)):
                    # No partition for the new seq yet (maintenance is late), or retention
                    # removed the stream row while it was empty: repair, then append again.
                    repairs += 1
                    needs_partition = _no_partition(exc)
                    if not needs_partition:
                        stream.key = None
                    continue
                if _not_migrated(exc):
                    raise SchemaNotReadyError(_NOT_MIGRATED) from exc
                if not is_transient(exc):
                    raise
                logger.warning("store_event: transient database error, retrying: %r", exc)
                backoff = backoff or Backoff(self.retry_deadline)
                if not await backoff.wait():
                    raise StoreUnavailableError(
                        f"event not stored: database unavailable for {self.retry_deadline:.1f}s "
                        f"({backoff.attempts} attempts): {exc}"
                    ) from exc
                continue
            stream.last_seq = seq
            return format_event_id(stream.key, seq, stream.tag)

    async def _resolve_stream(self, session_key: str, stream_id: str, stream: _Stream) -> None:
        name = _encode_stream_id(stream_id)
        row = await self._pool.fetchrow(sql.UPSERT_STREAM, session_key, name, new_tag())
        assert row is not None
        stream.key, stream.tag, stream.last_seq = row["id"], row["tag"], row["last_seq"] or 0

    async def _committed_seq(self, stream_key: int, unsure: _UnsureAppend, data: bytes | None) -> int | None:
        """The seq of an append whose answer was lost, if it committed; None if it never will.

        Its server process may still be running (waiting for the stream's lock, or
        for a slow disk) and commit later: end it first, so that what the stream
        holds afterwards is final. A stream has one writer at a time (the caller
        holds its lock), so a row past the last acknowledged one, with the same
        message, can only be that append.
        """
        ended = await self._pool.fetchval(sql.END_BACKEND, unsure.pid)
        if ended is False:
            raise asyncpg.InterfaceError(f"the server process {unsure.pid} of a lost append did not end yet")
        row = await self._pool.fetchrow(sql.LAST_EVENT, stream_key)
        if row is not None and row["seq"] > unsure.after and row["message"] == data:
            return int(row["seq"])
        return None

    async def _replay(
        self, session_key: str, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        ref = parse_event_id(last_event_id)
        if ref is None:
            logger.debug("replay: %r is not an event id of this store", last_event_id[:80])
            return None
        name = await self._fetch_with_retries(
            sql.CURSOR_STREAM, ref.stream_key, ref.seq, ref.tag, session_key, one_value=True
        )
        if name is None:
            logger.debug("replay: cursor %s is unknown, expired or not this session's", last_event_id)
            return None
        after = ref.seq
        # Read until a short page: this also picks up what was appended while we
        # were sending, which narrows the SDK's replay-to-live gap.
        while True:
            rows = await self._fetch_with_retries(
                sql.REPLAY_PAGE, ref.stream_key, after, self.replay_batch_size
            )
            for seq, data in rows:
                await send_callback(event_message(data, format_event_id(ref.stream_key, seq, ref.tag)))
            if len(rows) < self.replay_batch_size:
                break
            after = rows[-1]["seq"]
        return bytes(name).decode("utf-8", "surrogatepass")

    async def _fetch_with_retries(self, query: str, *args: Any, one_value: bool = False) -> Any:
        backoff = Backoff(self.retry_deadline)
        while True:
            try:
                if one_value:
                    return await self._pool.fetchval(query, *args)
                return await self._pool.fetch(query, *args)
            except Exception as exc:
                if _not_migrated(exc):
                    raise SchemaNotReadyError(_NOT_MIGRATED) from exc
                if not is_transient(exc) or not await backoff.wait():
                    raise


_UNSCOPED = (
    "PostgresEventStore is shared by all sessions and cannot be used as one session's EventStore: "
    "the SDK reuses stream ids across sessions. Pass it to PostgresSessionManager(app, event_store=store), "
    "call scope_sessions(server.session_manager), or use store.session(key)."
)


class SessionEventStore(EventStore):
    """The ``EventStore`` of one session: it stores and replays that session's streams only.

    Made by ``PostgresEventStore.session(key)``; cheap, and safe to make again for
    the same key (another view of the same session, e.g. in another process).
    """

    def __init__(self, root: PostgresEventStore, key: str) -> None:
        if not isinstance(key, str) or not key or len(key) > MAX_SESSION_KEY_LENGTH or "\x00" in key:
            raise ValueError(
                f"session key must be a non-empty string of at most {MAX_SESSION_KEY_LENGTH} "
                "characters without NUL"
            )
        self._root = root
        self.key = key
        self._streams: dict[str, _Stream] = {}

    def __repr__(self) -> str:
        return f"SessionEventStore(key={self.key!r})"

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        """Store ``message`` (None for a priming event) and return its id once committed."""
        data = None if message is None else dump_message(message)
        stream = self._streams.get(stream_id)
        if stream is None:
            if len(self._streams) >= MAX_CACHED_STREAMS:
                self._forget_idle_streams()
            stream = self._streams[stream_id] = _Stream()
        stream.users += 1
        try:
            async with stream.lock:
                return await self._root._append(self.key, stream_id, stream, data)
        finally:
            stream.users -= 1

    def _forget_idle_streams(self) -> None:
        # Every request of a session is a stream of its own: keep the cache bounded.
        # A forgotten stream is looked up again on its next append; its order is
        # still safe, the database serializes appends per stream.
        idle = [stream_id for stream_id, stream in self._streams.items() if not stream.users]
        for stream_id in idle[: MAX_CACHED_STREAMS // 2]:
            del self._streams[stream_id]

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        """Send this session's events after ``last_event_id`` on its stream; return the stream id.

        Returns None for an id that is malformed, unknown, expired or another
        session's; the stream id, even when nothing follows the cursor.
        """
        return await self._root._replay(self.key, last_event_id, send_callback)
