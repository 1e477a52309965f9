"""PostgreSQL collaborators for ``rest_framework_mcp`` (PyPI ``djangorestframework-mcp-server``).

Its transport takes five pluggable collaborators; these keep them in the tables
the rest of the package uses, so that a Django project on PostgreSQL runs many
workers with no Redis, under one retention job::

    from mcp_pg_events.rest_framework import postgres_collaborators

    server = MCPServer(name="notes", **postgres_collaborators("notes"), ...)
    urlpatterns = [path("mcp/", server.async_urls)]

- ``PostgresSSEReplayBuffer``: a session's pushed events are a stream of its row in
  ``mcp_events_sessions``, written through the group-commit writer; event ids are
  the store's own (``{stream}-{seq}-{tag}``), unguessable, per-session monotonic.
- ``PostgresSSEBroker``: the GET stream of a session follows that stream from any
  worker, woken by the process's one LISTEN connection. Paired with the buffer,
  replay and live delivery are one read after one cursor: no gap, no duplicate.
- ``PostgresSubscriptionBroker``: topics are items of one stream per namespace,
  followed once per process and routed to subscriptions in-process.
- ``PostgresSessionStore``: the session's row, bound to its principal, with an
  idle window kept by ``last_active_at``.
- ``PostgresTaskStore``: ``mcp_events_tasks``, one row per task.

Where the database work runs. The asynchronous pieces use one event store per
process on a loop of its own (``engine.py``), so they work from any loop,
including a fresh one per call in sync workers. The synchronous stores run on
Django's own connection (``MCP_PG_EVENTS["DATABASE"]``) where that connection
serves: a sync view, a task worker, a management command. Two places it does
not: inside an ASGI request, Django keeps the thread's connection open until the
response ends, which for a GET stream or a subscription is its whole life (one
connection per open stream, or an exhausted pool); and inside a transaction,
whose commit (or rollback) would decide whether a task's progress is seen at
all. There they go through the engine's pool, which that process has open for
the asynchronous pieces anyway; the engine's thread does the I/O, so the event
loop of the async view is never blocked.

Importing this module needs no Django; the classes import the framework when
first used, inside a configured project.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from . import sql
from .batched import BatchedStream
from .database import DjangoConnection
from .dsn import DSN_ENV, FALLBACK_DSN_ENV, dsn_from_django
from .engine import Engine
from .errors import ConfigurationError
from .event_ids import format_event_id, new_tag, parse_event_id
from .event_log import StreamHead, StreamState, stream_name
from .live import StreamFollower
from .settings import RestFrameworkSettings, StoreSettings
from .store import PostgresEventStore

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# The stream of a session that holds what the server pushes to its GET stream.
SSE_STREAM = "rest_framework_mcp:sse"
# The session whose streams hold the topics, one stream per namespace. The space
# keeps it apart from every MCP session id (visible ASCII only), so no client can
# name it; and the session store reads only keys of its own shape.
TOPIC_SESSION = "rest_framework_mcp topics"
# What a client that resumes from an event retention removed gets first.
REPLAY_GAP_METHOD = "notifications/mcp_pg_events/replay_gap"
# The shape of the ids the session and task stores hand out, as the framework's own
# stores check it: anything else is a miss without a query.
_ID_SHAPE = re.compile(r"\A[A-Za-z0-9_-]{1,128}\Z")
# A broker's or buffer's session id: what an MCP session id can be (visible ASCII).
_SESSION_ID = re.compile(r"\A[\x21-\x7e]{1,512}\Z")
# Wrapped event ids the buffer minted lately, by which the paired broker knows a
# publish that is already in the table.
_MINTED_MEMORY = 4096
# Sessions whose last ownership check (its time by the database's clock) is kept,
# and for how long it serves as the start of a GET stream the check let in.
_SEEN_MEMORY = 4096
_SEEN_FOR = 60.0
_TERMINAL = ("completed", "failed", "cancelled")

# ASSUMES: notify_wrapper. With a replay buffer, MCPServer.notify records the
# payload and publishes {"_mcp_event_id": id, "_mcp_payload": payload} to the
# broker; the GET generator unwraps items of exactly that shape.
EVENT_ID_KEY = "_mcp_event_id"
PAYLOAD_KEY = "_mcp_payload"


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(namespace: str) -> str:
    return hashlib.sha256(namespace.encode()).hexdigest()[:12]


def under_asgi_request() -> bool:
    """True in a thread that serves a request of Django's ASGI handler.

    ASSUMES: asgi_request_thread. Django's ASGI handler runs each request inside
    asgiref's ``ThreadSensitiveContext``, whose context variable
    ``SyncToAsync.thread_sensitive_context`` ``sync_to_async`` copies into the
    thread it runs the sync code in; a WSGI thread, a worker, a command and
    ``runserver`` never set it.
    """
    from asgiref.sync import SyncToAsync

    return SyncToAsync.thread_sensitive_context.get(None) is not None


class PostgresEvents:
    """The database of a set of collaborators: the engine for async work, Django's connection for sync work.

    One per process is enough, and ``default_events()`` gives it, configured from
    the ``MCP_PG_EVENTS`` Django setting and the environment. Nothing connects
    before the first call.

    Args:
        settings: ``RestFrameworkSettings`` (the Django alias, a DSN, queue sizes, ...).
        store_settings: the event store's ``StoreSettings`` (pool size, retry
            deadline, poll interval, ...).
    """

    def __init__(
        self,
        settings: RestFrameworkSettings | None = None,
        store_settings: StoreSettings | None = None,
    ) -> None:
        self.settings = settings or RestFrameworkSettings.from_env()
        self.store_settings = store_settings or StoreSettings.from_env()
        self.engine = Engine(self._connect)
        self._django = DjangoConnection(
            self.settings.database, retry_deadline=self.store_settings.retry_deadline
        )
        self._minted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._minted_lock = threading.Lock()
        self._seen_live: collections.OrderedDict[str, tuple[Any, float]] = collections.OrderedDict()
        self._watched: set[_FollowedStream] = set()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_django(cls) -> PostgresEvents:
        """Configured from ``settings.MCP_PG_EVENTS``, a dict of upper-case setting names.

        Any field of ``RestFrameworkSettings`` or ``StoreSettings`` may be given;
        what is not comes from ``MCP_PG_EVENTS_<NAME>``, else the default.
        """
        from django.conf import settings as django_settings

        given = getattr(django_settings, "MCP_PG_EVENTS", None) or {}
        if not isinstance(given, dict):
            raise ConfigurationError("the MCP_PG_EVENTS setting must be a dict")
        ours = {f.upper() for f in RestFrameworkSettings.__dataclass_fields__}
        store = {f.upper() for f in StoreSettings.__dataclass_fields__}
        unknown = sorted(set(given) - ours - store)
        if unknown:
            raise ConfigurationError(f"MCP_PG_EVENTS: unknown setting {', '.join(unknown)}")
        return cls(
            RestFrameworkSettings.from_env(**{k.lower(): v for k, v in given.items() if k in ours}),
            StoreSettings.from_env(**{k.lower(): v for k, v in given.items() if k in store}),
        )

    def _explicit_dsn(self) -> str | None:
        return self.settings.dsn or os.environ.get(DSN_ENV) or None

    def dsn(self) -> str:
        """The event store's DSN: ``dsn``, else ``$MCP_PG_EVENTS_DSN``, else ``DATABASES[database]``."""
        explicit = self._explicit_dsn()
        if explicit:
            return explicit
        try:
            from django.conf import settings as django_settings

            databases = django_settings.DATABASES
        except Exception as exc:  # Django missing or not configured
            raise ConfigurationError(
                f"no database for mcp-pg-events: set MCP_PG_EVENTS['DSN'] or {DSN_ENV} "
                f"(or {FALLBACK_DSN_ENV} outside Django), or configure Django: {exc}"
            ) from None
        alias = self.settings.database
        if alias not in databases:
            raise ConfigurationError(
                f"MCP_PG_EVENTS['DATABASE'] is {alias!r}, which DATABASES does not define"
            )
        return dsn_from_django(alias, databases[alias])

    async def _connect(self) -> PostgresEventStore:
        return await PostgresEventStore.connect(self.dsn(), settings=self.store_settings)

    # --- synchronous statements ------------------------------------------------------------

    def _on_django(self) -> bool:
        # With a DSN of its own the event store may be another database than
        # Django's: then every statement goes where the events are.
        if self._explicit_dsn() or under_asgi_request():
            return False
        from django.db import connections

        connection = connections[self.settings.database]
        return connection.vendor == "postgresql" and not connection.in_atomic_block

    def fetchval(self, query: str, *args: Any) -> Any:
        """One value, from a synchronous caller (see the module's docstring for which connection)."""
        if self._on_django():
            return self._django.fetchval(query, *args)
        return self.engine.run(lambda store: store.database.fetchval(query, *args))

    def fetchrow_timed(self, query: str, *args: Any) -> tuple[Any, float]:
        """One row (or None), and ``time.monotonic()`` as soon as it arrived; from a synchronous caller."""
        if self._on_django():
            row = self._django.fetchrow(query, *args)
            return row, time.monotonic()

        async def timed(store: PostgresEventStore) -> tuple[Any, float]:
            row = await store.database.fetchrow(query, *args)
            return row, time.monotonic()

        return self.engine.run(timed)

    # --- when a session was last seen live, by the database's clock -----------------------

    def _saw_live(self, session_id: str, db_now: Any, arrived: float) -> None:
        with self._minted_lock:
            self._seen_live[session_id] = (db_now, arrived)
            self._seen_live.move_to_end(session_id)
            if len(self._seen_live) > _SEEN_MEMORY:
                self._seen_live.popitem(last=False)

    def _live_at(self, session_id: str, moment: float) -> Any:
        """The database's clock no later than local ``moment``, from the session's last ownership check.

        The check's ``now()`` is when its statement started; mapping the local
        time since its answer arrived onto it gives a moment that is, at most by
        one query's execution and half a round trip, earlier than ``moment``.
        None without a recent check in this process.
        """
        with self._minted_lock:
            seen = self._seen_live.get(session_id)
        if seen is None or not 0 <= moment - seen[1] <= _SEEN_FOR:
            return None
        return seen[0] + timedelta(seconds=moment - seen[1])

    def execute(self, query: str, *args: Any) -> int:
        """Run a statement from a synchronous caller; the number of rows it touched."""
        if self._on_django():
            return self._django.execute(query, *args)
        status: str = self.engine.run(lambda store: store.database.execute(query, *args))
        return int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0

    # --- ids the buffer minted ---------------------------------------------------------------

    def _remember(self, event_id: str) -> None:
        with self._minted_lock:
            self._minted[event_id] = None
            if len(self._minted) > _MINTED_MEMORY:
                self._minted.popitem(last=False)

    def _minted_here(self, event_id: object) -> bool:
        with self._minted_lock:
            return isinstance(event_id, str) and self._minted.pop(event_id, 0) is None

    # --- streams that survive retention ----------------------------------------------------

    def _watch(self, stream: _FollowedStream, store: PostgresEventStore) -> None:
        self._watched.add(stream)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_streams(store))

    def _unwatch(self, stream: _FollowedStream) -> None:
        self._watched.discard(stream)

    async def _watch_streams(self, store: PostgresEventStore) -> None:
        # Retention removes a stream that has stayed empty past the ttl; the next
        # append makes a new one, under a new key, which a follower of the old key
        # would never see. A poll finds the followed keys that are gone.
        try:
            while self._watched:
                await asyncio.sleep(store.settings.poll_interval)
                watched = list(self._watched)
                try:
                    rows = await store.database.fetch(sql.EXISTING_STREAMS, [s.key for s in watched])
                except Exception as exc:
                    logger.warning("could not check the followed streams, trying again later: %r", exc)
                    continue
                present = {row[0] for row in rows}
                for stream in watched:
                    if stream.key not in present and stream in self._watched:
                        try:
                            await stream.move(store)
                        except Exception as exc:
                            logger.warning("could not follow a re-created stream yet: %r", exc)
        finally:
            self._watcher = None


