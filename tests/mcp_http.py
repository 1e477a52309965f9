"""Helpers for end-to-end tests: a recording store and the test server's tools.

The client, the SSE parser and the loopback server are the demo's (``mcp_pg_events.demo``):
one implementation, exercised by both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from mcp_pg_events.demo import READ_TIMEOUT, SSE, Context, McpClient, new_server, serve, streamable_app

__all__ = [
    "SSE",
    "McpClient",
    "RecordingStore",
    "build_app",
    "is_response",
    "progress_values",
    "serve",
    "wait_for_line",
]


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
    server = new_server("mcp-pg-events-test", store)

    @server.tool()
    async def progress(count: int, ctx: Context, pause_after: int = 0, close_after: int = 0) -> str:
        """Report progress ``count`` times; wait for the test's gate or close the stream on the way."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count)
            if i == pause_after:
                await gate.wait()
            if i == close_after:
                await ctx.close_sse_stream()
        return f"sent {count}"

    @server.tool()
    async def announce(text: str, ctx: Context) -> str:
        """Send a notification tied to no request: it goes to the standalone GET stream."""
        await ctx.session.send_resource_updated(f"test://{text}")
        return "announced"

    return streamable_app(server, store)


async def wait_for_line(output: asyncio.StreamReader | None, marker: bytes, timeout: float = 60) -> None:
    """Read a child process's output until a line holds ``marker`` (its server is up)."""
    assert output is not None
    while marker not in (line := await asyncio.wait_for(output.readline(), timeout)):
        assert line, f"the process exited before printing {marker!r}"


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
