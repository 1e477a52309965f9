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
import hashlib
import logging
from types import TracebackType
from typing import Any, NamedTuple

import asyncpg
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

from . import sql
from .config import connection_error, resolve_dsn
from .errors import (
    ConfigurationError,
    SchemaNotReadyError,
    StoreUnavailableError,
    StreamIdTooLongError,
    UnscopedEventStoreError,
)
from .event_ids import EventRef, format_event_id, new_tag, parse_event_id
from .group_commit import GroupCommitWriter, StreamGoneError
from .live import LiveTail, Subscription, ends_stream
from .messages import answered_request, dump_message, load_message, load_messages
from .retry import Backoff, is_transient
from .schema import NOT_MIGRATED, check_schema, not_migrated
from .wakeups import Notifier

logger = logging.getLogger("mcp_pg_events")

# A btree entry must stay well under PostgreSQL's ~2.7 kB limit: a longer stream
# id is indexed by its hash (see _stream_name).
INDEXED_STREAM_ID_BYTES = 2048
# A stream id is a client's JSON-RPC request id, read back on every resume: a
# longer one is refused (StreamIdTooLongError).
MAX_STREAM_ID_BYTES = 1024 * 1024
MAX_SESSION_KEY_LENGTH = 512
# Streams whose key, tag and lock a session view keeps in memory.
MAX_CACHED_STREAMS = 256


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


class _Cursor(NamedTuple):
    """A replay or subscription cursor that exists in its session."""

    ref: EventRef
    stream_name: str
    # The newest message at or before the cursor: a response there means the stream is over.
    last_message: bytes | None


def _stream_name(stream_id: str) -> tuple[bytes, bytes | None]:
    """The indexed name of a stream, and its id in full when the name is not the id itself."""
    # surrogatepass: a JSON string may hold a lone surrogate, and so may a request id.
    encoded = stream_id.encode("utf-8", "surrogatepass")
    if len(encoded) <= INDEXED_STREAM_ID_BYTES:
        return encoded, None
    if len(encoded) > MAX_STREAM_ID_BYTES:
        raise StreamIdTooLongError(
            f"stream id is {len(encoded)} bytes long; the store keeps at most {MAX_STREAM_ID_BYTES}"
        )
    # 0xFF never occurs in UTF-8, lone surrogates included: no id's own name starts
    # with it, so a hashed name never equals one.
    return b"\xff" + hashlib.sha256(encoded).digest(), encoded


def _valid_session_key(key: object) -> bool:
    if not isinstance(key, str) or not key or len(key) > MAX_SESSION_KEY_LENGTH or "\x00" in key:
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


