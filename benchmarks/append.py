"""Append, replay and end-to-end speed of the store, beside a naive PostgreSQL store and the SDK's.

Everything the group-commit issue asks for, in one run on one scratch database:

- append: events/s and latency (p50, p99, max) at 1, 16, 64 and 256 concurrent
  streams, each writing ~200-byte ``notifications/progress`` messages one
  ``await`` at a time as the SDK does, for this store, a naive PostgreSQL store
  (one ``INSERT ... RETURNING`` with ``pg_notify`` per event, unpartitioned) and
  the SDK's example in-memory store; every cell runs for the same time after a
  warm-up. Plus one bare ``INSERT ... RETURNING`` round trip on one connection,
  the reference for single-stream latency.
- replay: a 10,000-event stream written through the store, replayed from its
  first event; and one stream of a 1,000,000-event table replayed from its
  500,000th event (500,000 events). Events/s, then peak Python memory in a
  second pass under tracemalloc.
- e2e: a tool sending 1,000 progress notifications over Streamable HTTP (uvicorn
  on 127.0.0.1, a client in its own process reading the SSE stream until the
  response), this store vs the in-memory one, both scoped per session the same
  way: median wall time of a few rounds, and their ratio.
- profile (``--profile``): the 64-stream cell of this store under cProfile.

The table goes to stdout, progress to stderr, and ``--json PATH`` writes it all.

    python benchmarks/append.py --json append.json       # full run, a few minutes
    python benchmarks/append.py --smoke                  # CI: tiny sizes, seconds
    python benchmarks/append.py --only append --profile  # where the time of appends goes

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import pstats
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from _common import (
    DEFAULT_DSN,
    bulk_append,
    default_pool_size,
    describe_environment,
    environment,
    execute,
    fill,
    int_list,
    latency_summary,
    log,
    measure_replay,
    parts_of,
    progress_notification,
    report,
    run,
    scratch_database,
    stream_key,
)
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

import mcp_pg_events
from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import Context, new_server
from mcp_pg_events.messages import dump_message
from mcp_pg_events.testing import McpClient, serve, streamable_app

MESSAGE_BYTES = 200
PADDING = "x" * (MESSAGE_BYTES - len(dump_message(progress_notification("bench-0", 0, ""))))
# A report_progress text that makes the SDK's notification about MESSAGE_BYTES long too.
E2E_TEXT = "x" * 80
STORES = ("this store", "naive PostgreSQL", "SDK in-memory")
PARTS = ("append", "profile", "replay", "e2e")
PROFILE_STREAMS = 64
PROFILE_TOP = 25
# This file, run again as the end-to-end client.
SCRIPT = str(Path(__file__).resolve())


# --- the stores compared -----------------------------------------------------


@dataclass
class _Entry:
    event_id: EventId
    stream_id: StreamId
    message: Any


class InMemoryEventStore(EventStore):
    """The SDK's example event store, reproduced: the ``mcp`` wheels do not ship their examples.

    Reproduces ``examples/servers/simple-streamablehttp/mcp_simple_streamablehttp/event_store.py``
    of github.com/modelcontextprotocol/python-sdk (the version with one bounded deque
    per stream): uuid4 event ids, the last ``max_events_per_stream`` events of each
    stream id in a deque, an index from event id to event, priming events skipped
    on replay. It keeps message objects, so it never serializes; it is keyed by
    stream id alone, so one instance leaks across sessions (see ScopedInMemory).
    """

    def __init__(self, max_events_per_stream: int = 100) -> None:
        self.max_events_per_stream = max_events_per_stream
        self.streams: dict[StreamId, deque[_Entry]] = {}
        self.event_index: dict[EventId, _Entry] = {}

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        event_id = str(uuid.uuid4())
        entry = _Entry(event_id, stream_id, message)
        events = self.streams.setdefault(stream_id, deque(maxlen=self.max_events_per_stream))
        if len(events) == self.max_events_per_stream:
            # The deque drops its oldest event on append: drop it from the index too.
            self.event_index.pop(events[0].event_id, None)
        events.append(entry)
        self.event_index[event_id] = entry
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        last = self.event_index.get(last_event_id)
        if last is None:
            return None
        found = False
        for event in self.streams.get(last.stream_id, ()):
            if found and event.message is not None:
                await send_callback(EventMessage(event.message, event.event_id))
            elif event.event_id == last_event_id:
                found = True
        return last.stream_id


class ScopedInMemory:
    """One SDK in-memory store per MCP session, through the same ``scope_sessions`` as ours.

    End to end, both stores then sit behind the same per-session layer, so the
    ratio compares the stores and not the scoping.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, InMemoryEventStore] = {}

    def session(self, key: str) -> EventStore:
        return self._sessions.setdefault(key, InMemoryEventStore())


