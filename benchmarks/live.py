"""Live tail: commit-to-wake latency across processes, memory per idle subscriber, cost on appends.

What the live-tail issue asks to measure, in one run on one scratch database:

- latency: this process holds N subscriptions (1, 100, 1,000), each on a stream of
  its own session and read by a task of its own (``async for``). A writer in
  another process (this file, run with ``--writer``) appends progress
  notifications to randomly chosen streams of those N at a steady rate, and
  takes ``time.time_ns()`` right after each ``store_event`` returned (after the
  commit). A message cannot hold the time of its own commit, so it carries its
  number, and the writer reports the commit times over its stdout at the end;
  the reader takes ``time.time_ns()`` as soon as its ``async for`` yields.
  Commit-to-wake latency is the difference (one machine, one wall clock):
  p50 / p99 / max per N after a warm-up, and every event checked to arrive
  exactly once, on its own stream, in order. One more row: N subscriptions all
  on ONE stream (fan-out).
- memory: 10,000 subscriptions on 10,000 streams, each awaited by a task until
  all are idle; bytes per subscription from tracemalloc, minus what a bare task
  awaiting an ``asyncio.Event`` costs (measured apart), and VmRSS per subscription.
- cost on appends: 16 concurrent streams appending one ``await`` at a time (the
  ``append.py`` cell) with no subscription and with 10,000 idle ones on other
  streams of the same store, alternating, a few rounds each: medians, the
  difference, and whether it is outside the spread of the rounds.

The table goes to stdout, progress to stderr, and ``--json PATH`` writes it all.

    python benchmarks/live.py --json live.json     # full run, a few minutes
    python benchmarks/live.py --smoke              # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_DSN,
    default_pool_size,
    describe_environment,
    environment,
    int_list,
    latency_summary,
    log,
    parts_of,
    progress_notification,
    report,
    run,
    scratch_database,
    store_default,
)
from append import drive, our_writes, table
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import MCP_MAJOR, STANDALONE_STREAM
from mcp_pg_events.live import Subscription

# The SDK's stream for messages outside any request: it never completes, so a
# subscription on it lasts until it is closed, whatever the writer sends.
STREAM = STANDALONE_STREAM
# This file, run again as the writer process.
SCRIPT = str(Path(__file__).resolve())
# Concurrent store calls when creating streams and opening subscriptions: enough
# to fill the pool and the group commit, few enough to keep the loop responsive.
CHUNK = 500
# Seconds between the writer priming its streams and its first event: the readers'
# wake-ups for those priming events are over by then.
SETTLE = 0.5
LATENCY_TARGET_MS = 5.0
PARTS = ("latency", "memory", "append")
MEMORY_TARGET_BYTES = 4096


def event_number(event: EventMessage) -> int:
    """The writer's number of the event (its ``progress``)."""
    # Not getattr(message, "root", message): on a 2.x model a missing attribute goes
    # through pydantic's __getattr__ and an AttributeError, ~6 us, which would
    # weigh on the fan-out cell's reader (1,000 deliveries per event).
    message: Any = event.message
    model = message.root if MCP_MAJOR == 1 else message  # 1.x: a RootModel
    return int(model.params["progress"])


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def make_cursors(store: PostgresEventStore, keys: Sequence[str]) -> list[str]:
    """One stream per session key, each with a priming event, whose id is the stream's cursor."""
    cursors: list[str] = []
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        cursors += await asyncio.gather(*(store.session(key).store_event(STREAM, None) for key in chunk))
    return cursors


async def open_subscriptions(
    store: PostgresEventStore, keys: Sequence[str], cursors: Sequence[str]
) -> list[Subscription]:
    subs = [store.session(key).subscribe(cursor) for key, cursor in zip(keys, cursors, strict=True)]
    for start in range(0, len(subs), CHUNK):
        opened = await asyncio.gather(*(sub.open() for sub in subs[start : start + CHUNK]))
        if not all(opened):
            raise RuntimeError("a fresh cursor did not open a subscription")
    return subs


