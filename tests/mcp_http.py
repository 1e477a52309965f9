"""A real MCP server over Streamable HTTP on loopback, and a client that can drop and resume.

The client speaks the wire protocol with httpx directly, so a test decides exactly
when a stream is dropped and which ``Last-Event-ID`` is sent back.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from mcp_pg_events import scope_sessions

from .messages import MCP_MAJOR

# At module level: the SDK resolves the tools' string annotations in this namespace.
if MCP_MAJOR == 2:
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as _Server
else:
    from mcp.server.fastmcp import Context
    from mcp.server.fastmcp import FastMCP as _Server

PROTOCOL_VERSION = "2025-11-25"
READ_TIMEOUT = 15.0


class RecordingStore:
    """Forwards ``session()`` to a real store and lets tests await what gets stored."""

    def __init__(self, backing: Any) -> None:
        self._backing = backing
        self.stored: list[tuple[str, str, dict[str, Any] | None]] = []
        self._changed = asyncio.Event()

    def session(self, key: str) -> EventStore:
        return _RecordingView(self, self._backing.session(key), key)

    async def wait_for(self, predicate: Callable[[str, dict[str, Any] | None], bool]) -> None:
        async def wait() -> None:
            while not any(predicate(stream, message) for _, stream, message in self.stored):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), READ_TIMEOUT)

    def record(self, key: str, stream_id: str, message: Any) -> None:
        data = (
            None
            if message is None
            else json.loads(message.model_dump_json(by_alias=True, exclude_unset=True))
        )
        self.stored.append((key, stream_id, data))
        self._changed.set()


class _RecordingView(EventStore):
    def __init__(self, recorder: RecordingStore, view: EventStore, key: str) -> None:
        self._recorder, self._view, self._key = recorder, view, key

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        event_id = await self._view.store_event(stream_id, message)
        self._recorder.record(self._key, stream_id, message)
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        return await self._view.replay_events_after(last_event_id, send_callback)


def build_app(store: Any, gate: asyncio.Event) -> Any:
    """An MCP app for the installed SDK major, its sessions scoped by ``scope_sessions``."""
    server: Any = (
        _Server("mcp-pg-events-test") if MCP_MAJOR == 2 else _Server("mcp-pg-events-test", event_store=store)
    )

    @server.tool()
    async def progress(count: int, ctx: Context, pause_after: int = 0, close_after: int = 0) -> str:  # type: ignore[type-arg]
        """Report progress ``count`` times; wait for the test's gate or close the stream on the way."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count)
            if i == pause_after:
                await gate.wait()
            if i == close_after:
                await ctx.close_sse_stream()
        return f"sent {count}"

    @server.tool()
    async def announce(text: str, ctx: Context) -> str:  # type: ignore[type-arg]
        """Send a notification tied to no request: it goes to the standalone GET stream."""
        await ctx.session.send_resource_updated(f"test://{text}")
        return "announced"

    app = server.streamable_http_app(event_store=store) if MCP_MAJOR == 2 else server.streamable_http_app()
    scope_sessions(server.session_manager)
    return app


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    # Clients may connect at once: the kernel queues them until uvicorn accepts.
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class SSE:
    id: str | None
    data: str

    @property
    def message(self) -> dict[str, Any] | None:
        return json.loads(self.data) if self.data else None


class SSEStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> SSE | None:
        """The next event, or None when the server ended the stream."""
        event_id: str | None = None
        data: list[str] = []
        seen = False
        while True:
            try:
                line = await asyncio.wait_for(self._lines.__anext__(), READ_TIMEOUT)
            except StopAsyncIteration:
                return SSE(event_id, "\n".join(data)) if seen else None
            if line == "":
                if seen:
                    return SSE(event_id, "\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id, seen = value, True
            elif field == "data":
                data.append(value)
                seen = True
            elif field in ("event", "retry"):
                seen = True

    async def rest(self) -> list[SSE]:
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events


class Client:
    """One MCP session, driven by hand."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.session_id: str | None = None
        self._next_id = 1

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": PROTOCOL_VERSION}
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        headers.update(extra)
        return headers

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def initialize(self) -> None:
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-pg-events-test", "version": "1"},
        }
        async with self.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}) as stream:
            self.session_id = stream.response.headers["mcp-session-id"]
            events = await stream.rest()
        assert any(e.message and e.message.get("id") == 1 for e in events), events
        response = await self.http.post(
            "/mcp",
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers=self._headers(),
        )
        assert response.status_code == 202, response.text

    @asynccontextmanager
    async def post(self, payload: dict[str, Any]) -> AsyncIterator[SSEStream]:
        request = self.http.build_request("POST", "/mcp", json=payload, headers=self._headers())
        response = await self.http.send(request, stream=True)
        try:
            assert response.status_code == 200, (await response.aread(), response.status_code)
            yield SSEStream(response)
        finally:
            await response.aclose()

    def call_tool(self, name: str, arguments: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
        request_id = self.next_id()
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if token is not None:
            params["_meta"] = {"progressToken": token}
        payload = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        return request_id, self.post(payload)

    @asynccontextmanager
    async def get(self, last_event_id: str | None = None) -> AsyncIterator[SSEStream]:
        extra = {"accept": "text/event-stream"}
        if last_event_id is not None:
            extra["last-event-id"] = last_event_id
        request = self.http.build_request("GET", "/mcp", headers=self._headers(**extra))
        response = await self.http.send(request, stream=True)
        try:
            yield SSEStream(response)
        finally:
            await response.aclose()


def progress_values(events: list[SSE], token: str) -> list[float]:
    return [
        e.message["params"]["progress"]
        for e in events
        if e.message
        and e.message.get("method") == "notifications/progress"
        and e.message["params"]["progressToken"] == token
    ]


def is_response(request_id: int) -> Callable[[str, dict[str, Any] | None], bool]:
    def check(stream: str, message: dict[str, Any] | None) -> bool:
        return message is not None and message.get("id") == request_id and "method" not in message

    return check
