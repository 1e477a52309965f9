"""The PostgreSQL event store and its per-session views.

``PostgresEventStore`` is the composition root: it wires the database gateway,
the group-commit writer, the wake-up notifier, the listener, the live tail and
the event log, and owns their lifetime. ``SessionEventStore`` is the
``EventStore`` the SDK talks to, one per MCP session. The SDK hands a single
store to every session and never says which session is calling, while it reuses
stream ids (``"1"``, ``"_GET_stream"``) across sessions: a store keyed by stream
id alone would replay one session's events to another. So the root store refuses
to act as an ``EventStore`` itself.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from . import compat, sql
from .database import Database, keep_session_state
from .dsn import resolve_dsn
from .errors import UnscopedEventStoreError
from .event_ids import parse_event_id
from .event_log import MAX_SESSION_KEY_LENGTH, EventLog, StreamState, valid_session_key
from .group_commit import GroupCommitWriter
from .listener import Listener
from .live import LiveTail, Subscription
from .messages import dump_message
from .registry import SessionRegistry
from .settings import StoreSettings
from .wakeups import Notifier
from .workers import OrphanWatch, WorkerLease

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .settings import StoreOptions

__all__ = ["PostgresEventStore", "SessionEventStore", "keep_session_state"]

# Streams whose key, tag and lock a session view keeps in memory.
MAX_CACHED_STREAMS = 256
# FastMCP scopes whose session view a store keeps (their stream cache).
MAX_FASTMCP_VIEWS = 1024


class PostgresEventStore(EventStore):
    """A durable MCP event store on PostgreSQL, shared by every session of a server.

    Give it to ``PostgresSessionManager`` (or ``scope_sessions`` a manager that
    already holds it), which calls ``session(key)`` for each MCP session. Used
    directly as an ``EventStore`` it raises ``UnscopedEventStoreError``.

    Args:
        pool: an asyncpg pool, which the store borrows and never closes (create it
            with ``reset=keep_session_state``), or a ``Database`` it owns.
        settings: every knob (``StoreSettings``); ``options`` override single
            fields. What neither gives comes from ``MCP_PG_EVENTS_<NAME>``, else
            the default. A borrowed pool has no listener unless ``listen_dsn`` is
            given: live subscriptions then poll.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any] | Database,
        *,
        settings: StoreSettings | None = None,
        **options: Unpack[StoreOptions],
    ) -> None:
        settings = StoreSettings.from_env(**options) if settings is None else settings.replace(**options)
        self.settings = settings
        if isinstance(pool, Database):
            self._db = pool
        else:
            self._db = Database(pool, retry_deadline=settings.retry_deadline)
        self._notifier = (
            Notifier(self._db, min_interval=settings.notify_interval) if settings.notify else None
        )
        self._writer = GroupCommitWriter(self._db, self._notifier, settings)
        listen_dsn = settings.listen_dsn or (self._db.dsn if settings.listen else None)
        self._listener = (
            Listener(self._db, dsn=listen_dsn, ping_interval=settings.ping_interval) if listen_dsn else None
        )
        self._lease = WorkerLease(
            self._db,
            dsn=settings.listen_dsn,
            heartbeat_interval=settings.heartbeat_interval,
            grace=settings.worker_grace,
        )
        self._orphans = OrphanWatch(self._db, self._lease, self._notifier, settings.heartbeat_interval)
        self._tail: LiveTail | None = None
        self.log = EventLog(
            self._db,
            self._writer,
            lambda: self.live_tail,
            replay_batch_size=settings.replay_batch_size,
            worker=lambda: self._lease.id,
        )
        self.registry = SessionRegistry(self._db, self._listener, self._lease, settings)
        self._fastmcp_views: dict[str, SessionEventStore] = {}

    @classmethod
    async def connect(
        cls,
        dsn: str | None = None,
        *,
        settings: StoreSettings | None = None,
        **options: Unpack[StoreOptions],
    ) -> PostgresEventStore:
        """Open a pool that the store owns and closes.

        Args:
            dsn: ``postgresql://`` DSN; ``$MCP_PG_EVENTS_DSN``, else
                ``$DATABASE_URL``, when None.
            settings, options: as for the class (``StoreSettings``).
        """
        dsn = resolve_dsn(dsn)
        settings = StoreSettings.from_env(**options) if settings is None else settings.replace(**options)
        db = await Database.connect(
            dsn,
            min_size=settings.min_pool_size,
            max_size=settings.max_pool_size,
            retry_deadline=settings.retry_deadline,
        )
        try:
            store = cls(db, settings=settings)
            if settings.check_schema:
                await store.check_schema()
        except BaseException:
            await db.close()
            raise
        return store

    @property
    def database(self) -> Database:
        """The gateway every query of this store goes through."""
        return self._db

    async def check_schema(self) -> None:
        """Raise ``SchemaNotReadyError`` unless the database is at a revision this code runs on."""
        await self._db.check_schema()

    async def close(self) -> None:
        """End live subscriptions, finish the writes in flight, and close the pool if the store opened it."""
        await self.registry.stop(every_user=True)
        await self._orphans.close()
        if self._tail is not None:
            await self._tail.close()
        if self._listener is not None:
            await self._listener.close()
        await self._writer.close()
        if self._notifier is not None:
            await self._notifier.close()
        await self._db.close()

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
        """The ``EventStore`` of the MCP session ``key``: it sees only that session's events.

        ``key`` is one MCP session (its ``mcp-session-id``); a server's session manager
        needs ``scope_sessions`` / ``PostgresSessionManager``, which make one view per session.
        """
        return SessionEventStore(self.log, key)

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        """Refused (``UnscopedEventStoreError``), except from FastMCP's own session scoping.

        FastMCP's ``http_app(event_store=store)`` wraps the store per transport
        and calls it with stream ids that carry the transport's scope (a uuid):
        each scope is filed as a session of its own, so sessions stay apart and
        resume on the process that holds them. Another worker cannot adopt such a
        session (FastMCP keeps the scope in memory): ``with_postgres(server)``
        scopes FastMCP's sessions by their MCP session id instead.
        """
        scoped = compat.fastmcp_scope(stream_id)
        if scoped is None:
            raise UnscopedEventStoreError()
        scope, inner = scoped
        return await self._fastmcp_view(compat.FASTMCP_SESSION_PREFIX + scope).store_event(inner, message)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        """For FastMCP's own session scoping only: replay within the cursor's scope; None for any other."""
        ref = parse_event_id(last_event_id)
        if ref is None:
            return None
        key = await self._db.fetchval(sql.CURSOR_SESSION, ref.stream_key, ref.tag)
        if not isinstance(key, str) or not key.startswith(compat.FASTMCP_SESSION_PREFIX):
            return None
        stream_id = await self._fastmcp_view(key).replay_events_after(last_event_id, send_callback)
        if stream_id is None:
            return None
        # FastMCP drops the replay unless this names its own scope: a cursor of another scope replays nothing.
        return compat.fastmcp_stream_id(key.removeprefix(compat.FASTMCP_SESSION_PREFIX), stream_id)

    def _fastmcp_view(self, key: str) -> SessionEventStore:
        view = self._fastmcp_views.pop(key, None)
        if view is None:
            view = SessionEventStore(self.log, key)
            if len(self._fastmcp_views) >= MAX_FASTMCP_VIEWS:
                del self._fastmcp_views[next(iter(self._fastmcp_views))]
        self._fastmcp_views[key] = view  # newest last
        return view

    async def end_session(self, key: str) -> None:
        """End the session ``key`` for every worker; retention deletes its events after their grace."""
        await self.registry.end(key, None)

    @property
    def worker(self) -> WorkerLease:
        """This process's worker row and lease (taken while a session manager runs)."""
        return self._lease

    @property
    def orphans(self) -> OrphanWatch:
        """Ends the requests of dead workers that this store's subscriptions follow."""
        return self._orphans

    @property
    def listener(self) -> Listener | None:
        """This store's LISTEN connection, or None when subscriptions poll only."""
        return self._listener

    @property
    def live_tail(self) -> LiveTail:
        """This store's subscription registry, started by the first subscription."""
        if self._tail is None:
            self._tail = LiveTail(self._db, self._listener, self.settings, self._orphans)
        return self._tail


