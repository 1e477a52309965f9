"""Helpers for end-to-end tests: the test server's tools, and reading its events.

The client, the SSE parser, the recording store and the loopback server are the
package's public ones (``mcp_pg_events.testing``), which the demo uses too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp_pg_events.compat import Context, new_server
from mcp_pg_events.testing import SSE, McpClient, RecordingStore, is_response, serve, streamable_app

__all__ = [
    "SSE",
    "McpClient",
    "RecordingStore",
    "build_app",
    "data_events",
    "is_response",
    "progress_values",
    "serve",
    "wait_for_line",
]


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


def data_events(events: list[SSE]) -> list[SSE]:
    """The events that carry a message: not the empty priming events."""
    return [e for e in events if e.data]
