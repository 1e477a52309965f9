"""Test doubles and a test client, for this package's tests and for yours.

- ``MemoryEventStore``: an in-memory store with the contract of
  ``PostgresEventStore`` (the same contract suite runs against both), for tests
  of your own server that need no database.
- ``McpClient``: one MCP session over Streamable HTTP, driven step by step,
  with an SSE reader that splits lines only where SSE does.
- ``RecordingStore``: wraps a store and lets a test await what gets stored.
- ``serve``: an ASGI app on a loopback port, for the length of a block.

Needs httpx (``pip install "mcp-pg-events[testing]"``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from . import compat
from .compat import streamable_http_app
from .errors import StreamIdTooLongError, UnscopedEventStoreError
from .event_log import MAX_STREAM_ID_BYTES
from .integration import scope_sessions
from .messages import dump_message, event_message

PROTOCOL_VERSION = "2025-11-25"
READ_TIMEOUT = 15.0
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

__all__ = [
    "PROTOCOL_VERSION",
    "READ_TIMEOUT",
    "SSE",
    "McpClient",
    "MemoryEventStore",
    "RecordingStore",
    "SSEStream",
    "is_response",
    "serve",
    "streamable_app",
]


def streamable_app(server: Any, store: EventStore | None) -> Any:
    """``server``'s Streamable HTTP app with each session scoped to its own view of ``store``."""
    app = streamable_http_app(server, store)
    scope_sessions(server.session_manager)
    return app


@asynccontextmanager
async def serve(app: Any, port: int = 0, *, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on loopback (``port`` 0: any free port), or on ``sock``; yield its base URL."""
    if sock is None:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
        sock.listen(128)
    # Accepted connections inherit it: without it, Nagle and delayed ACKs hold each
    # small SSE write on loopback for ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Clients may connect at once: the kernel queues them until uvicorn accepts.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class SSE:
    """One server-sent event."""

    id: str | None
    data: str

    @property
    def message(self) -> dict[str, Any] | None:
        return json.loads(self.data) if self.data else None


async def _sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an SSE body that comes as ``chunks`` of text, without their line ends.

    SSE ends lines at CR, LF or CRLF only; httpx's ``aiter_lines`` also splits at
    U+2028, NEL and the like, which JSON strings may hold unescaped. (httpx-sse and
    httpx2 split right, but only inside their event parsers, which drop the comment
    lines this client waits for.) Each chunk is scanned once and the unfinished
    line is kept as a list of parts, joined once when it ends: a 10 MB event comes
    in hundreds of chunks, and re-scanning or re-copying what is held at every
    chunk is quadratic.
    """
    held: list[str] = []  # the line begun, no line end in it
    after_cr = False  # the last chunk ended with a CR, which may be half of a CRLF
    async for text in chunks:
        if not text:
            continue
        if after_cr and text[0] == "\n":
            text = text[1:]
        after_cr = text.endswith("\r")
        pieces = _LINE_BREAK.split(text)
        if len(pieces) == 1:
            held.append(text)
            continue
        held.append(pieces[0])
        yield "".join(held)
        for line in pieces[1:-1]:
            yield line
        held = [pieces[-1]] if pieces[-1] else []
    if held:
        yield "".join(held)


class SSEStream:
    """The events of one streaming HTTP response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = _sse_lines(response.aiter_text())

    async def next(self) -> SSE | None:
        """The next event, or None when the server ended the stream."""
        event_id: str | None = None
        data: list[str] = []
        seen = False
        loop = asyncio.get_running_loop()
        # READ_TIMEOUT between two lines that are not comments: a server's keep-alive
        # comments must not make a reader wait forever for an event that never comes.
        deadline = loop.time() + READ_TIMEOUT
        while True:
            try:
                line = await asyncio.wait_for(self._lines.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return SSE(event_id, "\n".join(data)) if seen else None
            if line.startswith(":"):
                continue
            deadline = loop.time() + READ_TIMEOUT
            if line == "":
                if seen:
                    return SSE(event_id, "\n".join(data))
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

    async def until_comment(self, text: str) -> None:
        """Read on until the comment line ``: text``, skipping any event before it.

        Some servers say so when a stream is open (rest_framework_mcp: ``stream open``).
        """
        while True:
            try:
                line = await asyncio.wait_for(self._lines.__anext__(), READ_TIMEOUT)
            except StopAsyncIteration:
                raise ConnectionError(f"the stream ended before the comment {text!r}") from None
            if line.startswith(":") and line[1:].strip() == text:
                return

    async def rest(self) -> list[SSE]:
        """Every event until the server ends the stream."""
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events

    async def until_response(self, request_id: int) -> list[SSE]:
        """Events up to and including the response to ``request_id``."""
        events: list[SSE] = []
        while True:
            event = await self.next()
            if event is None:
                raise ConnectionError(f"the stream ended before the response to request {request_id}")
            events.append(event)
            message = event.message  # a property that parses: once per event
            if message and message.get("id") == request_id:
                return events


class McpClient:
    """One MCP session over Streamable HTTP, driven step by step."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.session_id: str | None = None
        self._last_id = 1

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": PROTOCOL_VERSION}
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        headers.update(extra)
        return headers

    async def initialize(self, *, capabilities: dict[str, Any] | None = None) -> list[SSE]:
        """Open the session; returns the events of the initialize request's stream."""
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "mcp-pg-events-demo", "version": "1"},
        }
        async with self.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}) as stream:
            self.session_id = stream.response.headers["mcp-session-id"]
            events = await stream.until_response(1)
        response = await self.http.post(
            "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self._headers()
        )
        response.raise_for_status()
        return events

    @asynccontextmanager
    async def post(self, payload: dict[str, Any]) -> AsyncIterator[SSEStream]:
        request = self.http.build_request("POST", "/mcp", json=payload, headers=self._headers())
        response = await self.http.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise ConnectionError(f"POST answered {response.status_code}: {(await response.aread())!r}")
            yield SSEStream(response)
        finally:
            await response.aclose()

    def call_tool(
        self, name: str, arguments: dict[str, Any], progress_token: str | None = None
    ) -> tuple[int, Any]:
        """The request id and a context manager that opens the call's SSE stream."""
        self._last_id += 1
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if progress_token is not None:
            params["_meta"] = {"progressToken": progress_token}
        payload = {"jsonrpc": "2.0", "id": self._last_id, "method": "tools/call", "params": params}
        return self._last_id, self.post(payload)

    @asynccontextmanager
    async def get(self, last_event_id: str | None = None) -> AsyncIterator[SSEStream]:
        """The standalone GET stream, or with ``last_event_id`` the resumption of a stream."""
        extra = {"accept": "text/event-stream"}
        if last_event_id is not None:
            extra["last-event-id"] = last_event_id
        request = self.http.build_request("GET", "/mcp", headers=self._headers(**extra))
        response = await self.http.send(request, stream=True)
        try:
            yield SSEStream(response)
        finally:
            await response.aclose()