_default: PostgresEvents | None = None
_default_lock = threading.Lock()


def default_events() -> PostgresEvents:
    """The process's ``PostgresEvents``, from the ``MCP_PG_EVENTS`` Django setting and the environment."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PostgresEvents.from_django()
        return _default


class _FollowedStream:
    """A stream followed on the engine's loop from a cursor, across retention re-creating it.

    ``on_rows`` gets the raw rows, as ``EventLog.follow`` hands them.
    """

    def __init__(
        self,
        events: PostgresEvents,
        session_key: str,
        stream_name: str,
        head: StreamHead,
        on_rows: Callable[[list[tuple[int, bytes | None]]], None],
    ) -> None:
        self._events = events
        self._session_key = session_key
        self._name = stream_name
        self.key = head.key
        self.tag = head.tag
        self._on_rows = on_rows
        self.follower: StreamFollower | None = None
        self._start = head.last_seq

    def start(self, store: PostgresEventStore) -> None:
        self.follower = store.log.follow(StreamHead(self.key, self.tag, self._start), self._on_rows)
        self._events._watch(self, store)

    @property
    def after(self) -> int:
        return self.follower.after if self.follower is not None else self._start

    async def move(self, store: PostgresEventStore) -> None:
        """Follow the stream that replaced this one, from its first row (all of them are new)."""
        head = await store.log.stream_head(self._session_key, self._name, create=True)
        assert head is not None
        if self.follower is None or head.key == self.key:
            return
        paused = self.follower.paused
        store.log.unfollow(self.follower)
        logger.info("stream %s was re-created as %s: following the new one", self.key, head.key)
        self.key, self.tag = head.key, head.tag
        # A seq is global, so the new stream's rows all come after anything read.
        self.follower = store.log.follow(StreamHead(head.key, head.tag, 0), self._on_rows)
        if paused:
            self.follower.pause()

    def stop(self, store: PostgresEventStore) -> None:
        self._events._unwatch(self)
        if self.follower is not None:
            store.log.unfollow(self.follower)
            self.follower = None


# --- queues filled on the engine's loop, read on the consumer's ------------------------------


class _Outbox(asyncio.Queue[Any]):
    """A queue read on the loop that made it and filled from the engine's loop.

    ``push`` (engine's loop) hands items over with ``call_soon_threadsafe``;
    ``backlog`` counts what is pushed and not yet taken, each counter written by
    one thread only. When the backlog reaches ``limit`` the filler stops and
    calls ``wait_for_room``; the reader wakes it once it is down to half.
    """

    def __init__(self, engine: Engine, limit: int) -> None:
        super().__init__()
        self._engine = engine
        self._consumer = asyncio.get_running_loop()
        self.limit = limit
        self._pushed = 0
        self._taken = 0
        self._waiting: Callable[[], None] | None = None
        self.closed = False

    def backlog(self) -> int:
        return self._pushed - self._taken

    def over_limit(self) -> bool:
        return self.backlog() >= self.limit

    def push(self, items: list[Any]) -> bool:
        """Hand ``items`` to the reader; False when its loop is gone (the reader with it)."""
        self._pushed += len(items)
        try:
            self._consumer.call_soon_threadsafe(self._put_all, items)
        except RuntimeError:  # the consumer's loop closed
            self.closed = True
            return False
        return True

    def _put_all(self, items: list[Any]) -> None:
        for item in items:
            self.put_nowait(item)

    def wait_for_room(self, on_room: Callable[[], None]) -> None:
        """Call ``on_room`` on the engine's loop once the reader has taken half the backlog."""
        self._waiting = on_room
        # The reader may have drained before it could see the flag: look again.
        if self.backlog() <= self.limit // 2 and self._waiting is not None:
            self._waiting = None
            on_room()

    def get_nowait(self) -> Any:
        # asyncio.Queue.get() returns through get_nowait(): every take is counted here.
        item = super().get_nowait()
        self._taken += 1
        waiting = self._waiting
        if waiting is not None and self.backlog() <= self.limit // 2:
            self._waiting = None
            self._engine.call_soon(waiting)
        return item


# --- the replay buffer and the SSE broker ----------------------------------------------------


def _session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        raise ValueError(f"not an MCP session id: {str(session_id)[:80]!r}")
    return session_id


class _Appender:
    """Appends to the SSE streams of many sessions, one in flight per session (engine's loop)."""

    def __init__(self) -> None:
        self._streams: collections.OrderedDict[str, StreamState] = collections.OrderedDict()

    async def append(self, store: PostgresEventStore, session_id: str, data: bytes) -> str:
        state = self._streams.get(session_id)
        if state is None:
            state = self._streams[session_id] = StreamState()
            self._forget_idle()
        else:
            self._streams.move_to_end(session_id)
        state.users += 1
        try:
            async with state.lock:
                return await store.log.append(session_id, SSE_STREAM, state, data)
        finally:
            state.users -= 1

    def _forget_idle(self) -> None:
        # Keep the per-session state bounded; a forgotten session is looked up
        # again on its next append.
        while len(self._streams) > 4096:
            session_id, state = next(iter(self._streams.items()))
            if state.users:
                break
            del self._streams[session_id]


class _CursorState:
    __slots__ = ("expired", "seq")

    def __init__(self, seq: int, expired: bool) -> None:
        self.seq = seq
        self.expired = expired


async def _resolve_cursor(
    store: PostgresEventStore, session_id: str, last_event_id: str, head: StreamHead | None
) -> _CursorState | None:
    """Where a resume from ``last_event_id`` starts in the session's SSE stream; None if not its id."""
    ref = parse_event_id(last_event_id) if isinstance(last_event_id, str) else None
    if ref is None or (head is not None and ref.stream_key != head.key):
        logger.debug("SSE replay: %r is not an event id of this session", str(last_event_id)[:80])
        return None
    present = await store.database.fetchval(
        sql.STREAM_CURSOR, ref.stream_key, ref.seq, ref.tag, session_id, stream_name(SSE_STREAM)[0]
    )
    if present is None:
        logger.debug("SSE replay: %r is not an event id of this session", last_event_id)
        return None
    if not present:
        logger.warning("SSE replay: session %s resumes from %s, which retention removed", session_id, ref)
    return _CursorState(ref.seq, expired=not present)


def _gap_notice(last_event_id: str) -> dict[str, Any]:
    # Sent with the expired id as its own event id: the client's cursor stays
    # where it was (an empty id would reset it), and a resume from it says the
    # same again.
    return {"jsonrpc": "2.0", "method": REPLAY_GAP_METHOD, "params": {"lastEventId": last_event_id}}


def _decode(data: bytes | None) -> tuple[bool, Any]:
    if data is None:
        return False, None
    try:
        return True, json.loads(data)
    except ValueError:
        logger.error("a row of an SSE or topic stream is not JSON; skipped")
        return False, None


class PostgresSSEReplayBuffer:
    """``SSEReplayBuffer`` on the session's stream in ``mcp_events_events``.

    ``record`` returns once the event is committed, with an id of the store
    (``{stream}-{seq}-{tag}``): monotonic within a session, SSE-safe, and not
    guessable. Any JSON value is a payload. What a session holds is bounded by
    retention (the ttl, and ``forget``/``destroy``, which end the session), not
    by a count: it is on disk, not in memory.

    ``replay`` yields the events after ``after_id``. Paired with a
    ``PostgresSSEBroker`` (``PostgresSSEBroker(replay_buffer=...)``), when the
    transport replays on the GET that just subscribed, it yields nothing itself:
    it starts that subscription's queue at the cursor, so the replay and the live
    events arrive in one ordered read, with no event both replayed and pushed.

    ``after_id`` outside this session's stream (malformed, forged, another
    session's, a different store's) gives nothing, as an unknown id. An id of
    this stream whose event retention removed gives, first, one notification
    ``notifications/mcp_pg_events/replay_gap`` (``params.lastEventId``; no event
    id of its own), then the events still held after it: the client learns that
    events are missing, and re-reads its state (``replay_gap_notice`` off: no
    notification).
    """

    def __init__(self, *, events: PostgresEvents | None = None) -> None:
        self._events = events or default_events()
        self._appender = _Appender()
        self._broker: PostgresSSEBroker | None = None

    async def record(self, session_id: str, payload: Any) -> str:
        """Store ``payload`` in the session's stream; its event id, once committed."""
        session_id = _session_id(session_id)
        data = _json(payload)
        event_id = await self._events.engine.call(
            lambda store: self._appender.append(store, session_id, data)
        )
        self._events._remember(event_id)
        return event_id

    async def replay(self, session_id: str, after_id: str | None) -> AsyncIterator[tuple[str, Any]]:
        """The events after ``after_id``, as ``(event_id, payload)``; see the class."""
        if after_id is None or not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            return
        broker = self._broker
        queue = broker._claim(session_id) if broker is not None else None
        if queue is not None:
            await queue.open(after_id)
            return
        events = self._events
        page = events.store_settings.replay_batch_size
        cursor = await events.engine.call(lambda store: _resolve_cursor(store, session_id, after_id, None))
        if cursor is None:
            return
        if cursor.expired and events.settings.replay_gap_notice:
            yield after_id, _gap_notice(after_id)
        ref = parse_event_id(after_id)
        assert ref is not None
        after = cursor.seq
        while True:

            async def fetch(store: PostgresEventStore, after: int = after) -> list[Any]:
                return await store.database.fetch(sql.REPLAY_PAGE, ref.stream_key, after, page)

            rows = await events.engine.call(fetch)
            for seq, data in rows:
                decoded, payload = _decode(data)
                if decoded:
                    yield format_event_id(ref.stream_key, seq, ref.tag), payload
            if len(rows) < page:
                return
            after = rows[-1][0]

    async def forget(self, session_id: str) -> None:
        """End the session: retention removes its events after the ended-session grace."""
        if isinstance(session_id, str) and _SESSION_ID.match(session_id):
            await self._events.engine.call(lambda store: store.end_session(session_id))


class _SessionQueue(_Outbox):
    """One GET stream's queue: filled from the session's SSE stream, from the head or a cursor."""

    def __init__(self, broker: PostgresSSEBroker, session_id: str) -> None:
        events = broker._events
        super().__init__(events.engine, events.settings.sse_queue_size)
        self._events = events
        self._session_id = session_id
        self._wrap = broker._replay_buffer is not None
        self.task = asyncio.current_task()
        subscribed = time.monotonic()
        # Where "from now" is, asked at once: before the transport tells the client
        # that the stream is open.
        self._head = events.engine.submit(lambda store: self._find_head(store, subscribed))
        self._opening: asyncio.Future[None] | None = None
        self._stream: _FollowedStream | None = None
        self._store: PostgresEventStore | None = None

    @property
    def claimable(self) -> bool:
        return self._opening is None and self.task is asyncio.current_task()

    async def _find_head(self, store: PostgresEventStore, subscribed: float) -> StreamHead:
        # "From now" is the moment of subscribe(): the transport tells the client
        # the stream is open right after it, and the client may then cause an
        # event at once. That moment by the database's clock (created_at), or a
        # little earlier, is where the stream starts: events created from then on
        # are delivered. Two bounds, the later one wins: the database's clock at
        # this query less the time since subscribe() measured once its answer is
        # back (early by all of this query's wait); and the session's ownership
        # check, which the GET passed just before it subscribed (early by that
        # check's execution and half a round trip). Only an event pushed while no
        # stream was open can fall between.
        row = await store.database.fetchrow(
            sql.STREAM_NEWEST, self._session_id, stream_name(SSE_STREAM)[0], new_tag()
        )
        assert row is not None
        key, tag, now, newest, created_at = row
        opened = now - timedelta(seconds=time.monotonic() - subscribed)
        checked = self._events._live_at(self._session_id, subscribed)
        if checked is not None and checked > opened:
            opened = checked
        if newest is not None and created_at >= opened:
            newest = await store.database.fetchval(sql.STREAM_SEQ_BEFORE, key, opened)
        return StreamHead(key, tag, newest or 0)

    async def get(self) -> Any:
        if self._opening is None:
            await self.open(None)
        return await super().get()

    async def open(self, after_id: str | None) -> None:
        """Start filling, after ``after_id`` (a resume) or from the head; once, whoever asks first."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(
                self._events.engine.call(lambda s: self._start(s, after_id))
            )
        # A get() cancelled by the transport's keep-alive timeout must not cancel the start.
        await asyncio.shield(self._opening)

    async def _start(self, store: PostgresEventStore, after_id: str | None) -> None:
        head = await asyncio.wrap_future(self._head)
        if after_id is not None:
            cursor = await _resolve_cursor(store, self._session_id, after_id, head)
            if cursor is not None:
                if cursor.expired and self._events.settings.replay_gap_notice:
                    notice = _gap_notice(after_id)
                    self.push([{EVENT_ID_KEY: after_id, PAYLOAD_KEY: notice} if self._wrap else notice])
                head = StreamHead(head.key, head.tag, cursor.seq)
        if self.closed:
            return
        self._store = store
        self._stream = _FollowedStream(self._events, self._session_id, SSE_STREAM, head, self._on_rows)
        self._stream.start(store)

    def _on_rows(self, rows: list[tuple[int, bytes | None]]) -> None:
        stream = self._stream
        if stream is None or self.closed:
            return
        items = []
        for seq, data in rows:
            decoded, payload = _decode(data)
            if not decoded:
                continue
            if self._wrap:
                payload = {EVENT_ID_KEY: format_event_id(stream.key, seq, stream.tag), PAYLOAD_KEY: payload}
            items.append(payload)
        if items and not self.push(items):
            self._stop()
            return
        follower = stream.follower
        if follower is not None and self.over_limit():
            follower.pause()
            self.wait_for_room(follower.resume)

    def close(self) -> None:
        """From the reader's loop: stop filling."""
        self.closed = True
        self._head.cancel()
        self._events.engine.call_soon(self._stop)

    def _stop(self) -> None:
        self.closed = True
        if self._stream is not None and self._store is not None:
            self._stream.stop(self._store)
            self._stream = None


class PostgresSSEBroker:
    """``SSEBroker`` whose GET streams follow the session's stream in the database, on any worker.

    ``publish`` appends the payload to the session's stream and returns True once
    it is committed: every worker's GET stream for the session gets it (woken
    by the process's LISTEN connection; payloads of any size), and so does a
    later resume. With ``replay_buffer`` (a ``PostgresSSEReplayBuffer``), a
    publish of what that buffer just recorded writes nothing more, queue items
    carry their event ids, and a resume continues in the same read as the replay.
    True does not say that a client is connected somewhere: that would take a
    cross-process presence count. ``has_subscriber`` and ``active_streams`` count
    this worker's GET streams, as the framework's cap wants.

    A GET stream without ``Last-Event-ID`` starts with the events pushed from the
    moment it was opened (give or take the round trip of one query before it:
    an event pushed then went to no open stream, and is no duplicate). Its queue
    holds ``sse_queue_size`` events at most: a client that stops reading pauses
    the stream's reader in the database, and nothing is dropped.
    """

    def __init__(
        self, *, replay_buffer: PostgresSSEReplayBuffer | None = None, events: PostgresEvents | None = None
    ) -> None:
        self._events = events or (replay_buffer._events if replay_buffer is not None else default_events())
        self._replay_buffer = replay_buffer
        if replay_buffer is not None:
            replay_buffer._broker = self
        self._appender = replay_buffer._appender if replay_buffer is not None else _Appender()
        self._queues: dict[str, _SessionQueue] = {}

    def subscribe(self, session_id: str) -> asyncio.Queue[Any]:
        """A queue of what is pushed to the session from now (or from the cursor a replay gives)."""
        session_id = _session_id(session_id)
        queue = _SessionQueue(self, session_id)
        previous = self._queues.get(session_id)
        if previous is not None:
            previous.close()  # a session has one live subscriber per worker
        self._queues[session_id] = queue
        return queue

    def _claim(self, session_id: str) -> _SessionQueue | None:
        # ASSUMES: subscribe_then_replay. The transport's GET generator subscribes,
        # then replays, in the same task, before it reads the queue.
        queue = self._queues.get(session_id)
        return queue if queue is not None and queue.claimable else None

    def unsubscribe(self, session_id: str, queue: asyncio.Queue[Any]) -> None:
        if self._queues.get(session_id) is queue:
            del self._queues[session_id]
        if isinstance(queue, _SessionQueue):
            queue.close()

    async def publish(self, session_id: str, payload: Any) -> bool:
        """Append ``payload`` to the session's stream (unless the paired buffer did); True once committed."""
        session_id = _session_id(session_id)
        if (
            self._replay_buffer is not None
            and isinstance(payload, dict)
            and payload.keys() == {EVENT_ID_KEY, PAYLOAD_KEY}
            and self._events._minted_here(payload[EVENT_ID_KEY])
        ):
            return True
        data = _json(payload)
        await self._events.engine.call(lambda store: self._appender.append(store, session_id, data))
        return True

    def has_subscriber(self, session_id: str) -> bool:
        return session_id in self._queues

    @property
    def active_streams(self) -> int:
        return len(self._queues)


# --- the subscription broker -----------------------------------------------------------------


class _Subscription:
    """One subscription's place in the topic stream (engine's loop)."""

    def __init__(self, queue: _Outbox, topics: frozenset[str]) -> None:
        self.queue = queue
        self.topics = topics
        self.cursor = 0
        self.lagging: asyncio.Task[None] | None = None


class _TopicRouter:
    """The topic stream of a namespace, followed once per process, routed to subscriptions (engine's loop).

    A row is a JSON array of ``{"topic", "payload"}``: what many publishers
    append at once shares a row, so publishes are not one commit each.

    A subscription whose reader falls ``subscription_queue_size`` behind stops
    taking from the router and reads the stream itself from its cursor, at the
    reader's pace, until it has caught up; then it takes from the router again.
    Nothing is dropped and no reader stalls another.
    """

    def __init__(self, events: PostgresEvents, namespace: str) -> None:
        self._events = events
        self._name = namespace or "default"
        self._by_topic: dict[str, set[_Subscription]] = {}
        self._count = 0
        self._stream: _FollowedStream | None = None
        self._opening: asyncio.Future[None] | None = None
        self._store: PostgresEventStore | None = None
        self._rows = BatchedStream(TOPIC_SESSION, self._name)

    async def add(self, store: PostgresEventStore, subscription: _Subscription) -> None:
        if self._stream is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open(store))
            try:
                await asyncio.shield(self._opening)
            finally:
                if self._opening is not None and self._opening.done():
                    self._opening = None
        stream = self._stream
        assert stream is not None
        # Everything committed from here on has a larger seq than the router has
        # read (one append in flight per stream): the subscription is live.
        subscription.cursor = stream.after
        for topic in subscription.topics:
            self._by_topic.setdefault(topic, set()).add(subscription)
        self._count += 1

    async def _open(self, store: PostgresEventStore) -> None:
        head = await store.log.stream_head(TOPIC_SESSION, self._name, create=True)
        assert head is not None
        self._stream = _FollowedStream(self._events, TOPIC_SESSION, self._name, head, self._on_rows)
        self._stream.start(store)
        self._store = store

    def remove(self, subscription: _Subscription) -> None:
        found = False
        for topic in subscription.topics:
            subs = self._by_topic.get(topic)
            if subs is not None and subscription in subs:
                found = True
                subs.discard(subscription)
                if not subs:
                    del self._by_topic[topic]
        if subscription.lagging is not None:
            subscription.lagging.cancel()
        if found:
            self._count -= 1
        if self._count == 0 and self._stream is not None and self._store is not None:
            self._stream.stop(self._store)
            self._stream = None

    def subscribers(self, topic: str) -> int:
        return len(self._by_topic.get(topic, ()))

    def _on_rows(self, rows: list[tuple[int, bytes | None]]) -> None:
        for seq, data in rows:
            decoded, items = _decode(data)
            if not decoded or not isinstance(items, list):
                continue
            by_subscription: dict[_Subscription, list[Any]] = {}
            for item in items:
                if not isinstance(item, dict):
                    continue
                for subscription in self._by_topic.get(item.get("topic"), ()):  # type: ignore[arg-type]
                    by_subscription.setdefault(subscription, []).append(item.get("payload"))
            for subscription, payloads in by_subscription.items():
                self._offer(subscription, seq, payloads)

    def _offer(self, subscription: _Subscription, seq: int, payloads: list[Any]) -> None:
        if seq <= subscription.cursor or subscription.lagging is not None:
            return
        queue = subscription.queue
        if queue.closed:
            return
        if queue.backlog() and queue.backlog() + len(payloads) > queue.limit:
            subscription.cursor = seq - 1
            subscription.lagging = asyncio.get_running_loop().create_task(self._catch_up(subscription))
            return
        queue.push(payloads)
        subscription.cursor = seq

    async def _catch_up(self, subscription: _Subscription) -> None:
        store = self._store
        assert store is not None  # set when the router opened, before any subscription
        page = self._events.store_settings.replay_batch_size
        queue = subscription.queue
        try:
            while not queue.closed and self._stream is not None:
                try:
                    rows = await store.database.fetch(
                        sql.REPLAY_PAGE, self._stream.key, subscription.cursor, page
                    )
                except Exception as exc:
                    logger.warning("a lagging subscription could not read its topics, trying again: %r", exc)
                    await asyncio.sleep(self._events.store_settings.poll_interval)
                    continue
                for seq, data in rows:
                    decoded, items = _decode(data)
                    payloads = [
                        item.get("payload")
                        for item in (items if decoded and isinstance(items, list) else ())
                        if isinstance(item, dict) and item.get("topic") in subscription.topics
                    ]
                    if payloads:
                        while queue.over_limit() and not queue.closed:
                            room = asyncio.Event()
                            queue.wait_for_room(room.set)
                            await room.wait()
                        queue.push(payloads)
                    subscription.cursor = seq
                if (
                    len(rows) < page
                    and self._stream is not None
                    and self._stream.after <= subscription.cursor
                ):
                    return  # caught up: the router delivers what follows
        finally:
            subscription.lagging = None

    async def publish(self, store: PostgresEventStore, topic: str, payload: bytes) -> int:
        await self._rows.publish(store, payload)
        return self.subscribers(topic)