NAIVE_TABLE = "bench_naive_events"
NAIVE_DDL = f"""
CREATE TABLE {NAIVE_TABLE} (
    id bigserial PRIMARY KEY,
    stream_id text NOT NULL,
    message bytea,
    created_at timestamptz NOT NULL DEFAULT now()
)"""
# pg_notify in the same statement, hence the same transaction, as the insert:
# what a first PostgreSQL store for live tails looks like.
NAIVE_APPEND = f"""
WITH e AS (INSERT INTO {NAIVE_TABLE} (stream_id, message) VALUES ($1, $2) RETURNING id)
SELECT id, pg_notify('bench_naive', id::text) FROM e"""
# The reference round trip: the same insert, no NOTIFY, on one connection.
BARE_INSERT = f"INSERT INTO {NAIVE_TABLE} (stream_id, message) VALUES ($1, $2) RETURNING id"


class NaiveEventStore(EventStore):
    """One row per event, one statement per row, NOTIFY inside: the naive PostgreSQL store."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        data = None if message is None else dump_message(message)
        return str(await self._pool.fetchval(NAIVE_APPEND, stream_id, data))

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        raise NotImplementedError("the naive store is compared on appends only")


# --- append cells ------------------------------------------------------------

Write = Callable[[], Awaitable[object]]


async def drive(
    writes: list[Write], warmup: float, seconds: float, yield_each: bool = False
) -> dict[str, Any]:
    """Run every stream's writes back to back: ``warmup`` s unmeasured, then ``seconds`` s measured.

    Throughput counts the writes that complete inside the measured window;
    latency covers the writes that start in it.
    """
    begin = time.perf_counter()
    start, end = begin + warmup, begin + warmup + seconds
    latencies: list[float] = []
    completed = 0

    async def stream(write: Write) -> None:
        nonlocal completed
        while (t0 := time.perf_counter()) < end:
            await write()
            t1 = time.perf_counter()
            if t0 >= start:
                latencies.append(t1 - t0)
            if start <= t1 < end:
                completed += 1
            if yield_each:
                # A store that never suspends (in memory) would let one stream run
                # alone to the end; the SDK's router awaits its queues between messages.
                await asyncio.sleep(0)

    await asyncio.gather(*(stream(w) for w in writes))
    return {"events_per_s": round(completed / seconds), "events": completed, **latency_summary(latencies)}


def messages(streams: int) -> list[Any]:
    return [progress_notification(f"bench-{i}", i, PADDING) for i in range(streams)]


def our_writes(store: PostgresEventStore, label: str, streams: int) -> list[Write]:
    # One session view per stream, stream id "1": the first request's stream of a session.
    return [
        partial(store.session(f"bench-{label}-{i}").store_event, "1", message)
        for i, message in enumerate(messages(streams))
    ]


async def append_part(
    dsn: str, levels: list[int], pool_size: int, warmup: float, seconds: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    bare: dict[str, Any] = {}
    await execute(dsn, NAIVE_DDL)
    naive_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
    try:
        async with await PostgresEventStore.connect(dsn, max_pool_size=pool_size) as store:
            naive, memory = NaiveEventStore(naive_pool), InMemoryEventStore()
            for streams in levels:
                if streams == 1:
                    log("bare INSERT ... RETURNING, one connection")
                    bare = await bare_insert(dsn, warmup, seconds)
                    log(f"  {bare}")
                for name in STORES:
                    log(f"append: {name}, {streams} stream(s)")
                    if name == STORES[0]:
                        writes = our_writes(store, str(streams), streams)
                    elif name == STORES[1]:
                        writes = [
                            partial(naive.store_event, f"bench-{streams}-{i}/1", m)
                            for i, m in enumerate(messages(streams))
                        ]
                    else:
                        writes = [
                            partial(memory.store_event, f"bench-{streams}-{i}", m)
                            for i, m in enumerate(messages(streams))
                        ]
                    measured = await drive(writes, warmup, seconds, yield_each=name == STORES[2])
                    cell = {"store": name, "streams": streams, **measured}
                    log(f"  {cell}")
                    cells.append(cell)
    finally:
        await naive_pool.close()
    return cells, bare


async def bare_insert(dsn: str, warmup: float, seconds: float) -> dict[str, Any]:
    data = dump_message(progress_notification("bench-0", 0, PADDING))
    conn = await asyncpg.connect(dsn)
    try:
        return await drive([partial(conn.fetchval, BARE_INSERT, "bare", data)], warmup, seconds)
    finally:
        await conn.close()


# --- profile -----------------------------------------------------------------


def _where(filename: str) -> str:
    """A short name for a source file: from site-packages, the standard library or a checkout."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    if "/lib/python" in filename:
        return filename.split("/lib/python", 1)[1].split("/", 1)[-1]
    for root in (Path(mcp_pg_events.__file__).resolve().parent.parent, Path(SCRIPT).parent.parent):
        filename = filename.removeprefix(f"{root}/")
    return filename


