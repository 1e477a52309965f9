"""MCP sessions on PostgreSQL: each its own view of the store, one registry row, and any worker to serve it.

Scoping. The session manager reads its public ``event_store`` attribute once per
new session, to build that session's transport. Turning the attribute into a
property that returns a fresh per-session store scopes every transport.

One row per session. The session id is minted after that read, inside the same
call, and the opening request's first event (its priming event) is stored
before the response header names the id. The one moment between the two is
the manager's ``table[session_id] = transport`` (compat.SESSION_TABLE): the table is
wrapped (``_SessionTable``) and binds the store made during this request to the
session id there, so every stream of the session, the opening one included, is
filed under the id that clients and logs show.

The registry. As the response that opens a session goes out, and before its
header, the session is registered (``registry.py``): its handshake, its
protocol version, its principal. A worker that does not hold a session serves
it anyway (adoption): it looks the id up, and when the session is live and the
principal matches, builds a transport for it, initialized from the stored
handshake (``compat.serve_known_session``), and lets the SDK serve the request.
Any refusal falls through to the SDK's own answer for an unknown id, so an
unknown, ended, expired or foreign session gets the same 404. A database that
does not answer gets a 503 with ``Retry-After``: a 404 would make the client
throw away a session that is fine. A session held here costs no lookup.

Session end everywhere. A DELETE on any worker ends the session in the
registry, and every worker that holds it drops it; so does an idle timeout,
unless another worker used the session since. A worker shutting down ends
nothing: its sessions stay, for the other workers or its successor to serve.

A resumed stream is followed live by the store itself when the session's store
can ``subscribe`` (see ``_follow``): from PostgreSQL, so it follows a request
that another worker runs, and it closes the SDK's replay-to-live gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import compat
from .compat import SESSION_HEADER, manager_entry
from .errors import SchemaNotReadyError, StoreUnavailableError
from .event_log import short_key, valid_session_key
from .registry import MAX_HANDSHAKE_BYTES, SessionRegistry
from .settings import StoreSettings

PROVISIONAL_PREFIX = "provisional-"
# Seconds a client is asked to wait when the registry does not answer.
RETRY_AFTER = 2

logger = logging.getLogger(__name__)


class _Request:
    """What the integration keeps of the HTTP request being handled."""

    __slots__ = ("body", "method", "opened", "principal", "session_id")

    def __init__(self, scope: Scope) -> None:
        self.method: str = scope.get("method", "")
        self.session_id = _session_id(scope)
        self.principal = compat.requestor(scope)
        # The id of the session this request opened, once the SDK has minted it.
        self.opened: str | None = None
        # The first bytes of an opening request's body: where its handshake is.
        self.body = bytearray()


# A session id no session has: the SDK answers it as unknown.
_REFUSED = "mcp-pg-events-refused"


def _with_session_id(scope: Scope, session_id: str) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != SESSION_HEADER]
    return {**scope, "headers": [*headers, (SESSION_HEADER, session_id.encode())]}


def _session_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == SESSION_HEADER:
            return cast(bytes, value).decode("latin-1")
    return None


# The stores made while handling the current request, waiting for the session id.
_unbound: contextvars.ContextVar[list[_SessionBinding] | None] = contextvars.ContextVar(
    "mcp_pg_events_unbound", default=None
)
_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "mcp_pg_events_request", default=None
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

    def __init__(self, backing: SessionScopedStore, key: str | None = None) -> None:
        self._backing = backing
        self.key = key
        self._view: EventStore | None = None if key is None else backing.session(key)
        # Something was stored: an opening that fails must end its session row.
        self.used = False
        self._following: set[LiveSubscription] = set()
        self._ended = False

    def bind(self, session_id: str) -> None:
        if self._view is None:
            self.key = session_id
            self._view = self._backing.session(session_id)

    def _scope(self) -> EventStore:
        if self._view is None:
            # Only a store taken from the manager outside a request gets here: give it
            # a scope of its own rather than share one with anything.
            self.key = PROVISIONAL_PREFIX + uuid.uuid4().hex
            logger.warning("a session store used before its session id was known: filed as %s", self.key)
            self._view = self._backing.session(self.key)
        return self._view

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        self.used = True
        return await self._scope().store_event(stream_id, message)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        if self._ended:
            return None
        scope = self._scope()
        if not isinstance(scope, LiveEventStore):
            return await scope.replay_events_after(last_event_id, send_callback)
        subscription = scope.subscribe(last_event_id)
        if await subscription.open():
            self._following.add(subscription)
            try:
                await _follow(subscription, send_callback)
            finally:
                self._following.discard(subscription)
        return None

    async def end(self) -> None:
        """The session ended: streams resumed on this worker stop following."""
        self._ended = True
        for subscription in list(self._following):
            await subscription.aclose()


async def _follow(subscription: LiveSubscription, send_callback: EventCallback) -> None:
    """Send the stream's events from the cursor on, live, until the stream ends or the client leaves.

    The SDK registers a resumed connection as the live tail of its stream only
    after ``replay_events_after`` returns, and drops what its router stores in
    between (NOTES: the replay-to-live gap). Following the stream here instead
    leaves no such window: replay and live delivery are one read after one
    cursor, from PostgreSQL, whichever worker writes. Returning None afterwards
    makes the SDK end the response, as it would after the stream's response.
    The client leaving cancels this.
    """
    try:
        async for event in subscription:
            await send_callback(event)
    finally:
        await subscription.aclose()


class _Held:
    """A session this manager holds: its store, its transport, its registry row (None: unregistered),
    and the principal that may use it (``owned``: known)."""

    __slots__ = ("binding", "owned", "owner", "row_id", "transport")

    def __init__(
        self,
        binding: _SessionBinding | None,
        transport: Any,
        row_id: int | None,
        owner: dict[str, Any] | None = None,
        *,
        owned: bool,
    ) -> None:
        self.binding = binding
        self.transport = transport
        self.row_id = row_id
        self.owner = owner
        self.owned = owned


class _Sessions:
    """What one scoped manager keeps of its sessions, and what it does for them."""

    def __init__(self, manager: _ScopesSessions) -> None:
        self.manager = manager
        self.held: dict[str, _Held] = {}
        self._adoptions: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._undo_ended: Callable[[], None] | None = None
        self.shutting_down = False

    @property
    def backing(self) -> SessionScopedStore | None:
        return self.manager._scoped_backing

    @property
    def registry(self) -> SessionRegistry | None:
        registry = getattr(self.backing, "registry", None)
        return registry if isinstance(registry, SessionRegistry) else None

    @property
    def adopts(self) -> bool:
        choice = self.manager.__dict__.get(_ADOPT)
        if choice is not None:
            return bool(choice)
        settings = getattr(self.backing, "settings", None)
        if isinstance(settings, StoreSettings):
            return settings.adopt_sessions
        return StoreSettings.from_env().adopt_sessions

    # --- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        registry = self.registry
        if registry is not None:
            await registry.start()
            self._undo_ended = registry.on_ended(self.ended_elsewhere)

    async def stop(self) -> None:
        if self._undo_ended is not None:
            self._undo_ended()
            self._undo_ended = None
            await asyncio.gather(*self._tasks, return_exceptions=True)
            registry = self.registry
            if registry is not None:
                await registry.stop()
        self.held.clear()

    # --- sessions held -----------------------------------------------------------------------

    def added(self, session_id: str, transport: Any) -> None:
        """The manager holds ``transport`` for ``session_id`` from now on (the table seam)."""
        held = self.held.get(session_id)
        if held is None or held.transport is not transport:
            unbound = _unbound.get()
            binding = unbound.pop() if unbound else None
            if binding is not None:
                binding.bind(session_id)
            request = _request.get()
            owner = None if request is None else request.principal
            self.held[session_id] = _Held(binding, transport, None, owner, owned=request is not None)
            if request is not None:
                request.opened = session_id
        compat.on_terminate(transport, functools.partial(self.terminated, session_id, transport))

    async def terminated(self, session_id: str, transport: Any) -> None:
        """``transport`` was terminated: a DELETE, the idle timeout, a crash, a shutdown, an end elsewhere."""
        held = self.held.get(session_id)
        if held is None or held.transport is not transport:
            return
        del self.held[session_id]
        if held.binding is not None:
            await held.binding.end()
        registry = self.registry
        if registry is None or held.row_id is None:
            return
        registry.release(session_id)
        if self.shutting_down:
            return  # not an end: the session stays for the other workers, or this one's successor
        idle_timeout = compat.session_idle_timeout(self.manager)
        if idle_timeout is not None and compat.idle_expired(transport):
            try:
                await registry.end_if_idle(session_id, idle_timeout)
            except Exception as exc:  # retention ends it once it is idle past its timeout
                logger.warning("session %s: its idle end not recorded: %r", short_key(session_id), exc)

    def ended_elsewhere(self, session_ids: list[str]) -> None:
        """Sessions ended by another worker (or retention): drop them, at once for new requests."""
        instances = compat.held_sessions(self.manager)
        for session_id in session_ids:
            held = self.held.get(session_id)
            if held is None:
                continue
            if instances.get(session_id) is held.transport:
                instances.pop(session_id, None)
                owners = compat.session_owners(self.manager)
                if owners is not None:
                    owners.pop(session_id, None)
            self.spawn(compat.discard_session(self.manager, session_id, held.transport))

    def foreign(self, session_id: str, scope: Scope) -> bool:
        """True when a request for a held session comes from another principal than the opener,
        where the SDK itself does not check (before mcp 1.30 and 2.0)."""
        held = self.held.get(session_id)
        if held is None or not held.owned or compat.session_owners(self.manager) is not None:
            return False
        return compat.requestor(scope) != held.owner

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the opening request, and the end of a session -------------------------------------------

    async def opened(self, request: _Request, scope: Scope) -> None:
        """Register the session ``request`` opened, before its id goes out."""
        registry = self.registry
        session_id = request.opened
        held = self.held.get(session_id) if session_id is not None else None
        if registry is None or session_id is None or held is None:
            return
        handshake = compat.handshake_of(bytes(request.body))
        version = compat.negotiated_version((handshake or {}).get("protocolVersion"))
        try:
            row_id = await registry.register(
                session_id,
                handshake,
                version,
                compat.requestor(scope),
                compat.session_idle_timeout(self.manager),
            )
        except Exception as exc:
            # It still works here, but no other worker can serve it.
            logger.error("session %s not registered: %r", short_key(session_id), exc)
            return
        if row_id is not None and self.held.get(session_id) is held:
            held.row_id = row_id
            registry.hold(session_id, row_id)

    async def after(self, request: _Request, status: int) -> None:
        """A request that opened no session after all: its session row ends (its events may go)."""
        if request.opened is not None and not 200 <= status < 400:
            held = self.held.get(request.opened)
            if held is None or held.binding is None or held.binding.used:
                await self.end(request.opened, "failed-open")

    async def end(self, session_id: str, reason: str) -> None:
        try:
            registry = self.registry
            if registry is not None:
                await registry.end(session_id, reason)
            elif (end_session := getattr(self.backing, "end_session", None)) is not None:
                await end_session(session_id)
        except Exception as exc:  # retention's TTL takes care of it then
            logger.warning("could not mark session %s ended: %r", short_key(session_id), exc)

    # --- adoption ----------------------------------------------------------------------------

    async def adopt(self, session_id: str, scope: Scope) -> ASGIApp | None:
        """Serve ``session_id`` here if the registry knows it as live and the principal matches.

        None: let the SDK answer (it now holds the session, or answers its usual
        404); else the response to send instead (503).
        """
        registry = self.registry
        if registry is None or not (
            compat.VALID_SESSION_ID.fullmatch(session_id) and valid_session_key(session_id)
        ):
            return None
        pending = self._adoptions.get(session_id)
        if pending is not None:  # a request of the same session is adopting it: one adoption
            await asyncio.shield(pending)
            return None
        self._adoptions[session_id] = asyncio.get_running_loop().create_future()
        try:
            return await self._adopt(registry, session_id, scope)
        finally:
            self._adoptions.pop(session_id).set_result(None)

    async def _adopt(self, registry: SessionRegistry, session_id: str, scope: Scope) -> ASGIApp | None:
        try:
            known = await registry.lookup(session_id)
        except (StoreUnavailableError, SchemaNotReadyError) as exc:
            logger.warning("session %s: the registry did not answer: %r", short_key(session_id), exc)
            return _error(
                503, "The session registry is unavailable, retry later", {"Retry-After": str(RETRY_AFTER)}
            )
        if known is None:
            return None
        if compat.requestor(scope) != known.owner:
            logger.warning(
                "session %s presented by another principal than the one that opened it", short_key(session_id)
            )
            return None
        if known.handshake is None or known.protocol_version is None:
            return None
        if compat.initialize_params(known.handshake) is None:
            logger.warning(
                "session %s: its stored handshake is not valid for this SDK", short_key(session_id)
            )
            return None
        manager = self.manager
        if compat.at_session_limit(manager):
            return _error(503, "Too many open sessions")
        backing = self.backing
        assert backing is not None
        binding = _SessionBinding(backing, session_id)
        transport = compat.new_transport(manager, session_id, binding)
        try:
            await compat.task_group(manager).start(
                functools.partial(
                    compat.serve_known_session,
                    manager,
                    transport,
                    session_id,
                    known.handshake,
                    known.protocol_version,
                )
            )
        except Exception:
            logger.exception("session %s could not be served here", session_id)
            return None
        self.held[session_id] = _Held(binding, transport, known.row_id, known.owner, owned=True)
        owners = compat.session_owners(manager)
        if owners is not None and known.owner is not None:
            owners[session_id] = known.owner
        compat.held_sessions(manager)[session_id] = transport
        registry.hold(session_id, known.row_id, write_soon=True)
        logger.info("session %s taken over by this worker", short_key(session_id))
        return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> ASGIApp:
    """A JSON-RPC error with no request id, as the SDK answers what is not a session's."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32603, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class _SessionTable(dict[str, Any]):
    """The manager's table of held sessions: tells ``_Sessions`` of each session the manager holds."""

    def __init__(self, sessions: _Sessions, items: dict[str, Any]) -> None:
        super().__init__(items)
        self._sessions = sessions

    def __setitem__(self, session_id: str, transport: Any) -> None:
        self._sessions.added(session_id, transport)
        super().__setitem__(session_id, transport)