class SessionEventStore(EventStore):
    """The ``EventStore`` of one session: it stores and replays that session's streams only.

    Made by ``PostgresEventStore.session(key)``; cheap, and safe to make again for
    the same key (another view of the same session, e.g. in another process).
    """

    def __init__(self, log: EventLog, key: str) -> None:
        if not valid_session_key(key):
            raise ValueError(
                f"session key must be a non-empty string of at most {MAX_SESSION_KEY_LENGTH} "
                "characters, without NUL or lone surrogates (a text column holds neither)"
            )
        self._log = log
        self.key = key
        self._streams: dict[str, StreamState] = {}

    def __repr__(self) -> str:
        return f"SessionEventStore(key={self.key!r})"

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        """Store ``message`` (None for a priming event) and return its id once committed."""
        data = None if message is None else dump_message(message)
        stream = self._streams.get(stream_id)
        if stream is None:
            if len(self._streams) >= MAX_CACHED_STREAMS:
                self._forget_idle_streams()
            stream = self._streams[stream_id] = StreamState()
        stream.users += 1
        try:
            async with stream.lock:
                return await self._log.append(self.key, stream_id, stream, data)
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
        return await self._log.replay(self.key, last_event_id, send_callback)

    def subscribe(self, last_event_id: EventId) -> Subscription:
        """Follow this session's stream of ``last_event_id`` live, from just after it.

        An async iterator of ``EventMessage``: the events that follow the cursor
        (as replay sends them), then each new one as it commits, from any process.
        It stops after the response that ends a request's stream, or when
        ``aclose()`` d. A cursor that is malformed, unknown, expired or another
        session's gives an empty iterator. ``await sub.open()`` tells which, up front.
        """
        return self._log.subscribe(self.key, last_event_id)