def top_functions(profiler: cProfile.Profile, key: str, limit: int) -> list[dict[str, Any]]:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [
        {
            "function": f"{_where(file)}:{line}({name})" if line else name,
            "ncalls": nc,
            "tottime_s": round(tt, 3),
            "cumtime_s": round(ct, 3),
        }
        for (file, line, name), (_, nc, tt, ct, _) in stats.items()
    ]
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:limit]


async def profile_part(dsn: str, pool_size: int, warmup: float, seconds: float) -> dict[str, Any]:
    log(f"profile: this store, {PROFILE_STREAMS} streams, under cProfile")
    async with await PostgresEventStore.connect(dsn, max_pool_size=pool_size) as store:
        writes = our_writes(store, "profile", PROFILE_STREAMS)
        # Warm up unprofiled (streams created, pool filled): the profile shows the steady state.
        await drive(writes, 0, warmup)
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            cell = await drive(writes, 0, seconds)
        finally:
            profiler.disable()
    log(f"  {cell}")
    return {
        "streams": PROFILE_STREAMS,
        "cell": cell,
        "by_tottime": top_functions(profiler, "tottime_s", PROFILE_TOP),
        "by_cumtime": top_functions(profiler, "cumtime_s", PROFILE_TOP),
    }


# --- replay ------------------------------------------------------------------