class PostgresSubscriptionBroker:
    """``SubscriptionBroker`` on one stream per namespace, routed in each process.

    ``subscribe`` returns once the subscription is live: anything published
    (committed) after it returns is delivered, by the LISTEN wake-up, or by the
    poll while the listener reconnects; payloads of any size. ``publish``
    returns once committed, with the number of this process's subscriptions to
    the topic (0 does not mean that no worker listens). Topics are matched
    exactly; a topic nobody subscribed to here is never routed here.
    ``active_subscriptions`` counts this process's.

    Args:
        namespace: the server's name: servers sharing a database do not hear
            each other's topics.
    """

    def __init__(self, *, namespace: str = "default", events: PostgresEvents | None = None) -> None:
        self._events = events or default_events()
        self._router = _TopicRouter(self._events, namespace)
        self._active: dict[int, _Subscription] = {}

    async def subscribe(self, topics: frozenset[str]) -> asyncio.Queue[Any]:
        queue = _Outbox(self._events.engine, self._events.settings.subscription_queue_size)
        if not topics:
            return queue  # nothing can arrive: no registration
        subscription = _Subscription(queue, frozenset(topics))
        await self._events.engine.call(lambda store: self._router.add(store, subscription))
        self._active[id(queue)] = subscription
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Any]) -> None:
        subscription = self._active.pop(id(queue), None)
        if subscription is not None:
            subscription.queue.closed = True
            self._events.engine.call_soon(self._router.remove, subscription)

    async def publish(self, topic: str, payload: Any) -> int:
        data = _json({"topic": topic, "payload": payload})
        return await self._events.engine.call(lambda store: self._router.publish(store, topic, data))

    @property
    def active_subscriptions(self) -> int:
        return len(self._active)


