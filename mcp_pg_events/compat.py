"""Everything that differs between the MCP SDK's majors, and every assumption about its internals.

No other module of the package imports an SDK name that differs between 1.x and
2.x, or relies on an SDK detail that is not its documented API. Each assumption
below is named in a comment (``ASSUMES: ...``) and pinned by a test in
``tests/test_compat.py`` of the same name, which fails loudly when an SDK release
breaks it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.streamable_http import (
    GET_STREAM_KEY,
    MCP_SESSION_ID_HEADER,
    SESSION_ID_PATTERN,
    EventStore,
    StreamableHTTPServerTransport,
)
from pydantic import ValidationError

try:  # mcp 1.30+ and 2.x: the principal as the session manager compares it
    from mcp.server.auth.middleware.bearer_auth import (
        authorization_context as _authorization_context,  # type: ignore[attr-defined, unused-ignore]
    )
except ImportError:  # pragma: no cover - mcp 1.23 to 1.29
    _authorization_context = None  # type: ignore[assignment, unused-ignore]

logger = logging.getLogger(__name__)

try:  # mcp 2.x: plain message types in mcp_types, one TypeAdapter for the union
    from mcp.server.connection import Connection  # type: ignore[import-not-found, unused-ignore]
    from mcp.server.mcpserver import Context  # type: ignore[import-not-found, unused-ignore]
    from mcp.server.mcpserver import MCPServer as Server  # type: ignore[import-not-found, unused-ignore]
    from mcp.server.runner import serve_connection  # type: ignore[import-not-found, unused-ignore]
    from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher  # type: ignore[import-not-found, unused-ignore]
    from mcp_types import (  # type: ignore[import-not-found, unused-ignore]
        ErrorData,  # type: ignore[import-not-found, unused-ignore]
        InitializeRequestParams,  # type: ignore[import-not-found, unused-ignore]
        JSONRPCError,  # type: ignore[import-not-found, unused-ignore]
        JSONRPCMessage,  # type: ignore[import-not-found, unused-ignore]
        JSONRPCResponse,  # type: ignore[import-not-found, unused-ignore]
    )
    from mcp_types import jsonrpc_message_adapter as _adapter  # type: ignore[import-not-found, unused-ignore]
    from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS as _VERSIONS  # type: ignore[import-not-found, unused-ignore]
    from mcp_types.version import LATEST_HANDSHAKE_VERSION as _LATEST  # type: ignore[import-not-found, unused-ignore]

    MCP_MAJOR = 2
    # 1.x wraps every message in a RootModel; 2.x does not.
    ROOT_MODEL: type | None = None

    from mcp_types import JSONRPCNotification  # type: ignore[import-not-found, unused-ignore]

    # ASSUMES: notification_shape. pydantic writes a model's fields in their order, so
    # a notification as the store wrote it (``dump_message``) starts with this; and a
    # JSON object without an ``id`` member can only be the union's JSONRPCNotification
    # (every other member requires ``id``). Validating such bytes against that one
    # member skips trying the others: most of a replay's time, since a stream is
    # mostly notifications. ``\u`` is excluded so that no escaped spelling of ``id``
    # can hide a member.
    _NOTIFICATION_START = b'{"jsonrpc":"2.0","method":'
    # What model_validate_json calls, without its Python wrapper: a fifth of the cost here.
    _validate_notification = JSONRPCNotification.__pydantic_validator__.validate_json

    def validate_json(data: bytes) -> Any:
        """The message whose JSON is ``data``: what the union validates it as."""
        if data.startswith(_NOTIFICATION_START) and b'"id"' not in data and b"\\u" not in data:
            try:
                return _validate_notification(data)
            except ValidationError:
                pass  # the union's own error, or its other reading, below
        return _adapter.validate_json(data)

    def validate_python(value: Any) -> Any:
        """The message whose parsed JSON is ``value``."""
        return _adapter.validate_python(value)

    def validate_page(datas: list[bytes]) -> list[Any]:
        """The messages stored as ``datas``: each validated on its own, most by one member."""
        return [validate_json(data) for data in datas]

except ImportError:  # mcp 1.x: pydantic models in mcp.types, the message a RootModel
    from mcp.server.fastmcp import Context  # type: ignore[attr-defined, no-redef, unused-ignore]
    from mcp.server.fastmcp import FastMCP as Server  # type: ignore[attr-defined, no-redef, assignment, unused-ignore]
    from mcp.shared.message import SessionMessage
    from mcp.shared.version import (  # type: ignore[import-not-found, no-redef, unused-ignore]
        SUPPORTED_PROTOCOL_VERSIONS as _VERSIONS,
    )
    from mcp.types import LATEST_PROTOCOL_VERSION as _LATEST  # type: ignore[no-redef, attr-defined, unused-ignore]
    from mcp.types import (
        ErrorData,  # type: ignore[no-redef, attr-defined, unused-ignore]
        InitializeRequestParams,  # type: ignore[no-redef, attr-defined, unused-ignore]
        JSONRPCError,  # type: ignore[assignment, unused-ignore]
        JSONRPCMessage,  # type: ignore[assignment, unused-ignore]
        JSONRPCRequest,  # type: ignore[attr-defined, unused-ignore]
        JSONRPCResponse,  # type: ignore[assignment, unused-ignore]
    )

    MCP_MAJOR = 1
    ROOT_MODEL = JSONRPCMessage  # type: ignore[assignment, unused-ignore]

    def validate_json(data: bytes) -> Any:
        """The message whose JSON is ``data``."""
        return JSONRPCMessage.model_validate_json(data)  # type: ignore[attr-defined, unused-ignore]

    def validate_python(value: Any) -> Any:
        """The message whose parsed JSON is ``value``."""
        return JSONRPCMessage.model_validate(value)  # type: ignore[attr-defined, unused-ignore]

    from pydantic import TypeAdapter

    # Validating a page as one JSON array saves pydantic's per-call overhead.
    _page_adapter: TypeAdapter[list[Any]] = TypeAdapter(list[JSONRPCMessage])  # type: ignore[valid-type, unused-ignore]

    def validate_page(datas: list[bytes]) -> list[Any]:
        """The messages stored as ``datas``, validated as one JSON array."""
        return _page_adapter.validate_json(b"[" + b",".join(datas) + b"]")


# ASSUMES: standalone_stream_id. The SDK files every message that belongs to no
# request (server notifications, server-to-client requests) under this stream id;
# such a stream never completes.
STANDALONE_STREAM: str = GET_STREAM_KEY

# ASSUMES: session_header. The session id travels in this header, both ways.
SESSION_HEADER: bytes = MCP_SESSION_ID_HEADER.encode()

# ASSUMES: event_store_read_once_per_session. The manager reads its public
# ``event_store`` attribute once per new session, to build that session's
# transport: a property there gives each session a store of its own.

# ASSUMES: replay_none_ends_stream. A resumed stream whose store's
# ``replay_events_after`` returns None (after sending events through the callback,
# one SSE event each) ends with it: no priming event, no live registration. The
# store then follows the stream itself, from PostgreSQL.


def new_server(name: str, store: EventStore | None) -> Any:
    """An ``MCPServer`` (mcp 2.x) or a ``FastMCP`` (mcp 1.x, which takes the store up front)."""
    if MCP_MAJOR == 2:
        return Server(name)
    return Server(name, event_store=store)  # type: ignore[call-arg, unused-ignore]


def streamable_http_app(server: Any, store: EventStore | None) -> Any:
    """``server``'s Streamable HTTP app with ``store`` as its event store (scoping is the caller's)."""
    if MCP_MAJOR == 2:
        return server.streamable_http_app(event_store=store)
    return server.streamable_http_app()


def manager_entry(manager: Any) -> str:
    """The attribute through which requests reach a session manager.

    ASSUMES: manager_entry. Where the manager has a public ``asgi_app`` instance
    attribute (set in ``__init__``: mcp 2.x, and 1.x from 1.30), requests go
    through it (2.x mounts it, ``handle_request`` calls it); else (older 1.x) the
    app calls ``handle_request``.
    """
    return "asgi_app" if "asgi_app" in vars(manager) else "handle_request"


# --- sessions across workers ------------------------------------------------------------------
#
# The SDK keeps each session in the memory of the process that opened it, and has
# no public way to serve a session another process opened. What follows builds
# one, as the session manager would, from the registry's record of it.

# ASSUMES: session_table. The manager assigns its table of held sessions, a dict
# by session id, to this attribute in ``__init__``; it adds each session to it by
# item assignment, in the task of the request that opens it, after building its
# transport and before the session stores anything; it looks sessions up with
# ``in`` and ``[]``, and drops them with ``pop``, ``del`` and ``clear()``.
SESSION_TABLE = "_server_instances"

# ASSUMES: stateful_entry. Every request of the handshake era for a stateful
# manager goes through this method: the opening request, and every request of a
# session, which it serves when the session is in the table and otherwise answers
# with the SDK's fixed "Session not found" 404 (400 before 1.27).
STATEFUL_ENTRY = "_handle_stateful_request"


def held_sessions(manager: Any) -> dict[str, Any]:
    """The manager's table of the sessions it holds (``SESSION_TABLE``)."""
    table: dict[str, Any] = getattr(manager, SESSION_TABLE)
    return table


