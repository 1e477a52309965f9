"""Sessions across workers: a resume on another worker vs on its own, and a held session's registry cost.

In one run on one scratch database:

- resume: two worker processes (the demo's: ``python -m mcp_pg_events.demo
  worker``) serve the same MCP app. For each sample a fresh session opens on
  worker A, and a tool sends 3 progress notifications, then its result. The
  client then resumes that stream from its priming event on A, which holds the
  session, and on B, which never saw it (B looks the session up in the
  registry, builds a transport, starts the session's server task, then
  follows the stream), in alternating order; then once more on B, which now
  holds it. Time from sending the GET to the first event with data: p50, p99,
  max per case. The client runs in this process, the servers in theirs.
- registry cost: one worker in this process, whose store's pool logs every
  statement its connections run (asyncpg's query logger); one session makes N
  tool calls. Statements per request by kind: the event log's (a stream per
  request, its appends) and the registry's, which must be none for a held
  session (its activity is written for all sessions at once, every
  ``activity_interval``; the run sets that to 1 s so that the writes show).

The table goes to stdout, progress to stderr, and ``--json PATH`` writes it all.

    python benchmarks/sessions.py --json sessions.json   # full run, about a minute
    python benchmarks/sessions.py --smoke                # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import httpx
from _common import (
    DEFAULT_DSN,
    describe_environment,
    environment,
    latency_summary,
    log,
    report,
    run,
    scratch_database,
)
from append import table

from mcp_pg_events import PostgresEventStore, keep_session_state, sql
from mcp_pg_events.compat import Context, new_server
from mcp_pg_events.testing import McpClient, serve, streamable_app

# The statements of the session registry: none may run per request of a held session.
REGISTRY = {
    "REGISTER_SESSION",
    "ADOPTABLE_SESSION",
    "TOUCH_SESSIONS",
    "END_SESSION",
    "END_SESSION_IF_IDLE",
    "ENDED_SESSIONS",
}
# Statement text -> its name in sql.py.
STATEMENTS = {text: name for name, text in vars(sql).items() if name.isupper() and isinstance(text, str)}


@asynccontextmanager
async def worker(name: str, dsn: str) -> AsyncIterator[str]:
    """A demo worker process serving on a socket of its own; its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.demo", "worker", str(sock.fileno()), "0",
        env={**os.environ, "MCP_PG_EVENTS_DSN": dsn}, pass_fds=[sock.fileno()],
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        assert process.stdout is not None
        if not (await asyncio.wait_for(process.stdout.readline(), 60)).startswith(b"serving"):
            raise RuntimeError(f"worker {name} did not start")
        log(f"worker {name}: pid {process.pid}, {url}")
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()


async def first_event(client: McpClient, cursor: str) -> float:
    """Seconds from sending a resuming GET to its first event with data."""
    start = time.perf_counter()
    async with client.get(last_event_id=cursor) as resumed:
        while (event := await resumed.next()) is not None:
            if event.data:
                return time.perf_counter() - start
    raise RuntimeError("the resumed stream ended without an event")


async def resume_part(dsn: str, samples: int) -> dict[str, Any]:
    cases: dict[str, list[float]] = {"own worker": [], "another worker (takes the session over)": []}
    again: list[float] = []
    async with AsyncExitStack() as stack:
        url_a = await stack.enter_async_context(worker("A", dsn))
        url_b = await stack.enter_async_context(worker("B", dsn))
        http_a = await stack.enter_async_context(httpx.AsyncClient(base_url=url_a, timeout=30))
        http_b = await stack.enter_async_context(httpx.AsyncClient(base_url=url_b, timeout=30))
        for i in range(samples + 1):  # the first is a warm-up
            client = McpClient(http_a)
            await client.initialize()
            request_id, call = client.call_tool("countdown", {"n": 3}, progress_token="bench")
            async with call as stream:
                events = await stream.until_response(request_id)
            cursor = events[0].id
            assert cursor is not None
            order = [("own worker", http_a), ("another worker (takes the session over)", http_b)]
            for case, http in order if i % 2 else reversed(order):
                client.http = http
                took = await first_event(client, cursor)
                if i:
                    cases[case].append(took)
            client.http = http_b
            took = await first_event(client, cursor)
            if i:
                again.append(took)
            if i and i % 50 == 0:
                log(f"  resume: {i} / {samples}")
    cases["another worker, holding it by then"] = again
    return {case: {"samples": len(times), **latency_summary(times)} for case, times in cases.items()}