# --- the session store -----------------------------------------------------------------------


class PostgresSessionStore:
    """``SessionStore`` on ``mcp_events_sessions``: the row the session's SSE stream hangs from.

    A session is live while it is bound to a principal, not ended, used within
    the idle window and younger than the maximum age (``SESSION_TTL_SECONDS`` and
    ``SESSION_MAX_AGE_SECONDS`` of ``REST_FRAMEWORK_MCP``, or the arguments).
    ``owner`` records the activity (at most once per ``session_activity_interval``),
    which is also what keeps retention off an idle-looking session in use.
    ``destroy`` ends the session as the SDK integration does: its events go at
    retention's next run after the ended-session grace. Ids not of this store's
    shape (or namespace) are a miss without a query.

    Synchronous, as the protocol is: the framework's async views call it in a
    thread. See the module's docstring for which connection a call uses.
    """

    def __init__(
        self,
        *,
        namespace: str | None = None,
        ttl_seconds: float | None = None,
        max_age_seconds: float | None = None,
        events: PostgresEvents | None = None,
    ) -> None:
        from rest_framework_mcp.conf import get_setting

        self._events = events or default_events()
        self._prefix = "" if namespace is None else f"{_digest(namespace)}_"
        self._idle = float(ttl_seconds if ttl_seconds is not None else get_setting("SESSION_TTL_SECONDS"))
        max_age = max_age_seconds if max_age_seconds is not None else get_setting("SESSION_MAX_AGE_SECONDS")
        self._max_age = None if max_age is None else float(max_age)
        self._touch = self._events.settings.session_activity_interval.total_seconds()

    def _ours(self, session_id: object) -> bool:
        return (
            isinstance(session_id, str)
            and _ID_SHAPE.match(session_id) is not None
            and session_id.startswith(self._prefix)
        )

    def create(self, *, principal_id: str) -> str:
        session_id = self._prefix + secrets.token_urlsafe(24)
        self._events.execute(sql.SESSION_CREATE, session_id, principal_id)
        return session_id

    def exists(self, session_id: str) -> bool:
        if not self._ours(session_id):
            return False
        return bool(self._events.fetchval(sql.SESSION_EXISTS, session_id, self._idle, self._max_age))

    def owner(self, session_id: str) -> str | None:
        if not self._ours(session_id):
            return None
        row, arrived = self._events.fetchrow_timed(
            sql.SESSION_OWNER, session_id, self._idle, self._max_age, self._touch
        )
        if row is None:
            return None
        principal, db_now = row
        # A GET stream of this session may start here (see _SessionQueue._find_head).
        self._events._saw_live(session_id, db_now, arrived)
        return str(principal)

    def destroy(self, session_id: str) -> None:
        if self._ours(session_id):
            self._events.execute(sql.END_SESSION, session_id, "deleted")