# ASSUMES: session_id_pattern. The transport takes only session ids of this form
# (else ValueError); the manager mints uuid4().hex.
VALID_SESSION_ID = SESSION_ID_PATTERN

# ASSUMES: transport_owns_idle. From mcp 1.30 and 2.2 the transport takes
# ``idle_timeout`` and cancels its ``idle_scope`` once no request has been in
# flight that long; before, the manager set the scope and pushed its deadline
# (2.0, 2.1, 1.27 to 1.29), or sessions never expired (1.23 to 1.26).
TRANSPORT_OWNS_IDLE = "idle_timeout" in inspect.signature(StreamableHTTPServerTransport.__init__).parameters

# The id of the initialize that mcp 1.x replays to serve a session opened elsewhere.
ADOPT_REQUEST_ID = "mcp-pg-events-adopt"
# Seconds that replayed initialize may take to be answered.
HANDSHAKE_TIMEOUT = 30.0

# The error that ends a request whose worker died: JSON-RPC's internal error (not
# -32000, which the SDK keeps for its own side, nor a cancellation: nobody cancelled).
WORKER_LOST_CODE = -32603
WORKER_LOST_MESSAGE = "The server process running this request stopped before answering"
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]{0,17})")


def session_idle_timeout(manager: Any) -> float | None:
    """Seconds a session of ``manager`` may stay idle; None: it never expires.

    ASSUMES: session_idle_timeout. The manager's public ``session_idle_timeout``
    (1.27 and later, 2.x) means that; older managers have none and never expire a session.
    """
    value = getattr(manager, "session_idle_timeout", None)
    return None if value is None else float(value)