class Inbox:
    """What the readers received: (subscription, event number, time received), in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int]] = []
        self._expected = math.inf
        self._full = asyncio.Event()

    def add(self, sub: int, number: int, received: int) -> None:
        self.items.append((sub, number, received))
        if len(self.items) >= self._expected:
            self._full.set()

    async def wait_for(self, expected: int, timeout: float) -> None:
        """Until ``expected`` deliveries arrived, or ``timeout`` s passed (then some are missing)."""
        self._expected = expected
        if len(self.items) >= expected:
            return
        try:
            await asyncio.wait_for(self._full.wait(), timeout)
        except asyncio.TimeoutError:
            log(f"  only {len(self.items):,} of {expected:,} deliveries after {timeout:.0f} s")


async def consume(sub: Subscription, index: int, inbox: Inbox) -> None:
    """Read ``sub`` to its end, noting each event in ``inbox``."""
    async for event in sub:
        received = time.time_ns()  # first: the wake-up is what is measured, not the parsing
        inbox.add(index, event_number(event), received)


async def close_all(subs: Sequence[Subscription], tasks: Sequence[asyncio.Task[None]]) -> None:
    for sub in subs:
        await sub.aclose()
    # aclose wakes each reader, whose ``async for`` then ends: no cancellation needed.
    await asyncio.gather(*tasks)


# --- the writer process ------------------------------------------------------


async def write_cell(
    store: PostgresEventStore, config: dict[str, Any], readline: Callable[[], Awaitable[str]]
) -> dict[str, Any] | None:
    """One cell of the writer: prime, ``ready``, wait for ``go``, write; None if stdin closed first."""
    loop = asyncio.get_running_loop()
    rng = random.Random(config["seed"])
    total, rate = config["events"], config["rate"]
    views = [store.session(key) for key in config["keys"]]
    # A priming event on every stream first (readers skip them): the measured
    # appends then find their stream cached, as a long-running server's would,
    # instead of paying a stream lookup on first use.
    for start in range(0, len(views), CHUNK):
        await asyncio.gather(*(view.store_event(STREAM, None) for view in views[start : start + CHUNK]))
    print("ready", flush=True)
    if not await readline():
        return None  # stdin closed instead of "go": the benchmark stopped

    records: list[tuple[int, int, float] | None] = [None] * total

    async def append(number: int, stream: int) -> None:
        message = progress_notification("live", number, "")
        started = time.perf_counter()
        await views[stream].store_event(STREAM, message)
        commit_ns = time.time_ns()  # right after the commit was acknowledged
        records[number] = (stream, commit_ns, time.perf_counter() - started)

    # Appends start on a fixed schedule (open loop), not one after the other: a slow
    # commit then delays only its own event, and the rate holds.
    tasks: set[asyncio.Task[None]] = set()
    begin = loop.time()
    for number in range(total):
        delay = begin + number / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(append(number, rng.randrange(len(views))))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*list(tasks))
    seconds = loop.time() - begin
    # Let the last wake-up go out before serializing the records, which holds this
    # loop for milliseconds; so does parsing them in the reader's process.
    await asyncio.sleep(0.1)
    return {"records": records, "seconds": seconds}


async def writer_main() -> None:
    """The writer process: its DSN, then one cell per JSON line on stdin; answers on stdout.

    Per cell: ``ready`` once its streams are primed, then, after ``go``, one JSON
    line with a record per event: (stream, commit time in ns, store_event seconds).
    """
    loop = asyncio.get_running_loop()

    async def readline() -> str:
        return await loop.run_in_executor(None, sys.stdin.readline)

    dsn = json.loads(await readline())["dsn"]
    # listen=False: this process subscribes to nothing; notify stays on, as in a server.
    async with await PostgresEventStore.connect(dsn, listen=False) as store:
        while line := await readline():
            result = await write_cell(store, json.loads(line), readline)
            if result is None:
                break
            print(json.dumps(result), flush=True)


class Writer:
    """The writer process, driven over its stdin and stdout; one for all latency cells.

    One process for all cells: starting one (imports, a pool) takes seconds.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, dsn: str) -> Writer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--writer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # a cell's answer is one JSON line with every record
        )
        writer = cls(proc)
        # On stdin, not in argv, where ps would show a password.
        await writer.send(json.dumps({"dsn": dsn}))
        return writer

    async def prepare(self, cell: dict[str, Any]) -> None:
        """Send a cell; returns once its streams are primed."""
        await self.send(json.dumps(cell))
        line = await asyncio.wait_for(self.readline(), 120)
        if line != "ready":
            raise RuntimeError(f"the writer said {line!r} instead of ready")

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the writer exited (code {await self.proc.wait()})")
        return line.decode().strip()

    async def close(self) -> None:
        """End the writer between cells: it closes its store and exits when stdin closes."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            code = await asyncio.wait_for(self.proc.wait(), 30)
        except asyncio.TimeoutError:
            await self.kill()
            raise RuntimeError("the writer did not exit when its stdin closed") from None
        if code != 0:
            raise RuntimeError(f"the writer failed with exit code {code}")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


# --- latency -----------------------------------------------------------------


async def latency_cell(
    store: PostgresEventStore,
    writer: Writer,
    name: str,
    subscribers: int,
    streams: int,
    rate: float,
    events: int,
    warmup: int,
    poll_interval: float,
) -> dict[str, Any]:
    """``subscribers`` subscriptions spread over ``streams`` streams (1: fan-out), one writer process."""
    log(f"latency: {name}: creating {streams:,} stream(s), opening {subscribers:,} subscription(s)")
    keys = [f"live-{name}-{i}" for i in range(streams)]
    cursors = await make_cursors(store, keys)
    stream_of_sub = [i % streams for i in range(subscribers)]
    subs = await open_subscriptions(
        store, [keys[s] for s in stream_of_sub], [cursors[s] for s in stream_of_sub]
    )
    inbox = Inbox()
    tasks = [asyncio.create_task(consume(sub, i, inbox)) for i, sub in enumerate(subs)]
    await store.listener.wait_listening()
    total = warmup + events
    await writer.prepare({"keys": keys, "rate": rate, "events": total, "seed": subscribers * 7919 + streams})
    # Let the wake-ups for the writer's priming events pass before the first measured event.
    await asyncio.sleep(SETTLE)
    log(f"latency: {name}: {total:,} events at {rate:,.0f}/s ({warmup:,} of warm-up)")
    started_ns = time.time_ns()
    await writer.send("go")
    result = json.loads(await asyncio.wait_for(writer.readline(), total / rate + 120))
    records = [
        (int(stream), int(commit_ns), float(seconds)) for stream, commit_ns, seconds in result["records"]
    ]
    subs_of_stream: Counter[int] = Counter(stream_of_sub)
    expected = sum(subs_of_stream[stream] for stream, _, _ in records)
    # Whatever a lost wake-up delays is delivered by the next poll at the latest.
    await inbox.wait_for(expected, poll_interval + 10)
    await asyncio.sleep(0.2)  # time for a doubled delivery to show up
    received = list(inbox.items)
    await close_all(subs, tasks)
    return analyse(name, subscribers, streams, rate, warmup, records, stream_of_sub, received, started_ns)


def analyse(
    name: str,
    subscribers: int,
    streams: int,
    rate: float,
    warmup: int,
    records: list[tuple[int, int, float]],
    stream_of_sub: list[int],
    received: list[tuple[int, int, int]],
    started_ns: int,
) -> dict[str, Any]:
    deliveries = Counter((sub, number) for sub, number, _ in received)
    misrouted = sum(1 for sub, number, _ in received if stream_of_sub[sub] != records[number][0])
    subs_of_stream: dict[int, list[int]] = {}
    for sub, stream in enumerate(stream_of_sub):
        subs_of_stream.setdefault(stream, []).append(sub)
    expected = {
        (sub, n) for n, (stream, _, _) in enumerate(records) for sub in subs_of_stream.get(stream, ())
    }
    missing = len(expected - deliveries.keys())
    doubled = sum(count - 1 for count in deliveries.values() if count > 1)
    last_seen: dict[int, int] = {}
    out_of_order = 0
    for sub, number, _ in received:
        if number < last_seen.get(sub, -1):
            out_of_order += 1
        last_seen[sub] = number
    # Measured: deliveries of the events after the warm-up.
    lat = sorted((recv - records[number][1]) / 1e6 for _, number, recv in received if number >= warmup)
    summary = latency_summary([ms / 1000 for ms in lat])
    slowest = sorted(
        ((recv - records[number][1]) / 1e6, number, (recv - started_ns) / 1e9)
        for _, number, recv in received
        if number >= warmup
    )[-5:]
    # The worst latency in each second of the run: tells a lone spike from a slow phase
    # (a poll of every subscription, a checkpoint, a neighbour's load).
    by_second: dict[int, float] = {}
    for _, number, recv in received:
        if number >= warmup:
            second = (recv - started_ns) // 1_000_000_000
            by_second[second] = max(by_second.get(second, -math.inf), (recv - records[number][1]) / 1e6)
    append_ms = latency_summary([seconds for _, _, seconds in records])
    cell = {
        "cell": name,
        "subscribers": subscribers,
        "streams": streams,
        "rate": rate,
        "events": len(records) - warmup,
        "warmup_events": warmup,
        "written": len(records),
        "expected_deliveries": len(expected),
        "received": len(received),
        "missing": missing,
        "doubled": doubled,
        "misrouted": misrouted,
        "out_of_order": out_of_order,
        "samples": len(lat),
        "min_ms": round(lat[0], 3) if lat else math.nan,
        **summary,
        "writer_append_p50_ms": append_ms["p50_ms"],
        "writer_append_p99_ms": append_ms["p99_ms"],
        # (latency ms, event number, seconds since "go") of the slowest deliveries.
        "slowest": [[round(ms, 3), n, round(t, 3)] for ms, n, t in slowest],
        "max_ms_by_second": [round(by_second[s], 2) for s in sorted(by_second)],
    }
    shown = {k: v for k, v in cell.items() if k not in ("slowest", "max_ms_by_second")}
    log(f"  {shown}")
    log(f"  slowest (ms, event, s since go): {cell['slowest']}")
    log(f"  max ms in each second since go: {cell['max_ms_by_second']}")
    return cell


async def latency_part(store: PostgresEventStore, dsn: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    # (name, subscribers, streams, rate, measured events, warm-up events)
    plan = [(f"{n}", n, n, args.rate, args.events, args.warmup_events) for n in args.subscribers]
    if args.fanout:
        # The same share of warm-up as the other cells.
        warmup = max(1, args.warmup_events * args.fanout_events // max(1, args.events))
        plan.append((f"fanout-{args.fanout}", args.fanout, 1, args.fanout_rate, args.fanout_events, warmup))
    writer = await Writer.start(dsn)
    try:
        cells = [await latency_cell(store, writer, *cell, args.poll_interval) for cell in plan]
    except BaseException:
        await writer.kill()  # maybe mid-cell: what it writes is of no use any more
        raise
    await writer.close()
    return cells


# --- memory ------------------------------------------------------------------


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


async def until_steady(
    probe: Callable[[], int], quiet: float = 0.3, tolerance: int = 64 * 1024, limit: float = 60
) -> None:
    """Wait until the tail's first catch-up of new subscriptions is over: ``probe`` stops moving."""
    deadline = time.monotonic() + limit
    last = probe()
    steady_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = probe()
        if abs(now - last) > tolerance:
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since >= quiet:
            return
        last = now
    raise RuntimeError(f"memory still moving after {limit} s")


