"""A ``SubscriptionBus`` on PostgreSQL: server events of the 2026-07-28 revision across replicas.

MCP 2026-07-28 (SEP-2575, mcp >= 2.3) has no sessions and no ``Last-Event-ID``:
a client opens ``subscriptions/listen`` and the server's ``ListenHandler``
forwards what its ``SubscriptionBus`` delivers. The SDK's bus is in-process, so
a ``resources/updated`` published by a tool on one replica never reaches a
client listening on another. This bus carries events through the database:

- ``publish`` appends the event to a stream of the events table (a reserved
  session, one stream per ``namespace``) and returns once it is committed.
  Publishes made at the same moment in one process share a row (and a commit).
- Every process follows that stream with its live tail (``live.py``), woken by
  the store's one LISTEN connection, and hands each event to its local
  listeners on the event loop. A listener that raises is logged; the others
  still get the event.
- The notification only says "look again"; the event is read from the row, so
  an event of any size arrives (NOTIFY carries less than 8000 bytes), and in
  the order each publisher committed it (one append in flight per stream).
- When the listener connection drops and comes back, the tail catches up from
  the last row it handed on: nothing published meanwhile is lost, as long as
  retention has not dropped it yet (events older than the store's ``ttl``).
  A plain pub/sub bus loses whatever was published while it reconnected.

The reserved session's key holds a space, which no MCP session id has (visible
ASCII only, and minted by the SDK); it is never registered, so no worker adopts
it, and a cursor resolves only inside the session that asked. No client can
resume, replay or follow the bus's stream. Retention drops its rows like any
other event's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import sql
from .batched import BatchedStream
from .event_log import StreamHead
from .live import StreamFollower

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .settings import StoreOptions
    from .store import PostgresEventStore

try:  # mcp >= 2.3: the 2026-07-28 revision's events
    from mcp.shared.subscriptions import (  # type: ignore[import-not-found, unused-ignore]
        ResourceUpdated,
        event_from_wire,
    )

    HAS_SUBSCRIPTIONS = True
except ImportError:  # pragma: no cover - depends on the installed SDK
    HAS_SUBSCRIPTIONS = False

logger = logging.getLogger(__name__)

# The session whose streams carry the bus's events, one stream per namespace.
BUS_SESSION = "mcp-pg-events subscription bus"

_WIRE_METHODS = {
    "ToolsListChanged": "notifications/tools/list_changed",
    "PromptsListChanged": "notifications/prompts/list_changed",
    "ResourcesListChanged": "notifications/resources/list_changed",
}


def encode_event(event: Any) -> bytes:
    """An event as its wire notification's method and params (what ``event_from_wire`` reads back)."""
    if HAS_SUBSCRIPTIONS and isinstance(event, ResourceUpdated):
        item: dict[str, Any] = {"method": "notifications/resources/updated", "params": {"uri": event.uri}}
    else:
        method = _WIRE_METHODS.get(type(event).__name__)
        if method is None:
            raise TypeError(f"not a server event of the subscription bus: {event!r}")
        item = {"method": method}
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()


def decode_events(data: bytes | None) -> list[Any]:
    """The events of one row (a JSON array of encoded events); what no SDK event reads is skipped."""
    if data is None:
        return []
    try:
        items = json.loads(data)
    except ValueError:
        return []
    events = []
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and isinstance(item.get("method"), str):
            params = item.get("params")
            event = event_from_wire(item["method"], params if isinstance(params, dict) else None)
            if event is not None:
                events.append(event)
    return events