# --- the task store --------------------------------------------------------------------------


# ASSUMES: task_record_fields. TaskRecord and Task are the framework's frozen
# dataclasses with exactly the fields mapped here (the mapping of its own
# DjangoCacheTaskStore); a field added by a release fails the pinning test.
_TASK_FIELDS = (
    ("taskId", "task_id"),
    ("createdAt", "created_at"),
    ("lastUpdatedAt", "last_updated_at"),
    ("ttlMs", "ttl_ms"),
    ("pollIntervalMs", "poll_interval_ms"),
    ("statusMessage", "status_message"),
    ("result", "result"),
    ("error", "error"),
    ("inputRequests", "input_requests"),
)
_RECORD_FIELDS = (
    ("toolName", "tool_name"),
    ("arguments", "arguments"),
    ("principalId", "principal_id"),
    ("userPk", "user_pk"),
    ("audience", "audience"),
    ("enqueued", "enqueued"),
    ("inputResponses", "input_responses"),
    ("progress", "progress"),
    ("total", "total"),
)


_REQUIRED = frozenset(("taskId", "status", "createdAt", "lastUpdatedAt", "toolName", "principalId"))


def encode_task(record: Any) -> bytes:
    """A ``TaskRecord`` as JSON bytes (a user pk that JSON lacks, such as a UUID, as Django encodes it)."""
    from django.core.serializers.json import DjangoJSONEncoder

    task = record.task
    value: dict[str, Any] = {wire: getattr(task, name) for wire, name in _TASK_FIELDS}
    value["status"] = task.status.value
    value.update({wire: getattr(record, name) for wire, name in _RECORD_FIELDS})
    value["scopes"] = list(record.scopes)
    return json.dumps(value, cls=DjangoJSONEncoder, separators=(",", ":")).encode()


