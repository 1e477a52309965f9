"""Giving every MCP session its own scoped event store, on mcp 1.x and 2.x.

The session manager reads its public ``event_store`` attribute once per new
session, to build that session's transport. Turning the attribute into a property
that returns a fresh per-session store scopes every transport, without touching
private names of the SDK.

The SDK picks the session id inside the same call that reads the attribute, so
it is not known yet. A session's store starts under a provisional key and moves
to the real MCP session id when the ``mcp-session-id`` header of the response
that opened the session goes out; operators then find the session's streams
under the id that clients and logs show. Streams begun before that (the opening
request's own) stay under the provisional key, and replay looks there too.

A resumed stream is followed live by the store itself when the session's store
can ``subscribe`` (see ``_follow``), which closes the SDK's replay-to-live gap.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .compat import SESSION_HEADER, manager_entry

PROVISIONAL_PREFIX = "provisional-"

logger = logging.getLogger(__name__)

# The session stores by MCP session id, while their transport lives (weakly held:
# a session that times out or is never ended must not stay here).
_by_session_id: weakref.WeakValueDictionary[str, _SessionBinding] = weakref.WeakValueDictionary()

# The stores made while handling the current request, waiting for the session id.
_unbound: contextvars.ContextVar[list[_SessionBinding] | None] = contextvars.ContextVar(
    "mcp_pg_events_unbound", default=None
)


@runtime_checkable
class SessionScopedStore(Protocol):
    """A store shared by all sessions that makes one ``EventStore`` per session key."""

    def session(self, key: str) -> EventStore: ...


class LiveSubscription(Protocol):
    """What ``subscribe`` returns: see ``mcp_pg_events.live.Subscription``."""

    def __aiter__(self) -> AsyncIterator[EventMessage]: ...

    async def open(self) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LiveEventStore(Protocol):
    """A session's ``EventStore`` that can also follow a stream live from a cursor."""

    def subscribe(self, last_event_id: EventId) -> LiveSubscription: ...

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None: ...


class _SessionBinding(EventStore):
    """One transport's event store: the backing store's view of its session."""

    def __init__(self, backing: SessionScopedStore) -> None:
        self._backing = backing
        self._keys = [PROVISIONAL_PREFIX + uuid.uuid4().hex]
        self._provisional = backing.session(self._keys[0])
        self._bound: EventStore | None = None
        # Streams begun before the session id was known: they stay where they began,
        # so that one stream never spans two scopes (the opening request's priming
        # event is stored before the header goes out, its response after).
        self._early_streams: set[str] = set()

    def bind(self, session_id: str) -> None:
        self._bound = self._backing.session(session_id)
        self._keys.append(session_id)
        _by_session_id[session_id] = self

    async def end(self) -> None:
        """Tell the backing store (if it can be told) that the session ended: its events may go."""
        end_session = getattr(self._backing, "end_session", None)
        if end_session is None:
            return
        for key in self._keys:
            try:
                await end_session(key)
            except Exception as exc:  # retention's TTL takes care of it then
                logger.warning("could not mark session %s ended: %r", key, exc)

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        if self._bound is None:
            self._early_streams.add(stream_id)
            return await self._provisional.store_event(stream_id, message)
        scope = self._provisional if stream_id in self._early_streams else self._bound
        return await scope.store_event(stream_id, message)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        scopes = [self._provisional] if self._bound is None else [self._bound]
        if self._bound is not None and self._early_streams:
            scopes.append(self._provisional)
        for scope in scopes:
            if isinstance(scope, LiveEventStore):
                subscription = scope.subscribe(last_event_id)
                if await subscription.open():
                    await _follow(subscription, send_callback)
                    return None
            else:
                stream_id = await scope.replay_events_after(last_event_id, send_callback)
                if stream_id is not None:
                    return stream_id
        return None


async def _follow(subscription: LiveSubscription, send_callback: EventCallback) -> None:
    """Send the stream's events from the cursor on, live, until the stream ends or the client leaves.

    The SDK registers a resumed connection as the live tail of its stream only
    after ``replay_events_after`` returns, and drops what its router stores in
    between (NOTES: the replay-to-live gap). Following the stream here instead
    leaves no such window: replay and live delivery are one read after one
    cursor. Returning None afterwards makes the SDK end the response, as it
    would after the stream's response. The client leaving cancels this.
    """
    try:
        async for event in subscription:
            await send_callback(event)
    finally:
        await subscription.aclose()


