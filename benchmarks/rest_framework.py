"""rest_framework_mcp's collaborators on PostgreSQL (ours) beside the framework's own Redis ones, in one run.

What the Django REST framework issue asks to measure, both backends on the same
machine, in the same run, cells alternating which backend goes first:

- throughput per worker (one process, N concurrent callers, events/s for a fixed
  time after a warm-up):
  - ``record``: ``SSEReplayBuffer.record`` on N sessions, each awaiting its
    write before the next (ours: a committed row; Redis: XADD then EXPIRE);
  - ``notify``: what ``MCPServer.notify`` does with a buffer and a broker:
    ``record``, then ``SSEBroker.publish`` of the wrapped payload (ours: the
    paired broker writes nothing more; Redis: a PUBLISH);
  - ``topic``: ``SubscriptionBroker.publish`` to N topics (ours: concurrent
    publishes share a row; Redis: a PUBLISH each).
- cross-worker delivery: a subscriber process (this file with ``--subscriber``)
  holds K GET-stream queues (``SSEBroker.subscribe``) or K subscriptions
  (``SubscriptionBroker.subscribe``), and this process publishes to them at a
  fixed rate, the wall-clock time of the publish in each payload; the
  subscriber notes when each arrives on its queue. p50 / p99 / max, and what was
  lost or came twice (ours must show 0 / 0; Redis pub/sub loses what nobody was
  subscribed to when it was published).

Redis here keeps nothing on disk unless configured to (the report prints its
``appendonly`` and ``save``): a Redis ``record`` is acknowledged from memory,
ours after the commit's fsync. The Redis side uses database ``--redis`` (default
11) and keys and channels under a prefix of its own, deleted at the end; it never
flushes anything. Without a Redis server (or the redis package) it is skipped.

    python benchmarks/rest_framework.py --json rest_framework.json   # a few minutes
    python benchmarks/rest_framework.py --smoke                       # CI: seconds

The PostgreSQL server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is
created there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_DSN,
    describe_environment,
    environment,
    int_list,
    latency_summary,
    log,
    report,
    run,
    scratch_database,
)

SCRIPT = str(Path(__file__).resolve())
# Python put this folder first on sys.path, for _common; there this file would be
# the `rest_framework` that Django REST framework's own modules import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(SCRIPT).parent]
DEFAULT_REDIS = "redis://127.0.0.1:6379/11"
PAD = "x" * 150  # a ~200-byte notification, as the other benchmarks write
BACKENDS = ("postgres", "redis")
REDIS_CONNECTIONS = 2000


def configure_django() -> None:
    """The framework imports Django settings at import time: a minimal configuration."""
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"],
            DATABASES={},
            USE_TZ=True,
        )
        import django

        django.setup()


def notification(n: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": PAD, "n": n, "sent_ns": time.time_ns()},
    }


@dataclass
class Backend:
    """One backend's three collaborators, and how to close it."""

    name: str
    buffer: Any
    broker: Any
    topics: Any
    close: Callable[[], Awaitable[None]]
    ready: Callable[[list[str]], Awaitable[None]]


async def postgres_backend(dsn: str, namespace: str) -> Backend:
    from mcp_pg_events.rest_framework import (
        PostgresEvents,
        PostgresSSEBroker,
        PostgresSSEReplayBuffer,
        PostgresSubscriptionBroker,
    )
    from mcp_pg_events.settings import RestFrameworkSettings, StoreSettings

    events = PostgresEvents(RestFrameworkSettings(dsn=dsn), StoreSettings.from_env())
    buffer = PostgresSSEReplayBuffer(events=events)
    broker = PostgresSSEBroker(replay_buffer=buffer, events=events)
    topics = PostgresSubscriptionBroker(namespace=namespace, events=events)

    async def close() -> None:
        await asyncio.to_thread(events.engine.close)

    async def ready(sessions: list[str]) -> None:
        # A GET stream's queue starts reading when the transport first reads it.
        await asyncio.gather(*(broker._queues[s].open(None) for s in sessions))

    return Backend("postgres", buffer, broker, topics, close, ready)


