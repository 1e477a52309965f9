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
import gc
import json
import logging
import os
import pstats
import statistics
import sys
import time
import tracemalloc
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
    paced,
    parts_of,
    progress_notification,
    replay_count,
    report,
    run,
    scratch_database,
    stream_key,
)
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

import mcp_pg_events
from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import Context, new_server
from mcp_pg_events.messages import dump_message, load_message
from mcp_pg_events.testing import McpClient, serve, streamable_app

try:  # the leading peer, when installed: pip install "mcp-persist[postgres]" (it needs mcp 2.x)
    from mcp_persist.postgres import PostgresEventStore as PersistEventStore
except ImportError:
    PersistEventStore = None
PERSIST_MISSING = (
    'mcp-persist is not installed (pip install "mcp-persist[postgres]", mcp 2.x): its rows are skipped'
)
# Its replay skips events older than its ttl (one extra query per replay); production sets one,
# and it warns without. A day, as this store's default retention.
PERSIST_TTL = 86_400

MESSAGE_BYTES = 200
PADDING = "x" * (MESSAGE_BYTES - len(dump_message(progress_notification("bench-0", 0, ""))))
# A report_progress text that makes the SDK's notification about MESSAGE_BYTES long too.
E2E_TEXT = "x" * 80
OURS, PERSIST, NAIVE, MEMORY = "this store", "mcp-persist PostgreSQL", "naive PostgreSQL", "SDK in-memory"
OURS_ASYNC = "this store, synchronous_commit=off"
# What the wake-ups cost end to end: the same store sending none (no live reader anywhere).
OURS_SILENT = "this store, notify=False"
PARTS = ("append", "profile", "replay", "e2e")
# A resume in the middle of a stream: the cursor this many events before its end.
RESUME_TAIL = 100
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
CREATE TABLE IF NOT EXISTS {NAIVE_TABLE} (
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
# What its replay needs, there for its appends too.
NAIVE_INDEX = f"CREATE INDEX IF NOT EXISTS bench_naive_stream ON {NAIVE_TABLE} (stream_id, id)"
# The reference round trip: the same insert, no NOTIFY, on one connection.
BARE_INSERT = f"INSERT INTO {NAIVE_TABLE} (stream_id, message) VALUES ($1, $2) RETURNING id"
# The rest of the cursor's stream, in one query and one result.
NAIVE_REPLAY = f"""
SELECT id, stream_id, message FROM {NAIVE_TABLE}
WHERE stream_id = (SELECT stream_id FROM {NAIVE_TABLE} WHERE id = $1) AND id > $1
ORDER BY id"""
NAIVE_STREAM = f"SELECT stream_id FROM {NAIVE_TABLE} WHERE id = $1"


class NaiveEventStore(EventStore):
    """One row per event, one statement per row, NOTIFY inside: the naive PostgreSQL store.

    Replay reads the rest of the stream in one query (no pages: memory grows with
    the stream) and parses each message on its own. Keyed by stream id alone.
    """

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        data = None if message is None else dump_message(message)
        return str(await self._pool.fetchval(NAIVE_APPEND, stream_id, data))

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        if not last_event_id.isdigit() or len(last_event_id) > 18:
            return None
        cursor = int(last_event_id)
        rows = await self._pool.fetch(NAIVE_REPLAY, cursor)
        if not rows:
            stream: StreamId | None = await self._pool.fetchval(NAIVE_STREAM, cursor)
            return stream
        for row in rows:
            if row[2] is not None:
                await send_callback(EventMessage(load_message(row[2]), str(row[0])))
        return str(rows[0][1])


async def persist_store(pool: asyncpg.Pool[Any]) -> Any:
    """mcp-persist's PostgreSQL store on ``pool``, its table created; None when not installed."""
    if PersistEventStore is None:
        return None
    store = PersistEventStore(pool, ttl=PERSIST_TTL)
    await store.initialize()
    return store


# --- append cells ------------------------------------------------------------

Write = Callable[[], Awaitable[object]]


async def drive_raw(
    writes: list[Write], warmup: float, seconds: float, yield_each: bool = False
) -> tuple[int, list[float]]:
    """Run every stream's writes back to back: ``warmup`` s unmeasured, then ``seconds`` s measured.

    Returns the writes that completed inside the measured window (throughput)
    and the latencies of the writes that started in it.
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
    return completed, latencies


async def drive(
    writes: list[Write], warmup: float, seconds: float, yield_each: bool = False
) -> dict[str, Any]:
    """``drive_raw`` summarized: events/s, events, p50, p99 and max."""
    completed, latencies = await drive_raw(writes, warmup, seconds, yield_each)
    return {"events_per_s": round(completed / seconds), "events": completed, **latency_summary(latencies)}


def messages(streams: int) -> list[Any]:
    return [progress_notification(f"bench-{i}", i, PADDING) for i in range(streams)]


def our_writes(store: PostgresEventStore, label: str, streams: int) -> list[Write]:
    # One session view per stream, stream id "1": the first request's stream of a session.
    return [
        partial(store.session(f"bench-{label}-{i}").store_event, "1", message)
        for i, message in enumerate(messages(streams))
    ]


def peer_writes(store: EventStore, label: str, streams: int) -> list[Write]:
    # The peers are keyed by stream id alone: one id per stream, as a session's scope would make it.
    return [
        partial(store.store_event, f"bench-{label}-{i}/1", message)
        for i, message in enumerate(messages(streams))
    ]


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` starting at the ``r``-th: each store goes first in turn, so drift hits all alike."""
    k = r % len(names)
    return names[k:] + names[:k]


async def append_part(
    dsn: str, levels: list[int], pool_size: int, warmup: float, seconds: float, rounds: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    bare: dict[str, Any] = {}
    await execute(dsn, NAIVE_DDL)
    await execute(dsn, NAIVE_INDEX)
    naive_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
    persist_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
    try:
        async with await PostgresEventStore.connect(dsn, max_pool_size=pool_size) as store:
            stores: dict[str, Any] = {
                OURS: store,
                PERSIST: await persist_store(persist_pool),
                NAIVE: NaiveEventStore(naive_pool),
                MEMORY: InMemoryEventStore(),
            }
            if stores[PERSIST] is None:
                log(PERSIST_MISSING)
                del stores[PERSIST]
            names = list(stores)
            for streams in levels:
                if streams == 1:
                    log("bare INSERT ... RETURNING, one connection")
                    bare = await bare_insert(dsn, warmup, seconds)
                    log(f"  {bare}")
                runs: dict[str, list[tuple[int, list[float]]]] = {name: [] for name in names}
                for r in range(rounds):
                    for name in rotated(names, r):
                        label = f"{streams}-{r}"
                        if name == OURS:
                            writes = our_writes(store, label, streams)
                        else:
                            writes = peer_writes(stores[name], label, streams)
                        log(f"append: {name}, {streams} stream(s), round {r + 1}/{rounds}")
                        runs[name].append(await drive_raw(writes, warmup, seconds, yield_each=name == MEMORY))
                        log(f"  {round(runs[name][-1][0] / seconds):,} events/s")
                rates = {
                    name: statistics.median(done / seconds for done, _ in got) for name, got in runs.items()
                }
                for name, got in runs.items():
                    latencies = [t for _, lat in got for t in lat]
                    cell = {
                        "store": name,
                        "streams": streams,
                        "events_per_s": round(rates[name]),
                        "rounds_events_per_s": [round(done / seconds) for done, _ in got],
                        **latency_summary(latencies),
                        # How many times this store's throughput the row's is.
                        "ours_vs_row": round(rates[OURS] / rates[name], 2) if rates[name] else None,
                    }
                    log(f"  {cell}")
                    cells.append(cell)
    finally:
        await naive_pool.close()
        await persist_pool.close()
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


class FirstEvent:
    """A replay callback that notes when the first event arrived, and counts."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.count = 0

    async def __call__(self, event: EventMessage) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += 1


async def write_stream(store: Any, stream: str, events: int) -> list[str]:
    """A priming event, then ``events`` messages, one ``store_event`` at a time as the SDK stores them."""
    message = progress_notification("bench-replay", 0, PADDING)
    ids = [await store.store_event(stream, None)]
    for _ in range(events):
        ids.append(await store.store_event(stream, message))
    return ids


async def replay_peers(
    stores: dict[str, tuple[EventStore, list[str], str]], rounds: int, resumes: int
) -> dict[str, Any]:
    """Each store replays its stream from the first event, then resumes near its end, rounds interleaved."""
    names = list(stores)
    rates: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = {}
    for r in range(rounds):
        for name in rotated(names, r):
            view, ids, stream = stores[name]
            # Each replay starts from the same collector state: a full collection of this
            # process's heap (the append part's latencies, every store's objects) fell in
            # one replay or another and cut its rate by two thirds, whichever store it was.
            gc.collect()
            start = time.perf_counter()
            got = await replay_count(view, ids[0])
            elapsed = time.perf_counter() - start
            if got != (stream, len(ids) - 1):
                raise RuntimeError(
                    f"{name}: replay gave (stream, events) {got}, expected {(stream, len(ids) - 1)}"
                )
            rates[name].append((len(ids) - 1) / elapsed)
            log(f"replay: {name}, round {r + 1}/{rounds}: {rates[name][-1]:,.0f} events/s")
    for name in names:
        view, ids, _ = stores[name]
        tracemalloc.start()
        try:
            await replay_count(view, ids[0])
            peaks[name] = tracemalloc.get_traced_memory()[1] // 1024
        finally:
            tracemalloc.stop()
    # Mid-stream resumes: RESUME_TAIL events follow the cursor.
    first: dict[str, list[float]] = {name: [] for name in names}
    whole: dict[str, list[float]] = {name: [] for name in names}
    log(f"resume: {resumes} resumes per store, {RESUME_TAIL} events after the cursor")
    for r in range(resumes):
        for name in rotated(names, r):
            view, ids, stream = stores[name]
            callback = FirstEvent()
            start = time.perf_counter()
            if await view.replay_events_after(ids[-1 - RESUME_TAIL], callback) != stream:
                raise RuntimeError(f"{name}: a resume lost its stream")
            end = time.perf_counter()
            if callback.first is None or callback.count != RESUME_TAIL:
                raise RuntimeError(f"{name}: a resume sent {callback.count} events of {RESUME_TAIL}")
            first[name].append(callback.first - start)
            whole[name].append(end - start)
    ours = statistics.median(rates[OURS])
    ours_first = statistics.median(first[OURS])
    rows = []
    for name in names:
        rate = statistics.median(rates[name])
        rows.append(
            {
                "store": name,
                "events": len(stores[name][1]) - 1,
                "events_per_s": round(rate),
                "rounds_events_per_s": [round(x) for x in rates[name]],
                "peak_kib": peaks[name],
                "resume_first_p50_ms": round(statistics.median(first[name]) * 1000, 3),
                "resume_first_p99_ms": latency_summary(first[name])["p99_ms"],
                "resume_whole_p50_ms": round(statistics.median(whole[name]) * 1000, 3),
                "ours_vs_row": round(ours / rate, 2),
                "ours_first_vs_row": round(statistics.median(first[name]) / ours_first, 2),
            }
        )
    return {"rounds": rounds, "resumes": resumes, "rows": rows}


async def replays_under_writes(
    stores: dict[str, tuple[EventStore, list[str], str]],
    writes: dict[str, list[Write]],
    rate: float,
    rounds: int,
    replays: int,
) -> dict[str, Any]:
    """Each store replays its stream ``replays`` times per round while its writers append, paced.

    Every store is offered the same write load (each writer ``rate`` / writers
    events/s), so that what differs is what the replays feel, not how much the
    writers manage to write; the writes/s column says what each store carried
    (the naive store's replay, one query for the whole stream, holds up its
    writers). Writers and replays share this process's event loop, as in one
    server process.
    """
    names = list(stores)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    written: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            view, ids, stream = stores[name]
            stop = asyncio.Event()
            interval = len(writes[name]) / rate
            writers = [asyncio.ensure_future(paced(write, interval, stop)) for write in writes[name]]
            await asyncio.sleep(0.3)  # the writers' first batches: connections, streams
            began = time.perf_counter()
            for _ in range(replays):
                start = time.perf_counter()
                got = await replay_count(view, ids[0])
                seconds[name].append(time.perf_counter() - start)
                if got != (stream, len(ids) - 1):
                    raise RuntimeError(f"{name}: a replay under writes gave {got}")
            stop.set()
            done = await asyncio.gather(*writers)
            written[name].append(sum(done) / (time.perf_counter() - began + 0.3))
            log(
                f"replay under writes: {name}, round {r + 1}/{rounds}: p50 "
                f"{statistics.median(seconds[name][-replays:]) * 1000:.1f} ms, "
                f"{written[name][-1]:,.0f} writes/s"
            )
    ours_p99 = latency_summary(seconds[OURS])["p99_ms"]
    rows = []
    for name in names:
        summary = latency_summary(seconds[name])
        rows.append(
            {
                "store": name,
                "replays": len(seconds[name]),
                **summary,
                "writes_per_s": round(statistics.median(written[name])),
                "p99_vs_ours": round(summary["p99_ms"] / ours_p99, 2),
            }
        )
    return {"writers": len(writes[OURS]), "rate": rate, "rounds": rounds, "rows": rows}


async def replay_part(
    dsn: str,
    stream_events: int,
    table_events: int,
    rounds: int,
    resumes: int,
    loaded: tuple[int, float, int],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    message = progress_notification("bench-replay", 0, PADDING)
    await execute(dsn, NAIVE_DDL)
    await execute(dsn, NAIVE_INDEX)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(await PostgresEventStore.connect(dsn))
        # The peers' pools as large as the store's: the writers under load share them.
        pool_size = default_pool_size()
        naive_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
        stack.push_async_callback(naive_pool.close)
        persist_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
        stack.push_async_callback(persist_pool.close)
        # (a) A stream per store, written through it one event at a time as the SDK
        # does, after the priming event the SDK stores first: the replay's cursor.
        peers: dict[str, tuple[EventStore, list[str], str]] = {}
        log(f"replay: writing a {stream_events:,}-event stream through each store")
        view = store.session("replay-stream")
        peers[OURS] = (view, await write_stream(view, "1", stream_events), "1")
        persist = await persist_store(persist_pool)
        if persist is None:
            log(PERSIST_MISSING)
        else:
            peers[PERSIST] = (persist, await write_stream(persist, "replay/1", stream_events), "replay/1")
        naive = NaiveEventStore(naive_pool)
        peers[NAIVE] = (naive, await write_stream(naive, "replay/1", stream_events), "replay/1")
        await execute(dsn, "VACUUM ANALYZE")
        results["stream"] = await replay_peers(peers, rounds, resumes)
        for row in results["stream"]["rows"]:
            log(f"  {row}")
        writers, rate, replays = loaded
        if writers and replays:
            log(f"replay under writes: {writers} writers appending {rate:,.0f} events/s in all, each store")
            writes = {
                name: (
                    our_writes(store, "loaded", writers)
                    if name == OURS
                    else peer_writes(view, "loaded", writers)
                )
                for name, (view, _, _) in peers.items()
            }
            results["loaded"] = await replays_under_writes(peers, writes, rate, rounds, replays)
            for row in results["loaded"]["rows"]:
                log(f"  {row}")

        # (b) One stream holding the whole table, bulk-written with SQL except for
        # its middle event, stored through the store so that its id is a real cursor.
        if table_events:
            before = table_events // 2
            after = table_events - before
            log(f"replay: writing a {table_events:,}-event stream (SQL, one event through the store)")
            await fill(store, dsn, before - 1, session="replay-table", stream="1")
            middle = await store.session("replay-table").store_event("1", message)
            await bulk_append(dsn, stream_key(middle), after, first=before)
            log(f"replay: {after:,} events from the middle of the {table_events:,}-event table")
            result = await measure_replay(store.session("replay-table"), middle, after, "1")
            results["table"] = {
                "case": f"{table_events:,}-event table, from its middle",
                "events": after,
                **result,
            }
            log(f"  {results['table']}")
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
    names = (OURS, OURS_ASYNC, OURS_SILENT, MEMORY)
    times: dict[str, list[float]] = {name: [] for name in names}
    bare_p50: list[float] = []
    # The SDK logs every session at INFO level: keep stderr to our progress lines.
    logging.getLogger("mcp").setLevel(logging.WARNING)
    await execute(dsn, NAIVE_DDL)
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(await PostgresEventStore.connect(dsn))
        ours_async = await stack.enter_async_context(
            await PostgresEventStore.connect(dsn, synchronous_commit="off")
        )
        ours_silent = await stack.enter_async_context(await PostgresEventStore.connect(dsn, notify=False))
        urls = {
            OURS: await stack.enter_async_context(serve(e2e_app(ours))),
            OURS_ASYNC: await stack.enter_async_context(serve(e2e_app(ours_async))),
            OURS_SILENT: await stack.enter_async_context(serve(e2e_app(ours_silent))),
            MEMORY: await stack.enter_async_context(serve(e2e_app(ScopedInMemory()))),
        }
        for r in range(rounds):
            # Rotate which goes first, so that drift in the machine's load hits all.
            for name in rotated(list(names), r):
                log(f"e2e round {r + 1}/{rounds}: {name}, {count:,} notifications")
                times[name].append(round(await run_client(urls[name], count), 4))
                log(f"  {times[name][-1]} s")
            # The reference, in the same run: one bare INSERT commit round trip.
            bare_p50.append((await bare_insert(dsn, 0.1, 0.5))["p50_ms"])
    medians = {name: statistics.median(t) for name, t in times.items()}
    bare = statistics.median(bare_p50)
    added = {
        name: (medians[name] - medians[MEMORY]) / count * 1000 for name in (OURS, OURS_ASYNC, OURS_SILENT)
    }
    return {
        "notifications": count,
        "rounds": rounds,
        "seconds": {name: {"median": round(medians[name], 4), "runs": times[name]} for name in names},
        "ratio": round(medians[OURS] / medians[MEMORY], 3),
        "ratio_async": round(medians[OURS_ASYNC] / medians[MEMORY], 3),
        "bare_insert_p50_ms": bare,
        "bare_insert_p50_runs_ms": bare_p50,
        "added_ms_per_message": {name: round(v, 3) for name, v in added.items()},
        "added_vs_bare": {name: round(v / bare, 2) for name, v in added.items()},
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

    def ratio(streams: int, peer: str) -> float | None:
        ours, other = _cell(results, OURS, streams), _cell(results, peer, streams)
        return ours["events_per_s"] / other["events_per_s"] if ours and other else None

    add("throughput vs naive PostgreSQL, 64 streams", ">= 10x", ratio(64, NAIVE), lambda v: v >= 10, "x")
    for streams in (64, 256):
        add(
            f"throughput vs mcp-persist, {streams} streams",
            ">= 5x",
            ratio(streams, PERSIST),
            lambda v: v >= 5,
            "x",
        )
    ours256 = _cell(results, OURS, 256)
    add(
        "throughput, 256 streams",
        ">= 30,000/s",
        ours256 and ours256["events_per_s"],
        lambda v: v >= 30_000,
        "/s",
    )
    ours64 = _cell(results, OURS, 64)
    add("p99 latency, 64 streams", "<= 10 ms", ours64 and ours64["p99_ms"], lambda v: v <= 10, " ms")
    ours1, bare = _cell(results, OURS, 1), results.get("bare_insert")
    single = ours1["p50_ms"] / bare["p50_ms"] if ours1 and bare else None
    add("1-stream p50 / bare INSERT p50", "<= 1.3x", single, lambda v: v <= 1.3, "x")
    stream = {row["store"]: row for row in results.get("replay", {}).get("stream", {}).get("rows", [])}
    add(
        "replay, 10k-event stream",
        ">= 200,000/s",
        stream[OURS]["events_per_s"] if OURS in stream else None,
        lambda v: v >= 200_000,
        "/s",
    )
    add(
        "replay vs mcp-persist",
        ">= 2x",
        stream[PERSIST]["ours_vs_row"] if PERSIST in stream else None,
        lambda v: v >= 2,
        "x",
    )
    add(
        "resume first event p50, mcp-persist / this store",
        "> 1x",
        stream[PERSIST]["ours_first_vs_row"] if PERSIST in stream else None,
        lambda v: v > 1,
        "x",
    )
    loaded = {row["store"]: row for row in results.get("replay", {}).get("loaded", {}).get("rows", [])}
    add(
        "replay p99 under writes, naive / this store",
        ">= 1x",
        loaded[NAIVE]["p99_vs_ours"] if NAIVE in loaded else None,
        lambda v: v >= 1,
        "x",
    )
    table_case = results.get("replay", {}).get("table")
    if table_case:
        add(
            f"replay: {table_case['case']}",
            ">= 200,000/s",
            table_case["events_per_s"],
            lambda v: v >= 200_000,
            "/s",
        )
    e2e = results.get("e2e")
    add(
        "end to end: added per message / bare commit",
        "<= 1.3x",
        e2e and e2e["added_vs_bare"][OURS],
        lambda v: v <= 1.3,
        "x",
    )
    add(
        "end to end, synchronous_commit=off: added per message",
        "< 0.25 ms",
        e2e and e2e["added_ms_per_message"][OURS_ASYNC],
        lambda v: v < 0.25,
        " ms",
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
            ["store", "streams", "events/s", "p50 ms", "p99 ms", "max ms", "this store x"],
            (
                [c["store"], str(c["streams"]), f"{c['events_per_s']:,}"]
                + [f"{c[k]:.3f}" for k in ("p50_ms", "p99_ms", "max_ms")]
                + [f"{c['ours_vs_row']:.2f}" if c["ours_vs_row"] else "-"]
                for c in results["append"]
            ),
        )
        lines.append(
            f"median events/s of {config['append_rounds']} interleaved round(s); latencies over all rounds; "
            "'this store x': this store's events/s over the row's"
        )
        bare = results.get("bare_insert")
        if bare:
            lines.append(
                f"bare INSERT ... RETURNING, 1 connection: {bare['events_per_s']:,}/s, "
                f"p50 {bare['p50_ms']:.3f} ms, p99 {bare['p99_ms']:.3f} ms"
            )
    if "replay" in results:
        stream = results["replay"]["stream"]
        lines += [
            "",
            f"replay of a {stream['rows'][0]['events']:,}-event stream from its first event (median of "
            f"{stream['rounds']} interleaved rounds; callback only counts; peak Python memory from a traced "
            f"pass), and mid-stream resumes ({RESUME_TAIL} events after the cursor, "
            f"{stream['resumes']} each)",
        ]
        lines += table(
            [
                "store",
                "events/s",
                "peak KiB",
                "this store x",
                "resume 1st p50 ms",
                "1st p99 ms",
                "whole p50 ms",
                "1st vs this store",
            ],
            (
                [
                    c["store"],
                    f"{c['events_per_s']:,}",
                    f"{c['peak_kib']:,}",
                    f"{c['ours_vs_row']:.2f}",
                    f"{c['resume_first_p50_ms']:.3f}",
                    f"{c['resume_first_p99_ms']:.3f}",
                    f"{c['resume_whole_p50_ms']:.3f}",
                    f"{c['ours_first_vs_row']:.2f}",
                ]
                for c in stream["rows"]
            ),
        )
        loaded_part = results["replay"].get("loaded")
        if loaded_part:
            lines += [
                "",
                f"the same replay while {loaded_part['writers']} writers append to the same store, "
                f"{loaded_part['rate']:,.0f} events/s in all offered, paced (writes/s: what it carried); "
                f"{loaded_part['rounds']} interleaved round(s)",
            ]
            lines += table(
                ["store", "replays", "p50 ms", "p99 ms", "max ms", "writes/s", "p99 vs this store"],
                (
                    [c["store"], str(c["replays"])]
                    + [f"{c[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms")]
                    + [f"{c['writes_per_s']:,}", f"{c['p99_vs_ours']:.2f}"]
                    for c in loaded_part["rows"]
                ),
            )
        big = results["replay"].get("table")
        if big:
            lines.append(
                f"this store, {big['case']}: {big['events']:,} events, {big['events_per_s']:,}/s, "
                f"{big['seconds']} s, peak {big['peak_kib']:,} KiB"
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
        lines.append(
            f"ratio to in-memory: this store {e2e['ratio']:.2f}, "
            f"synchronous_commit=off {e2e['ratio_async']:.2f}"
        )
        added, vs = e2e["added_ms_per_message"], e2e["added_vs_bare"]
        lines.append(
            f"added per message: this store {added[OURS]:.3f} ms ({vs[OURS]:.2f}x one bare INSERT commit, "
            f"p50 {e2e['bare_insert_p50_ms']:.3f} ms in this run), "
            f"synchronous_commit=off {added[OURS_ASYNC]:.3f} ms ({vs[OURS_ASYNC]:.2f}x), "
            f"notify=False {added[OURS_SILENT]:.3f} ms ({vs[OURS_SILENT]:.2f}x)"
        )
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
            "append_rounds": args.append_rounds,
            "event_loop": "uvloop" if args.uvloop else "asyncio",
            "parts": sorted(parts),
            "smoke": args.smoke,
        }
    }
    async with scratch_database(args.dsn) as dsn:
        if "append" in parts:
            results["append"], results["bare_insert"] = await append_part(
                dsn, args.streams, args.pool_size, args.warmup, args.seconds, args.append_rounds
            )
        if "profile" in parts:
            results["profile"] = await profile_part(dsn, args.pool_size, args.warmup, args.seconds)
        if "replay" in parts:
            results["replay"] = await replay_part(
                dsn,
                args.stream_events,
                args.table_events,
                args.replay_rounds,
                args.resumes,
                (args.loaded_writers, args.loaded_rate, args.loaded_replays),
            )
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
        "--streams", type=int_list, default=[1, 64, 256], help="concurrent streams (1,64,256)"
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
        "--table-events",
        type=int,
        default=1_000_000,
        help="events of the big table (1,000,000; 0: skip that case)",
    )
    parser.add_argument(
        "--notifications", type=int, default=1000, help="progress notifications end to end (1000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds per store (5)")
    parser.add_argument("--append-rounds", type=int, default=3, help="interleaved rounds per append cell (3)")
    parser.add_argument("--replay-rounds", type=int, default=5, help="interleaved replays per store (5)")
    parser.add_argument("--resumes", type=int, default=200, help="mid-stream resumes per store (200)")
    parser.add_argument(
        "--loaded-writers", type=int, default=64, help="writers appending during the loaded replays (64)"
    )
    parser.add_argument(
        "--loaded-rate", type=float, default=1600, help="events/s those writers append in all (1,600)"
    )
    parser.add_argument(
        "--loaded-replays",
        type=int,
        default=20,
        help="replays per store per round under writes (20; 0: skip)",
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop, as uvicorn[standard] servers do"
    )
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
        args.append_rounds, args.replay_rounds, args.resumes = 1, 1, 3
        args.loaded_writers, args.loaded_rate, args.loaded_replays = 4, 200.0, 2
    parts = args.only if args.only is not None else {"append", "replay", "e2e"}
    if args.profile:
        parts.add("profile")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    report(run(bench(args, parts)), render, args.json)


if __name__ == "__main__":
    main()