def requestor(scope: Any) -> dict[str, Any] | None:
    """The principal of a request, as the session manager compares it with a session's owner.

    ASSUMES: authorization_context. The SDK's auth middleware sets
    ``scope["user"]`` to an ``AuthenticatedUser``; the manager binds a session to
    ``authorization_context(user)`` (mcp 1.30+, 2.x). Older 1.x have no such
    function: the client id alone names the principal there.
    """
    user = scope.get("user")
    if not isinstance(user, AuthenticatedUser):
        return None
    if _authorization_context is not None:
        return dict(_authorization_context(user))
    return {"client_id": user.access_token.client_id, "issuer": None, "subject": None}


def session_owners(manager: Any) -> dict[str, Any] | None:
    """The principal each session the manager holds must be used with, or None.

    ASSUMES: session_owners. ``_session_owners`` (mcp 1.30+, 2.x) is a dict by
    session id, compared with ``requestor`` for each request of a held session;
    older managers have none.
    """
    owners = vars(manager).get("_session_owners")
    return owners if isinstance(owners, dict) else None


def negotiated_version(requested: object) -> str:
    """The protocol version the SDK answers an ``initialize`` that asked for ``requested``.

    ASSUMES: version_negotiation. The requested version when the SDK supports it
    for the handshake, else its latest.
    """
    if isinstance(requested, str) and requested in _VERSIONS:
        return requested
    return str(_LATEST)


