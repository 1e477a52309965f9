"""Each assumption ``mcp_pg_events.compat`` makes about the installed SDK, one test per ``ASSUMES:`` name.

They run on the SDK major installed (CI runs both). A failure here means an SDK
release changed something the package relies on: fix compat.py, not the test.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from mcp_pg_events import PostgresEventStore, compat
from mcp_pg_events.integration import scope_sessions

from .mcp_http import McpClient, RecordingStore, build_app, serve

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