async def open_idle(
    store: PostgresEventStore, keys: Sequence[str], cursors: Sequence[str], probe: Callable[[], int]
) -> tuple[list[Subscription], list[asyncio.Task[None]]]:
    """Subscriptions on ``keys``' streams, each awaited by a reading task, and all of them idle."""
    subs = await open_subscriptions(store, keys, cursors)
    inbox = Inbox()  # stays empty: nothing is written to these streams
    tasks = [asyncio.create_task(consume(sub, i, inbox)) for i, sub in enumerate(subs)]
    await until_steady(probe)
    if any(task.done() for task in tasks) or inbox.items:
        raise RuntimeError("the subscriptions are not all open and idle")
    return subs, tasks


async def wait_event(event: asyncio.Event) -> None:
    await event.wait()


async def memory_part(store: PostgresEventStore, count: int) -> tuple[dict[str, Any], list[str], list[str]]:
    log(f"memory: creating {count:,} streams")
    started = time.perf_counter()
    keys = [f"idle-{i}" for i in range(count)]
    cursors = await make_cursors(store, keys)
    created_s = time.perf_counter() - started
    log(f"  {created_s:.1f} s")
    # The tail (listener connection, fetch and poll tasks, prepared statements) is
    # paid once per store, not per subscription: have it running before the baselines.
    warm_cursor = await store.session("idle-warm").store_event(STREAM, None)
    (warm,) = await open_subscriptions(store, ["idle-warm"], [warm_cursor])
    warm_task = asyncio.create_task(consume(warm, 0, Inbox()))
    await store.listener.wait_listening()
    await asyncio.sleep(0.2)

    # RSS first, in a pass of its own: tracemalloc's own bookkeeping (outside the
    # Python heap, per traced block) would show in RSS too.
    log(f"memory: opening {count:,} subscriptions, one reading task each (RSS pass)")
    gc.collect()
    base_rss = rss_bytes()
    subs, tasks = await open_idle(store, keys, cursors, rss_bytes)
    gc.collect()
    rss = rss_bytes() - base_rss
    await close_all(subs, tasks)
    del subs, tasks

    log(f"memory: opening {count:,} subscriptions, one reading task each (tracemalloc pass)")
    gc.collect()
    tracemalloc.start()
    try:
        base = traced()
        started = time.perf_counter()
        subs, tasks = await open_idle(store, keys, cursors, traced)
        opened_s = time.perf_counter() - started
        gc.collect()
        held = traced() - base
        if store.live_tail.subscriptions != count + 1:
            raise RuntimeError(f"{store.live_tail.subscriptions:,} subscriptions, expected {count + 1:,}")

        # What the reading task alone costs: a task parked on an await, as the
        # readers are, with nothing of the store behind it.
        event = asyncio.Event()
        gc.collect()
        base = traced()
        dummies = [asyncio.create_task(wait_event(event)) for _ in range(count)]
        await asyncio.sleep(0.1)  # every task runs to its await
        gc.collect()
        task_cost = (traced() - base) / count
        event.set()
        await asyncio.gather(*dummies)
        del dummies
    finally:
        tracemalloc.stop()
    await close_all([*subs, warm], [*tasks, warm_task])
    per_sub = held / count
    result = {
        "subscriptions": count,
        "streams_created_s": round(created_s, 2),
        "open_s": round(opened_s, 2),
        "traced_per_subscription_b": round(per_sub),
        "task_per_subscription_b": round(task_cost),
        "library_per_subscription_b": round(per_sub - task_cost),
        "rss_per_subscription_b": round(rss / count),
    }
    log(f"  {result}")
    return result, keys, cursors


