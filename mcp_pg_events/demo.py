"""``mcp-pg-events demo``: a stream that drops on one worker and resumes on another, nothing lost.

Two worker processes serve the same MCP app on one database. The client opens
its session on worker A, calls a tool that streams progress notifications,
drops its SSE stream half-way, and resumes it with ``Last-Event-ID`` on worker
B, which has never seen the session: B takes it over from the registry and
follows, from PostgreSQL, what A keeps storing until the tool's result. Then A
is killed, and the session goes on, on B. The client speaks the wire protocol
with httpx, so every step is visible.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx

from .compat import MCP_MAJOR, Context, new_server
from .testing import PROTOCOL_VERSION, SSE, McpClient, serve, streamable_app

# Names the demo's progress notifications (a progress token, not a secret).
PROGRESS_TOKEN = "demo"  # noqa: S105
# Seconds a worker process may take to start.
WORKER_START = 60.0
# Why the demo's client pins its protocol version.
RESUMABLE_PROTOCOLS = (
    "streams resume only on 2025-03-26 to 2025-11-25, which have sessions and Last-Event-ID; "
    "2026-07-28 has neither (its server events come by subscriptions/listen, without replay)"
)


def _demo_app(store: Any, pace: float) -> Any:
    server = new_server("mcp-pg-events-demo", store)

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def countdown(n: int, ctx: Context) -> str:  # type: ignore[type-arg, unused-ignore]
        """Count down from n: one progress notification per step."""
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"{n - i} to go")
            await asyncio.sleep(pace)
        return f"counted down from {n} on worker {os.getpid()}"

    return streamable_app(server, store)


def _progress(event: SSE) -> float | None:
    message = event.message
    if message and message.get("method") == "notifications/progress":
        return float(message["params"]["progress"])
    return None


def _result(event: SSE, request_id: int) -> str | None:
    message = event.message
    if message and message.get("id") == request_id:
        return str(message.get("result", {}).get("content", [{}])[0].get("text"))
    return None


class _Worker:
    """A worker process serving the demo app on a socket of its own."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, url: str) -> None:
        self.name, self.process, self.url = name, process, url

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                await self.kill()


@asynccontextmanager
async def _worker(name: str, dsn: str, pace: float) -> AsyncIterator[_Worker]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    environment = {**os.environ, "MCP_PG_EVENTS_DSN": dsn}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.demo", "worker", str(sock.fileno()), str(pace),
        env=environment, pass_fds=[sock.fileno()], stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    worker = _Worker(name, process, f"http://127.0.0.1:{sock.getsockname()[1]}")
    sock.close()  # the worker has its own
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WORKER_START)
        if not line.startswith(b"serving"):
            raise RuntimeError(f"worker {name} did not start")
        yield worker
    finally:
        await worker.stop()


async def run_demo(
    dsn: str, *, events: int, drop_after: int, pace: float, say: Callable[[str], None]
) -> bool:
    """Drop on one worker, resume on the other, check; kill the first, go on. True when all went well."""
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(_worker("A", dsn, pace))
        b = await stack.enter_async_context(_worker("B", dsn, pace))
        for worker in (a, b):
            say(f"worker {worker.name} pid {worker.process.pid} on {worker.url}/mcp")
        say(f"         (mcp {MCP_MAJOR}.x; one database, no sticky routing)")
        say(f"client   speaks protocol {PROTOCOL_VERSION}: {RESUMABLE_PROTOCOLS}")
        http_a = await stack.enter_async_context(httpx.AsyncClient(base_url=a.url, timeout=30))
        http_b = await stack.enter_async_context(httpx.AsyncClient(base_url=b.url, timeout=30))
        client = McpClient(http_a)
        await client.initialize()
        say(f"client   session {client.session_id}, opened on worker A")
        say(f'client   calls "countdown" with n={events} on worker A: one progress notification per step')
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
        say(f"client   drops the SSE stream after {drop_after} notifications; worker A goes on with the tool")
        cursor = live[-1].id
        assert cursor is not None
        client.http = http_b
        say(f"client   resumes on worker B, which never saw the session: GET /mcp, Last-Event-ID: {cursor}")
        async with client.get(last_event_id=cursor) as resumed:
            rest = await resumed.until_response(request_id)
        for event in rest:
            if (progress := _progress(event)) is not None:
                say(f"  resumed   progress {progress:>4.0f}/{events}   id {event.id}")
            elif (result := _result(event, request_id)) is not None:
                say(f"  resumed   result: {result!r}")

        received = [p for p in map(_progress, live + rest) if p is not None]
        expected = [float(i) for i in range(1, events + 1)]
        lost = sorted(set(expected) - set(received))
        doubled = len(received) - len(set(received))
        ok = received == expected
        say(
            f"check    {len(set(received))} of {events} notifications, {len(live)} live from worker A and "
            f"{len(received) - len(live)} resumed on worker B; lost {len(lost)}, doubled {doubled}: "
            + ("OK" if ok else "FAILED")
        )

        await a.kill()
        say("worker A killed (SIGKILL); the client calls again, on worker B")
        request_id, call = client.call_tool("countdown", {"n": 2}, progress_token=PROGRESS_TOKEN)
        async with call as stream:
            answer = [r for e in await stream.until_response(request_id) if (r := _result(e, request_id))]
        ok = ok and len(answer) == 1
        say(f"session  goes on without worker A: {answer[0] if answer else 'no answer'!r}")
    return ok


async def _serve_worker(fd: int, pace: float) -> None:
    from .store import PostgresEventStore

    sock = socket.socket(fileno=fd)
    async with await PostgresEventStore.connect() as store:
        app = _demo_app(store, pace)
        # The SDK logs every session at INFO: the demo's own lines tell the story.
        logging.getLogger().setLevel(logging.WARNING)
        async with serve(app, sock=sock):
            print("serving", flush=True)
            await asyncio.Event().wait()


def say(line: str) -> None:
    """Print one line of demo progress, at once."""
    print(line, flush=True)


async def serve_forever(store: Any, port: int, pace: float) -> None:
    """Run only the demo server, for an external client such as the MCP Inspector."""
    async with serve(_demo_app(store, pace), port) as url:
        say(f"server   listening on {url}/mcp (mcp {MCP_MAJOR}.x); Ctrl-C stops it")
        say(f"         a client must ask for protocol 2025-11-25 or older: {RESUMABLE_PROTOCOLS}")
        await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover - the CLI is the entry point
    # ``python -m mcp_pg_events.demo worker FD PACE``: one of run_demo's workers.
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        sys.exit("run: mcp-pg-events demo")
    asyncio.run(_serve_worker(int(sys.argv[2]), float(sys.argv[3])))
