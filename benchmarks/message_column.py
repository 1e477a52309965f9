"""Benchmark: storing the JSON-RPC message column as jsonb vs text vs bytea (asyncpg).

Measures what the library does: writes dump real ``mcp_types.JSONRPCNotification`` objects with
``model_dump_json(by_alias=True, exclude_unset=True)`` (``.encode()``-d for bytea) inside the timed
loop; reads fetch the rows and parse each with ``mcp_pg_events.messages.load_message`` (the str
of jsonb and text encoded first: it reads bytes, as a bytea column gives). Per type: single-row
inserts from 1 and 16 clients, batched ``unnest`` inserts, warm best-of-5 reads (fetch alone and
fetch+decode) and on-disk bytes/row. Each of ``--rounds`` rounds runs every type once, in
an order rotated per round, on freshly truncated tables; the table shows medians over rounds, the
JSON also min, max and every run. Finally checks whether a message holding ``\\u0000`` survives.
Scratch tables ``mcp_events_bench_<type>`` are dropped at the end, also on error.

    python benchmarks/message_column.py [--dsn DSN] [--events N] [--rounds R] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import timeit
from typing import Any

import asyncpg
import mcp_types

from mcp_pg_events.messages import load_message

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
METRICS = (*RATE_KEYS, "bytes_per_row")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(kind: str) -> str:
    return f"mcp_events_bench_{kind}"


def make_message(n: int, padding: str = "") -> mcp_types.JSONRPCNotification:
    params = {"progressToken": "tok-1", "progress": n, "total": 1000, "message": padding}
    return mcp_types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params=params)


def dump(message: mcp_types.JSONRPCNotification) -> str:
    """What the library stores: pydantic JSON of the message as it was set."""
    return message.model_dump_json(by_alias=True, exclude_unset=True)


def encode(kind: str, message: mcp_types.JSONRPCNotification) -> str | bytes:
    text = dump(message)
    return text.encode() if kind == "bytea" else text


PADDING = "x" * (TARGET_BYTES - len(dump(make_message(0))))


async def insert_one_by_one(
    pool: asyncpg.Pool, kind: str, stream_key: int, msgs: list[mcp_types.JSONRPCNotification]
) -> None:
    sql = f"INSERT INTO {table(kind)} (stream_key, message) VALUES ($1, $2)"
    async with pool.acquire() as conn:
        for m in msgs:
            await conn.execute(sql, stream_key, encode(kind, m))


async def bench_inserts(
    pool: asyncpg.Pool, kind: str, msgs: list[mcp_types.JSONRPCNotification], clients: int, base_key: int
) -> float:
    # All messages, dealt round-robin over `clients` connections, one stream per client.
    start = time.perf_counter()
    await asyncio.gather(
        *(insert_one_by_one(pool, kind, base_key + c, msgs[c::clients]) for c in range(clients))
    )
    return len(msgs) / (time.perf_counter() - start)


async def bench_batched(
    pool: asyncpg.Pool, kind: str, msgs: list[mcp_types.JSONRPCNotification], stream_key: int
) -> float:
    sql = f"INSERT INTO {table(kind)} (stream_key, message) SELECT * FROM unnest($1::bigint[], $2::{kind}[])"
    async with pool.acquire() as conn:
        start = time.perf_counter()
        for lo in range(0, len(msgs), BATCH):
            chunk = msgs[lo : lo + BATCH]
            await conn.execute(sql, [stream_key] * len(chunk), [encode(kind, m) for m in chunk])
        return len(msgs) / (time.perf_counter() - start)


def _as_bytes(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


async def bench_read(pool: asyncpg.Pool, kind: str, stream_key: int, repeat: int = 5) -> tuple[float, float]:
    """Rows/s of the fetch alone and of fetch plus ``load_message``: best of ``repeat`` warm runs."""
    sql = f"SELECT message FROM {table(kind)} WHERE stream_key = $1 ORDER BY seq"
    best_fetch = best_total = float("inf")
    decoded: list[Any] = []
    async with pool.acquire() as conn:
        await conn.fetch(sql, stream_key)  # prepare the statement and warm the cache
        for _ in range(repeat):
            start = time.perf_counter()
            rows = await conn.fetch(sql, stream_key)
            fetched = time.perf_counter()
            # str for jsonb and text: load_message reads the bytes a bytea column gives.
            decoded = [load_message(_as_bytes(r["message"])) for r in rows]
            done = time.perf_counter()
            best_fetch = min(best_fetch, fetched - start)
            best_total = min(best_total, done - start)
    if not decoded or decoded[0] != make_message(0, PADDING):
        raise RuntimeError(f"unexpected read-back from {table(kind)}: {decoded[:1]!r}")
    return len(decoded) / best_fetch, len(decoded) / best_total


async def bytes_per_row(pool: asyncpg.Pool, kind: str) -> float:
    size = await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", table(kind))
    rows = await pool.fetchval(f"SELECT count(*) FROM {table(kind)}")
    return float(size / rows)


async def check_nul(pool: asyncpg.Pool, kind: str) -> dict[str, Any]:
    message = make_message(1, "a\x00b")
    text = dump(message)  # pydantic writes the NUL as the JSON escape \u0000
    try:
        got = await pool.fetchval(
            f"INSERT INTO {table(kind)} (stream_key, message) VALUES (-1, $1) RETURNING message",
            encode(kind, message),
        )
    except asyncpg.PostgresError as exc:
        error = f"{type(exc).__name__}: {exc}"
        return {"accepted": False, "exact": False, "decoded_equal": False, "error": error}
    got_text = got.decode() if isinstance(got, bytes) else got
    return {
        "accepted": True,
        "exact": got_text == text,
        "decoded_equal": load_message(_as_bytes(got)) == message,
        "error": None,
    }


async def one_round(
    pool: asyncpg.Pool, kind: str, msgs: list[mcp_types.JSONRPCNotification]
) -> dict[str, float]:
    await pool.execute(f"TRUNCATE {table(kind)} RESTART IDENTITY")
    n = len(msgs)
    log(f"  [{kind}] {n} single-row inserts, 1 client ...")
    one = await bench_inserts(pool, kind, msgs, 1, base_key=1)
    log(f"  [{kind}] {n} single-row inserts, {CLIENTS} clients ...")
    many = await bench_inserts(pool, kind, msgs, CLIENTS, base_key=100)
    log(f"  [{kind}] {n} rows batched by {BATCH} ...")
    batched = await bench_batched(pool, kind, msgs, stream_key=2)
    await pool.execute(f"VACUUM ANALYZE {table(kind)}")
    log(f"  [{kind}] reading {n} rows ...")
    fetch, read = await bench_read(pool, kind, stream_key=1)
    return dict(zip(METRICS, (one, many, batched, fetch, read, await bytes_per_row(pool, kind)), strict=True))


def summarize(runs: list[float], digits: int) -> dict[str, Any]:
    def r(v: float) -> float:
        return round(v, digits) if digits else round(v)

    return {
        "median": r(statistics.median(runs)),
        "min": r(min(runs)),
        "max": r(max(runs)),
        "runs": [r(v) for v in runs],
    }


async def run(dsn: str, events: int, rounds: int) -> dict[str, dict[str, Any]]:
    msgs = [make_message(i, PADDING) for i in range(events)]
    pool = await asyncpg.create_pool(dsn, min_size=CLIENTS, max_size=CLIENTS)
    assert pool is not None
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in TYPES}
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in TYPES:
            await pool.execute(
                f"DROP TABLE IF EXISTS {table(kind)}; CREATE TABLE {table(kind)} (stream_key bigint, "
                f"seq bigserial, created_at timestamptz DEFAULT now(), message {kind}, "
                "PRIMARY KEY (stream_key, seq))"
            )
        for rnd in range(rounds):
            order = TYPES[rnd % len(TYPES) :] + TYPES[: rnd % len(TYPES)]
            log(f"round {rnd + 1}/{rounds}: {', '.join(order)}")
            for kind in order:
                runs[kind].append(await one_round(pool, kind, msgs))
        for kind in TYPES:
            log(f"[{kind}] NUL escape check ...")
            results[kind] = {
                m: summarize([x[m] for x in runs[kind]], 1 if m == "bytes_per_row" else 0) for m in METRICS
            }
            results[kind]["nul"] = await check_nul(pool, kind)
    finally:
        for kind in TYPES:
            await pool.execute(f"DROP TABLE IF EXISTS {table(kind)}")
        await pool.close()
    return results


def decode_only(count: int = 20000, repeat: int = 5) -> dict[str, float]:
    """Messages/s that ``load_message`` parses from ``str`` (text, jsonb; encoded first) and ``bytes``.

    No database: this isolates the Python half of a read from the noise of the server.
    """
    data = dump(make_message(17, PADDING))
    rates = {}
    for kind, value in (("str", data), ("bytes", data.encode())):
        best = min(timeit.repeat(lambda v=value: load_message(_as_bytes(v)), number=count, repeat=repeat))
        rates[kind] = round(count / best)
    return rates


def render(results: dict[str, dict[str, Any]], events: int, rounds: int) -> str:
    head = ["type", "insert/s 1c", f"insert/s {CLIENTS}c", "batched rows/s", "fetch rows/s"]
    head += ["fetch+decode rows/s", "bytes/row", "NUL ok?"]
    rows = [head]
    for kind, r in results.items():
        nul = r["nul"]
        ok = "yes" if nul["exact"] else ("rejected" if not nul["accepted"] else "altered")
        rates = [r[k]["median"] for k in RATE_KEYS]
        rows.append([kind, *(f"{v:,}" for v in rates), f"{r['bytes_per_row']['median']:.1f}", ok])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    payload = len(dump(make_message(17, PADDING)))
    lines = [f"events={events}, payload={payload} bytes, median of {rounds} round(s)"]
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for kind, r in results.items():
        lines.append(f"NUL {kind}: {json.dumps(r['nul'])}")
    decode = decode_only()
    lines.append(f"decode only (no database): from str {decode['str']:,}/s, from bytes {decode['bytes']:,}/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--events", type=int, default=20000, help="events per measurement (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, type order rotated each (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="quick CI run: --events 200 --rounds 1")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.rounds = 200, 1
    results = asyncio.run(run(args.dsn, args.events, args.rounds))
    print(render(results, args.events, args.rounds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"events": args.events, "rounds": args.rounds, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
