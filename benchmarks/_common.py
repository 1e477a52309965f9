"""What the benchmarks share: a scratch database, bulk-written streams, a measured replay.

Not a benchmark itself. The scripts run as ``python benchmarks/<name>.py``, which
puts this folder on ``sys.path``, so they import it as ``_common``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from mcp.server.streamable_http import EventMessage, EventStore

import mcp_pg_events
from mcp_pg_events import PostgresEventStore, StoreSettings, migrate
from mcp_pg_events.compat import MCP_MAJOR

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PARTITION_WIDTH = 1_000_000
# Rows per bulk INSERT: one statement of 100k ~200-byte rows is ~20 MB of parameters.
BULK_CHUNK = 100_000

T = TypeVar("T")

try:  # mcp 2.x: messages are plain pydantic models
    import mcp_types

    def progress_notification(token: str, progress: int, text: str) -> Any:
        """A ``notifications/progress`` message as the SDK hands it to the store."""
        params = {"progressToken": token, "progress": progress, "total": 10**6, "message": text}
        return mcp_types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params=params)

except ImportError:  # mcp 1.x: the SDK hands the store every message wrapped in the RootModel
    from mcp.types import JSONRPCMessage, JSONRPCNotification

    def progress_notification(token: str, progress: int, text: str) -> Any:
        """A ``notifications/progress`` message as the SDK hands it to the store."""
        params = {"progressToken": token, "progress": progress, "total": 10**6, "message": text}
        return JSONRPCMessage(
            JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params=params)
        )


# Scratch databases created and not yet dropped, with the DSN to drop them from.
_undropped: dict[str, str] = {}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def payload(i: int) -> bytes:
    """A ~200-byte progress notification as the SDK would have stored it."""
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "bench", "progress": i, "total": 10**6, "message": "x" * 100},
    }
    return json.dumps(message, separators=(",", ":")).encode()


async def execute(dsn: str, query: str, *args: Any) -> None:
    """Run one statement on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def _drop(admin_dsn: str, name: str) -> None:
    # A fresh connection: the one that created the database may have been
    # interrupted mid-statement by Ctrl-C.
    await execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _undropped.pop(name, None)


