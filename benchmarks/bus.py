"""Subscription bus: publish-to-delivery latency across processes, and publishes per second to all.

What the bus issue asks to measure, in one run on one scratch database:

- two listener processes (this file, run with ``--listener``), each with a
  ``PostgresSubscriptionBus`` on a store of its own and ``listeners / 2``
  subscribed listeners: what the SDK's ``ListenHandler`` subscribes for each open
  ``subscriptions/listen`` stream (a synchronous callback that enqueues). The
  HTTP framing of the listen streams is not measured, only the bus.
- this process publishes ``ResourceUpdated`` events through a bus of its own
  (a third process), each URI carrying ``time.time_ns()`` taken just before
  ``publish`` was called. Latency is from then to the moment the LAST listener
  of a listener process got the event (so every listener of that process has
  it), both processes counted: p50 / p99 / max, after a warm-up, at a steady
  ``--rate``; and the same from the moment ``publish`` returned (the event
  committed), which is what ``live.py`` calls commit-to-wake.
- throughput: ``--burst`` events published by ``--publishers`` concurrent tasks
  as fast as they go; events per second from the first publish to the moment
  the last listener of both processes had the last one. Every listener of
  every process is checked to get every event exactly once, in publish order
  per publisher.

    python benchmarks/bus.py --json bus.json    # full run, about a minute
    python benchmarks/bus.py --smoke            # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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
from mcp.shared.subscriptions import ResourceUpdated

from mcp_pg_events import PostgresEventStore, PostgresSubscriptionBus

NAMESPACE = "bench"
SCRIPT = str(Path(__file__).resolve())


async def listener_process(dsn: str, listeners: int, expected: int) -> None:
    """One process's bus and listeners; prints what it saw once ``expected`` events came."""
    arrived: list[tuple[int, str]] = []
    counts = [0] * listeners
    order_ok = True
    last_index: dict[str, int] = {}
    done = asyncio.Event()

    def counting(n: int) -> Any:
        def listener(event: Any) -> None:
            counts[n] += 1

        return listener

    def last(event: Any) -> None:
        nonlocal order_ok
        # bench://{phase}/{publisher}/{index}/{ns}
        _, _, phase, publisher, index, _ = event.uri.split("/")
        key = f"{phase}/{publisher}"
        if int(index) <= last_index.get(key, -1):
            order_ok = False
        last_index[key] = int(index)
        arrived.append((time.time_ns(), event.uri))
        if len(arrived) >= expected:
            done.set()

    store = await PostgresEventStore.connect(dsn)
    bus = await PostgresSubscriptionBus.from_store(store, namespace=NAMESPACE)
    for n in range(listeners - 1):
        bus.subscribe(counting(n))
    bus.subscribe(last)  # subscribed last: called after every other listener
    print("ready", flush=True)
    await done.wait()
    await bus.close()
    await store.close()
    seen = {"arrived": arrived, "counts": counts[: listeners - 1], "order_ok": order_ok}
    print(json.dumps(seen), flush=True)