# Where a scoped manager keeps its things, in its instance dict.
_STATE = "_mcp_pg_events_sessions"
_TABLE = "_mcp_pg_events_table"
_ADOPT = "_mcp_pg_events_adopt"


class _ScopesSessions:
    """Mixin for a StreamableHTTPSessionManager class: per-session stores, the registry, adoption."""

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

    # The manager's table of held sessions (compat.SESSION_TABLE), wrapped.
    def _table(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.__dict__[_TABLE])

    def _set_table(self, table: dict[str, Any]) -> None:
        self.__dict__[_TABLE] = _SessionTable(self._sessions(), table)

    def _sessions(self) -> _Sessions:
        sessions = self.__dict__.get(_STATE)
        if sessions is None:
            sessions = self.__dict__[_STATE] = _Sessions(self)
        return cast(_Sessions, sessions)

    def __init__(self, *args: Any, adopt_sessions: bool | None = None, **kwargs: Any) -> None:
        self.__dict__[_ADOPT] = adopt_sessions
        super().__init__(*args, **kwargs)
        self._bind_at_entry()

    def _bind_at_entry(self) -> None:
        if manager_entry(self) == "asgi_app":
            self.__dict__["asgi_app"] = _binds_session_ids(self, self.__dict__["asgi_app"])

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        parent = super().handle_request  # type: ignore[misc]
        if manager_entry(self) == "asgi_app":
            await parent(scope, receive, send)
        else:
            await _binds_session_ids(self, parent)(scope, receive, send)

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        sessions = self._sessions()
        try:
            async with super().run():  # type: ignore[misc]
                await sessions.start()
                try:
                    yield
                finally:
                    # Before the SDK terminates every transport: that is no end of theirs.
                    sessions.shutting_down = True
        finally:
            await sessions.stop()

    async def _serve_stateful(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The manager's entry for every request of a session (compat.STATEFUL_ENTRY).
        sessions = self._sessions()
        session_id = _session_id(scope)
        registry = sessions.registry
        if session_id is not None and registry is not None:
            # Let the listener's callbacks that are due run first: an end announced
            # before this request arrived (another worker answered its DELETE) is
            # then known, and this request gets the 404.
            await asyncio.sleep(0)
            registry.read_announcements()
            if session_id not in self._table() and sessions.adopts:
                refusal = await sessions.adopt(session_id, scope)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        if session_id is not None and sessions.foreign(session_id, scope):
            # Answered as the SDK answers an id it does not hold: the same 404 (or 400).
            await getattr(super(), compat.STATEFUL_ENTRY)(_with_session_id(scope, _REFUSED), receive, send)
            return
        held = session_id is not None and registry is not None and session_id in sessions.held
        if held:
            assert registry is not None and session_id is not None
            registry.begin(session_id)
        try:
            await getattr(super(), compat.STATEFUL_ENTRY)(scope, receive, send)
        finally:
            if held:
                assert registry is not None and session_id is not None
                registry.done(session_id)
            if session_id is not None:
                compat.forget_if_terminated(self, session_id)


setattr(_ScopesSessions, compat.SESSION_TABLE, property(_ScopesSessions._table, _ScopesSessions._set_table))
setattr(_ScopesSessions, compat.STATEFUL_ENTRY, _ScopesSessions._serve_stateful)


def _binds_session_ids(manager: _ScopesSessions, app: ASGIApp) -> ASGIApp:
    """Wrap ``app``: the stores made during a request learn its session, which is registered and ended."""

    async def binding_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        sessions = manager._sessions()
        request = _Request(scope)
        unbound_token = _unbound.set([])
        request_token = _request.set(request)
        status = 0

        async def keep_handshake() -> Message:
            message = await receive()
            if message.get("type") == "http.request" and len(request.body) <= MAX_HANDSHAKE_BYTES:
                request.body += message.get("body", b"")[: MAX_HANDSHAKE_BYTES + 1 - len(request.body)]
            return message

        async def send_and_register(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if request.opened is not None and status < 400:
                    # Before the header names the session: from then on the client may
                    # take it to any worker, which must find it.
                    await sessions.opened(request, scope)
                elif request.method == "DELETE" and 200 <= status < 300 and request.session_id is not None:
                    # Before the client hears its DELETE succeeded: its next request,
                    # wherever it goes, must find the session ended.
                    await sessions.end(request.session_id, "deleted")
            await send(message)

        opening = request.method == "POST" and request.session_id is None
        try:
            await app(scope, keep_handshake if opening else receive, send_and_register)
        finally:
            _unbound.reset(unbound_token)
            _request.reset(request_token)
            await sessions.after(request, status)

    return binding_app


class PostgresSessionManager(_ScopesSessions, StreamableHTTPSessionManager):
    """A ``StreamableHTTPSessionManager`` whose sessions are kept in PostgreSQL.

    Takes the arguments of ``StreamableHTTPSessionManager``; ``event_store``
    must have a ``session(key)`` method, as ``PostgresEventStore`` does (or a
    wrapper that forwards it, and ``registry`` for sessions that outlive their
    worker). Each session gets its own view of the store; with a
    ``PostgresEventStore``, sessions are registered, and any worker serves any
    live session (``adopt_sessions``, default: the store's setting, on).
    """


_Manager = TypeVar("_Manager", bound=StreamableHTTPSessionManager)
_scoped_classes: dict[type[Any], type[Any]] = {StreamableHTTPSessionManager: PostgresSessionManager}


def scope_sessions(manager: _Manager, *, adopt_sessions: bool | None = None) -> _Manager:
    """Make an existing session manager keep its sessions in its event store (see ``PostgresSessionManager``).

    For the manager that ``FastMCP.streamable_http_app()`` (mcp 1.x) or
    ``MCPServer.streamable_http_app()`` (mcp 2.x) builds, reachable as
    ``server.session_manager``. Call it before the app serves requests.
    Idempotent. ``adopt_sessions``: serve sessions opened by other workers
    (None: the store's setting, ``MCP_PG_EVENTS_ADOPT_SESSIONS``, on by default).
    """
    if isinstance(manager, _ScopesSessions):
        if adopt_sessions is not None:
            manager.__dict__[_ADOPT] = adopt_sessions
        return manager
    store: Any = manager.__dict__.get("event_store")
    if store is not None and not isinstance(store, SessionScopedStore):
        raise TypeError(f"{type(store).__name__} has no session(key) method; see PostgresEventStore.session")
    cls = type(manager)
    scoped = _scoped_classes.get(cls)
    if scoped is None:
        scoped = _scoped_classes[cls] = type(f"Scoped{cls.__name__}", (_ScopesSessions, cls), {})
    manager.__dict__.pop("event_store", None)
    table = manager.__dict__.pop(compat.SESSION_TABLE, {})
    manager.__dict__[_ADOPT] = adopt_sessions
    manager.__class__ = scoped
    scoped_manager = cast(_ScopesSessions, manager)
    scoped_manager.event_store = cast("EventStore | None", store)
    scoped_manager._set_table(table)
    scoped_manager._bind_at_entry()
    return manager