# --- cost on appends ---------------------------------------------------------


async def append_cost_part(
    store: PostgresEventStore,
    keys: list[str],
    cursors: list[str],
    streams: int,
    rounds: int,
    warmup: float,
    seconds: float,
) -> dict[str, Any]:
    writes = our_writes(store, "cost", streams)
    # Streams created and the pool filled before the first round counts.
    await drive(writes, 0, max(warmup, 0.2))
    cells: dict[str, list[dict[str, Any]]] = {"none": [], "idle": []}
    for r in range(rounds):
        for case in ("none", "idle"):
            subs: list[Subscription] = []
            tasks: list[asyncio.Task[None]] = []
            if case == "idle":
                log(f"append cost: round {r + 1}/{rounds}: opening {len(keys):,} idle subscriptions")
                subs, tasks = await open_idle(store, keys, cursors, rss_bytes)
            log(f"append cost: round {r + 1}/{rounds}: {streams} streams, {case} subscriptions")
            cell = await drive(writes, warmup, seconds)
            cell["subscriptions"] = store.live_tail.subscriptions
            log(f"  {cell}")
            cells[case].append(cell)
            await close_all(subs, tasks)

    def median(case: str, key: str) -> float:
        return float(statistics.median(c[key] for c in cells[case]))

    summary: dict[str, Any] = {
        "streams": streams,
        "subscriptions": len(keys),
        "rounds": rounds,
        "seconds": seconds,
        "cells": cells,
    }
    for case in cells:
        rates = [c["events_per_s"] for c in cells[case]]
        summary[case] = {
            "events_per_s": median(case, "events_per_s"),
            "min_events_per_s": min(rates),
            "max_events_per_s": max(rates),
            "p50_ms": median(case, "p50_ms"),
            "p99_ms": median(case, "p99_ms"),
        }
    none, idle = summary["none"], summary["idle"]
    summary["throughput_change_pct"] = round(100 * (idle["events_per_s"] / none["events_per_s"] - 1), 1)
    summary["p50_change_pct"] = round(100 * (idle["p50_ms"] / none["p50_ms"] - 1), 1)
    summary["p99_change_pct"] = round(100 * (idle["p99_ms"] / none["p99_ms"] - 1), 1)
    # Within noise: the rounds of one case overlap those of the other.
    summary["within_noise"] = (
        idle["max_events_per_s"] >= none["min_events_per_s"]
        and none["max_events_per_s"] >= idle["min_events_per_s"]
    )
    return summary


