"""Scale-out: the same append load spread over 1, 2, 4 and 8 worker processes on one database.

How a server is deployed: several worker processes (uvicorn or gunicorn workers,
pods), each with its own store, pool and LISTEN connection, on one PostgreSQL.
For each count of processes P, in one run on one scratch database:

- append: ``--streams`` concurrent streams in all (64 by default), split evenly
  over the P processes, each stream writing ~200-byte progress notifications one
  ``await`` at a time (the ``append.py`` cell), all processes starting at the same
  wall-clock moment: aggregate events/s, and p50 / p99 / max over every write.
- live tail: each process holds a live subscription (so its listener LISTENs, as
  in production: before PostgreSQL 19 every NOTIFY wakes every listening
  backend). Process 0 also appends to a probe stream every ``--probe-interval``
  and follows it with a subscription: commit-to-delivery p50 / p99 while the
  load runs, through PostgreSQL's NOTIFY like any cross-process wake-up.
- the database's view: listening backends and the notification queue's usage.

Counts are interleaved over ``--rounds`` rounds (1, 2, 4, 8, then again) so that
drift in the machine's load falls on all alike; the table shows medians.

    python benchmarks/scale.py --json scale.json   # full run, a few minutes
    python benchmarks/scale.py --smoke             # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from _common import (
    DEFAULT_DSN,
    describe_environment,
    environment,
    int_list,
    latency_summary,
    log,
    progress_notification,
    report,
    run,
    scratch_database,
)
from append import drive_raw, our_writes, table
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import MCP_MAJOR, STANDALONE_STREAM

# This file, run again as a worker process.
SCRIPT = str(Path(__file__).resolve())


def event_number(event: EventMessage) -> int:
    message: Any = event.message
    model = message.root if MCP_MAJOR == 1 else message  # 1.x: a RootModel
    return int(model.params["progress"])


# --- a worker process ----------------------------------------------------------


async def probe(store: PostgresEventStore, interval: float, until: float) -> list[float]:
    """Append to a stream of our own every ``interval`` s and follow it live: commit-to-delivery seconds."""
    view = store.session("scale-probe")
    cursor = await view.store_event(STANDALONE_STREAM, None)
    sub = view.subscribe(cursor)
    if not await sub.open():
        raise RuntimeError("the probe's subscription did not open")
    committed: dict[int, float] = {}
    latencies: list[float] = []
    written = 0
    finished = False
    caught_up = asyncio.Event()

    async def read() -> None:
        async for event in sub:
            now = time.perf_counter()
            # Delivered before its writer resumed: as good as no delay.
            latencies.append(now - committed.get(event_number(event), now))
            if finished and len(latencies) >= written:
                caught_up.set()

    reader = asyncio.create_task(read())
    try:
        while time.time() < until:
            written += 1
            await view.store_event(STANDALONE_STREAM, progress_notification("probe", written, ""))
            committed[written] = time.perf_counter()
            await asyncio.sleep(interval)
        finished = True
        if len(latencies) < written:
            try:
                await asyncio.wait_for(caught_up.wait(), 10)
            except asyncio.TimeoutError:
                raise RuntimeError(f"the probe got {len(latencies)} of {written} events") from None
    finally:
        await sub.aclose()
        await reader
    return latencies


async def worker_main(config: dict[str, Any]) -> None:
    index = config["index"]
    async with await PostgresEventStore.connect(config["dsn"], max_pool_size=config["pool_size"]) as store:
        # A live subscription, so that this process's listener is LISTENing.
        idle = store.session(f"scale-idle-{config['round']}-{index}")
        idle_sub = idle.subscribe(await idle.store_event(STANDALONE_STREAM, None))
        if not await idle_sub.open():
            raise RuntimeError("the idle subscription did not open")
        writes = our_writes(store, f"{config['round']}-{config['processes']}-{index}", config["streams"])
        # Streams and connections made before the clock starts.
        await asyncio.gather(*(write() for write in writes))
        print("ready", flush=True)
        start_at = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end_at = start_at + config["warmup"] + config["seconds"]
        tasks = [drive_raw(writes, config["warmup"], config["seconds"])] if writes else []
        probe_task = probe(store, config["probe_interval"], end_at) if index == 0 else None
        results = await asyncio.gather(*tasks, *([probe_task] if probe_task else []))
        completed, latencies = results[0] if writes else (0, [])
        probed = results[-1] if probe_task else []
        await idle_sub.aclose()
    print(json.dumps({"completed": completed, "latencies": latencies, "probe": probed}), flush=True)


# --- the coordinator -------------------------------------------------------------


async def db_view(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        listeners = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'mcp-pg-events listener%'"
        )
        usage = await conn.fetchval("SELECT pg_notification_queue_usage()")
    finally:
        await conn.close()
    return {"listeners": listeners, "notification_queue_usage": usage}


async def cell(dsn: str, processes: int, r: int, args: argparse.Namespace) -> dict[str, Any]:
    shares = [
        args.streams // processes + (1 if i < args.streams % processes else 0) for i in range(processes)
    ]
    procs = []
    for index, streams in enumerate(shares):
        config = {
            "dsn": dsn,
            "index": index,
            "round": r,
            "processes": processes,
            "streams": streams,
            "warmup": args.warmup,
            "seconds": args.seconds,
            "probe_interval": args.probe_interval,
            "pool_size": args.pool_size,
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--worker",
                json.dumps(config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"a worker did not start: {line!r}")
        start_at = time.time() + 0.2
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at}\n".encode())
            await proc.stdin.drain()
        await asyncio.sleep(max(0.0, start_at + args.warmup + args.seconds / 2 - time.time()))
        seen = await db_view(dsn)
        outs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"a worker failed: exit codes {[proc.returncode for proc in procs]}")
    parts = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    latencies = [t for part in parts for t in part["latencies"]]
    completed = sum(part["completed"] for part in parts)
    probe = parts[0]["probe"]
    return {
        "processes": processes,
        "round": r,
        "events_per_s": round(completed / args.seconds),
        **latency_summary(latencies),
        "probe": {"events": len(probe), **latency_summary(probe)},
        **seen,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            **environment(),
            "streams": args.streams,
            "processes": args.processes,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "probe_interval": args.probe_interval,
            "pool_size": args.pool_size,
            "smoke": args.smoke,
            "load_before": os.getloadavg(),
        }
    }
    cells: list[dict[str, Any]] = []
    async with scratch_database(args.dsn) as dsn:
        for r in range(args.rounds):
            for processes in args.processes:
                log(f"round {r + 1}/{args.rounds}: {processes} process(es), {args.streams} streams in all")
                cells.append(await cell(dsn, processes, r, args))
                log(f"  {cells[-1]}")
    results["config"]["load_after"] = os.getloadavg()
    results["cells"] = cells
    rows = []
    for processes in args.processes:
        mine = [c for c in cells if c["processes"] == processes]
        rows.append(
            {
                "processes": processes,
                "events_per_s": round(statistics.median(c["events_per_s"] for c in mine)),
                "rounds_events_per_s": [c["events_per_s"] for c in mine],
                "p50_ms": statistics.median(c["p50_ms"] for c in mine),
                "p99_ms": statistics.median(c["p99_ms"] for c in mine),
                "probe_p50_ms": statistics.median(c["probe"]["p50_ms"] for c in mine),
                "probe_p99_ms": statistics.median(c["probe"]["p99_ms"] for c in mine),
                "listeners": max(c["listeners"] for c in mine),
            }
        )
    base = rows[0]["events_per_s"]
    for row in rows:
        row["vs_first"] = round(row["events_per_s"] / base, 2) if base else None
    results["rows"] = rows
    return results


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    load = " / ".join(f"{x:.2f}" for x in config["load_before"])
    after = " / ".join(f"{x:.2f}" for x in config["load_after"])
    lines = [
        describe_environment(config),
        f"load average before {load}, after {after}",
        "",
        f"{config['streams']} streams in all, split over the processes, a pool of {config['pool_size']} "
        f"per process; {config['seconds']} s measured after "
        f"{config['warmup']} s of warm-up; medians of {config['rounds']} interleaved round(s); live probe: "
        f"one append every {config['probe_interval'] * 1000:g} ms in process 0, followed live",
    ]
    lines += table(
        [
            "processes",
            "events/s",
            "x 1 process",
            "p50 ms",
            "p99 ms",
            "live p50 ms",
            "live p99 ms",
            "listeners",
        ],
        (
            [
                str(r["processes"]),
                f"{r['events_per_s']:,}",
                f"{r['vs_first']:.2f}" if r["vs_first"] is not None else "-",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['probe_p50_ms']:.3f}",
                f"{r['probe_p99_ms']:.3f}",
                str(r["listeners"]),
            ]
            for r in results["rows"]
        ),
    )
    if config["smoke"]:
        lines += ["", "(smoke run: sizes too small to judge)"]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        asyncio.run(worker_main(json.loads(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams in all (64)")
    parser.add_argument(
        "--processes", type=int_list, default=[1, 2, 4, 8], help="worker process counts (1,2,4,8)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first (0.5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument(
        "--probe-interval", type=float, default=0.01, help="seconds between live probe appends (0.01)"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=4,
        help="pool connections per process (4: 8 processes with the default 10, plus a listener "
        "and a lease each, would take most of a default max_connections of 100)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 1 and 2 processes, 4 streams")
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.processes, args.seconds, args.warmup, args.rounds = 4, [1, 2], 0.3, 0.1, 1
    report(run(bench(args)), render, args.json)


if __name__ == "__main__":
    main()