async def keep_session_state(conn: asyncpg.Connection[Any]) -> None:
    """A pool ``reset`` that skips asyncpg's reset query.

    asyncpg runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    on every release: a server round trip after every query, which nearly
    doubles an append's latency. The store changes no session state (no SET,
    no LISTEN on pooled connections, only transaction-level advisory locks), so
    there is nothing to reset; asyncpg still rolls back a transaction left open.
    Pass it as ``reset=`` to a pool you give the store, if that holds for your
    other uses of the pool too.
    """


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
        replay_batch_size: rows fetched per query while replaying or tailing;
            bounds the memory a reader holds, whatever the length of the stream.
        listen_dsn: DSN of the one LISTEN connection (outside the pool) that
            wakes this process's live subscriptions. None: subscriptions poll
            every ``poll_interval`` only (for a pool behind PgBouncer in
            transaction mode, where LISTEN does not work).
        poll_interval: seconds between two catch-ups of every live subscription:
            the safety net for lost notifications, or the delivery delay
            without a listener.
        notify: send a wake-up notification after each commit, so that live
            readers in any process see new events at once. Off only if nothing
            subscribes; readers then see new events at their next poll.
        notify_interval: seconds between two wake-ups at least: a writer
            committing back to back sends one per interval, naming every stream
            that changed, so wake-ups cost the server little under load; the
            first after a quiet spell goes at once.
        max_batch: appends written in one INSERT (one commit) at most.
        max_inflight: batches written at once, each on its own pool connection.
        max_pending: appends queued or in flight at most; more callers wait
            (back-pressure when the database is slower than the writers).
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        retry_deadline: float = 30.0,
        replay_batch_size: int = 500,
        listen_dsn: str | None = None,
        poll_interval: float = 5.0,
        notify: bool = True,
        notify_interval: float = 0.0005,
        max_batch: int = 512,
        max_inflight: int = 2,
        max_pending: int = 10_000,
    ) -> None:
        if retry_deadline < 0:
            raise ConfigurationError(f"retry_deadline must be >= 0, got {retry_deadline}")
        for name, value in (
            ("replay_batch_size", replay_batch_size),
            ("max_batch", max_batch),
            ("max_inflight", max_inflight),
            ("max_pending", max_pending),
        ):
            if value < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {value}")
        if poll_interval <= 0:
            raise ConfigurationError(f"poll_interval must be > 0, got {poll_interval}")
        self._pool = pool
        self._owns_pool = False
        self.retry_deadline = retry_deadline
        self.replay_batch_size = replay_batch_size
        self._notifier = Notifier(pool, min_interval=notify_interval) if notify else None
        self._writer = GroupCommitWriter(
            pool,
            self._notifier,
            retry_deadline=retry_deadline,
            max_batch=max_batch,
            max_inflight=max_inflight,
            max_pending=max_pending,
        )
        self._listen_dsn = listen_dsn
        self._poll_interval = poll_interval
        self._tail: LiveTail | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str | None = None,
        *,
        min_pool_size: int = 1,
        max_pool_size: int = 10,
        check_schema: bool = True,
        listen: bool = True,
        listen_dsn: str | None = None,
        **options: Any,
    ) -> PostgresEventStore:
        """Open a pool that the store owns and closes.

        Args:
            dsn: ``postgresql://`` DSN; ``$MCP_PG_EVENTS_DSN``, else
                ``$DATABASE_URL``, when None.
            min_pool_size: connections kept open.
            max_pool_size: connections at most.
            check_schema: fail now, with a clear message, when the database has
                not been migrated, rather than at the first event.
            listen: keep a LISTEN connection for live subscriptions; False to
                poll only.
            listen_dsn: DSN of that connection when it must differ from ``dsn``
                (``dsn`` goes through PgBouncer in transaction mode, say).
            options: the class's other arguments (``retry_deadline``, ...).
        """
        dsn = resolve_dsn(dsn)
        try:
            pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
                dsn, min_size=min_pool_size, max_size=max_pool_size, reset=keep_session_state
            )
        except (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            ValueError,
        ) as exc:
            raise connection_error(dsn, exc) from exc
        try:
            store = cls(pool, listen_dsn=(listen_dsn or dsn) if listen else None, **options)
            store._owns_pool = True
            if check_schema:
                await store.check_schema()
        except BaseException:
            await pool.close()
            raise
        return store

    async def check_schema(self) -> None:
        """Raise ``SchemaNotReadyError`` unless the database is migrated to this code's revision."""
        await check_schema(self._pool)

    async def close(self) -> None:
        """End live subscriptions, finish the writes in flight, and close the pool if the store opened it."""
        if self._tail is not None:
            await self._tail.close()
        await self._writer.close()
        if self._notifier is not None:
            await self._notifier.close()
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

    async def end_session(self, key: str) -> None:
        """Mark the session ``key`` ended: retention deletes its events after its ended-session grace."""
        if _valid_session_key(key):  # no session can have any other key
            await self._query(sql.END_SESSION, key)

    @property
    def live_tail(self) -> LiveTail:
        """This store's listener and subscription registry, started by the first subscription."""
        if self._tail is None:
            self._tail = LiveTail(
                self._pool,
                listen_dsn=self._listen_dsn,
                poll_interval=self._poll_interval,
                page_size=self.replay_batch_size,
                retry_deadline=self.retry_deadline,
            )
        return self._tail

    async def _append(self, session_key: str, stream_id: str, stream: _Stream, data: bytes | None) -> EventId:
        """Append one event and return its id once committed. Caller holds ``stream.lock``."""
        for _ in range(3):
            if stream.key is None:
                name, full_name = _stream_name(stream_id)
                row = await self._query(sql.UPSERT_STREAM, session_key, name, new_tag(), full_name, row=True)
                stream.key, stream.tag, stream.last_seq = row["id"], row["tag"], row["last_seq"] or 0
            assert stream.key is not None
            try:
                seq = await self._writer.append(stream.key, data, stream.last_seq)
            except StreamGoneError:
                # Retention removed the stream row while it was empty: make it again.
                stream.key = None
                continue
            stream.last_seq = seq
            return format_event_id(stream.key, seq, stream.tag)
        raise StoreUnavailableError(f"event not stored: stream {stream_id!r} kept disappearing")

    async def _open_cursor(self, session_key: str, last_event_id: EventId) -> _Cursor | None:
        """The cursor, resolved, or None when it is not valid in this session."""
        ref = parse_event_id(last_event_id)
        if ref is None:
            logger.debug("replay: %r is not an event id of this store", last_event_id[:80])
            return None
        row = await self._query(sql.CURSOR_STREAM, ref.stream_key, ref.seq, ref.tag, session_key, row=True)
        if row is None:
            logger.debug("replay: cursor %s is unknown, expired or not this session's", last_event_id)
            return None
        return _Cursor(ref, bytes(row["name"]).decode("utf-8", "surrogatepass"), row["last_message"])

    async def _replay(
        self, session_key: str, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        cursor = await self._open_cursor(session_key, last_event_id)
        if cursor is None:
            return None
        ref = cursor.ref
        page = self.replay_batch_size

        def fetch(after: int) -> asyncio.Task[Any]:
            return asyncio.ensure_future(self._query(sql.REPLAY_PAGE, ref.stream_key, after, page))

        # Read until a short page (which also picks up what was appended while we
        # were sending), fetching the next page while this one is decoded and
        # sent: the database and the decoding then overlap, for two pages of memory.
        following: asyncio.Task[Any] | None = fetch(ref.seq)
        try:
            while following is not None:
                rows = await following
                following = fetch(rows[-1]["seq"]) if len(rows) == page else None
                messages = load_messages([row[1] for row in rows])
                for row, message in zip(rows, messages, strict=True):
                    await send_callback(
                        EventMessage(message, format_event_id(ref.stream_key, row[0], ref.tag))
                    )
        finally:
            if following is not None:
                following.cancel()
        return cursor.stream_name

    def _subscribe(self, session_key: str, last_event_id: EventId) -> Subscription:
        async def open_cursor() -> tuple[LiveTail, EventRef, str, bool] | None:
            cursor = await self._open_cursor(session_key, last_event_id)
            if cursor is None:
                return None
            last = cursor.last_message
            complete = last is not None and ends_stream(
                answered_request(load_message(last)), cursor.stream_name
            )
            return self.live_tail, cursor.ref, cursor.stream_name, complete

        return Subscription(open_cursor)

    async def _query(self, query: str, *args: Any, row: bool = False) -> Any:
        """Run a read (or an idempotent upsert), retrying transient errors up to the deadline."""
        backoff: Backoff | None = None
        while True:
            try:
                if row:
                    return await self._pool.fetchrow(query, *args)
                return await self._pool.fetch(query, *args)
            except Exception as exc:
                if not_migrated(exc):
                    raise SchemaNotReadyError(NOT_MIGRATED) from exc
                if not is_transient(exc):
                    raise
                backoff = backoff or Backoff(self.retry_deadline)
                if not await backoff.wait():
                    raise backoff.gave_up(exc) from exc


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
        if not _valid_session_key(key):
            raise ValueError(
                f"session key must be a non-empty string of at most {MAX_SESSION_KEY_LENGTH} "
                "characters, without NUL or lone surrogates (a text column holds neither)"
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

    def subscribe(self, last_event_id: EventId) -> Subscription:
        """Follow this session's stream of ``last_event_id`` live, from just after it.

        An async iterator of ``EventMessage``: the events that follow the cursor
        (as replay sends them), then each new one as it commits, from any process.
        It stops after the response that ends a request's stream, or when
        ``aclose()`` d. A cursor that is malformed, unknown, expired or another
        session's gives an empty iterator. ``await sub.open()`` tells which, up front.
        """
        return self._root._subscribe(self.key, last_event_id)
