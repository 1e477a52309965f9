"""Benchmark: storing the JSON-RPC message column as jsonb vs text vs bytea (asyncpg).

Creates scratch tables ``mcp_events_bench_<type>``, measures single-row inserts from 1 and 16
concurrent clients, batched ``unnest`` inserts, ordered reads plus ``json.loads``, and on-disk
size, then checks whether a message containing the JSON escape ``\\u0000`` survives. Tables are
dropped at the end, also on error.

    python benchmarks/message_column.py [--dsn DSN] [--events N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import asyncpg

TYPES = ("jsonb", "text", "bytea")
CLIENTS = 16
BATCH = 100
TARGET_BYTES = 200
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RATE_KEYS = (
    "insert_per_s_1_client",
    f"insert_per_s_{CLIENTS}_clients",
    "batched_rows_per_s",
    "fetch_rows_per_s",
    "read_rows_per_s",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(kind: str) -> str:
    return f"mcp_events_bench_{kind}"


def _progress(n: int, message: str) -> dict[str, Any]:
    params = {"progressToken": "tok-1", "progress": n, "total": 1000, "message": message}
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}


PADDING = "x" * (TARGET_BYTES - len(json.dumps(_progress(0, ""))))


def payload(n: int) -> str:
    return json.dumps(_progress(n, PADDING))


def encode(kind: str, text: str) -> str | bytes:
    return text.encode() if kind == "bytea" else text


async def insert_one_by_one(pool: asyncpg.Pool, kind: str, stream_key: int, count: int) -> None:
    sql = f"INSERT INTO {table(kind)} (stream_key, message) VALUES ($1, $2)"
    async with pool.acquire() as conn:
        for i in range(count):
            await conn.execute(sql, stream_key, encode(kind, payload(i)))


async def bench_inserts(pool: asyncpg.Pool, kind: str, events: int, clients: int, base_key: int) -> float:
    # `events` in total, spread evenly over `clients` connections, one stream per client.
    share = [events // clients + (1 if c < events % clients else 0) for c in range(clients)]
    start = time.perf_counter()
    await asyncio.gather(*(insert_one_by_one(pool, kind, base_key + c, n) for c, n in enumerate(share)))
    return events / (time.perf_counter() - start)


async def bench_batched(pool: asyncpg.Pool, kind: str, events: int, stream_key: int) -> float:
    sql = f"INSERT INTO {table(kind)} (stream_key, message) SELECT * FROM unnest($1::bigint[], $2::{kind}[])"
    async with pool.acquire() as conn:
        start = time.perf_counter()
        for lo in range(0, events, BATCH):
            n = min(BATCH, events - lo)
            await conn.execute(sql, [stream_key] * n, [encode(kind, payload(lo + i)) for i in range(n)])
        return events / (time.perf_counter() - start)


async def bench_read(pool: asyncpg.Pool, kind: str, stream_key: int, repeat: int = 5) -> tuple[float, float]:
    """Rows/s of the fetch alone and of fetch plus decode: best of ``repeat`` warm runs."""
    sql = f"SELECT message FROM {table(kind)} WHERE stream_key = $1 ORDER BY seq"
    best_fetch = best_total = float("inf")
    async with pool.acquire() as conn:
        await conn.fetch(sql, stream_key)  # prepare the statement and warm the cache
        for _ in range(repeat):
            start = time.perf_counter()
            rows = await conn.fetch(sql, stream_key)
            fetched = time.perf_counter()
            decoded = [json.loads(r["message"]) for r in rows]
            done = time.perf_counter()
            best_fetch = min(best_fetch, fetched - start)
            best_total = min(best_total, done - start)
    if not decoded or decoded[0]["method"] != "notifications/progress":
        raise RuntimeError(f"unexpected read-back from {table(kind)}")
    return len(decoded) / best_fetch, len(decoded) / best_total


async def bytes_per_row(pool: asyncpg.Pool, kind: str) -> float:
    size = await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", table(kind))
    rows = await pool.fetchval(f"SELECT count(*) FROM {table(kind)}")
    return size / rows


async def check_nul(pool: asyncpg.Pool, kind: str) -> dict[str, Any]:
    text = json.dumps({"s": "a\x00b"})  # '{"s": "a\\u0000b"}'
    try:
        got = await pool.fetchval(
            f"INSERT INTO {table(kind)} (stream_key, message) VALUES (-1, $1) RETURNING message",
            encode(kind, text),
        )
    except asyncpg.PostgresError as exc:
        error = f"{type(exc).__name__}: {exc}"
        return {"accepted": False, "exact": False, "decoded_equal": False, "error": error}
    got_text = got.decode() if isinstance(got, bytes) else got
    return {
        "accepted": True,
        "exact": got_text == text,
        "decoded_equal": json.loads(got_text) == {"s": "a\x00b"},
        "error": None,
    }


async def run(dsn: str, events: int) -> dict[str, dict[str, Any]]:
    pool = await asyncpg.create_pool(dsn, min_size=CLIENTS, max_size=CLIENTS)
    assert pool is not None
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in TYPES:
            await pool.execute(
                f"DROP TABLE IF EXISTS {table(kind)}; CREATE TABLE {table(kind)} (stream_key bigint, "
                f"seq bigserial, created_at timestamptz DEFAULT now(), message {kind}, "
                "PRIMARY KEY (stream_key, seq))"
            )
        for kind in TYPES:
            log(f"[{kind}] {events} single-row inserts, 1 client ...")
            one = await bench_inserts(pool, kind, events, 1, base_key=1)
            log(f"[{kind}] {events} single-row inserts, {CLIENTS} clients ...")
            many = await bench_inserts(pool, kind, events, CLIENTS, base_key=100)
            log(f"[{kind}] {events} rows batched by {BATCH} ...")
            batched = await bench_batched(pool, kind, events, stream_key=2)
            await pool.execute(f"VACUUM ANALYZE {table(kind)}")
            log(f"[{kind}] reading {events} rows ...")
            fetch, read = await bench_read(pool, kind, stream_key=1)
            size = await bytes_per_row(pool, kind)
            log(f"[{kind}] NUL escape check ...")
            results[kind] = {
                "insert_per_s_1_client": round(one),
                f"insert_per_s_{CLIENTS}_clients": round(many),
                "batched_rows_per_s": round(batched),
                "fetch_rows_per_s": round(fetch),
                "read_rows_per_s": round(read),
                "bytes_per_row": round(size, 1),
                "nul": await check_nul(pool, kind),
            }
    finally:
        for kind in TYPES:
            await pool.execute(f"DROP TABLE IF EXISTS {table(kind)}")
        await pool.close()
    return results


def render(results: dict[str, dict[str, Any]], events: int) -> str:
    head = ["type", "insert/s 1c", f"insert/s {CLIENTS}c", "batched rows/s", "fetch rows/s"]
    head += ["fetch+decode rows/s"]
    head += ["bytes/row", "NUL ok?"]
    rows = [head]
    for kind, r in results.items():
        nul = r["nul"]
        ok = "yes" if nul["exact"] else ("rejected" if not nul["accepted"] else "altered")
        rates = [r[k] for k in RATE_KEYS]
        rows.append([kind, *(f"{v:,}" for v in rates), f"{r['bytes_per_row']:.1f}", ok])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"events={events}, payload={len(payload(17))} bytes"]
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for kind, r in results.items():
        lines.append(f"NUL {kind}: {json.dumps(r['nul'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--events", type=int, default=20000, help="events per measurement (default 20000)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    results = asyncio.run(run(args.dsn, args.events))
    print(render(results, args.events))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"events": args.events, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
