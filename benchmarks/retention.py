"""Retention: partition drops against row deletes, and what a run costs concurrent appends.

Three scratch databases, each holding N expired events (~200-byte messages over
1,000 streams, bulk-written with ``INSERT ... SELECT generate_series``, then
``VACUUM ANALYZE``, as autovacuum would have left them, then ``CHECKPOINT``):

- drops: the N events fill N / width partitions below the sequence; one
  ``run_retention`` detaches and drops them all.
- deletes: the N events sit in one partition that is still being written (the
  sequence is inside it), so the same run has to delete them row by row, in
  batches; then the ``VACUUM`` that reclaims the space, measured apart.
- latency: half the events in whole partitions, half in the partition in use.
  Paced writers (``--writers`` streams, each appending every ``--interval-ms``
  through ``PostgresEventStore.connect(dsn).session(key).store_event``) run
  first alone (idle), then through a retention run that drops, then deletes.

Time and WAL (``pg_current_wal_lsn()`` before and after) come from the first
two, with nothing else running; append latency (p50, p99, max) from the third,
per phase. The target: p99 during retention at most 2x idle.

    python benchmarks/retention.py                      # 5,000,000 events, a few minutes
    python benchmarks/retention.py --events 1000000     # quicker
    python benchmarks/retention.py --smoke              # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch databases are created
there and dropped at the end. CHECKPOINT needs a superuser or pg_checkpoint;
without it the WAL numbers include fewer full-page images.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from datetime import timedelta
from functools import partial
from typing import Any

import asyncpg
from _common import (
    DEFAULT_DSN,
    execute,
    latency_summary,
    log,
    paced,
    parts_of,
    payload,
    progress_notification,
    report,
    run,
    scratch_database,
)

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.retention import RetentionReport, format_bytes, run_retention

STREAMS = 1000
TTL = timedelta(days=1)
# The events are two days old; no roll-over by time, so each layout stays as built.
MAX_AGE = timedelta(days=30)
LOAD_CHUNK = 500_000
PARTS = ("drops", "deletes", "latency")

# Streams of one session for the bulk-written events.
MAKE_STREAMS = """
WITH session AS (INSERT INTO mcp_events_sessions (key) VALUES ('bulk') RETURNING id)
INSERT INTO mcp_events_streams (session_id, name, tag)
SELECT session.id, convert_to('s' || g, 'UTF8'), 'bulk' FROM session, generate_series(1, $1) g
RETURNING id
"""

# Stream keys by arithmetic: indexing an array parameter per row is several times slower.
# $1 first stream key, $2 streams (consecutive keys), $3 events, $4 message
LOAD = """
INSERT INTO mcp_events_events (stream_key, seq, created_at, message)
SELECT $1 + g % $2, nextval('mcp_events_seq'), now() - interval '2 days', $4
FROM generate_series(1, $3) g
"""

WAL_LSN = "SELECT pg_current_wal_lsn()"
WAL_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)::bigint"


async def replace_partitions(conn: asyncpg.Connection, layout: list[tuple[int, int]]) -> None:
    """Drop the migration's partitions; create ``count`` partitions of ``width`` seqs, for each pair."""
    for row in await conn.fetch("SELECT name FROM mcp_events_partitions() WHERE attached"):
        await conn.execute(f'ALTER TABLE mcp_events_events DETACH PARTITION "{row["name"]}"')
        await conn.execute(f'DROP TABLE "{row["name"]}"')
    for count, width in layout:
        await conn.fetchval("SELECT mcp_events_ensure_partitions($1, $2)", count, width)


async def load(dsn: str, events: int, layout: list[tuple[int, int]]) -> None:
    """``events`` two-day-old events, seq 1..events, in partitions laid out as ``layout``."""
    conn = await asyncpg.connect(dsn)
    try:
        await replace_partitions(conn, layout)
        keys = sorted(r["id"] for r in await conn.fetch(MAKE_STREAMS, STREAMS))
        if keys != list(range(keys[0], keys[0] + STREAMS)):
            raise RuntimeError("the stream keys of the scratch database are not consecutive")
        for start in range(0, events, LOAD_CHUNK):
            n = min(LOAD_CHUNK, events - start)
            await conn.execute(LOAD, keys[0], STREAMS, n, payload(start))
            log(f"  wrote {start + n:,} / {events:,}")
        log("  VACUUM ANALYZE")
        await conn.execute("VACUUM ANALYZE")
        await checkpoint(conn)
    finally:
        await conn.close()