class RecordingStore:
    """Forwards ``session()`` to a real store and lets a caller await what gets stored.

    The demo waits with it for a tool's result to be stored before resuming; the
    tests use it to assert on what was stored, and under which session key.
    """

    def __init__(self, backing: Any) -> None:
        self._backing = backing
        # (session key, stream id, message as JSON or None for a priming event)
        self.stored: list[tuple[str, str, dict[str, Any] | None]] = []
        self._changed = asyncio.Event()

    def session(self, key: str) -> EventStore:
        return _RecordingView(self, self._backing.session(key), key)

    @property
    def registry(self) -> Any:
        """The backing store's session registry, if it keeps one: sessions then outlive their worker."""
        return getattr(self._backing, "registry", None)

    @property
    def settings(self) -> Any:
        return getattr(self._backing, "settings", None)

    async def wait_for(self, predicate: Callable[[str, dict[str, Any] | None], bool], timeout: float) -> None:
        """Wait until an event for which ``predicate(stream_id, message)`` holds has been stored."""

        async def wait() -> None:
            while not any(predicate(stream, message) for _, stream, message in self.stored):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def record(self, key: str, stream_id: str, message: Any) -> None:
        data = None if message is None else json.loads(dump_message(message))
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

    def subscribe(self, last_event_id: EventId) -> Any:
        return self._view.subscribe(last_event_id)  # type: ignore[attr-defined]


def is_response(request_id: int) -> Callable[[str, dict[str, Any] | None], bool]:
    """A ``RecordingStore.wait_for`` predicate: the response (or error) to ``request_id``."""

    def check(stream: str, message: dict[str, Any] | None) -> bool:
        return message is not None and message.get("id") == request_id and "method" not in message

    return check


class MemoryEventStore(EventStore):
    """An in-memory store with the contract of ``PostgresEventStore``, for tests without a database.

    ``session(key)`` gives each session its own view. Nothing is durable, nothing
    crosses processes.
    """

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        # event id -> (session key, stream id, seq); stream -> [(seq, event id, data)]
        self._index: dict[str, tuple[str, str, int]] = {}
        self._streams: dict[tuple[str, str], list[tuple[int, str, bytes | None]]] = {}

    def session(self, key: str) -> MemorySessionStore:
        return MemorySessionStore(self, key)

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        # As PostgresEventStore: only FastMCP's own session scoping may call the shared store.
        scoped = compat.fastmcp_scope(stream_id)
        if scoped is None:
            raise UnscopedEventStoreError()
        return await self.session(compat.FASTMCP_SESSION_PREFIX + scoped[0]).store_event(scoped[1], message)

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        found = self._index.get(last_event_id)
        if found is None or not found[0].startswith(compat.FASTMCP_SESSION_PREFIX):
            return None
        stream_id = await self.session(found[0]).replay_events_after(last_event_id, send_callback)
        if stream_id is None:
            return None
        return compat.fastmcp_stream_id(found[0].removeprefix(compat.FASTMCP_SESSION_PREFIX), stream_id)


class MemorySessionStore(EventStore):
    """One session's view of a ``MemoryEventStore``."""

    def __init__(self, root: MemoryEventStore, key: str) -> None:
        self._root = root
        self.key = key

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        if len(stream_id.encode("utf-8", "surrogatepass")) > MAX_STREAM_ID_BYTES:
            raise StreamIdTooLongError("stream id too long")
        seq = next(self._root._seq)
        event_id = f"m{seq}-{secrets.token_hex(6)}"
        data = None if message is None else dump_message(message)
        self._root._streams.setdefault((self.key, stream_id), []).append((seq, event_id, data))
        self._root._index[event_id] = (self.key, stream_id, seq)
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        found = self._root._index.get(last_event_id)
        if found is None or found[0] != self.key:
            return None
        _, stream_id, after = found
        for seq, event_id, data in list(self._root._streams[(self.key, stream_id)]):
            if seq > after and data is not None:
                await send_callback(event_message(data, event_id))
        return stream_id