async def replay_part(dsn: str, stream_events: int, table_events: int) -> list[dict[str, Any]]:
    results = []
    message = progress_notification("bench-replay", 0, PADDING)
    async with await PostgresEventStore.connect(dsn) as store:
        # (a) A stream written through the store, one event at a time as the SDK
        # does, after the priming event the SDK stores first: the replay's cursor.
        log(f"replay: writing a {stream_events:,}-event stream through the store")
        view = store.session("replay-stream")
        cursor = await view.store_event("1", None)
        for _ in range(stream_events):
            await view.store_event("1", message)
        log(f"replay: {stream_events:,} events from the stream's first event")
        result = await measure_replay(store.session("replay-stream"), cursor, stream_events, "1")
        results.append(
            {
                "case": f"{stream_events:,}-event stream, from its first event",
                "events": stream_events,
                **result,
            }
        )
        log(f"  {results[-1]}")

        # (b) One stream holding the whole table, bulk-written with SQL except for
        # its middle event, stored through the store so that its id is a real cursor.
        before = table_events // 2
        after = table_events - before
        log(f"replay: writing a {table_events:,}-event stream (SQL, one event through the store)")
        await fill(store, dsn, before - 1, session="replay-table", stream="1")
        middle = await store.session("replay-table").store_event("1", message)
        await bulk_append(dsn, stream_key(middle), after, first=before)
        log(f"replay: {after:,} events from the middle of the {table_events:,}-event table")
        result = await measure_replay(store.session("replay-table"), middle, after, "1")
        results.append({"case": f"{table_events:,}-event table, from its middle", "events": after, **result})
        log(f"  {results[-1]}")
    return results


# --- end to end --------------------------------------------------------------


def e2e_app(store: Any) -> Any:
    server = new_server("mcp-pg-events-bench", store)

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def progress(count: int, ctx: Context) -> str:  # type: ignore[type-arg, unused-ignore]
        """Send ``count`` progress notifications, then answer."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count, E2E_TEXT)
        return f"sent {count}"

    return streamable_app(server, store)


async def call_progress(client: McpClient, count: int) -> float:
    """Seconds from sending the tool call to reading its response off the SSE stream."""
    start = time.perf_counter()
    request_id, call = client.call_tool("progress", {"count": count}, progress_token="bench")
    received = 0
    async with call as stream:
        while True:
            event = await stream.next()
            if event is None:
                raise ConnectionError(f"the stream ended before the response to request {request_id}")
            message = event.message  # parsed once per event: it is a property that parses
            if message is None:
                continue  # a priming event
            if message.get("id") == request_id:
                break
            if message.get("method") == "notifications/progress":
                received += 1
    elapsed = time.perf_counter() - start
    if received != count:
        raise RuntimeError(f"got {received} progress notifications of {count}")
    return elapsed


async def e2e_client(url: str, count: int) -> float:
    """One session: initialize, a small warm-up call, then the timed call."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        client = McpClient(http)
        await client.initialize()
        await call_progress(client, 10)
        return await call_progress(client, count)


async def run_client(url: str, count: int) -> float:
    # The client runs in its own process, as a real one would: its SSE parsing
    # then does not slow down the server's event loop.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--e2e-client",
        url,
        str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the e2e client failed with exit code {proc.returncode}")
    seconds: float = json.loads(out)["seconds"]
    return seconds


async def e2e_part(dsn: str, count: int, rounds: int) -> dict[str, Any]:
    names = (STORES[0], STORES[2])
    times: dict[str, list[float]] = {name: [] for name in names}
    # The SDK logs every session at INFO level: keep stderr to our progress lines.
    logging.getLogger("mcp").setLevel(logging.WARNING)
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(await PostgresEventStore.connect(dsn))
        urls = {
            names[0]: await stack.enter_async_context(serve(e2e_app(ours))),
            names[1]: await stack.enter_async_context(serve(e2e_app(ScopedInMemory()))),
        }
        for r in range(rounds):
            # Alternate which goes first, so that drift in the machine's load hits both.
            for name in names if r % 2 == 0 else names[::-1]:
                log(f"e2e round {r + 1}/{rounds}: {name}, {count:,} notifications")
                times[name].append(round(await run_client(urls[name], count), 4))
                log(f"  {times[name][-1]} s")
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "notifications": count,
        "rounds": rounds,
        "seconds": {name: {"median": round(medians[name], 4), "runs": times[name]} for name in names},
        "ratio": round(medians[names[0]] / medians[names[1]], 3),
    }