async def checkpoint(conn: asyncpg.Connection) -> None:
    # Every measurement starts right after a checkpoint, so that each pays its
    # full-page images the same way.
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        log("  (no CHECKPOINT: not allowed for this role)")


async def measured(dsn: str, what: str, work: Any) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        lsn = await conn.fetchval(WAL_LSN)
        start = time.perf_counter()
        result = await work()
        seconds = time.perf_counter() - start
        wal = await conn.fetchval(WAL_SINCE, lsn)
    finally:
        await conn.close()
    log(f"  {what}: {seconds:.2f} s, {format_bytes(wal)} of WAL")
    return {"what": what, "seconds": round(seconds, 3), "wal_bytes": wal, "result": result}


def report_dict(report: RetentionReport) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if k != "seconds"}


async def retention_run(dsn: str, batch: int) -> dict[str, Any]:
    """One ``run_retention`` of this benchmark, as a dict: the work ``measured`` times."""
    return report_dict(await run_retention(dsn, ttl=TTL, batch_size=batch, partition_max_age=MAX_AGE))


async def drops_part(dsn: str, events: int, width: int, batch: int) -> dict[str, Any]:
    partitions = math.ceil(events / width)
    log(f"drops: {events:,} events in {partitions} partitions of {width:,}")
    await load(dsn, events, [(partitions + 1, width)])
    # The sequence moves past the last loaded partition, as it would have.
    await execute(dsn, "SELECT setval('mcp_events_seq', $1, false)", partitions * width + 1)
    result = await measured(dsn, "partition drops", partial(retention_run, dsn, batch))
    if result["result"]["partitions_dropped"] != partitions or result["result"]["rows_deleted"]:
        raise RuntimeError(f"expected {partitions} partitions dropped and no rows deleted: {result}")
    return result


async def deletes_part(dsn: str, events: int, batch: int) -> list[dict[str, Any]]:
    log(f"deletes: {events:,} events in the partition in use")
    await load(dsn, events, [(1, 2 * events)])
    result = await measured(dsn, "row deletes", partial(retention_run, dsn, batch))
    if result["result"]["rows_deleted"] != events or result["result"]["partitions_dropped"]:
        raise RuntimeError(f"expected {events} rows deleted and no partition dropped: {result}")
    vacuum = partial(execute, dsn, "VACUUM mcp_events_events")
    return [result, await measured(dsn, "VACUUM after the deletes", vacuum)]