async def redis_backend(url: str, prefix: str) -> Backend:
    from redis.asyncio import Redis
    from rest_framework_mcp.subscriptions.redis_subscription_broker import RedisSubscriptionBroker
    from rest_framework_mcp.transport.redis_sse_broker import RedisSSEBroker
    from rest_framework_mcp.transport.redis_sse_replay_buffer import RedisSSEReplayBuffer

    # redis-py's default pool holds 100 connections: the subscriber's GET streams
    # take one each (a pubsub per stream), and an open-loop publisher at 1,000/s
    # has more than 100 commands in flight whenever Redis stalls a moment; either
    # then fails with MaxConnectionsError. The benchmark gives it room.
    client = Redis.from_url(url, max_connections=REDIS_CONNECTIONS)
    channel_prefix = f"{prefix}:sse"
    buffer = RedisSSEReplayBuffer(client, key_prefix=f"{prefix}:replay")
    broker = RedisSSEBroker(client, channel_prefix=channel_prefix)
    topics = RedisSubscriptionBroker(client, channel_prefix=f"{prefix}:sub")

    async def close() -> None:
        # Only this run's keys: the server may serve others.
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()

    async def ready(sessions: list[str]) -> None:
        # RedisSSEBroker subscribes in a background task: wait until Redis counts
        # a subscriber on every channel (a benchmark may poll; nothing announces it).
        channels = [f"{channel_prefix}:{s}" for s in sessions]
        while True:
            counts = dict(await client.pubsub_numsub(*channels))
            if all(counts.get(c.encode(), 0) for c in channels):
                return
            await asyncio.sleep(0.01)

    return Backend("redis", buffer, broker, topics, close, ready)


async def redis_answers(url: str) -> str | None:
    """None when Redis serves at ``url``; else why not."""
    try:
        from redis.asyncio import Redis
    except ImportError:
        return "the redis package is not installed"
    client = Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except Exception as exc:
        return f"no Redis at {url}: {exc}"
    finally:
        await client.aclose()
    return None


async def redis_persistence(url: str) -> dict[str, str]:
    from redis.asyncio import Redis

    client = Redis.from_url(url, decode_responses=True)
    try:
        config = {**await client.config_get("appendonly"), **await client.config_get("save")}
        info = await client.info("server")
        config["version"] = info.get("redis_version", "?")
        return config
    finally:
        await client.aclose()


# --- throughput ----------------------------------------------------------------------------


async def throughput_cell(backend: Backend, op: str, streams: int, seconds: float, warmup: float) -> float:
    """Operations per second of ``op`` with ``streams`` concurrent callers, after ``warmup`` seconds."""
    loop = asyncio.get_running_loop()
    tag = uuid.uuid4().hex[:8]
    sessions = [f"bench{tag}{i}" for i in range(streams)]
    done = 0
    counting = False
    stop = loop.time() + warmup + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = 0
        while loop.time() < stop:
            payload = notification(n)
            if op == "record":
                await backend.buffer.record(sessions[i], payload)
            elif op == "notify":
                event_id = await backend.buffer.record(sessions[i], payload)
                await backend.broker.publish(
                    sessions[i], {"_mcp_event_id": event_id, "_mcp_payload": payload}
                )
            else:
                await backend.topics.publish(f"resource:bench/{tag}/{i}", payload)
            n += 1
            if counting:
                done += 1

    async def window() -> None:
        nonlocal counting, done
        await asyncio.sleep(warmup)
        counting, done = True, 0

    started = loop.time()
    await asyncio.gather(window(), *(caller(i) for i in range(streams)))
    measured = loop.time() - started - warmup
    return done / measured


# --- cross-worker delivery -----------------------------------------------------------------