# --- output ------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[list[str]]:
    """The issue's targets, each with what was measured, for the parts that ran."""
    rows = []
    latency = results.get("latency", [])
    cells = [c for c in latency if c["streams"] == c["subscribers"]]
    if cells:
        top = max(cells, key=lambda c: c["subscribers"])
        rows.append(
            [
                f"commit-to-wake p99, {top['subscribers']:,} subscribers",
                f"<= {LATENCY_TARGET_MS:g} ms",
                f"{top['p99_ms']:.2f} ms",
                "PASS" if top["p99_ms"] <= LATENCY_TARGET_MS else "FAIL",
            ]
        )
    if latency:
        wrong = sum(c["missing"] + c["doubled"] + c["misrouted"] + c["out_of_order"] for c in latency)
        rows.append(
            [
                "every event once, in order, on its stream",
                "0 wrong",
                f"{wrong:,} wrong",
                "PASS" if wrong == 0 else "FAIL",
            ]
        )
    memory = results.get("memory")
    if memory:
        lib = memory["library_per_subscription_b"]
        rows.append(
            [
                "memory per idle subscriber (library part)",
                f"<= {MEMORY_TARGET_BYTES:,} B",
                f"{lib:,} B",
                "PASS" if lib <= MEMORY_TARGET_BYTES else "FAIL",
            ]
        )
    cost = results.get("append_cost")
    if cost:
        rows.append(
            [
                f"append throughput, {cost['subscriptions']:,} idle subscribers",
                "within noise",
                f"{cost['throughput_change_pct']:+.1f} %",
                "PASS" if cost["within_noise"] else "FAIL",
            ]
        )
    return rows