async def latency_part(
    dsn: str, events: int, width: int, batch: int, writers: int, interval: float, idle: float
) -> dict[str, Any]:
    half = events // 2
    partitions = max(1, half // width)
    log(f"latency: {partitions * width:,} events in {partitions} partitions, the rest in the one in use")
    await load(dsn, events, [(partitions, width), (1, 2 * events)])

    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    async with await PostgresEventStore.connect(dsn, max_pool_size=max(2, writers)) as store:

        async def write(i: int) -> None:
            view = store.session(f"writer-{i}")
            message = progress_notification(f"writer-{i}", i, "x" * 100)
            await view.store_event("1", message)  # creates the stream: not measured

            async def timed() -> None:
                start = time.perf_counter()
                await view.store_event("1", message)
                samples.append((start, time.perf_counter() - start))

            await paced(timed, interval, stop)

        tasks = [asyncio.create_task(write(i)) for i in range(writers)]
        try:
            await asyncio.sleep(1.0)  # warm-up: pool connections, first statements
            idle_from = time.perf_counter()
            await asyncio.sleep(idle)
            marks: dict[str, float] = {"start": time.perf_counter()}

            def progress(line: str) -> None:
                if line.startswith("deleted ") and "deletes" not in marks:
                    marks["deletes"] = time.perf_counter()

            report = await run_retention(
                dsn, ttl=TTL, batch_size=batch, partition_max_age=MAX_AGE, progress=progress
            )
            marks["end"] = time.perf_counter()
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    if report.partitions_dropped != partitions or report.rows_deleted != events - partitions * width:
        raise RuntimeError(f"unexpected retention run: {report}")
    deletes_from = marks.get("deletes", marks["end"])
    phases = {
        "idle": [d for t, d in samples if idle_from <= t < marks["start"]],
        "during partition drops": [d for t, d in samples if marks["start"] <= t < deletes_from],
        "during row deletes": [d for t, d in samples if deletes_from <= t < marks["end"]],
        "during the whole run": [d for t, d in samples if marks["start"] <= t < marks["end"]],
    }
    return {
        "writers": writers,
        "interval_ms": interval * 1000,
        "retention_seconds": round(marks["end"] - marks["start"], 3),
        "drop_seconds": round(deletes_from - marks["start"], 3),
        "phases": {
            name: {"appends": len(values), **latency_summary(values)} for name, values in phases.items()
        },
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "events": args.events,
        "partition_width": args.partition_width,
        "batch_size": args.batch_size,
    }
    if "drops" in args.only:
        async with scratch_database(args.dsn) as dsn:
            results["drops"] = await drops_part(dsn, args.events, args.partition_width, args.batch_size)
    if "deletes" in args.only:
        async with scratch_database(args.dsn) as dsn:
            results["deletes"], results["vacuum"] = await deletes_part(dsn, args.events, args.batch_size)
    if "latency" in args.only:
        async with scratch_database(args.dsn) as dsn:
            results["latency"] = await latency_part(
                dsn,
                args.events,
                args.partition_width,
                args.batch_size,
                args.writers,
                args.interval_ms / 1000,
                args.idle_seconds,
            )
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        f"expire {results['events']:,} events (~200-byte messages); partitions of "
        f"{results['partition_width']:,}; delete batches of {results['batch_size']:,}",
        "",
        f"{'how':<26} {'seconds':>8} {'WAL':>10} {'events/s':>11}",
    ]
    for key in ("drops", "deletes", "vacuum"):
        if key not in results:
            continue
        r = results[key]
        rate = f"{results['events'] / r['seconds']:,.0f}" if key != "vacuum" and r["seconds"] else ""
        lines.append(f"{r['what']:<26} {r['seconds']:>8.2f} {format_bytes(r['wal_bytes']):>10} {rate:>11}")
    if "latency" not in results:
        return "\n".join(lines)
    latency = results["latency"]
    lines += [
        "",
        f"append latency, {latency['writers']} streams each appending every {latency['interval_ms']:g} ms "
        f"(retention run: {latency['retention_seconds']:.1f} s, drops {latency['drop_seconds']:.2f} s)",
        f"{'phase':<26} {'appends':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for name, p in latency["phases"].items():
        lines.append(
            f"{name:<26} {p['appends']:>8,} {p['p50_ms']:>8.2f} {p['p99_ms']:>8.2f} {p['max_ms']:>8.2f}"
        )
    idle = latency["phases"]["idle"]["p99_ms"]
    during = latency["phases"]["during the whole run"]["p99_ms"]
    ratio = during / idle if idle else math.nan
    results["p99_ratio"] = round(ratio, 2)
    verdict = "met" if ratio <= 2 else "NOT met"
    lines.append(f"p99 during retention / idle: {ratio:.2f}x (target <= 2x: {verdict})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--events", type=int, default=5_000_000, help="expired events (default 5,000,000)")
    parser.add_argument(
        "--partition-width", type=int, default=1_000_000, help="seqs per partition (default 1,000,000)"
    )
    parser.add_argument("--batch-size", type=int, default=2_000, help="rows per delete batch (default 2,000)")
    parser.add_argument("--writers", type=int, default=8, help="appending streams (default 8)")
    parser.add_argument(
        "--interval-ms", type=float, default=10, help="ms between a stream's appends (default 10)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10, help="idle latency window (default 10)")
    parser.add_argument(
        "--only",
        type=parts_of(PARTS),
        default=set(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default all)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 20,000 events, tiny partitions")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.partition_width, args.batch_size = 20_000, 5_000, 2_000
        args.writers, args.idle_seconds = 2, 0.5
    report(run(main_async(args)), render, args.json)


if __name__ == "__main__":
    main()