def initialize_params(handshake: Any) -> Any | None:
    """The SDK's model of stored ``initialize`` params, or None when they are not valid ones."""
    try:
        if MCP_MAJOR == 2:
            return InitializeRequestParams.model_validate(handshake, by_name=False)  # type: ignore[call-arg, unused-ignore]
        return InitializeRequestParams.model_validate(handshake)
    except ValidationError:
        return None


def new_transport(manager: Any, session_id: str, event_store: EventStore | None) -> Any:
    """A transport for a session the registry knows, built as the manager builds one for a new session.

    ASSUMES: transport_arguments. The manager passes its public ``json_response``,
    ``security_settings``, ``retry_interval`` and (where the transport owns idle)
    ``session_idle_timeout`` as these arguments.
    """
    options: dict[str, Any] = {
        "mcp_session_id": session_id,
        "is_json_response_enabled": manager.json_response,
        "event_store": event_store,
        "security_settings": manager.security_settings,
        "retry_interval": manager.retry_interval,
    }
    if TRANSPORT_OWNS_IDLE:
        options["idle_timeout"] = session_idle_timeout(manager)
    return StreamableHTTPServerTransport(**options)


def at_session_limit(manager: Any) -> bool:
    """True when the manager holds as many sessions as it may (``max_sessions``, mcp 1.30+ and 2.2+)."""
    limit = getattr(manager, "max_sessions", None)
    return limit is not None and len(held_sessions(manager)) >= limit


def task_group(manager: Any) -> Any:
    """The task group session tasks run in.

    ASSUMES: task_group. ``_task_group`` is set by ``run()`` and starts each
    session's server task with ``start()``.
    """
    return manager._task_group


def on_terminate(transport: Any, callback: Callable[[], Awaitable[None]]) -> None:
    """Await ``callback()`` once, after ``transport`` is first terminated, before ``terminate()`` returns.

    ASSUMES: terminate_funnel. However a session ends on its worker (a DELETE,
    the idle timeout, a crash, the manager shutting down), the SDK calls the
    transport's ``terminate()`` through the instance (``self.terminate()``,
    ``transport.terminate()``), after which ``is_terminated`` is true.
    """
    original = transport.terminate

    async def terminate() -> None:
        first = not transport.is_terminated
        await original()
        if first:
            await callback()

    transport.terminate = terminate


def idle_expired(transport: Any) -> bool:
    """True when ``transport`` ended because its session stayed idle too long.

    ASSUMES: idle_scope. The idle timeout cancels ``transport.idle_scope``
    (made by the transport or set by the manager): ``cancel_called`` is then true.
    """
    scope = getattr(transport, "idle_scope", None)
    return scope is not None and bool(scope.cancel_called)


async def discard_session(manager: Any, session_id: str, transport: Any) -> None:
    """Stop holding a session and terminate its transport, as the manager does.

    ASSUMES: discard_session. ``_discard_session(session_id, transport)`` (mcp
    1.30+, 2.2+) pops the session from ``_server_instances`` and
    ``_session_owners``, then terminates the transport, shielded; older managers
    have none, and this does the same.
    """
    discard = getattr(manager, "_discard_session", None)
    if discard is not None:
        await discard(session_id, transport)
        return
    if held_sessions(manager).get(session_id) is transport:
        held_sessions(manager).pop(session_id, None)
        owners = session_owners(manager)
        if owners is not None:
            owners.pop(session_id, None)
    if not transport.is_terminated:
        with anyio.CancelScope(shield=True):
            await transport.terminate()


