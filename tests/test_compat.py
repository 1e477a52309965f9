"""Each assumption ``mcp_pg_events.compat`` makes about the installed SDK, one test per ``ASSUMES:`` name.

They run on the SDK major installed (CI runs both). A failure here means an SDK
release changed something the package relies on: fix compat.py, not the test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import re
import typing
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from mcp_pg_events import PostgresEventStore, compat
from mcp_pg_events.integration import scope_sessions
from mcp_pg_events.messages import dump_message
from mcp_pg_events.testing import PROTOCOL_VERSION

from .mcp_http import McpClient, RecordingStore, build_app, serve
from .test_sessions import ends_idle_sessions
from .worker_processes import in_process_worker

COMPAT = Path(compat.__file__).read_text()


def test_every_assumption_has_a_test_here() -> None:
    assumed = set(re.findall(r"ASSUMES: (\w+)", COMPAT))
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert assumed and assumed <= tested, assumed - tested


async def _session_with_a_call(url: str, tool: str, arguments: dict[str, Any]) -> McpClient:
    http = httpx.AsyncClient(base_url=url, timeout=15)
    client = McpClient(http)
    await client.initialize()
    _, call = client.call_tool(tool, arguments, progress_token="t")
    async with call as stream:
        await stream.rest()
    await http.aclose()
    return client


async def test_standalone_stream_id(store: PostgresEventStore) -> None:
    # A notification tied to no request is stored under the SDK's standalone stream id.
    recorder = RecordingStore(store)
    async with serve(build_app(recorder, asyncio.Event())) as url:
        client = await _session_with_a_call(url, "announce", {"text": "x"})
    standalone = [
        message
        for key, stream, message in recorder.stored
        if key == client.session_id and stream == compat.STANDALONE_STREAM and message
    ]
    assert [m["params"]["uri"] for m in standalone] == ["test://x"]


async def test_session_header(store: PostgresEventStore) -> None:
    # The session id comes back in this header (the integration reads it off the
    # response that opens a session), and requests of the session carry it.
    recorder = RecordingStore(store)
    async with serve(build_app(recorder, asyncio.Event())) as url, httpx.AsyncClient(base_url=url) as http:
        request = http.build_request("POST", "/mcp", json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "compat", "version": "1"}},
        }, headers={"accept": "application/json, text/event-stream"})  # fmt: skip
        response = await http.send(request)
        session_id = response.headers[compat.SESSION_HEADER.decode()]
        initialized = await http.post(
            "/mcp",
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": "2025-11-25",
                compat.SESSION_HEADER.decode(): session_id,
            },
        )
        assert initialized.status_code == 202


async def test_manager_entry(store: PostgresEventStore) -> None:
    # Requests reach the manager through the entry compat names: wrapping that one
    # is what files a session's streams under its id.
    recorder = RecordingStore(store)
    app = build_app(recorder, asyncio.Event())
    server_manager = next(
        value for value in _managers(app) if isinstance(value, StreamableHTTPSessionManager)
    )
    entry = compat.manager_entry(server_manager)
    # mcp 2.x and 1.30+ set an asgi_app that handle_request goes through; older 1.x has none.
    assert entry == (
        "asgi_app" if "asgi_app" in vars(StreamableHTTPSessionManager(object())) else "handle_request"
    )
    async with serve(app) as url:
        client = await _session_with_a_call(url, "announce", {"text": "y"})
    assert any(key == client.session_id for key, _, _ in recorder.stored)


def _managers(app: Any) -> list[Any]:
    found = []
    for route in app.router.routes:
        endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
        while endpoint is not None:
            manager = getattr(endpoint, "session_manager", None)
            if manager is not None:
                found.append(manager)
                break
            endpoint = getattr(endpoint, "app", None)
    return found


async def test_event_store_read_once_per_session(store: PostgresEventStore) -> None:
    # The manager reads its public event_store attribute once per new session, to
    # build that session's transport: the seam that gives each session its own view.
    server = compat.new_server("compat", store)

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def noop() -> str:
        return "ok"

    app = compat.streamable_http_app(server, store)
    manager = scope_sessions(server.session_manager)
    reads = 0
    cls = type(manager)
    original = cls.event_store

    class Counting(cls):  # type: ignore[misc, valid-type]
        @property
        def event_store(self) -> Any:
            nonlocal reads
            reads += 1
            return original.fget(self)  # type: ignore[union-attr]

        @event_store.setter
        def event_store(self, value: Any) -> None:
            original.fset(self, value)  # type: ignore[union-attr]

    manager.__class__ = Counting
    async with serve(app) as url:
        for _ in range(3):
            await _session_with_a_call(url, "noop", {})
    assert reads == 3


# --- sessions across workers ---------------------------------------------------------------------


def _plain_manager(**options: Any) -> StreamableHTTPSessionManager:
    server = compat.new_server("compat", None)
    return StreamableHTTPSessionManager(
        getattr(server, "_lowlevel_server", None) or server._mcp_server, **options
    )


async def _open(url: str) -> McpClient:
    http = httpx.AsyncClient(base_url=url, timeout=15)
    client = McpClient(http)
    await client.initialize()
    return client


async def test_session_table(dsn: str) -> None:
    # The manager's table is a dict assigned in __init__, and the opening request
    # adds its session to it before the session stores anything: the store made
    # for the session is then bound to its id, and every stream is filed under it.
    assert isinstance(vars(_plain_manager())[compat.SESSION_TABLE], dict)
    async with in_process_worker(dsn) as worker:
        recorder = RecordingStore(worker.store)
        worker.manager.event_store = recorder
        client = await _open(worker.url)
        assert client.session_id in compat.held_sessions(worker.manager)
        await client.http.aclose()
    assert recorder.stored and {key for key, _, _ in recorder.stored} == {client.session_id}


async def test_stateful_entry(dsn: str) -> None:
    # Requests of a session go through this method; an id the manager does not hold
    # gets the SDK's fixed answer, the same for every unknown id.
    assert callable(getattr(StreamableHTTPSessionManager, compat.STATEFUL_ENTRY))
    async with in_process_worker(dsn, adopt_sessions=False) as worker:
        calls = 0
        entry = getattr(worker.manager, compat.STATEFUL_ENTRY)

        async def counting(*args: Any) -> None:
            nonlocal calls
            calls += 1
            await entry(*args)

        setattr(worker.manager, compat.STATEFUL_ENTRY, counting)
        client = await _open(worker.url)
        answers = []
        for session_id in ("0" * 32, "f" * 32):
            client.session_id = session_id
            response = await client.http.post(
                "/mcp", json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, headers=client._headers()
            )
            answers.append((response.status_code, response.text.replace(session_id, "")))
        await client.http.aclose()
    assert calls >= 4  # initialize, initialized, two unknown ids
    assert answers[0] == answers[1] and answers[0][0] in (400, 404)
    assert "Session not found" in answers[0][1] or "No valid session ID" in answers[0][1]


def test_session_id_pattern() -> None:
    # The manager mints uuid4().hex; the transport refuses anything but visible ASCII.
    assert compat.VALID_SESSION_ID.fullmatch(uuid.uuid4().hex)
    for bad in ("a b", "é", "x\n"):
        assert not compat.VALID_SESSION_ID.fullmatch(bad)
        with pytest.raises(ValueError):
            StreamableHTTPServerTransport(mcp_session_id=bad)


async def test_transport_owns_idle() -> None:
    # Where the transport takes idle_timeout, connect() makes the scope it cancels.
    parameters = inspect.signature(StreamableHTTPServerTransport.__init__).parameters
    assert ("idle_timeout" in parameters) == compat.TRANSPORT_OWNS_IDLE
    if compat.TRANSPORT_OWNS_IDLE:
        transport = StreamableHTTPServerTransport(mcp_session_id="x", idle_timeout=5)
        async with transport.connect():
            assert transport.idle_scope is not None


@ends_idle_sessions
def test_session_idle_timeout() -> None:
    manager = _plain_manager(session_idle_timeout=7.5)
    assert compat.session_idle_timeout(manager) == 7.5
    assert compat.session_idle_timeout(_plain_manager(session_idle_timeout=None)) is None


def test_authorization_context() -> None:
    token = AccessToken(token="t", client_id="alice", scopes=[])
    scope = {"user": AuthenticatedUser(token)}
    principal = compat.requestor(scope)
    assert principal is not None and principal["client_id"] == "alice"
    try:
        from mcp.server.auth.middleware.bearer_auth import authorization_context
    except ImportError:  # before 1.30: the client id alone
        assert principal == {"client_id": "alice", "issuer": None, "subject": None}
    else:
        assert principal == dict(authorization_context(AuthenticatedUser(token)))
    assert compat.requestor({}) is None and compat.requestor({"user": object()}) is None


async def test_session_owners(dsn: str) -> None:
    # The manager keeps each held session's principal there and compares it with
    # each request's: another principal gets the unknown-id answer.
    owners = compat.session_owners(_plain_manager())
    if owners is None:  # before 1.30: no principal binding to pin
        return
    async with in_process_worker(dsn, authenticate=True, adopt_sessions=False) as worker:
        http = httpx.AsyncClient(base_url=worker.url, timeout=15, headers={"x-test-principal": "alice"})
        client = McpClient(http)
        await client.initialize()
        held = compat.session_owners(worker.manager)
        assert held is not None and held[client.session_id or ""]["client_id"] == "alice"
        body = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}
        foreign = await http.post("/mcp", json=body, headers={**client._headers(), "x-test-principal": "bob"})
        own = await http.post("/mcp", json=body, headers=client._headers())
        await http.aclose()
    assert foreign.status_code == 404 and own.status_code == 200


@pytest.mark.parametrize("requested", ["2025-06-18", PROTOCOL_VERSION, "1999-01-01"])
async def test_version_negotiation(dsn: str, requested: str) -> None:
    # What the SDK answers an initialize, computed the same way without asking it.
    async with in_process_worker(dsn) as worker, worker.client() as http:
        params = {
            "protocolVersion": requested,
            "capabilities": {},
            "clientInfo": {"name": "v", "version": "1"},
        }
        answer = await http.post(
            "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params},
            headers={"accept": "application/json, text/event-stream"},
        )
    (event,) = [line for line in answer.text.splitlines() if line.startswith("data: {")]
    assert json.loads(event[6:])["result"]["protocolVersion"] == compat.negotiated_version(requested)


def test_transport_arguments() -> None:
    # The manager builds each transport from these public attributes of its own.
    parameters = inspect.signature(StreamableHTTPServerTransport.__init__).parameters
    for name in (
        "mcp_session_id",
        "is_json_response_enabled",
        "event_store",
        "security_settings",
        "retry_interval",
    ):
        assert name in parameters
    manager = _plain_manager(json_response=True, retry_interval=1234)
    transport = compat.new_transport(manager, "s1", None)
    assert transport.mcp_session_id == "s1" and transport.is_json_response_enabled
    assert manager.security_settings is None and manager.retry_interval == 1234


async def test_task_group(dsn: str) -> None:
    manager = _plain_manager()
    assert compat.task_group(manager) is None
    async with in_process_worker(dsn) as worker:
        group = compat.task_group(worker.manager)
        assert group is not None and callable(group.start)


async def test_terminate_funnel(dsn: str) -> None:
    # A DELETE ends in the transport's terminate(), called through the instance.
    async with in_process_worker(dsn) as worker:
        client = await _open(worker.url)
        transport = compat.held_sessions(worker.manager)[client.session_id]
        seen: list[bool] = []

        async def after() -> None:
            seen.append(transport.is_terminated)

        compat.on_terminate(transport, after)
        assert (await client.http.delete("/mcp", headers=client._headers())).status_code == 200
        await client.http.aclose()
    assert seen == [True]


@ends_idle_sessions
async def test_idle_scope(dsn: str) -> None:
    # The idle timeout cancels the transport's idle scope, then terminates it.
    async with in_process_worker(dsn, idle_timeout=0.3) as worker:
        client = await _open(worker.url)
        transport = compat.held_sessions(worker.manager)[client.session_id]
        ended = asyncio.Event()

        async def after() -> None:
            ended.set()

        compat.on_terminate(transport, after)
        await asyncio.wait_for(ended.wait(), 60)
        await client.http.aclose()
        assert compat.idle_expired(transport)
        assert client.session_id not in compat.held_sessions(worker.manager)


async def test_discard_session(dsn: str) -> None:
    async with in_process_worker(dsn, adopt_sessions=False) as worker:
        client = await _open(worker.url)
        transport = compat.held_sessions(worker.manager)[client.session_id]
        await compat.discard_session(worker.manager, client.session_id or "", transport)
        assert transport.is_terminated and client.session_id not in compat.held_sessions(worker.manager)
        owners = compat.session_owners(worker.manager)
        assert owners is None or client.session_id not in owners
        answer = await client.http.post(
            "/mcp", json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, headers=client._headers()
        )
        await client.http.aclose()
    assert answer.status_code in (400, 404)


async def test_terminated_stays(dsn: str) -> None:
    # After a DELETE the session is gone from the table (1.30+, 2.2+), or made so.
    async with in_process_worker(dsn, adopt_sessions=False) as worker:
        client = await _open(worker.url)
        transport = compat.held_sessions(worker.manager)[client.session_id]
        assert (await client.http.delete("/mcp", headers=client._headers())).status_code == 200
        compat.forget_if_terminated(worker.manager, client.session_id or "")
        await client.http.aclose()
    assert transport.is_terminated and client.session_id not in compat.held_sessions(worker.manager)


async def test_initialized_connection(dsn: str) -> None:
    # mcp 2.x: a session served from its stored handshake answers every request as
    # initialized, with the client's params and the negotiated protocol version.
    if compat.MCP_MAJOR != 2:
        pytest.skip("mcp 1.x replays the handshake instead (test_replayed_handshake)")
    await _served_elsewhere_as_initialized(dsn)


async def test_replayed_handshake(dsn: str) -> None:
    # mcp 1.x: the stored initialize, replayed, is answered first and dropped, and
    # the server keeps its params; nothing of it is stored.
    if compat.MCP_MAJOR != 1:
        pytest.skip("mcp 2.x builds an initialized connection instead (test_initialized_connection)")
    await _served_elsewhere_as_initialized(dsn)


async def _served_elsewhere_as_initialized(dsn: str) -> None:
    async with in_process_worker(dsn) as a, in_process_worker(dsn) as b:
        recorder = RecordingStore(b.store)
        b.manager.event_store = recorder
        client = McpClient(httpx.AsyncClient(base_url=a.url, timeout=15))
        await client.initialize(capabilities={"sampling": {}, "roots": {"listChanged": True}})
        await client.http.aclose()
        client.http = httpx.AsyncClient(base_url=b.url, timeout=15)
        request_id, call = client.call_tool("whoami", {})
        async with call as stream:
            events = await stream.until_response(request_id)
        await client.http.aclose()
        assert client.session_id in compat.held_sessions(b.manager)
    message = events[-1].message
    assert message is not None and "result" in message, message
    seen = json.loads(message["result"]["content"][0]["text"])
    assert seen["client"] == "mcp-pg-events-demo" and seen["capabilities"] == ["roots", "sampling"]
    if compat.MCP_MAJOR == 2:
        assert seen["protocol_version"] == PROTOCOL_VERSION
    stored_streams = {stream for _, stream, _ in recorder.stored}
    assert compat.ADOPT_REQUEST_ID not in stored_streams and str(request_id) in stored_streams


async def test_replay_none_ends_stream(store: PostgresEventStore) -> None:
    async with serve(build_app(store, asyncio.Event())) as url:
        client = await _open(url)
        request_id, call = client.call_tool("progress", {"count": 2}, progress_token="r")
        async with call as stream:
            events = await stream.rest()
        async with client.get(last_event_id=events[0].id) as resumed:
            replayed = await resumed.rest()  # ends by itself, after the response
        await client.http.aclose()
    assert [e.id for e in replayed] == [e.id for e in events[1:]]
    assert all(e.data for e in replayed)  # no priming event
    assert replayed[-1].message is not None and replayed[-1].message["id"] == request_id


HAS_FASTMCP = importlib.util.find_spec("fastmcp") is not None
needs_fastmcp = pytest.mark.skipif(
    not HAS_FASTMCP, reason="the standalone fastmcp package is not installed (fastmcp 4.x needs mcp >= 2.3)"
)
needs_subscriptions = pytest.mark.skipif(
    importlib.util.find_spec("mcp.shared.subscriptions") is None,
    reason="subscriptions/listen (the 2026-07-28 revision) needs mcp >= 2.3",
)


@needs_subscriptions
def test_subscription_bus_seat() -> None:
    from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler

    from mcp_pg_events.compat import Server

    server = compat.new_server("seat", None)
    default = compat.subscription_bus(server)
    assert isinstance(default, InMemorySubscriptionBus)
    entry = server._lowlevel_server._request_handlers["subscriptions/listen"]
    assert isinstance(entry.handler, ListenHandler) and entry.handler._bus is default
    other = InMemorySubscriptionBus()
    assert compat.replace_in_memory_bus(server, other)
    assert compat.subscription_bus(server) is other and entry.handler._bus is other
    # A bus of the user's own stays, and a server that serves no listen streams needs none.
    server = compat.new_server("own", None)
    server._subscriptions = object()
    assert not compat.replace_in_memory_bus(server, other)
    server = Server("unserved", subscriptions=False)
    assert not compat.replace_in_memory_bus(server, other)
    assert compat.subscription_bus(server) is not other


@needs_fastmcp
async def test_fastmcp_session_manager() -> None:
    import fastmcp
    from fastmcp.server.session_scoped_event_store import SessionScopedEventStore

    app = fastmcp.FastMCP("seat").http_app(path="/mcp", transport="http")
    entry = compat.fastmcp_entry(app)
    assert entry is not None and entry.session_manager is None
    seen: list[tuple[Any, Any]] = []

    def scope(manager: Any) -> Any:
        seen.append((manager, compat.task_group(manager)))
        return manager

    compat.on_fastmcp_manager(entry, scope)
    async with app.router.lifespan_context(app):
        ((manager, group_then),) = seen
        # Handed over before it runs, and the one the app routes to.
        assert isinstance(manager, StreamableHTTPSessionManager) and group_then is None
        assert entry.session_manager is manager and compat.task_group(manager) is not None
        manager.event_store = PostgresEventStore.__new__(PostgresEventStore)
        assert isinstance(manager.event_store, SessionScopedEventStore)


@needs_fastmcp
async def test_fastmcp_scoped_stream_ids() -> None:
    from fastmcp.server.session_scoped_event_store import SessionScopedEventStore

    calls: list[str] = []

    class Shared:
        async def store_event(self, stream_id: str, message: Any) -> str:
            calls.append(stream_id)
            return "e1"

        async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
            return calls[-1]

    scope = uuid.uuid4().hex
    view = SessionScopedEventStore(Shared(), session_id=scope)  # type: ignore[arg-type]
    await view.store_event("_GET_stream", None)
    assert calls == [compat.fastmcp_stream_id(scope, "_GET_stream")]
    assert compat.fastmcp_scope(calls[0]) == (scope, "_GET_stream")
    assert await view.replay_events_after("e1", lambda e: None) == "_GET_stream"  # type: ignore[arg-type, return-value]
    calls.append(compat.fastmcp_stream_id(uuid.uuid4().hex, "_GET_stream"))
    assert await view.replay_events_after("e1", lambda e: None) is None  # type: ignore[arg-type, return-value]


# Messages of every kind, and odd ones that look like notifications.
MESSAGE_SHAPES = [
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call"},
    {"jsonrpc": "2.0", "id": "a", "method": "tools/call", "params": {"name": "x"}},
    {"jsonrpc": "2.0", "method": "notifications/progress"},
    {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}},
    {"jsonrpc": "2.0", "method": "notifications/progress", "params": None},
    {"jsonrpc": "2.0", "method": "m", "params": {"id": 1, "text": "\u0069d"}},
    {"jsonrpc": "2.0", "id": 7, "result": {}},
    {"jsonrpc": "2.0", "id": 2, "error": {"code": -32600, "message": "no"}},
    # A notification's start with a request's id after it: the union takes a request.
    {"jsonrpc": "2.0", "method": "m", "params": {}, "id": 3},
    {"jsonrpc": "2.0", "method": "m", "\u0069d": 3},
    {"jsonrpc": "2.0", "method": "m", "id": True},
    {"jsonrpc": "2.0", "method": 5},
]


@pytest.mark.parametrize("value", MESSAGE_SHAPES)
def test_notification_shape(value: dict[str, Any]) -> None:
    # validate_json must give what the SDK's own validation of the union gives.
    data = json.dumps(value, separators=(",", ":")).encode()
    try:
        expected = compat.validate_python(json.loads(data))
    except ValueError:
        with pytest.raises(ValueError):
            compat.validate_json(data)
        return
    got = compat.validate_json(data)
    assert type(got) is type(expected)
    assert got == expected
    inner = (lambda m: m.root) if compat.ROOT_MODEL is not None else (lambda m: m)
    assert type(inner(got)) is type(inner(expected))
    assert inner(got).model_fields_set == inner(expected).model_fields_set
    if compat.MCP_MAJOR == 2:
        # The store writes notifications with the start the fast path looks for.
        progress = compat.validate_python(MESSAGE_SHAPES[3])
        assert dump_message(progress).startswith(compat._NOTIFICATION_START)
        # Every other member of the union requires an id.
        members = set(typing.get_args(compat.JSONRPCMessage)) - {compat.JSONRPCNotification}
        assert len(members) == 3
        assert all(member.model_fields["id"].is_required() for member in members)
