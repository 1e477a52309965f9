"""``mcp-pg-events demo``: an MCP server whose stream drops and resumes, with nothing lost.

It serves a tool that streams progress notifications over Streamable HTTP on
loopback, and runs a client that drops its SSE stream half-way, reconnects with
``Last-Event-ID`` and checks that every notification arrived exactly once.
The client speaks the wire protocol with httpx, so every step is visible.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import httpx

from .compat import MCP_MAJOR, Context, new_server
from .testing import (
    PROTOCOL_VERSION,
    READ_TIMEOUT,
    SSE,
    McpClient,
    RecordingStore,
    is_response,
    serve,
    streamable_app,
)

# Names the demo's progress notifications (a progress token, not a secret).
PROGRESS_TOKEN = "demo"  # noqa: S105


def _demo_app(store: Any, pace: float) -> Any:
    server = new_server("mcp-pg-events-demo", store)

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def countdown(n: int, ctx: Context) -> str:  # type: ignore[type-arg, unused-ignore]
        """Count down from n: one progress notification per step."""
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"{n - i} to go")
            await asyncio.sleep(pace)
        return f"counted down from {n}"

    return streamable_app(server, store)


def _progress(event: SSE) -> float | None:
    message = event.message
    if message and message.get("method") == "notifications/progress":
        return float(message["params"]["progress"])
    return None


async def run_demo(
    store: Any, *, events: int, drop_after: int, pace: float, say: Callable[[str], None]
) -> bool:
    """Serve, drop, resume, check. True when every notification arrived exactly once."""
    watch = RecordingStore(store)
    async with serve(_demo_app(watch, pace)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        say(f"server   listening on {url}/mcp (mcp {MCP_MAJOR}.x, protocol {PROTOCOL_VERSION})")
        client = McpClient(http)
        await client.initialize()
        say(f"client   session {client.session_id}")
        say(f'client   calls "countdown" with n={events}: one progress notification per step')
        request_id, call = client.call_tool("countdown", {"n": events}, progress_token=PROGRESS_TOKEN)
        live: list[SSE] = []
        async with call as stream:
            while len(live) < drop_after:
                event = await stream.next()
                if event is None:
                    raise ConnectionError("the server ended the stream early")
                if (progress := _progress(event)) is not None:
                    live.append(event)
                    say(f"  live      progress {progress:>4.0f}/{events}   id {event.id}")
        say(f"client   drops the SSE stream after {drop_after} notifications")
        await watch.wait_for(is_response(request_id), READ_TIMEOUT + pace * events)
        say("server   the tool went on alone: the rest and the result are stored in PostgreSQL")
        cursor = live[-1].id
        assert cursor is not None
        say(f"client   reconnects: GET /mcp with Last-Event-ID: {cursor}")
        async with client.get(last_event_id=cursor) as resumed:
            replayed = await resumed.until_response(request_id)
        for event in replayed:
            if (progress := _progress(event)) is not None:
                say(f"  replayed  progress {progress:>4.0f}/{events}   id {event.id}")
            elif event.message and event.message.get("id") == request_id:
                result = event.message.get("result", {}).get("content", [{}])[0].get("text")
                say(f"  replayed  result: {result!r}")

    received = [p for p in map(_progress, live + replayed) if p is not None]
    expected = [float(i) for i in range(1, events + 1)]
    lost = sorted(set(expected) - set(received))
    doubled = len(received) - len(set(received))
    ok = received == expected
    say(
        f"check    {len(set(received))} of {events} notifications, {len(live)} live and "
        f"{len(received) - len(live)} replayed; lost {len(lost)}, doubled {doubled}: "
        + ("OK" if ok else "FAILED")
    )
    return ok


def say(line: str) -> None:
    """Print one line of demo progress, at once."""
    print(line, flush=True)


async def serve_forever(store: Any, port: int, pace: float) -> None:
    """Run only the demo server, for an external client such as the MCP Inspector."""
    async with serve(_demo_app(store, pace), port) as url:
        say(f"server   listening on {url}/mcp (mcp {MCP_MAJOR}.x); Ctrl-C stops it")
        await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover - the CLI is the entry point
    sys.exit("run: mcp-pg-events demo")