def forget_if_terminated(manager: Any, session_id: str) -> None:
    """Drop a held session whose transport a DELETE terminated.

    ASSUMES: terminated_stays. Before mcp 1.30 and 2.2 such a transport stays in
    ``_server_instances`` and answers its own 404 ("Session has been terminated"),
    unlike an unknown id; from then on the manager discards it itself.
    """
    transport = held_sessions(manager).get(session_id)
    if transport is not None and transport.is_terminated:
        held_sessions(manager).pop(session_id, None)
        owners = session_owners(manager)
        if owners is not None:
            owners.pop(session_id, None)


def _idle_scope(manager: Any, transport: Any) -> Any:
    if TRANSPORT_OWNS_IDLE:
        return transport.idle_scope  # made by connect() when there is an idle timeout
    timeout = session_idle_timeout(manager)
    if timeout is None:
        return None
    # The manager pushes this deadline on each request of a session it holds.
    scope = anyio.CancelScope(deadline=anyio.current_time() + timeout)
    transport.idle_scope = scope
    return scope


async def serve_known_session(
    manager: Any,
    transport: Any,
    session_id: str,
    handshake: dict[str, Any],
    protocol_version: str,
    *,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a session whose handshake happened elsewhere, initialized, until it ends.

    Started with ``task_group(manager).start(...)``: ready once it reports
    started, when ``transport`` may handle requests. Raises before that when the
    session cannot be served (its handshake refused).
    """
    started = False

    def report_started() -> None:
        nonlocal started
        started = True
        task_status.started()

    async with transport.connect() as (read_stream, write_stream):
        try:
            async with anyio.create_task_group() as session_tasks:
                idle = _idle_scope(manager, transport)
                if idle is not None:
                    session_tasks.start_soon(_end_when_idle, manager, session_id, transport, idle)
                if MCP_MAJOR == 2:
                    report_started()
                    await _serve_initialized(
                        manager, read_stream, write_stream, session_id, handshake, protocol_version
                    )
                else:
                    await _serve_replaying_handshake(
                        manager, read_stream, write_stream, handshake, report_started
                    )
                session_tasks.cancel_scope.cancel()
        except Exception:
            if not started:
                raise
            logger.exception("session %s crashed", session_id)
        finally:
            await discard_session(manager, session_id, transport)


async def _end_when_idle(manager: Any, session_id: str, transport: Any, idle: Any) -> None:
    with idle:
        await anyio.sleep_forever()
    await discard_session(manager, session_id, transport)


async def _serve_initialized(
    manager: Any,
    read_stream: Any,
    write_stream: Any,
    session_id: str,
    handshake: dict[str, Any],
    version: str,
) -> None:
    """mcp 2.x: the server loop of the manager, on a connection that is initialized already.

    ASSUMES: initialized_connection. ``serve_loop`` is ``JSONRPCDispatcher`` with
    ``initialize`` inline, ``Connection.for_loop`` and ``serve_connection`` with the
    manager's ``_lifespan_state``; a connection whose ``client_params`` are set and
    ``initialized`` is set serves every request, and speaks ``protocol_version``.
    Replaying the handshake instead would lose the request's context (auth,
    tracing), which 2.x carries on its streams.
    """
    dispatcher = JSONRPCDispatcher(
        read_stream, write_stream, raise_handler_exceptions=False, inline_methods=frozenset({"initialize"})
    )
    connection = Connection.for_loop(dispatcher, session_id=session_id)
    connection.client_params = initialize_params(handshake)
    connection.protocol_version = version
    connection.initialized.set()
    await serve_connection(
        manager.app, dispatcher, connection=connection, lifespan_state=manager._lifespan_state
    )


async def _serve_replaying_handshake(
    manager: Any, read_stream: Any, write_stream: Any, handshake: dict[str, Any], report_started: Any
) -> None:
    """mcp 1.x: the server told the stored ``initialize`` first, its answer dropped; then the client's.

    ASSUMES: replayed_handshake. ``Server.run`` answers ``initialize`` before it
    reads the next message, as the first message it writes, and is initialized
    right after (it keeps the params as ``client_params``); the transport's
    streams carry ``SessionMessage`` s. Only public names.
    """
    to_server, server_reads = anyio.create_memory_object_stream[Any](0)
    server_writes, from_server = anyio.create_memory_object_stream[Any](0)
    ready = anyio.Event()
    request = JSONRPCRequest(jsonrpc="2.0", id=ADOPT_REQUEST_ID, method="initialize", params=handshake)

    async def inbound() -> None:
        async with to_server:
            await to_server.send(SessionMessage(JSONRPCMessage(request)))  # type: ignore[call-arg, operator, unused-ignore]
            with contextlib.suppress(anyio.ClosedResourceError, anyio.EndOfStream):
                async for item in read_stream:
                    await to_server.send(item)

    async def outbound() -> None:
        async with from_server:
            first = (await from_server.receive()).message.root
            if not isinstance(first, JSONRPCResponse) or first.id != ADOPT_REQUEST_ID:
                raise RuntimeError(f"the server refused the session's stored handshake: {first!r}"[:500])
            ready.set()
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                async for message in from_server:
                    await write_stream.send(message)

    async with anyio.create_task_group() as relay:

        async def run_server() -> None:
            async with server_reads, server_writes:
                await manager.app.run(
                    server_reads, server_writes, manager.app.create_initialization_options(), stateless=False
                )
            relay.cancel_scope.cancel()

        relay.start_soon(inbound)
        relay.start_soon(outbound)
        relay.start_soon(run_server)
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await ready.wait()
        report_started()


def worker_lost_error(stream_name: str) -> bytes:
    """The stored error that ends request ``stream_name`` (the SDK names a request's stream ``str(id)``).

    Its id has the request's JSON type as far as the name tells: a canonical
    decimal was a number (clients number their requests), anything else a string.
    """
    request_id: int | str = int(stream_name) if _DECIMAL.fullmatch(stream_name) else stream_name
    error = ErrorData(code=WORKER_LOST_CODE, message=WORKER_LOST_MESSAGE, data={"reason": "worker-lost"})
    message: Any = JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
    if ROOT_MODEL is not None:
        message = JSONRPCMessage(message)  # type: ignore[call-arg, operator, unused-ignore]
    data: str = message.model_dump_json(by_alias=True, exclude_unset=True)
    return data.encode()


def handshake_of(body: bytes) -> dict[str, Any] | None:
    """The params of the ``initialize`` in a POST body (one message or a batch), or None."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    for message in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(message, dict) and message.get("method") == "initialize":
            params = message.get("params")
            return params if isinstance(params, dict) else None
    return None


__all__ = [
    "ADOPT_REQUEST_ID",
    "MCP_MAJOR",
    "ROOT_MODEL",
    "SESSION_HEADER",
    "SESSION_TABLE",
    "STANDALONE_STREAM",
    "STATEFUL_ENTRY",
    "TRANSPORT_OWNS_IDLE",
    "VALID_SESSION_ID",
    "Context",
    "JSONRPCError",
    "JSONRPCMessage",
    "JSONRPCResponse",
    "Server",
    "at_session_limit",
    "discard_session",
    "forget_if_terminated",
    "handshake_of",
    "held_sessions",
    "idle_expired",
    "initialize_params",
    "manager_entry",
    "negotiated_version",
    "new_server",
    "new_transport",
    "on_terminate",
    "requestor",
    "serve_known_session",
    "session_idle_timeout",
    "session_owners",
    "streamable_http_app",
    "task_group",
    "validate_json",
    "validate_python",
    "worker_lost_error",
]


# --- one-call wiring (wiring.py) ----------------------------------------------------------------


# ASSUMES: subscription_bus_seat. An ``MCPServer`` (mcp >= 2.3) keeps its
# ``SubscriptionBus`` in ``_subscriptions`` (every tool context reads it there, at
# each call) and serves ``subscriptions/listen`` through a ``ListenHandler``
# registered on its lowlevel server, which keeps the same bus in ``_bus``. The
# in-memory default is an ``InMemorySubscriptionBus``.
def subscription_bus(server: Any) -> Any | None:
    """``server``'s subscription bus, or None for a server without one (mcp 1.x, the standalone FastMCP)."""
    return getattr(server, "_subscriptions", None) if MCP_MAJOR == 2 else None


def replace_in_memory_bus(server: Any, bus: Any) -> bool:
    """Give ``server`` ``bus`` instead of its in-memory default; False (nothing done) for a bus of its own."""
    try:
        from mcp.server.subscriptions import (  # type: ignore[import-not-found, unused-ignore]
            InMemorySubscriptionBus,
            ListenHandler,
        )
    except ImportError:  # pragma: no cover - mcp 2.0 to 2.2
        return False
    if not isinstance(subscription_bus(server), InMemorySubscriptionBus):
        return False
    entry = server._lowlevel_server._request_handlers.get("subscriptions/listen")
    handler = getattr(entry, "handler", None)
    if not isinstance(handler, ListenHandler):
        return False  # MCPServer(subscriptions=False): nobody listens, nothing to carry
    server._subscriptions = handler._bus = bus
    return True


# ASSUMES: fastmcp_session_manager. The standalone ``fastmcp`` package's
# ``http_app()`` routes requests to a ``StreamableHTTPASGIApp`` (its
# ``fastmcp.server.http``), whose ``session_manager`` attribute its lifespan sets
# to a fresh ``FastMCPStreamableHTTPSessionManager`` and then enters that
# manager's ``run()``. That manager is a ``StreamableHTTPSessionManager`` whose
# ``event_store`` property wraps the store it is given in its own
# ``SessionScopedEventStore`` (prefixed stream ids, a uuid per transport).
def fastmcp_entry(app: Any) -> Any | None:
    """The ``StreamableHTTPASGIApp`` of a standalone FastMCP's ``http_app()``, or None."""
    try:
        from fastmcp.server.http import StreamableHTTPASGIApp  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    for route in getattr(app, "routes", ()):
        endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
        for candidate in (endpoint, getattr(endpoint, "app", None)):
            if isinstance(candidate, StreamableHTTPASGIApp):
                return candidate
    return None


def on_fastmcp_manager(entry: Any, scope: Callable[[Any], Any]) -> None:
    """Have ``scope(manager)`` replace each session manager ``entry`` gets, before the manager runs."""

    class _ScopedEntry(type(entry)):  # type: ignore[misc]
        @property
        def session_manager(self) -> Any:
            return self.__dict__.get("session_manager")

        @session_manager.setter
        def session_manager(self, manager: Any) -> None:
            self.__dict__["session_manager"] = None if manager is None else scope(manager)

    manager = entry.__dict__.pop("session_manager", None)
    entry.__class__ = _ScopedEntry
    entry.session_manager = manager


# ASSUMES: fastmcp_scoped_stream_ids. Given a shared store through its own
# ``http_app(event_store=...)``, the standalone FastMCP calls the shared store's
# ``store_event`` with stream ids ``"{len(scope)}:{scope}:{stream_id}"`` (a fresh
# uuid hex per transport as the scope) and its ``replay_events_after`` with the
# client's cursor, then drops the replay unless the stream id returned carries its
# own prefix.
_FASTMCP_SCOPE = re.compile(r"([1-9][0-9]{0,2}):")
# The session key a store files a FastMCP scope under: the space keeps it apart
# from every MCP session id (visible ASCII).
FASTMCP_SESSION_PREFIX = "fastmcp "


def fastmcp_scope(stream_id: str) -> tuple[str, str] | None:
    """``(scope, stream id)`` of a stream id FastMCP's session scoping made, else None."""
    match = _FASTMCP_SCOPE.match(stream_id)
    if match is None:
        return None
    start = match.end()
    end = start + int(match[1])
    if len(stream_id) <= end or stream_id[end] != ":":
        return None
    return stream_id[start:end], stream_id[end + 1 :]


def fastmcp_stream_id(scope: str, stream_id: str) -> str:
    """The stream id FastMCP's session scoping expects back for ``scope``."""
    return f"{len(scope)}:{scope}:{stream_id}"