# --- targets and output ------------------------------------------------------


def _cell(results: dict[str, Any], store: str, streams: int) -> dict[str, Any] | None:
    for cell in results.get("append", []):
        if cell["store"] == store and cell["streams"] == streams:
            return dict(cell)
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured; n/a when its part did not run."""
    rows: list[dict[str, Any]] = []

    def add(target: str, goal: str, value: float | None, ok: Callable[[float], bool], unit: str) -> None:
        shown = "-" if value is None else f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
        result = "n/a" if value is None else "PASS" if ok(value) else "FAIL"
        rows.append({"target": target, "goal": goal, "measured": shown, "value": value, "result": result})

    ours64, naive64 = _cell(results, STORES[0], 64), _cell(results, STORES[1], 64)
    speedup = ours64["events_per_s"] / naive64["events_per_s"] if ours64 and naive64 else None
    add("throughput vs naive PostgreSQL, 64 streams", ">= 10x", speedup, lambda v: v >= 10, "x")
    ours256 = _cell(results, STORES[0], 256)
    add(
        "throughput, 256 streams",
        ">= 30,000/s",
        ours256 and ours256["events_per_s"],
        lambda v: v >= 30_000,
        "/s",
    )
    add("p99 latency, 64 streams", "<= 10 ms", ours64 and ours64["p99_ms"], lambda v: v <= 10, " ms")
    ours1, bare = _cell(results, STORES[0], 1), results.get("bare_insert")
    ratio = ours1["p50_ms"] / bare["p50_ms"] if ours1 and bare else None
    add("1-stream p50 / bare INSERT p50", "<= 1.5x", ratio, lambda v: v <= 1.5, "x")
    for case in results.get("replay", []):
        add(f"replay: {case['case']}", ">= 200,000/s", case["events_per_s"], lambda v: v >= 200_000, "/s")
    if not results.get("replay"):
        add("replay", ">= 200,000/s", None, lambda v: True, "")
    e2e = results.get("e2e")
    add(
        "end-to-end wall time, this store / in-memory",
        "<= 1.3x",
        e2e and e2e["ratio"],
        lambda v: v <= 1.3,
        "x",
    )
    return rows


def table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    rows = [head, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        f"{describe_environment(config)}; {config['message_bytes']}-byte progress notifications",
    ]
    if "append" in results:
        lines += [
            "",
            f"append: {config['seconds']} s per cell after {config['warmup']} s of warm-up; "
            f"pool of {config['pool_size']} connections for both PostgreSQL stores",
        ]
        lines += table(
            ["store", "streams", "events/s", "p50 ms", "p99 ms", "max ms"],
            (
                [c["store"], str(c["streams"]), f"{c['events_per_s']:,}"]
                + [f"{c[k]:.3f}" for k in ("p50_ms", "p99_ms", "max_ms")]
                for c in results["append"]
            ),
        )
        bare = results.get("bare_insert")
        if bare:
            lines.append(
                f"bare INSERT ... RETURNING, 1 connection: {bare['events_per_s']:,}/s, "
                f"p50 {bare['p50_ms']:.3f} ms, p99 {bare['p99_ms']:.3f} ms"
            )
    if "replay" in results:
        lines += ["", "replay (callback only counts; peak Python memory from a second, traced pass)"]
        lines += table(
            ["case", "events", "events/s", "seconds", "peak KiB"],
            (
                [
                    c["case"],
                    f"{c['events']:,}",
                    f"{c['events_per_s']:,}",
                    f"{c['seconds']}",
                    f"{c['peak_kib']:,}",
                ]
                for c in results["replay"]
            ),
        )
    if "e2e" in results:
        e2e = results["e2e"]
        lines += [
            "",
            f"end to end: {e2e['notifications']:,} progress notifications over Streamable HTTP, "
            f"median of {e2e['rounds']} round(s)",
        ]
        lines += table(
            ["store", "median s", "runs"],
            (
                [name, f"{s['median']:.3f}", " ".join(f"{t:.3f}" for t in s["runs"])]
                for name, s in e2e["seconds"].items()
            ),
        )
        lines.append(f"ratio this store / in-memory: {e2e['ratio']:.2f}")
    sizes = " (smoke run: sizes too small to judge)" if config["smoke"] else ""
    lines += ["", f"targets (2-core machine, from the issue){sizes}"]
    lines += table(
        ["target", "goal", "measured", "result"],
        ([t["target"], t["goal"], t["measured"], t["result"]] for t in results["targets"]),
    )
    if "profile" in results:
        prof = results["profile"]
        cell = prof["cell"]
        lines += [
            "",
            f"profile: this store, {prof['streams']} streams under cProfile "
            f"({cell['events_per_s']:,} events/s while profiled)",
        ]
        for key, label in (("by_tottime", "tottime"), ("by_cumtime", "cumtime")):
            lines += ["", f"top {len(prof[key])} by {label}"]
            lines += table(
                ["function", "ncalls", "tottime s", "cumtime s"],
                (
                    [r["function"], f"{r['ncalls']:,}", f"{r['tottime_s']:.3f}", f"{r['cumtime_s']:.3f}"]
                    for r in prof[key]
                ),
            )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, parts: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            **environment(),
            "message_bytes": len(dump_message(progress_notification("bench-0", 0, PADDING))),
            "pool_size": args.pool_size,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "streams": args.streams,
            "parts": sorted(parts),
            "smoke": args.smoke,
        }
    }
    async with scratch_database(args.dsn) as dsn:
        if "append" in parts:
            results["append"], results["bare_insert"] = await append_part(
                dsn, args.streams, args.pool_size, args.warmup, args.seconds
            )
        if "profile" in parts:
            results["profile"] = await profile_part(dsn, args.pool_size, args.warmup, args.seconds)
        if "replay" in parts:
            results["replay"] = await replay_part(dsn, args.stream_events, args.table_events)
        if "e2e" in parts:
            results["e2e"] = await e2e_part(dsn, args.notifications, args.rounds)
    results["targets"] = targets(results)
    return results


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--e2e-client":
        # The end-to-end client, started by e2e_part in a process of its own.
        seconds = asyncio.run(e2e_client(sys.argv[2], int(sys.argv[3])))
        print(json.dumps({"seconds": seconds}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per append cell (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell (0.5)")
    parser.add_argument(
        "--streams", type=int_list, default=[1, 16, 64, 256], help="concurrent streams (1,16,64,256)"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=default_pool_size(),
        help="connections per PostgreSQL store (store default)",
    )
    parser.add_argument(
        "--stream-events", type=int, default=10_000, help="events of the replayed stream (10,000)"
    )
    parser.add_argument(
        "--table-events", type=int, default=1_000_000, help="events of the big table (1,000,000)"
    )
    parser.add_argument(
        "--notifications", type=int, default=1000, help="progress notifications end to end (1000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds per store (5)")
    parser.add_argument(
        "--only",
        type=parts_of(PARTS),
        default=None,
        help=f"comma-separated parts to run, of {','.join(PARTS)}",
    )
    parser.add_argument(
        "--profile", action="store_true", help=f"also profile the {PROFILE_STREAMS}-stream cell"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="quick CI run: 0.2 s cells, 1 and 16 streams, small replays, 50 e2e",
    )
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.warmup, args.streams = 0.2, 0.1, [1, 16]
        args.stream_events, args.table_events, args.notifications, args.rounds = 1000, 2000, 50, 1
    parts = args.only if args.only is not None else {"append", "replay", "e2e"}
    if args.profile:
        parts.add("profile")
    report(run(bench(args, parts)), render, args.json)


if __name__ == "__main__":
    main()
