"""Replay of one long stream: events/s and the memory the replay holds.

The store replays in pages (``replay_batch_size`` rows per query), so the memory a
replay holds should not grow with the stream. This writes one stream of N events
(~200-byte progress notifications) into a scratch database, replays it from its
first event with a callback that only counts, and reports, per page size, the
replay rate and the peak of Python allocations during the replay (tracemalloc, in
a second pass: tracing slows Python down).

    python benchmarks/replay_memory.py                   # 1,000,000 events
    python benchmarks/replay_memory.py --events 20000    # quick look
    python benchmarks/replay_memory.py --fresh --events 100000 --batch 500

``--fresh`` replays before the table is analyzed (a new partition until
autovacuum gets to it), with the store's page query and, side by side, with the
``LIMIT $3`` form it had before, whose plan read the rest of the stream for every
page there.

The server is $MCP_PG_EVENTS_DSN (or --dsn); the scratch database is created on it
and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from _common import DEFAULT_DSN, fill, log, measure_replay, report, run, scratch_database

from mcp_pg_events import PostgresEventStore, sql

# The page query before LIMIT became a subquery (see sql.REPLAY_PAGE), for --fresh.
FORMER_REPLAY_PAGE = sql.REPLAY_PAGE.replace("LIMIT (SELECT $3::int)", "LIMIT $3")


async def measure(dsn: str, cursor: str, events: int, batch: int, query: str) -> dict[str, Any]:
    store_query, sql.REPLAY_PAGE = sql.REPLAY_PAGE, query
    try:
        async with await PostgresEventStore.connect(dsn, replay_batch_size=batch) as store:
            result = await measure_replay(store.session("bench"), cursor, events, "long")
    finally:
        sql.REPLAY_PAGE = store_query
    return {"batch": batch, **result}


async def run_all(dsn: str, events: int, batches: list[int], fresh: bool) -> list[dict[str, Any]]:
    queries = {"store": sql.REPLAY_PAGE}
    if fresh:
        queries["former LIMIT $3"] = FORMER_REPLAY_PAGE
    async with scratch_database(dsn) as bench_dsn:
        async with await PostgresEventStore.connect(bench_dsn) as store:
            log(f"writing one stream of {events:,} events{', not analyzed' if fresh else ''}")
            cursor = await fill(store, bench_dsn, events, analyze=not fresh)
        results = []
        for batch in batches:
            # Two rounds, the order reversed in the second, when there are two queries.
            order = list(queries.items())
            for _ in range(len(order)):
                for name, query in order:
                    log(f"replaying {events:,} events, {batch} rows per page, {name} query")
                    results.append({"query": name, **await measure(bench_dsn, cursor, events, batch, query)})
                    log(f"  {results[-1]}")
                order.reverse()
        return results


def render(results: dict[str, Any]) -> str:
    lines = [
        f"replay of one stream of {results['events']:,} events (~200-byte messages)",
        f"{'page rows':>9}  {'query':<16}  {'events/s':>9}  {'seconds':>7}  {'peak Python memory':>18}",
    ]
    for r in results["results"]:
        lines.append(
            f"{r['batch']:>9}  {r['query']:<16}  {r['events_per_s']:>9,}  {r['seconds']:>7}"
            f"  {r['peak_kib']:>14,} KiB"
        )
    return "\n".join(lines)


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
    parser.add_argument(
        "--fresh", action="store_true", help="replay before ANALYZE, also with the former page query"
    )
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 2,000 events, one page size")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.batch, args.fresh = 2_000, [500], True
    batches = args.batch or [100, 500, 2000]
    results = run(run_all(args.dsn, args.events, batches, args.fresh))
    report({"events": args.events, "results": results}, render, args.json)


if __name__ == "__main__":
    main()