async def subscriber_main() -> None:
    """The subscriber process: subscribe, say ready, collect, report as JSON on stdout."""
    configure_django()
    config = json.loads(sys.stdin.readline())
    backend = await (
        postgres_backend(config["dsn"], config["namespace"])
        if config["backend"] == "postgres"
        else redis_backend(config["redis"], config["prefix"])
    )
    count, names = config["count"], config["names"]
    received: list[tuple[int, int]] = []  # (n, received_ns)
    complete = asyncio.Event()

    async def read(queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            now = time.time_ns()
            payload = item.get("_mcp_payload", item) if isinstance(item, dict) else item
            received.append((payload["params"]["n"], now - payload["params"]["sent_ns"]))
            if len(received) >= count:
                complete.set()

    if config["kind"] == "sse":
        queues = [backend.broker.subscribe(name) for name in names]
        readers = [asyncio.ensure_future(read(q)) for q in queues]
        await backend.ready(names)
    else:
        queues = [await backend.topics.subscribe(frozenset({name})) for name in names]
        readers = [asyncio.ensure_future(read(q)) for q in queues]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "sent": everything was published
    # What has not come by then is counted lost.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(complete.wait(), config["grace"])
    for reader in readers:
        reader.cancel()
    counts = Counter(n for n, _ in received)
    print(
        json.dumps(
            {
                "latencies": [ns / 1e9 for _, ns in received],
                "lost": sum(1 for n in range(count) if n not in counts),
                "duplicated": sum(c - 1 for c in counts.values() if c > 1),
            }
        ),
        flush=True,
    )
    await backend.close()


async def delivery_cell(
    backend: Backend, config: dict[str, Any], kind: str, streams: int, count: int, rate: float
) -> dict[str, Any]:
    """Publish ``count`` payloads at ``rate``/s to ``streams`` queues of a subscriber process."""
    tag = uuid.uuid4().hex[:8]
    names = (
        [f"bench{tag}{i}" for i in range(streams)]
        if kind == "sse"
        else [f"resource:bench/{tag}/{i}" for i in range(streams)]
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, "--subscriber",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        return await _deliver(backend, config, kind, names, count, rate, process)
    finally:
        if process.returncode is None:  # the run failed: the subscriber must not outlive it
            process.kill()
            await process.wait()


async def _deliver(
    backend: Backend,
    config: dict[str, Any],
    kind: str,
    names: list[str],
    count: int,
    rate: float,
    process: asyncio.subprocess.Process,
) -> dict[str, Any]:
    streams = len(names)
    assert process.stdin is not None and process.stdout is not None
    grace = count / rate + 30
    process.stdin.write(
        (json.dumps({**config, "kind": kind, "names": names, "count": count, "grace": grace}) + "\n").encode()
    )
    await process.stdin.drain()
    line = await asyncio.wait_for(process.stdout.readline(), 120)
    if line.strip() != b"ready":
        raise RuntimeError(f"the subscriber did not start: {line!r}")
    loop = asyncio.get_running_loop()
    begin = loop.time()
    tasks = []

    async def publish(n: int) -> None:
        payload = notification(n)
        name = names[n % streams]
        if kind == "sse":
            event_id = await backend.buffer.record(name, payload)
            await backend.broker.publish(name, {"_mcp_event_id": event_id, "_mcp_payload": payload})
        else:
            await backend.topics.publish(name, payload)

    # On a schedule (open loop): a slow publish delays only its own message.
    for n in range(count):
        delay = begin + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(publish(n)))
    await asyncio.gather(*tasks)
    process.stdin.write(b"sent\n")
    await process.stdin.drain()
    out = await asyncio.wait_for(process.stdout.readline(), grace + 60)
    await process.wait()
    result = json.loads(out)
    return {
        "kind": kind,
        "streams": streams,
        "count": count,
        **latency_summary(result["latencies"]),
        "lost": result["lost"],
        "duplicated": result["duplicated"],
    }


# --- the run -------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    configure_django()
    config = environment()
    config["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    why_no_redis = await redis_answers(args.redis)
    backends = list(BACKENDS) if why_no_redis is None else ["postgres"]
    if why_no_redis is not None:
        log(f"Redis skipped: {why_no_redis}")
        config["redis"] = f"skipped: {why_no_redis}"
    else:
        config["redis"] = await redis_persistence(args.redis)
    results: dict[str, Any] = {"config": config, "throughput": [], "delivery": []}
    prefix = f"mcp-pg-events-bench:{uuid.uuid4().hex[:8]}"
    async with scratch_database(args.dsn) as dsn:
        made = {
            "postgres": await postgres_backend(dsn, "bench"),
            **({"redis": await redis_backend(args.redis, prefix)} if "redis" in backends else {}),
        }
        try:
            cell = 0
            for op in ("record", "notify", "topic"):
                for streams in args.streams:
                    order = backends if cell % 2 == 0 else backends[::-1]
                    cell += 1
                    for name in order:
                        rate = await throughput_cell(made[name], op, streams, args.seconds, args.warmup)
                        log(f"throughput {name:8} {op:6} {streams:4} callers: {rate:,.0f}/s")
                        results["throughput"].append(
                            {"backend": name, "op": op, "streams": streams, "per_second": round(rate, 1)}
                        )
            subscriber_config = {"dsn": dsn, "namespace": "bench", "redis": args.redis, "prefix": prefix}
            for kind in ("sse", "topic"):
                for streams in args.subscribers:
                    order = backends if cell % 2 == 0 else backends[::-1]
                    cell += 1
                    for name in order:
                        result = await delivery_cell(
                            made[name], {**subscriber_config, "backend": name}, kind, streams,
                            args.messages, args.rate,
                        )  # fmt: skip
                        log(f"delivery {name:8} {kind:5} to {streams:4} queues: {result}")
                        results["delivery"].append({"backend": name, **result})
        finally:
            for backend in made.values():
                await backend.close()
    config["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    config["sizes"] = {
        "seconds": args.seconds,
        "warmup": args.warmup,
        "streams": args.streams,
        "subscribers": args.subscribers,
        "messages": args.messages,
        "rate": args.rate,
    }
    return results


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    redis = config["redis"]
    lines = [
        describe_environment(config),
        "load average (1, 5, 15 min) at the start {}, at the end {}".format(
            *(" / ".join(map(str, config[k])) for k in ("load_average_start", "load_average_end"))
        ),
        f"Redis: {redis}" if isinstance(redis, str) else
        f"Redis {redis['version']}: appendonly {redis['appendonly']}, save {redis['save']!r} "
        "(its writes are acknowledged from memory; ours after the commit)",
        "",
        f"throughput per worker: {config['sizes']['seconds']} s per cell after {config['sizes']['warmup']} s",
        "op       callers  postgres/s     redis/s  postgres/redis",
        "-------  -------  ----------  ----------  --------------",
    ]  # fmt: skip
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for row in results["throughput"]:
        cells.setdefault((row["op"], row["streams"]), {})[row["backend"]] = row["per_second"]
    for (op, streams), by in cells.items():
        pg, rd = by.get("postgres"), by.get("redis")
        ratio = f"{pg / rd:.2f}" if pg and rd else "-"
        lines.append(
            f"{op:7}  {streams:7}  {pg or 0:10,.0f}  {(f'{rd:10,.0f}' if rd else '         -')}  {ratio:>14}"
        )
    lines += [
        "",
        f"cross-worker delivery: {config['sizes']['messages']} messages at {config['sizes']['rate']}/s, "
        "publisher and subscriber in two processes",
        "backend   kind   queues   p50 ms   p99 ms   max ms  lost  duplicated",
        "--------  -----  ------  -------  -------  -------  ----  ----------",
    ]
    for row in results["delivery"]:
        lines.append(
            f"{row['backend']:8}  {row['kind']:5}  {row['streams']:6}  {row['p50_ms']:7.2f}  "
            f"{row['p99_ms']:7.2f}  {row['max_ms']:7.2f}  {row['lost']:4}  {row['duplicated']:10}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument(
        "--redis", default=os.environ.get("MCP_PG_EVENTS_BENCH_REDIS", DEFAULT_REDIS),
        help="the Redis database for the framework's collaborators (default %(default)s; never flushed)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per throughput cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    parser.add_argument("--streams", type=int_list, default=[1, 16, 64], help="concurrent callers")
    parser.add_argument(
        "--subscribers", type=int_list, default=[1, 100], help="queues held by the subscriber"
    )
    parser.add_argument("--messages", type=int, default=1000, help="messages per delivery cell")
    parser.add_argument(
        "--rate", type=float, default=200.0,
        help="messages per second in a delivery cell: below what one session records, or it measures a queue",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI: the numbers mean nothing")
    parser.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.streams = 0.2, 0.05, [1, 4]
        args.subscribers, args.messages, args.rate = [2], 20, 200.0
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.subscriber:
        asyncio.run(subscriber_main())
    else:
        report(run(main(arguments)), render, arguments.json)