def render_latency(cells: list[dict[str, Any]], warmup: int) -> list[str]:
    lines = [
        "commit-to-wake latency: the writer process's time.time_ns() after store_event returned, "
        "to the reader's async for here"
    ]
    lines += table(
        [
            "subscribers",
            "streams",
            "rate/s",
            "events",
            "p50 ms",
            "p99 ms",
            "max ms",
            "min ms",
            "written",
            "expected",
            "received",
            "missed",
            "doubled",
            "writer append p50/p99 ms",
        ],
        (
            [
                f"{c['subscribers']:,}"
                + (" (fan-out)" if c["streams"] == 1 and c["subscribers"] > 1 else ""),
                f"{c['streams']:,}",
                f"{c['rate']:,.0f}",
                f"{c['events']:,}",
                f"{c['p50_ms']:.2f}",
                f"{c['p99_ms']:.2f}",
                f"{c['max_ms']:.2f}",
                f"{c['min_ms']:.2f}",
                f"{c['written']:,}",
                f"{c['expected_deliveries']:,}",
                f"{c['received']:,}",
                f"{c['missing']:,}",
                f"{c['doubled']:,}",
                f"{c['writer_append_p50_ms']:.2f} / {c['writer_append_p99_ms']:.2f}",
            ]
            for c in cells
        ),
    )
    lines.append(
        f"latencies: the events after {warmup:,} of warm-up, every subscriber's delivery; written, "
        "expected (deliveries), received, missed and doubled: every event, warm-up included"
    )
    return lines


