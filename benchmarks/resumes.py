"""Many resumes at once over HTTP: C clients resume a finished 1,000-event stream at the same moment.

As production users would meet it: one worker process (the demo's, ``python -m
mcp_pg_events.demo worker``: uvicorn, the store's default pool) serves an app
whose tool sends N progress notifications. Each of C sessions calls it once and
reads the stream to the response. Then all C clients send their resuming GET
(``Last-Event-ID``: the stream's priming event) at once, each reading until the
response comes again. Per round: time to each client's response headers (p50) and first event (p50, p99,
max), time until every client had all N + 1 events, the aggregate events/s, and
the server's RSS before, at the end and a second later. Two rounds by default,
so that memory that is not given back shows. The clients run in this process
(one httpx client each), the server in its own.

    python benchmarks/resumes.py --json resumes.json   # 200 clients x 1,000 events
    python benchmarks/resumes.py --smoke               # CI: tiny sizes, seconds

The server is --dsn, else $MCP_PG_EVENTS_DSN; the scratch database is created
there and dropped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
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
from append import table

from mcp_pg_events.testing import McpClient

# Sessions that write their stream at once while preparing: enough to keep the
# group commit busy, few enough not to time out.
PREPARE_AT_ONCE = 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


@asynccontextmanager
async def worker(dsn: str) -> AsyncIterator[tuple[str, int]]:
    """A demo worker process serving on a socket of its own: its base URL and pid."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.demo", "worker", str(sock.fileno()), "0",
        env={**os.environ, "MCP_PG_EVENTS_DSN": dsn}, pass_fds=[sock.fileno()],
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        assert process.stdout is not None
        if not (await asyncio.wait_for(process.stdout.readline(), 60)).startswith(b"serving"):
            raise RuntimeError("the worker did not start")
        yield url, process.pid
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()


async def prepare(http: httpx.AsyncClient, events: int) -> tuple[McpClient, str, int]:
    """A session whose tool sent ``events`` notifications: the client, its first event id, the call's id."""
    client = McpClient(http)
    await client.initialize()
    request_id, call = client.call_tool("countdown", {"n": events}, progress_token="bench")
    async with call as stream:
        got = await stream.until_response(request_id)
    cursor = got[0].id
    if cursor is None or len(got) < events + 1:
        raise RuntimeError(f"the tool call gave {len(got)} events")
    return client, cursor, request_id


async def resume(
    client: McpClient, cursor: str, request_id: int, go: asyncio.Event
) -> tuple[float, float, int, float]:
    """After ``go``: seconds to the first event with data, to the response, the events read,
    and seconds to the response's headers."""
    await go.wait()
    start = time.perf_counter()
    first: float | None = None
    count = 0
    async with client.get(last_event_id=cursor) as resumed:
        # The clients share this process: what a late client waits for before its
        # headers is mostly the others' requests being sent and read, not the server.
        headers = time.perf_counter() - start
        while (event := await resumed.next()) is not None:
            if not event.data:
                continue
            count += 1
            if first is None:
                first = time.perf_counter() - start
            message = event.message
            if message is not None and message.get("id") == request_id:
                return first, time.perf_counter() - start, count, headers
    raise RuntimeError(f"a resumed stream ended after {count} events, without the response")


# --- writers beside the resumes: a process of their own ----------------------