def decode_task(data: bytes) -> Any:
    """The ``TaskRecord`` of ``encode_task``'s bytes; None for bytes it cannot trust (another version's)."""
    from rest_framework_mcp.constants import TaskStatus
    from rest_framework_mcp.protocol.types.task import Task
    from rest_framework_mcp.tasks.types.task_record import TaskRecord

    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or _REQUIRED - raw.keys():
            return None
        task = Task(status=TaskStatus(raw["status"]), **{name: raw.get(wire) for wire, name in _TASK_FIELDS})
        fields = {name: raw.get(wire) for wire, name in _RECORD_FIELDS}
        fields["arguments"] = fields["arguments"] or {}
        fields["input_responses"] = fields["input_responses"] or {}
        fields["enqueued"] = bool(fields["enqueued"])
        if not isinstance(task.task_id, str) or not isinstance(fields["principal_id"], str):
            return None
        return TaskRecord(task=task, scopes=tuple(raw.get("scopes") or ()), **fields)
    except (KeyError, ValueError, TypeError):
        return None


class PostgresTaskStore:
    """``TaskStore`` on ``mcp_events_tasks``.

    ``create`` returns once the task is committed, whatever transaction the
    caller is in. A task expires ``ttlMs`` after its creation (a task that asked
    for none, after ``task_ttl_fallback``): ``get`` then gives None and
    retention deletes it. ``save`` overwrites in place and keeps the expiry;
    it neither brings back an expired or deleted task nor changes the status
    of a finished one (completed, failed, cancelled), so a worker's late write
    cannot reopen a task cancelled in another process. Malformed ids are a miss
    without a query.

    Args:
        namespace: the server's name: servers sharing a database do not see
            each other's tasks.
    """

    def __init__(self, *, namespace: str = "", events: PostgresEvents | None = None) -> None:
        self._events = events or default_events()
        self._namespace = namespace

    def create(self, record: Any) -> None:
        ttl_ms = record.task.ttl_ms
        seconds = (
            ttl_ms / 1000 if ttl_ms is not None else self._events.settings.task_ttl_fallback.total_seconds()
        )
        self._events.execute(
            sql.TASK_CREATE,
            self._namespace,
            record.task_id,
            record.principal_id,
            record.task.status.value,
            encode_task(record),
            float(seconds),
        )

    def get(self, task_id: str) -> Any:
        if not isinstance(task_id, str) or not _ID_SHAPE.match(task_id):
            return None
        data = self._events.fetchval(sql.TASK_GET, self._namespace, task_id)
        return None if data is None else decode_task(bytes(data))

    def save(self, record: Any) -> None:
        self._events.execute(
            sql.TASK_SAVE,
            self._namespace,
            record.task_id,
            record.principal_id,
            record.task.status.value,
            encode_task(record),
        )

    def delete(self, task_id: str) -> None:
        if isinstance(task_id, str) and _ID_SHAPE.match(task_id):
            self._events.execute(sql.TASK_DELETE, self._namespace, task_id)