@asynccontextmanager
async def scratch_database(dsn: str) -> AsyncIterator[str]:
    """A new database on the server of ``dsn``, migrated to head; dropped on the way out."""
    name = f"mcp_events_bench_{uuid.uuid4().hex[:8]}"
    await execute(dsn, f'CREATE DATABASE "{name}"')
    _undropped[name] = dsn
    try:
        bench_dsn = with_database(dsn, name)
        log(f"scratch database {name}: migrating")
        await asyncio.to_thread(migrate.upgrade, bench_dsn)
        yield bench_dsn
    finally:
        await _drop(dsn, name)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, then drop any scratch database an interruption left behind.

    On Python 3.11+ Ctrl-C cancels ``main`` and ``scratch_database`` drops its
    database on the way out; this catches what is left when that could not run
    (Python 3.10, or a second Ctrl-C). Ctrl-C then exits with status 130 and one
    line, not a traceback.
    """
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        log("interrupted; the scratch database was dropped")
        sys.exit(130)
    finally:
        for name, admin_dsn in list(_undropped.items()):
            log(f"dropping scratch database {name}")
            asyncio.run(_drop(admin_dsn, name))


def stream_key(event_id: str) -> int:
    """The stream's key: the first field of the store's event ids, ``{stream_key}-{seq}-{tag}``."""
    return int(event_id.split("-")[0])


async def bulk_append(dsn: str, key: int, events: int, first: int = 0, analyze: bool = True) -> None:
    """Append ``events`` messages to the stream ``key`` with SQL: far faster than one by one.

    ``analyze=False`` leaves the table as a fresh partition is until autovacuum
    analyzes it: without statistics.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval("SELECT mcp_events_ensure_partitions($1)", events // PARTITION_WIDTH + 2)
        for start in range(0, events, BULK_CHUNK):
            n = min(BULK_CHUNK, events - start)
            await conn.execute(
                "INSERT INTO mcp_events_events (stream_key, message) SELECT $1, m FROM unnest($2::bytea[]) m",
                key,
                [payload(first + start + i) for i in range(n)],
            )
            log(f"  wrote {start + n:,} / {events:,}")
        if analyze:
            await conn.execute("VACUUM ANALYZE mcp_events_events")
    finally:
        await conn.close()


async def fill(
    store: PostgresEventStore,
    dsn: str,
    events: int,
    session: str = "bench",
    stream: str = "long",
    analyze: bool = True,
) -> str:
    """One stream of ``events`` messages after a priming event; returns the priming id."""
    cursor = await store.session(session).store_event(stream, None)
    await bulk_append(dsn, stream_key(cursor), events, analyze=analyze)
    return cursor


async def replay_count(view: EventStore, cursor: str) -> tuple[str | None, int]:
    """Replay after ``cursor`` with a callback that only counts: (stream id, events)."""
    count = 0

    async def count_event(event: EventMessage) -> None:
        nonlocal count
        count += 1

    stream = await view.replay_events_after(cursor, count_event)
    return stream, count


async def measure_replay(view: EventStore, cursor: str, events: int, stream: str) -> dict[str, Any]:
    """Rate of a replay of ``events`` events after ``cursor``, then its peak Python memory.

    The peak comes from a second pass under tracemalloc, which slows Python down.
    """
    start = time.perf_counter()
    got = await replay_count(view, cursor)
    elapsed = time.perf_counter() - start
    if got != (stream, events):
        raise RuntimeError(f"replay gave (stream, events) {got}, expected {(stream, events)}")
    tracemalloc.start()
    try:
        await replay_count(view, cursor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"events_per_s": round(events / elapsed), "seconds": round(elapsed, 2), "peak_kib": peak // 1024}


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and max in ms (nearest rank)."""
    if not latencies:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    ordered = sorted(latencies)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return {
        "p50_ms": round(rank(0.50), 3),
        "p99_ms": round(rank(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def store_default(name: str) -> Any:
    """A default of the store's settings, so that a benchmark follows the store."""
    return getattr(StoreSettings(), name)


def default_pool_size() -> int:
    """The pool ``PostgresEventStore.connect()`` opens by default, so a benchmark follows the store."""
    return StoreSettings().max_pool_size


def int_list(text: str) -> list[int]:
    """An argparse type: ``1,16,64`` as a list of ints."""
    return [int(x) for x in text.split(",") if x]


def parts_of(choices: Iterable[str]) -> Callable[[str], set[str]]:
    """An argparse type: a comma-separated subset of ``choices``."""
    known = tuple(choices)

    def parse(text: str) -> set[str]:
        parts = {p.strip() for p in text.split(",") if p.strip()}
        unknown = parts - set(known)
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown part(s) {', '.join(sorted(unknown))}; choose from {known}"
            )
        return parts

    return parse


def report(results: dict[str, Any], render: Callable[[dict[str, Any]], str], json_path: str | None) -> None:
    """Print the table, and write the results as JSON when asked."""
    print(render(results))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(results, out, indent=2)


def store_commit() -> str:
    """The git commit of the mcp_pg_events being measured, '+dirty' with local changes."""
    root = Path(mcp_pg_events.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return f"(not a git checkout: {root})"
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    """What a result depends on besides the sizes: the commit measured, the SDK, Python, the cores."""
    return {
        "store_commit": store_commit(),
        "mcp": f"{importlib.metadata.version('mcp')} ({MCP_MAJOR}.x)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def describe_environment(config: dict[str, Any]) -> str:
    """The first line of a report: ``environment()`` in words."""
    return (
        f"mcp-pg-events {config['store_commit']}, mcp {config['mcp']}, "
        f"Python {config['python']}, {config['cpus']} CPUs"
    )


async def paced(write: Callable[[], Awaitable[object]], interval: float, stop: asyncio.Event) -> int:
    """``write`` once per ``interval`` seconds until ``stop`` is set; how many were written.

    Paced, not back to back: a server's progress notifications come at the tool's
    pace. A writer that fell behind (a write slower than ``interval``) does not
    burst to catch up.
    """
    loop = asyncio.get_running_loop()
    due = loop.time()
    done = 0
    while not stop.is_set():
        await write()
        done += 1
        due = max(due + interval, loop.time())
        await asyncio.sleep(due - loop.time())
    return done
