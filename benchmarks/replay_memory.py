"""Replay of one long stream: events/s and the memory the replay holds.

The store replays in pages (``replay_batch_size`` rows per query), so the memory a
replay holds should not grow with the stream. This writes one stream of N events
(~200-byte progress notifications) into a scratch database, replays it from its
first event with a callback that only counts, and reports, per page size, the
replay rate and the peak of Python allocations during the replay (tracemalloc, in
a second pass: tracing slows Python down).

    python benchmarks/replay_memory.py                   # 1,000,000 events
    python benchmarks/replay_memory.py --events 20000    # quick look

The server is $MCP_PG_EVENTS_DSN (or --dsn); the scratch database is created on it
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tracemalloc
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore, migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PARTITION_WIDTH = 1_000_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def payload(i: int) -> bytes:
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "bench", "progress": i, "total": 10**6, "message": "x" * 100},
    }
    return json.dumps(message, separators=(",", ":")).encode()


async def fill(store: PostgresEventStore, dsn: str, events: int) -> str:
    """One stream of ``events`` messages after a priming event; returns the priming id."""
    cursor = await store.session("bench").store_event("long", None)
    stream_key = int(cursor.split("-")[0])
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval("SELECT mcp_events_ensure_partitions($1)", events // PARTITION_WIDTH + 2)
        chunk = 100_000
        for start in range(0, events, chunk):
            n = min(chunk, events - start)
            await conn.execute(
                "INSERT INTO mcp_events_events (stream_key, message) SELECT $1, m FROM unnest($2::bytea[]) m",
                stream_key,
                [payload(start + i) for i in range(n)],
            )
            log(f"  wrote {start + n:,} / {events:,}")
        await conn.execute("VACUUM ANALYZE mcp_events_events")
    finally:
        await conn.close()
    return cursor


async def replay(store: PostgresEventStore, cursor: str) -> int:
    count = 0

    async def count_event(event: EventMessage) -> None:
        nonlocal count
        count += 1

    assert await store.session("bench").replay_events_after(cursor, count_event) == "long"
    return count


async def measure(dsn: str, cursor: str, events: int, batch: int) -> dict[str, Any]:
    async with await PostgresEventStore.connect(dsn, replay_batch_size=batch) as store:
        start = time.perf_counter()
        count = await replay(store, cursor)
        elapsed = time.perf_counter() - start
        if count != events:
            raise RuntimeError(f"replayed {count} events of {events}")
        tracemalloc.start()
        try:
            await replay(store, cursor)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return {
        "batch": batch,
        "events_per_s": round(count / elapsed),
        "seconds": round(elapsed, 2),
        "peak_kib": peak // 1024,
    }


async def run(dsn: str, events: int, batches: list[int]) -> list[dict[str, Any]]:
    name = f"mcp_events_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        bench_dsn = with_database(dsn, name)
        log(f"scratch database {name}: migrating")
        await asyncio.to_thread(migrate.upgrade, bench_dsn)
        async with await PostgresEventStore.connect(bench_dsn) as store:
            log(f"writing one stream of {events:,} events")
            cursor = await fill(store, bench_dsn, events)
        results = []
        for batch in batches:
            log(f"replaying {events:,} events, {batch} rows per page")
            results.append(await measure(bench_dsn, cursor, events, batch))
            log(f"  {results[-1]}")
        return results
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="events in the stream (default 1,000,000)"
    )
    parser.add_argument(
        "--batch", type=int, action="append", help="page sizes to try (default 100, 500, 2000)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 2,000 events, one page size")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.batch = 2_000, [500]
    batches = args.batch or [100, 500, 2000]
    results = asyncio.run(run(args.dsn, args.events, batches))
    print(f"replay of one stream of {args.events:,} events (~200-byte messages)")
    print(f"{'page rows':>9}  {'events/s':>9}  {'seconds':>7}  {'peak Python memory':>18}")
    for r in results:
        print(f"{r['batch']:>9}  {r['events_per_s']:>9,}  {r['seconds']:>7}  {r['peak_kib']:>14,} KiB")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"events": args.events, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