async def registry_part(dsn: str, calls: int, activity_interval: float) -> dict[str, Any]:
    counts: Counter[str] = Counter()

    def logged(record: Any) -> None:
        counts[STATEMENTS.get(record.query, "other (asyncpg type lookups)")] += 1

    async def init(conn: asyncpg.Connection[Any]) -> None:
        conn.add_query_logger(logged)

    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, max_size=10, reset=keep_session_state, init=init)
    try:
        store = PostgresEventStore(pool, listen_dsn=dsn, activity_interval=activity_interval)
        server = new_server("bench-sessions", store)
        logging.getLogger().setLevel(logging.WARNING)  # the SDK logs every request at INFO

        @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
        async def tick(ctx: Context) -> str:  # type: ignore[type-arg, unused-ignore]
            """One progress notification, then the result."""
            await ctx.report_progress(1, 1)
            return "tick"

        async with (
            serve(streamable_app(server, store)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            client = McpClient(http)
            await client.initialize()  # registered before its answer: counted before this
            before = Counter(counts)
            start = time.perf_counter()
            for _ in range(calls):
                request_id, call = client.call_tool("tick", {}, progress_token="t")
                async with call as stream:
                    await stream.until_response(request_id)
            seconds = time.perf_counter() - start
            during = counts - before
        await store.close()
    finally:
        await pool.close()
    registry = {name: n for name, n in during.items() if name in REGISTRY}
    per_request = {name: round(n / calls, 3) for name, n in sorted(during.items())}
    return {
        "calls": calls,
        "seconds": round(seconds, 2),
        "activity_interval": activity_interval,
        "statements_per_request": per_request,
        "registry_statements": registry,
        # What runs on a request's own path: everything but the timed activity write.
        "registry_per_request": round(
            sum(n for k, n in registry.items() if k != "TOUCH_SESSIONS") / calls, 3
        ),
    }


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    load = " / ".join(map(str, config["load_average_start"]))
    lines = [f"{describe_environment(config)}; load average at start {load}"]
    if config["smoke"]:
        lines.append("(smoke run: sizes too small to judge)")
    if "resume" in results:
        lines += ["", "resume: GET with Last-Event-ID to its first event (client in this process)"]
        rows = [
            [case, str(r["samples"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}"]
            for case, r in results["resume"].items()
        ]
        lines += table(["resumed on", "samples", "p50 ms", "p99 ms", "max ms"], rows)
    if "registry" in results:
        r = results["registry"]
        lines += [
            "",
            f"registry cost of a held session: {r['calls']} tool calls in {r['seconds']} s "
            f"(activity written every {r['activity_interval']} s)",
        ]
        rows = [
            [name + (" (registry)" if name in REGISTRY else ""), f"{n:.3f}"]
            for name, n in r["statements_per_request"].items()
        ]
        lines += table(["statement", "per request"], rows)
        lines.append(
            f"registry statements on the request path: {r['registry_per_request']:.3f} per request "
            f"(timed activity writes in the run: {r['registry_statements'].get('TOUCH_SESSIONS', 0)})"
        )
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            **environment(),
            "samples": args.samples,
            "calls": args.calls,
            "smoke": args.smoke,
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    async with scratch_database(args.dsn) as dsn:
        log("resume: own worker vs another")
        results["resume"] = await resume_part(dsn, args.samples)
        log("registry cost of a held session")
        results["registry"] = await registry_part(dsn, args.calls, args.activity_interval)
    results["config"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if results["registry"]["registry_per_request"] != 0:
        raise SystemExit(f"a held session cost the registry: {results['registry']['registry_statements']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--samples", type=int, default=200, help="sessions resumed on each worker (200)")
    parser.add_argument("--calls", type=int, default=500, help="tool calls of the held session (500)")
    parser.add_argument(
        "--activity-interval", type=float, default=1.0, help="seconds between activity writes (1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 5 samples, 20 calls")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.calls = 5, 20
    report(run(bench(args)), render, args.json)


if __name__ == "__main__":
    main()
