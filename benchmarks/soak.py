"""Soak: ten minutes of mixed load with a fault every minute; nothing acknowledged may be lost.

The load, all at once, on one store:

- sessions: 24 live sessions of 2 streams each, a writer task per stream appending
  progress notifications at a steady pace, and a live subscriber on each stream.
  A session lives 30-75 s; then its streams get their response, and its whole
  history is checked (replay from the first event, and what the subscriber got)
  before it is ended and handed to retention. A new session takes its place.
- resumptions: every 0.5 s a random stream is replayed from a random acknowledged
  event; what comes back must start with exactly the events acknowledged after it.
- a writer process (``tests/writer_process.py``), 4 streams: at every fault tick it
  is killed with SIGKILL (itself one of the faults) or, on other ticks once it is a
  minute old, replaced the same way; each time, every event it acknowledged must be
  in the database, in order.
- retention every 20 s with a 4 min TTL, 30 s partition roll-over and 5 s grace for
  ended sessions: it deletes ended sessions' rows and drops whole partitions while
  all of this runs.

The faults, one per minute, in turn: a server restart, every backend terminated,
the writer process SIGKILLed, the listener killed, a stuck listener plus a flood of
notifications for 20 s, a crash (immediate shutdown, crash recovery), an ACCESS
EXCLUSIVE lock on the streams table held for 5 s (a migration, say). Restart and
crash need a server of our own: by default the soak starts an embedded PostgreSQL
in a temporary folder. With ``--dsn`` it uses a scratch database on that server and
terminates every backend in their place.

Reported: events acknowledged, replayed (checked by replay), lost and duplicated
(both must be 0; exit status 1 otherwise), subscriber deliveries missed or doubled,
and append latency p50/p99/max in the 20 s before, during (at least 5 s), and the
20 s after each fault. Progress goes to stderr every 10 s, the table to stdout,
``--json PATH`` writes everything.

    python benchmarks/soak.py                       # 10 minutes, embedded server
    python benchmarks/soak.py --duration 120 --fault-every 15   # a short look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from _common import describe_environment, environment, log, report, run, scratch_database
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore, run_retention
from mcp_pg_events.listener import LISTENER_NAME
from mcp_pg_events.wakeups import CHANNEL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.messages import params_of, progress_message, response
from tests.own_server import OwnServer, start_own_server
from tests.writer_process import WriterProcess

SESSIONS = 24
STREAMS = ("1", "2")
PACE = 0.04  # seconds between two appends of one writer task: ~1,000 events/s in all
TTL = timedelta(minutes=4)
ENDED_GRACE = timedelta(seconds=5)
PARTITION_MAX_AGE = timedelta(seconds=30)
FAULTS = ("restart", "terminate", "sigkill", "listener", "flood", "crash", "lock")


def progress_of(event: EventMessage) -> Any:
    params = params_of(event)
    return params["progress"] if params else None


def window(latencies: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    seconds = [s for at, s in latencies if start <= at < end]
    if len(seconds) < 2:
        return {"n": len(seconds)}
    cuts = statistics.quantiles(seconds, n=100)
    return {
        "n": len(seconds),
        "p50_ms": cuts[49] * 1e3,
        "p99_ms": cuts[98] * 1e3,
        "max_ms": max(seconds) * 1e3,
    }


@dataclass
class Counts:
    acknowledged: int = 0
    replayed: int = 0
    lost: int = 0
    duplicated: int = 0
    missed_by_subscriber: int = 0
    doubled_to_subscriber: int = 0
    resume_checks: int = 0
    resume_mismatches: int = 0
    sessions_checked: int = 0
    process_writers_killed: int = 0
    retention_rows_deleted: int = 0
    retention_partitions_dropped: int = 0
    retention_runs: int = 0
    errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, store: PostgresEventStore, dsn: str, server: OwnServer | None) -> None:
        self.store = store
        self.dsn = dsn
        self.server = server
        self.counts = Counts()
        self.latencies: list[tuple[float, float]] = []
        self.faults: list[dict[str, Any]] = []
        self._acked: dict[tuple[str, str], list[str]] = {}
        self._stop = asyncio.Event()
        self._session_no = 0
        self._writer: WriterProcess | None = None
        self._writer_key = ""
        self._writer_started = 0.0
        self._loop = asyncio.get_running_loop()

    # --- sessions ---------------------------------------------------------------------------------

    async def session_slot(self) -> None:
        """One session after another, each written, followed, checked and ended."""
        while not self._stop.is_set():
            self._session_no += 1
            await self.one_session(f"soak-{self._session_no}", random.uniform(30, 75))

    async def one_session(self, key: str, lifetime: float) -> None:
        view = self.store.session(key)
        cursors: dict[str, str] = {}
        readers: dict[str, asyncio.Task[list[EventMessage]]] = {}
        for stream in STREAMS:
            cursors[stream] = await view.store_event(stream, None)
            self._acked[key, stream] = []
            readers[stream] = asyncio.create_task(self.follow(view, cursors[stream]))
        ends = self._loop.time() + lifetime
        await asyncio.gather(*(self.write(view, key, stream, ends) for stream in STREAMS))
        for stream in STREAMS:
            await self.check_stream(view, key, stream, cursors[stream], await readers[stream])
            del self._acked[key, stream]
        self.counts.sessions_checked += 1
        await self.store.end_session(key)

    async def write(self, view: Any, key: str, stream: str, ends: float) -> None:
        acked = self._acked[key, stream]
        n = 0
        while self._loop.time() < ends and not self._stop.is_set():
            started = self._loop.time()
            event_id = await view.store_event(stream, progress_message(n))
            self.latencies.append((started, self._loop.time() - started))
            acked.append(event_id)
            self.counts.acknowledged += 1
            n += 1
            await asyncio.sleep(PACE)
        await view.store_event(stream, response(int(stream), {"sent": n}))

    @staticmethod
    async def follow(view: Any, cursor: str) -> list[EventMessage]:
        return [event async for event in view.subscribe(cursor)]

    async def replay(self, view: Any, cursor: str) -> list[EventMessage]:
        events: list[EventMessage] = []

        async def keep(event: EventMessage) -> None:
            events.append(event)

        await view.replay_events_after(cursor, keep)
        self.counts.replayed += len(events)
        return events

    async def check_stream(
        self, view: Any, key: str, stream: str, cursor: str, delivered: list[EventMessage]
    ) -> None:
        stored = await self.replay(view, cursor)
        acked = self._acked[key, stream]
        stored_ids = [e.event_id for e in stored]
        present = set(stored_ids)
        lost = [i for i, event_id in enumerate(acked) if event_id not in present]
        if lost:
            self.counts.lost += len(lost)
            self.counts.errors.append(
                f"{key}/{stream}: {len(lost)} of {len(acked)} acknowledged events missing "
                f"(numbers {lost[0]}..{lost[-1]}; {len(stored)} replayed)"
            )
        numbers = [progress_of(e) for e in stored if progress_of(e) is not None]
        self.counts.duplicated += len(stored_ids) - len(present) + len(numbers) - len(set(numbers))
        if [event_id for event_id in stored_ids if event_id in set(acked)] != acked:
            self.counts.errors.append(f"{key}/{stream}: acknowledged events out of order")
        delivered_ids = [e.event_id for e in delivered]
        self.counts.missed_by_subscriber += len(present - set(delivered_ids))
        self.counts.doubled_to_subscriber += len(delivered_ids) - len(set(delivered_ids))

    async def resumptions(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.5)
            candidates = [(k, acked) for k, acked in self._acked.items() if len(acked) > 2]
            if not candidates:
                continue
            (key, _stream), acked = random.choice(candidates)
            at = random.randrange(len(acked) - 1)
            expected = acked[at + 1 :]
            replayed = [e.event_id for e in await self.replay(self.store.session(key), acked[at])]
            self.counts.resume_checks += 1
            if replayed[: len(expected)] != expected:
                self.counts.resume_mismatches += 1

    # --- the writer process --------------------------------------------------------------------

    async def start_writer(self) -> None:
        self._session_no += 1
        # Named before the await: the session slots take numbers meanwhile.
        self._writer_key = key = f"soak-proc-{self._session_no}"
        self._writer = await WriterProcess.start(self.dsn, key, "p", ["1", "2", "3", "4"], pace=PACE)
        await self._writer.go()
        self._writer_started = self._loop.time()

    async def kill_writer(self, *, replace: bool = True) -> None:
        """SIGKILL the writer process; check what it acknowledged; start the next one."""
        writer, key = self._writer, self._writer_key
        assert writer is not None
        await writer.kill()
        self.counts.process_writers_killed += 1
        self.counts.acknowledged += len(writer.acks)
        view = self.store.session(key)
        for stream in ("1", "2", "3", "4"):
            acked = [ack for ack in writer.acks if ack.stream == stream]
            if len(acked) < 2:
                continue
            stored = await self.replay(view, acked[0].event_id)
            numbers = [progress_of(e) for e in stored]
            # After its first acknowledged event: 1, 2, ... with no hole, holding every ack.
            if numbers != list(range(1, len(numbers) + 1)):
                self.counts.errors.append(f"{key}/{stream}: stored numbers have a hole or a repeat")
            self.counts.duplicated += len(numbers) - len(set(numbers))
            present = {e.event_id for e in stored}
            lost = [ack.n for ack in acked[1:] if ack.event_id not in present]
            if lost:
                self.counts.lost += len(lost)
                self.counts.errors.append(
                    f"{key}/{stream}: {len(lost)} of {len(acked)} acknowledged events missing "
                    f"(numbers {lost[0]}..{lost[-1]}; {len(stored)} replayed)"
                )
        await self.store.end_session(key)
        if replace:
            await self.start_writer()

    # --- retention ---------------------------------------------------------------------------------

    async def retention(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(20)
            try:
                done = await run_retention(
                    self.dsn,
                    ttl=TTL,
                    ended_grace=ENDED_GRACE,
                    partition_max_age=PARTITION_MAX_AGE,
                )
            except Exception as exc:  # a fault may hit it: the next run finishes its work
                log(f"  retention run failed ({exc!r}); the next one carries on")
                continue
            self.counts.retention_runs += 1
            self.counts.retention_rows_deleted += done.rows_deleted
            self.counts.retention_partitions_dropped += done.partitions_dropped

    # --- faults --------------------------------------------------------------------------------------

    async def inject(self, name: str) -> float:
        """Cause fault ``name``; return when it is over."""
        if name in ("restart", "crash") and self.server is None:
            name = "terminate"
        if name == "restart":
            await self.server.restart("fast", outage=2.0)  # type: ignore[union-attr]
        elif name == "crash":
            await self.server.restart("immediate", outage=2.0)  # type: ignore[union-attr]
        elif name == "terminate":
            await self.admin("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")  # fmt: skip
        elif name == "sigkill":
            await self.kill_writer()
        elif name == "listener":
            await self.admin(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = $1",
                LISTENER_NAME,
            )
        elif name == "flood":
            await self.flood(20.0)
        elif name == "lock":
            conn = await asyncpg.connect(self.dsn)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE mcp_events_streams IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(5.0)  # how long the lock is held
            finally:
                await conn.close()
        return self._loop.time()

    async def admin(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    async def flood(self, seconds: float) -> None:
        stuck = await asyncpg.connect(self.dsn)
        flooder = await asyncpg.connect(self.dsn)
        try:
            await stuck.execute(f"LISTEN {CHANNEL}")
            await stuck.execute("BEGIN; SELECT 1")  # listens, never reads: the queue fills behind it
            ends = self._loop.time() + seconds
            while self._loop.time() < ends:
                await flooder.execute(
                    "SELECT pg_notify($1, CASE i % 3 WHEN 0 THEN (i * 7919)::text WHEN 1 THEN '*' "
                    "ELSE repeat('9,', 3990) || i END) FROM generate_series(1, 200) i",
                    CHANNEL,
                )
        finally:
            await stuck.close()
            await flooder.close()

    async def fault_ticks(self, every: float, duration: float) -> None:
        began = self._loop.time()
        for number in range(1, int(duration // every)):
            await asyncio.sleep(began + number * every - self._loop.time())
            name = FAULTS[(number - 1) % len(FAULTS)]
            start = self._loop.time()
            log(f"  t={start - began:5.0f}s fault: {name}")
            try:
                end = await self.inject(name)
            except Exception as exc:
                self.counts.errors.append(f"fault {name} could not be caused: {exc!r}")
                continue
            log(f"  t={end - began:5.0f}s fault over after {end - start:.1f}s")
            self.faults.append({"t": round(start - began), "fault": name, "start": start, "end": end})
            if name != "sigkill" and self._loop.time() - self._writer_started > 60:
                await self.kill_writer()  # its history must be checked before the TTL takes it

    async def progress(self, began: float) -> None:
        last = 0
        while not self._stop.is_set():
            await asyncio.sleep(10)
            acked = self.counts.acknowledged
            now = self._loop.time() - began
            log(
                f"  t={now:5.0f}s acknowledged {acked:,} (+{(acked - last) / 10:,.0f}/s), "
                f"sessions checked {self.counts.sessions_checked}, resumes {self.counts.resume_checks}, "
                f"lost {self.counts.lost}, duplicated {self.counts.duplicated}, "
                f"retention deleted {self.counts.retention_rows_deleted:,} rows "
                f"and {self.counts.retention_partitions_dropped} partitions"
            )
            last = acked

    async def run(self, duration: float, fault_every: float) -> None:
        began = self._loop.time()
        await self.start_writer()
        background = [
            asyncio.create_task(self.resumptions()),
            asyncio.create_task(self.retention()),
            asyncio.create_task(self.progress(began)),
        ]
        slots = [asyncio.create_task(self.session_slot()) for _ in range(SESSIONS)]
        try:
            await self.fault_ticks(fault_every, duration)
            await asyncio.sleep(max(0.0, began + duration - self._loop.time()))
            self._stop.set()
            log("  winding down: the live sessions finish and are checked")
            await asyncio.wait_for(asyncio.gather(*slots), 180)
            await self.kill_writer(replace=False)
        finally:
            # Also on Ctrl-C or a failure: nothing may use the store once it closes.
            for task in [*background, *slots]:
                task.cancel()
            await asyncio.gather(*background, *slots, return_exceptions=True)
            if self._writer is not None and self._writer.process.returncode is None:
                await self._writer.kill()


@asynccontextmanager
async def database(dsn: str | None) -> AsyncIterator[tuple[str, OwnServer | None]]:
    if dsn is not None:
        async with scratch_database(dsn) as scratch:
            yield scratch, None
        return
    log("starting an embedded PostgreSQL (restart and crash faults need a server of our own)")
    with start_own_server() as server:
        async with scratch_database(server.uri) as scratch:
            yield scratch, server


async def main(args: argparse.Namespace) -> int:
    config = {**environment(), "duration_s": args.duration, "fault_every_s": args.fault_every,
              "server": "--dsn" if args.dsn else "embedded", "sessions": SESSIONS,
              "pace_s": PACE}  # fmt: skip
    async with (
        database(args.dsn) as (dsn, server),
        await PostgresEventStore.connect(dsn, retry_deadline=30, max_pool_size=10) as store,
    ):
        soak = Soak(store, dsn, server)
        started = time.monotonic()
        await soak.run(args.duration, args.fault_every)
        wall = time.monotonic() - started
    faults = []
    for fault in soak.faults:
        start, end = fault["start"], max(fault["end"], fault["start"] + 5)
        faults.append(
            {
                "t_s": fault["t"],
                "fault": fault["fault"],
                "lasted_s": round(fault["end"] - fault["start"], 2),
                "before": window(soak.latencies, start - 20, start),
                "during": window(soak.latencies, start, end),
                "after": window(soak.latencies, end, end + 20),
            }
        )
    counts = vars(soak.counts)
    results = {"config": config, "wall_s": round(wall, 1), "counts": counts, "faults": faults,
               "overall": window(soak.latencies, float("-inf"), float("inf"))}  # fmt: skip
    report(results, render, args.json)
    failed = counts["lost"] or counts["duplicated"] or counts["resume_mismatches"] or counts["errors"]
    failed = failed or counts["missed_by_subscriber"] or counts["doubled_to_subscriber"]
    return 1 if failed else 0


def _cell(stats: dict[str, Any]) -> str:
    if "p50_ms" not in stats:
        return f"n={stats['n']}"
    return f"{stats['p50_ms']:.1f} / {stats['p99_ms']:.1f} / {stats['max_ms']:.0f}"


def render(results: dict[str, Any]) -> str:
    counts = results["counts"]
    lines = [
        f"# soak: {results['wall_s']:.0f} s, {describe_environment(results['config'])}, "
        f"{results['config']['server']} server",
        "",
        f"events acknowledged {counts['acknowledged']:,}; replayed (checked) {counts['replayed']:,}; "
        f"lost {counts['lost']}; duplicated {counts['duplicated']}",
        f"subscribers: missed {counts['missed_by_subscriber']}, doubled {counts['doubled_to_subscriber']}; "
        f"resumptions checked {counts['resume_checks']:,}, wrong {counts['resume_mismatches']}; "
        f"sessions checked {counts['sessions_checked']}; writer processes SIGKILLed "
        f"{counts['process_writers_killed']}",
        f"retention: {counts['retention_runs']} runs, {counts['retention_rows_deleted']:,} rows deleted, "
        f"{counts['retention_partitions_dropped']} partitions dropped",
        f"append latency overall (p50 / p99 / max ms): {_cell(results['overall'])}",
        "",
        "| t (s) | fault | lasted (s) | before p50 / p99 / max ms | during | after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for fault in results["faults"]:
        lines.append(
            f"| {fault['t_s']} | {fault['fault']} | {fault['lasted_s']} | {_cell(fault['before'])} "
            f"| {_cell(fault['during'])} | {_cell(fault['after'])} |"
        )
    if counts["errors"]:
        lines += ["", "errors:", *(f"- {error}" for error in counts["errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="use this server (restart and crash become 'terminate'); "
                        "default: an embedded PostgreSQL the soak starts")  # fmt: skip
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--fault-every", type=float, default=60, help="seconds between faults (default 60)")
    parser.add_argument("--json", help="also write the results here")
    # asyncpg logs a traceback for each failed attempt to refill its pool during an
    # outage; the store's own one-line warnings say the same.
    logging.getLogger("asyncpg").setLevel(logging.ERROR)
    with contextlib.suppress(BrokenPipeError):
        sys.exit(run(main(parser.parse_args())))