# --- wiring ----------------------------------------------------------------------------------


def postgres_collaborators(namespace: str, *, events: PostgresEvents | None = None) -> dict[str, Any]:
    """The ``MCPServer`` keyword arguments that keep everything in PostgreSQL.

    ``MCPServer(name="notes", **postgres_collaborators("notes"), task_executor=...)``:
    ``session_store``, ``sse_replay_buffer``, ``sse_broker`` (paired with the
    buffer), ``subscription_broker`` and ``task_store``, namespaced by
    ``namespace`` (use the server's name) and sharing ``events`` (default: the
    process's, from the ``MCP_PG_EVENTS`` setting).
    """
    events = events or default_events()
    buffer = PostgresSSEReplayBuffer(events=events)
    return {
        "session_store": PostgresSessionStore(namespace=namespace, events=events),
        "sse_replay_buffer": buffer,
        "sse_broker": PostgresSSEBroker(replay_buffer=buffer, events=events),
        "subscription_broker": PostgresSubscriptionBroker(namespace=namespace, events=events),
        "task_store": PostgresTaskStore(namespace=namespace, events=events),
    }


__all__ = [
    "REPLAY_GAP_METHOD",
    "PostgresEvents",
    "PostgresSSEBroker",
    "PostgresSSEReplayBuffer",
    "PostgresSessionStore",
    "PostgresSubscriptionBroker",
    "PostgresTaskStore",
    "default_events",
    "postgres_collaborators",
    "under_asgi_request",
]