def render_memory(m: dict[str, Any]) -> list[str]:
    lines = [f"memory: {m['subscriptions']:,} idle subscriptions on as many streams, one reading task each"]
    lines += table(
        ["per subscription", "bytes"],
        [
            ["traced: subscription + its reading task", f"{m['traced_per_subscription_b']:,}"],
            ["traced: a bare task awaiting an asyncio.Event", f"{m['task_per_subscription_b']:,}"],
            ["traced: library part (difference)", f"{m['library_per_subscription_b']:,}"],
            ["VmRSS: subscription + its reading task", f"{m['rss_per_subscription_b']:,}"],
        ],
    )
    lines.append(
        f"opening them took {m['open_s']:.1f} s, after {m['streams_created_s']:.1f} s creating the streams"
    )
    return lines


def render_append_cost(cost: dict[str, Any]) -> list[str]:
    lines = [
        f"append path: {cost['streams']} concurrent streams in this process, {cost['seconds']:g} s per "
        f"round, {cost['rounds']} alternating rounds per case: medians, and the rounds' min - max"
    ]
    lines += table(
        ["idle subscriptions", "events/s", "min - max", "p50 ms", "p99 ms"],
        (
            [
                f"{0 if case == 'none' else cost['subscriptions']:,}",
                f"{s['events_per_s']:,.0f}",
                f"{s['min_events_per_s']:,} - {s['max_events_per_s']:,}",
                f"{s['p50_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
            ]
            for case, s in (("none", cost["none"]), ("idle", cost["idle"]))
        ),
    )
    lines.append(
        f"with the idle subscriptions: throughput {cost['throughput_change_pct']:+.1f} %, "
        f"p50 {cost['p50_change_pct']:+.1f} %, p99 {cost['p99_change_pct']:+.1f} %; "
        + ("within" if cost["within_noise"] else "outside")
        + " the spread of the rounds"
    )
    return lines


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        f"{describe_environment(config)}; subscriber store: poll every {config['poll_interval']:g} s, "
        f"pool of {config['pool_size']}",
        "load average (1, 5, 15 min) at the start {}, at the end {}".format(
            *(" / ".join(map(str, config[k])) for k in ("load_average_start", "load_average_end"))
        ),
    ]
    if "latency" in results:
        lines += ["", *render_latency(results["latency"], config["warmup_events"])]
    if "memory" in results:
        lines += ["", *render_memory(results["memory"])]
    if "append_cost" in results:
        lines += ["", *render_append_cost(results["append_cost"])]
    sizes = " (smoke run: sizes too small to judge)" if config["smoke"] else ""
    lines += ["", f"targets (2-core machine, from the issue){sizes}"]
    lines += table(["target", "goal", "measured", "result"], results["targets"])
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            **environment(),
            "poll_interval": args.poll_interval,
            "pool_size": args.pool_size,
            "rate": args.rate,
            "events": args.events,
            "warmup_events": args.warmup_events,
            "smoke": args.smoke,
            # The machine is shared: what else ran shows here.
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    async with (
        scratch_database(args.dsn) as dsn,
        await PostgresEventStore.connect(
            dsn, max_pool_size=args.pool_size, poll_interval=args.poll_interval, listen=True
        ) as store,
    ):
        # Memory first, while the process has freed little: memory freed earlier is
        # reused before RSS grows, and would hide part of the subscriptions' RSS.
        if args.only & {"memory", "append"}:
            results["memory"], keys, cursors = await memory_part(store, args.idle)
        if "append" in args.only:
            results["append_cost"] = await append_cost_part(
                store, keys, cursors, args.append_streams, args.rounds, args.append_warmup, args.seconds
            )
        if "latency" in args.only:
            results["latency"] = await latency_part(store, dsn, args)
    results["config"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results)
    return results