class PostgresSubscriptionBus:
    """A ``SubscriptionBus`` (mcp >= 2.3) whose events reach every process on the same database.

    Made at import time, before any event loop::

        server = MCPServer("notes", subscriptions=PostgresSubscriptionBus())
        app = with_postgres(server)   # connects the bus in the app's lifespan

    or started by hand: ``await bus.start()`` opens a store of its own (from
    ``dsn``, else ``MCP_PG_EVENTS_DSN``), ``await bus.start(store)`` uses an open
    ``PostgresEventStore`` (its pool, its LISTEN connection) and leaves it open;
    ``await bus.close()`` stops it. ``PostgresSubscriptionBus.from_store(store)``
    makes one on an open store.

    ``subscribe`` works at any time; ``publish`` needs the bus started (it
    raises ``RuntimeError`` before). Filtering by the listen request stays the
    SDK's ``ListenHandler``'s job.

    Args:
        dsn: the database of a store the bus opens itself (None: the environment).
        namespace: servers sharing a database hear only the events of their own
            namespace (use the server's name).
        options: ``StoreSettings`` fields for a store the bus opens itself.
    """

    def __init__(
        self, dsn: str | None = None, *, namespace: str = "default", **options: Unpack[StoreOptions]
    ) -> None:
        if not HAS_SUBSCRIPTIONS:
            raise RuntimeError(
                "PostgresSubscriptionBus needs mcp >= 2.3, whose subscriptions/listen it feeds "
                "(the 2026-07-28 revision); this SDK has none"
            )
        if not namespace:
            raise ValueError("namespace must not be empty")
        self._dsn = dsn
        self._options = options
        self.namespace = namespace
        self._listeners: dict[object, Callable[[Any], None]] = {}
        self._store: PostgresEventStore | None = None
        self._owns_store = False
        self._follower: StreamFollower | None = None
        self._rows = BatchedStream(BUS_SESSION, namespace)
        self._watcher: asyncio.Task[None] | None = None
        # Events handed to local listeners, for tests and benchmarks to wait on.
        self.delivered = 0

    @classmethod
    async def from_store(
        cls, store: PostgresEventStore, *, namespace: str = "default"
    ) -> PostgresSubscriptionBus:
        """A bus started on an open store, which it borrows and leaves open."""
        bus = cls(namespace=namespace)
        await bus.start(store)
        return bus

    @property
    def started(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> PostgresEventStore | None:
        """The store the bus publishes through, once started."""
        return self._store

    async def start(self, store: PostgresEventStore | None = None) -> None:
        """Follow the bus's stream from now on: on ``store`` (borrowed), else on a store of its own.

        Idempotent; events committed before it returns are not delivered here.
        """
        if self._store is not None:
            return
        owns = store is None
        if store is None:
            from .store import PostgresEventStore

            store = await PostgresEventStore.connect(self._dsn, **self._options)
        try:
            head = await store.log.stream_head(BUS_SESSION, self.namespace, create=True)
            assert head is not None
        except BaseException:
            if owns:
                await store.close()
            raise
        self._store, self._owns_store = store, owns
        self._follow(head)
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_stream(), name="mcp-pg-events bus stream watch"
        )

    async def close(self) -> None:
        """Stop following, after the publishes in flight; close the store if the bus opened it."""
        store, self._store = self._store, None
        if store is None:
            return
        await self._rows.drain()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._follower is not None:
            store.log.unfollow(self._follower)
            self._follower = None
        if self._owns_store:
            await store.close()

    async def __aenter__(self) -> PostgresSubscriptionBus:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def subscribe(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        """Register ``listener`` for every event published from now on, by any process; returns an
        idempotent unsubscribe."""
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def publish(self, event: Any) -> None:
        """Make ``event`` visible to every process's listeners; returns once it is committed."""
        data = encode_event(event)
        if self._store is None:
            raise RuntimeError(
                "PostgresSubscriptionBus is not started: serve the app with_postgres(server) returns, "
                "or await bus.start() first"
            )
        await self._rows.publish(self._store, data)

    def _follow(self, head: StreamHead) -> None:
        assert self._store is not None
        self._follower = self._store.log.follow(head, self._on_rows)

    def _on_rows(self, rows: list[tuple[int, bytes | None]]) -> None:
        # On the tail's fetch task: the listeners only enqueue (ListenHandler's do).
        for _, data in rows:
            for event in decode_events(data):
                self.delivered += 1
                for listener in list(self._listeners.values()):
                    try:
                        listener(event)
                    except Exception:  # one listener's failure is its own
                        logger.exception("subscription bus: a listener raised; the others get the event")

    async def _watch_stream(self) -> None:
        # Retention removes a stream that stayed empty past the ttl; the next
        # publish makes it again under a new key, which a follower of the old key
        # would never see. A slow poll finds the stream gone and follows the new one.
        while True:
            store = self._store
            if store is None:
                return
            await asyncio.sleep(store.settings.poll_interval)
            follower = self._follower
            if follower is None:
                continue
            try:
                rows = await store.database.fetch(sql.EXISTING_STREAMS, [follower.stream_key])
                if rows:
                    continue
                head = await store.log.stream_head(BUS_SESSION, self.namespace, create=True)
            except Exception as exc:
                logger.warning("subscription bus: could not check its stream, trying again later: %r", exc)
                continue
            assert head is not None
            if self._follower is follower and head.key != follower.stream_key:
                logger.info("subscription bus: stream %s was re-created as %s", follower.stream_key, head.key)
                store.log.unfollow(follower)
                # A seq is global: every row of the new stream is new to this process.
                self._follow(StreamHead(head.key, head.tag, 0))