class _ScopesSessions:
    """Mixin for a StreamableHTTPSessionManager class: per-session event stores."""

    _scoped_backing: SessionScopedStore | None

    @property
    def event_store(self) -> EventStore | None:
        backing = self._scoped_backing
        if backing is None:
            return None
        binding = _SessionBinding(backing)
        unbound = _unbound.get()
        if unbound is not None:
            unbound.append(binding)
        return binding

    @event_store.setter
    def event_store(self, store: EventStore | None) -> None:
        if store is not None and not isinstance(store, SessionScopedStore):
            raise TypeError(
                f"{type(store).__name__} has no session(key) method: a store shared by every session "
                "must be able to give each session its own view"
            )
        self._scoped_backing = store

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bind_at_entry()

    def _bind_at_entry(self) -> None:
        if manager_entry(self) == "asgi_app":
            self.__dict__["asgi_app"] = _binds_session_ids(self.__dict__["asgi_app"])

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        parent = super().handle_request  # type: ignore[misc]
        if manager_entry(self) == "asgi_app":
            await parent(scope, receive, send)
        else:
            await _binds_session_ids(parent)(scope, receive, send)


def _binds_session_ids(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so the stores made during a request learn the session id it answers with."""

    async def binding_app(scope: Scope, receive: Receive, send: Send) -> None:
        unbound: list[_SessionBinding] = []
        token = _unbound.set(unbound)
        status = 0

        async def send_and_bind(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if unbound:
                    for name, value in message.get("headers", ()):
                        if name.lower() == SESSION_HEADER:
                            for binding in unbound:
                                binding.bind(value.decode("latin-1"))
                            unbound.clear()
            await send(message)

        try:
            await app(scope, receive, send_and_bind)
        finally:
            _unbound.reset(token)
        if scope.get("method") == "DELETE" and 200 <= status < 300:
            # The client ended its session: its events may go at once (retention's
            # ended-session grace), rather than when they reach the TTL.
            for name, value in scope.get("headers", ()):
                if name.lower() == SESSION_HEADER:
                    ended = _by_session_id.pop(value.decode("latin-1"), None)
                    if ended is not None:
                        await ended.end()

    return binding_app


class PostgresSessionManager(_ScopesSessions, StreamableHTTPSessionManager):
    """A ``StreamableHTTPSessionManager`` that gives every session its own view of the event store.

    Takes the same arguments as ``StreamableHTTPSessionManager``; ``event_store``
    must have a ``session(key)`` method, as ``PostgresEventStore`` does (or a
    wrapper that forwards it).
    """


_Manager = TypeVar("_Manager", bound=StreamableHTTPSessionManager)
_scoped_classes: dict[type[Any], type[Any]] = {StreamableHTTPSessionManager: PostgresSessionManager}


def scope_sessions(manager: _Manager) -> _Manager:
    """Make an existing session manager give each session its own view of its event store.

    For the manager that ``FastMCP.streamable_http_app()`` (mcp 1.x) or
    ``MCPServer.streamable_http_app()`` (mcp 2.x) builds, reachable as
    ``server.session_manager``. Call it before the app serves requests. Idempotent.
    """
    if isinstance(manager, _ScopesSessions):
        return manager
    store: Any = manager.__dict__.get("event_store")
    if store is not None and not isinstance(store, SessionScopedStore):
        raise TypeError(f"{type(store).__name__} has no session(key) method; see PostgresEventStore.session")
    cls = type(manager)
    scoped = _scoped_classes.get(cls)
    if scoped is None:
        scoped = _scoped_classes[cls] = type(f"Scoped{cls.__name__}", (_ScopesSessions, cls), {})
    manager.__dict__.pop("event_store", None)
    manager.__class__ = scoped
    scoped_manager = cast(_ScopesSessions, manager)
    scoped_manager.event_store = cast("EventStore | None", store)
    scoped_manager._bind_at_entry()
    return manager