async def writers_main(url: str, writers: int, events: int, pause: float) -> None:
    """The writers' process: ``writers`` sessions each call the tool (``events`` notifications),
    then pause, until told to stop; each call's time is filed under the phase it started in.

    The phase comes on stdin, a word a line ("alone", "resumes", "idle"), and "stop"
    ends it: it then prints the latencies per phase as JSON. It runs apart from the
    resuming clients, whose process is busy reading their events, so that what a
    call waits for is the server and the database.
    """
    loop = asyncio.get_running_loop()
    phase = "idle"
    latencies: dict[str, list[float]] = {}
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def write(http: httpx.AsyncClient, ready: asyncio.Event) -> None:
        client = McpClient(http)
        await client.initialize()
        await ready.wait()
        while not stop.is_set():
            started, at = phase, time.perf_counter()
            request_id, call = client.call_tool("countdown", {"n": events}, progress_token="writer")
            async with call as stream:
                await stream.until_response(request_id)
            latencies.setdefault(started, []).append(time.perf_counter() - at)
            await asyncio.sleep(pause)

    async with AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=120, limits=limits))
            for _ in range(writers)
        ]
        ready = asyncio.Event()
        tasks = [asyncio.ensure_future(write(http, ready)) for http in https]
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        ready.set()
        while (line := (await reader.readline()).decode().strip()) not in ("stop", ""):
            phase = line
        stop.set()
        await asyncio.gather(*tasks)
    print(
        json.dumps(
            {name: latency_summary(values) | {"calls": len(values)} for name, values in latencies.items()}
        )
    )