class Listeners:
    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes

    @classmethod
    async def start(cls, dsn: str, count: int, listeners: int, expected: int) -> Listeners:
        processes = []
        for _ in range(count):
            process = await asyncio.create_subprocess_exec(
                sys.executable, SCRIPT, "--listener", "--dsn", dsn,
                "--listeners", str(listeners), "--expected", str(expected),
                stdout=asyncio.subprocess.PIPE, limit=2**28,
            )  # fmt: skip
            processes.append(process)
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 120)
            if line.strip() != b"ready":
                raise RuntimeError(f"a listener process did not start: {line!r}")
        return cls(processes)

    async def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for process in self.processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
            out.append(json.loads(line))
            await process.wait()
        return out

    def kill(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()


def uri(phase: str, publisher: int, index: int) -> str:
    return f"bench://{phase}/{publisher}/{index}/{time.time_ns()}"


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = os.getloadavg()
    per_process = args.listeners // 2
    expected = args.warmup + args.events + args.burst
    async with scratch_database(args.dsn) as dsn:
        store = await PostgresEventStore.connect(dsn)
        bus = await PostgresSubscriptionBus.from_store(store, namespace=NAMESPACE)
        log(f"2 listener processes x {per_process} listeners")
        listeners = await Listeners.start(dsn, 2, per_process, expected)
        try:
            log(f"latency: {args.warmup} warm-up + {args.events} events at {args.rate}/s")
            interval = 1 / args.rate
            committed: dict[int, int] = {}
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(args.warmup + args.events):
                phase = "warmup" if i < args.warmup else "latency"
                await bus.publish(ResourceUpdated(uri=uri(phase, 0, i)))
                committed[i] = time.time_ns()
                await asyncio.sleep(max(0.0, start + (i + 1) * interval - loop.time()))

            log(f"throughput: {args.burst} events from {args.publishers} concurrent publishers")
            per_publisher = args.burst // args.publishers
            burst_start = time.time_ns()

            async def publisher(p: int, count: int) -> None:
                for i in range(count):
                    await bus.publish(ResourceUpdated(uri=uri("burst", p, i)))

            counts = [per_publisher] * args.publishers
            counts[0] += args.burst - per_publisher * args.publishers
            await asyncio.gather(*(publisher(p, c) for p, c in enumerate(counts)))
            published = time.time_ns()
            results = await listeners.results(timeout=120)
        finally:
            listeners.kill()
            await bus.close()
            await store.close()

    latencies: list[float] = []
    after_commit: list[float] = []
    last_burst = 0
    for result in results:
        for arrived_ns, text in result["arrived"]:
            _, _, phase, _, index, sent_ns = text.split("/")
            if phase == "latency":
                latencies.append((arrived_ns - int(sent_ns)) / 1e9)
                after_commit.append((arrived_ns - committed[int(index)]) / 1e9)
            elif phase == "burst":
                last_burst = max(last_burst, arrived_ns)
    every_listener = all(all(c == expected for c in r["counts"]) for r in results)
    return {
        "config": {
            **environment(),
            "listeners": per_process * 2,
            "events": args.events,
            "rate": args.rate,
            "burst": args.burst,
            "publishers": args.publishers,
            "load_average_at_start": load_at_start,
            "load_average": os.getloadavg(),
        },
        "latency": {**latency_summary(latencies), "samples": len(latencies)},
        "after_commit": latency_summary(after_commit),
        "throughput": {
            "events_per_s_delivered_to_all": round(args.burst / ((last_burst - burst_start) / 1e9)),
            "events_per_s_published": round(args.burst / ((published - burst_start) / 1e9)),
        },
        "every_listener_every_event": every_listener,
        "in_order_per_publisher": all(r["order_ok"] for r in results),
    }


def render(results: dict[str, Any]) -> str:
    c, lat, tp = results["config"], results["latency"], results["throughput"]
    com = results["after_commit"]
    start = ", ".join(f"{x:.2f}" for x in c["load_average_at_start"])
    load = ", ".join(f"{x:.2f}" for x in c["load_average"])
    return "\n".join(
        [
            describe_environment(c),
            f"{c['listeners']} listeners over 2 processes, publisher in a third; "
            f"load average (1, 5, 15 min) at the start {start}, at the end {load}",
            "",
            "| publish-to-delivery | p50 ms | p99 ms | max ms | samples |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| publish called, at {c['rate']}/s | {lat['p50_ms']} | {lat['p99_ms']} | {lat['max_ms']} "
            f"| {lat['samples']} |",
            f"| publish returned (committed) | {com['p50_ms']} | {com['p99_ms']} | {com['max_ms']} "
            f"| {lat['samples']} |",
            "",
            "| burst | events | publishers | published/s | delivered to all/s |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| as fast as they go | {c['burst']} | {c['publishers']} | "
            f"{tp['events_per_s_published']} | {tp['events_per_s_delivered_to_all']} |",
            "",
            f"every listener got every event once: {results['every_listener_every_event']}; "
            f"in order per publisher: {results['in_order_per_publisher']}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--listeners", type=int, default=1000, help="listeners over both processes (1000)")
    parser.add_argument("--events", type=int, default=2000, help="events timed for latency (2000)")
    parser.add_argument("--warmup", type=int, default=100, help="events before timing (100)")
    parser.add_argument("--rate", type=float, default=200, help="publishes per second while timing (200)")
    parser.add_argument("--burst", type=int, default=20000, help="events of the throughput burst (20000)")
    parser.add_argument("--publishers", type=int, default=16, help="concurrent publishers in the burst (16)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: 10 listeners, 20 + 100 events")
    parser.add_argument("--listener", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.listener:
        asyncio.run(listener_process(args.dsn, args.listeners, args.expected))
        return
    if args.smoke:
        args.listeners, args.events, args.warmup, args.burst, args.publishers = 10, 20, 5, 100, 4
    results = run(bench(args))
    report(results, render, args.json)
    if not (results["every_listener_every_event"] and results["in_order_per_publisher"]):
        sys.exit("the bus lost, doubled or reordered events")


if __name__ == "__main__":
    main()