def main() -> None:
    if sys.argv[1:] == ["--writer"]:
        # The writer, started by latency_cell in a process of its own.
        asyncio.run(writer_main())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument(
        "--subscribers",
        type=int_list,
        default=[1, 100, 1000],
        help="subscribers per latency cell (1,100,1000)",
    )
    parser.add_argument("--rate", type=float, default=500, help="events/s the writer appends (500)")
    parser.add_argument("--events", type=int, default=2000, help="measured events per latency cell (2000)")
    parser.add_argument("--warmup-events", type=int, default=200, help="unmeasured events first (200)")
    parser.add_argument(
        "--fanout",
        type=int,
        default=1000,
        help="subscribers on one stream in the fan-out cell; 0: none (1000)",
    )
    # Not --rate: a fan-out delivers every event to every subscriber, 500 events/s to
    # 1,000 of them is 500,000 deliveries/s, well past what one process keeps up with
    # (see the README); the cell then measures a growing backlog, not a wake-up.
    parser.add_argument(
        "--fanout-rate", type=float, default=20, help="events/s of the fan-out cell (20; see the README)"
    )
    parser.add_argument(
        "--fanout-events", type=int, default=200, help="measured events of the fan-out cell (200)"
    )
    parser.add_argument("--idle", type=int, default=10_000, help="idle subscriptions (10,000)")
    parser.add_argument("--append-streams", type=int, default=16, help="concurrent append streams (16)")
    parser.add_argument("--rounds", type=int, default=3, help="append rounds per case (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per append round (5)")
    parser.add_argument("--append-warmup", type=float, default=0.5, help="unmeasured seconds per round (0.5)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=store_default("poll_interval"),
        help="the subscriber store's poll_interval (the store's default)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=default_pool_size(),
        help="the subscriber store's pool (the store's default)",
    )
    parser.add_argument(
        "--only",
        type=parts_of(PARTS),
        default=set(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (append needs memory's subscriptions)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--smoke", action="store_true", help="quick CI run: 1 and 10 subscribers, 100 events, 500 idle"
    )
    args = parser.parse_args()
    if args.smoke:
        args.subscribers, args.fanout, args.events, args.warmup_events = [1, 10], 10, 100, 20
        args.fanout_rate, args.fanout_events = args.rate, 100
        args.idle, args.seconds, args.append_warmup = 500, 0.3, 0.1
    report(run(bench(args)), render, args.json)


if __name__ == "__main__":
    main()