class Writers:
    """The writers' process, started beside the server: ``phase()`` tells it what is going on."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    @asynccontextmanager
    async def run(cls, url: str, writers: int, events: int, pause: float) -> AsyncIterator[Writers]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--writers-process", url, str(writers), str(events), str(pause),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            if await asyncio.wait_for(process.stdout.readline(), 120) != b"ready\n":
                raise RuntimeError("the writers did not start")
            yield cls(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def phase(self, name: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{name}\n".encode())
        await self._process.stdin.drain()

    async def results(self) -> dict[str, Any]:
        """Stop them; their calls' latencies per phase."""
        await self.phase("stop")
        out, _ = await self._process.communicate()
        if self._process.returncode != 0:
            raise RuntimeError(f"the writers failed with exit code {self._process.returncode}")
        results: dict[str, Any] = json.loads(out)
        return results


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            **environment(),
            "clients": args.clients,
            "events": args.events,
            "rounds": args.rounds,
            "writers": args.writers,
            "writer_events": args.writer_events,
            "writer_pause": args.writer_pause,
            "writer_baseline": args.writer_baseline,
            "smoke": args.smoke,
            "load_before": os.getloadavg(),
        },
        "rounds": [],
    }
    async with scratch_database(args.dsn) as dsn, AsyncExitStack() as stack:
        url, pid = await stack.enter_async_context(worker(dsn))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        https = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=120, limits=limits))
            for _ in range(args.clients)
        ]
        log(f"preparing {args.clients} sessions of {args.events:,} events each")
        sessions: list[tuple[McpClient, str, int]] = []
        for start in range(0, args.clients, PREPARE_AT_ONCE):
            chunk = https[start : start + PREPARE_AT_ONCE]
            sessions += await asyncio.gather(*(prepare(http, args.events) for http in chunk))
        writers: Writers | None = None
        if args.writers:
            log(
                f"{args.writers} writer sessions in a process of their own: {args.writer_events} "
                f"notifications a call, {args.writer_pause:g} s between calls"
            )
            writers = await stack.enter_async_context(
                Writers.run(url, args.writers, args.writer_events, args.writer_pause)
            )
        rss_start = rss_mib(pid)
        log(f"server RSS {rss_start} MiB")
        for r in range(args.rounds):
            if writers is not None:
                await writers.phase("alone")  # the writers' latencies without the resumes
                await asyncio.sleep(args.writer_baseline)
            go = asyncio.Event()
            tasks = [asyncio.create_task(resume(c, cursor, rid, go)) for c, cursor, rid in sessions]
            await asyncio.sleep(0.1)
            rss_before = rss_mib(pid)
            start = time.perf_counter()
            if writers is not None:
                await writers.phase("resumes")
            go.set()
            done = await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
            if writers is not None:
                await writers.phase("idle")
            rss_end = rss_mib(pid)
            await asyncio.sleep(1)
            rss_later = rss_mib(pid)
            if any(n != args.events + 1 for _, _, n, _ in done):
                raise RuntimeError(f"events per resume: {sorted({n for _, _, n, _ in done})}")
            row = {
                "round": r + 1,
                "headers": latency_summary([h for _, _, _, h in done]),
                "first_event": latency_summary([f for f, _, _, _ in done]),
                "whole_p50_ms": round(statistics.median(w for _, w, _, _ in done) * 1000, 1),
                "all_done_s": round(elapsed, 2),
                "events_per_s": round(args.clients * (args.events + 1) / elapsed),
                "rss_before_mib": rss_before,
                "rss_end_mib": rss_end,
                "rss_1s_later_mib": rss_later,
            }
            log(f"  {row}")
            results["rounds"].append(row)
        if writers is not None:
            results["writers"] = await writers.results()
            results["writers"].pop("idle", None)
            log(f"  writers: {results['writers']}")
    results["config"]["load_after"] = os.getloadavg()
    return results


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        describe_environment(config),
        "load average before "
        + " / ".join(f"{x:.2f}" for x in config["load_before"])
        + ", after "
        + " / ".join(f"{x:.2f}" for x in config["load_after"]),
        "",
        f"{config['clients']} clients resume a finished {config['events']:,}-event stream each, at once, "
        "over HTTP (one demo worker process)",
    ]
    lines += table(
        [
            "round",
            "headers p50 ms",
            "1st p50 ms",
            "1st p99 ms",
            "1st max ms",
            "whole p50 ms",
            "all done s",
            "events/s",
            "RSS MiB",
        ],
        (
            [
                str(row["round"]),
                f"{row['headers']['p50_ms']:.1f}",
                *(f"{row['first_event'][k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms")),
                f"{row['whole_p50_ms']:.1f}",
                f"{row['all_done_s']:.2f}",
                f"{row['events_per_s']:,}",
                f"{row['rss_before_mib']} / {row['rss_end_mib']} / {row['rss_1s_later_mib']} (+1 s)",
            ]
            for row in results["rounds"]
        ),
    )
    calls = results.get("writers")
    if calls:
        lines += [
            "",
            f"{config['writers']} writer sessions meanwhile, in a process of their own: each calls the tool "
            f"({config['writer_events']} notifications), then waits {config['writer_pause']:g} s; "
            f"'alone': the {config['writer_baseline']:g} s before each round, 'resumes': during the rounds",
        ]
        lines += table(
            ["phase", "calls", "p50 ms", "p99 ms", "max ms"],
            (
                [name, f"{row['calls']:,}", *(f"{row[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms"))]
                for name, row in calls.items()
            ),
        )
        if "alone" in calls and "resumes" in calls:
            ratio = calls["resumes"]["p99_ms"] / calls["alone"]["p99_ms"]
            lines.append(f"writers' p99 during the resumes / alone: {ratio:.2f}")
    if config["smoke"]:
        lines += ["", "(smoke run: sizes too small to judge)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=os.environ.get("MCP_PG_EVENTS_DSN", DEFAULT_DSN))
    parser.add_argument("--clients", type=int, default=200, help="clients resuming at once (200)")
    parser.add_argument("--events", type=int, default=1000, help="events of each stream (1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of resumes (2)")
    parser.add_argument(
        "--writers",
        type=int,
        default=50,
        help="sessions writing meanwhile, in a process of their own (50; 0: none)",
    )
    parser.add_argument("--writer-events", type=int, default=5, help="notifications per writer call (5)")
    parser.add_argument(
        "--writer-pause", type=float, default=0.2, help="seconds between a writer's calls (0.2)"
    )
    parser.add_argument(
        "--writer-baseline", type=float, default=5.0, help="seconds of writers alone before each round (5)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--smoke", action="store_true", help="quick CI run: 3 clients, 20 events, 1 round, 2 writers"
    )
    if len(sys.argv) == 6 and sys.argv[1] == "--writers-process":
        url, writers, events, pause = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        asyncio.run(writers_main(url, writers, events, pause))
        return
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.events, args.rounds = 3, 20, 1
        args.writers, args.writer_baseline = 2, 0.5
    report(run(bench(args)), render, args.json)


if __name__ == "__main__":
    main()
