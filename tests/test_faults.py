"""What the store survives: a restarted or crashed server, killed connections and
processes, a stuck and flooded notification queue, two writers on one stream.

Each test keeps writers and readers busy while the fault happens, then checks, from
the database and from every reader, that nothing acknowledged was lost and that
nothing was delivered twice or out of order. Latencies are printed (``pytest -s``),
not asserted: numbers are the soak's job (``benchmarks/soak.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore, migrate
from mcp_pg_events.compat import Context, new_server
from mcp_pg_events.testing import McpClient, serve, streamable_app
from mcp_pg_events.wakeups import CHANNEL

from .conftest import _admin, _database
from .deployments import Deployment
from .mcp_http import progress_values
from .messages import params_of, progress_message, response
from .own_server import OwnServer, start_own_server
from .test_contract import Recorder
from .test_live import collect, kill_listener
from .writer_process import Ack, WriterProcess

Target = tuple[str, str]  # (session, stream)


def progress_number(event: EventMessage) -> int | None:
    params = params_of(event)
    return params["progress"] if params else None


async def replay(view: Any, cursor: str) -> list[EventMessage]:
    got = Recorder()
    await view.replay_events_after(cursor, got)
    return got.events


def percentiles(seconds: list[float]) -> str:
    if len(seconds) < 2:
        return f"n={len(seconds)}"
    cuts = statistics.quantiles(seconds, n=100)
    p50, p99, top = cuts[49] * 1000, cuts[98] * 1000, max(seconds) * 1000
    return f"n={len(seconds)} p50={p50:.2f}ms p99={p99:.2f}ms max={top:.1f}ms"


class StreamLoad:
    """Writers appending to streams of several sessions, each stream followed by a live subscriber."""

    def __init__(self, store: PostgresEventStore, sessions: int = 6, pace: float = 0.002) -> None:
        self.store = store
        self.targets: list[Target] = [(f"s{i}", stream) for i in range(sessions) for stream in ("1", "2")]
        self.acked: dict[Target, list[str]] = {target: [] for target in self.targets}
        self.latencies: list[tuple[float, float]] = []  # (when it started, seconds)
        self._pace = pace
        self._stop = asyncio.Event()
        self._acks = asyncio.Condition()
        self._cursors: dict[Target, str] = {}
        self._readers: dict[Target, asyncio.Task[list[EventMessage]]] = {}
        self._writers: list[asyncio.Task[None]] = []

    @property
    def total(self) -> int:
        return sum(map(len, self.acked.values()))

    async def start(self) -> None:
        for session, stream in self.targets:
            view = self.store.session(session)
            cursor = self._cursors[session, stream] = await view.store_event(stream, None)
            subscription = view.subscribe(cursor)
            assert await subscription.open()
            self._readers[session, stream] = asyncio.create_task(collect(subscription, timeout=120))
            self._writers.append(asyncio.create_task(self._write(view, (session, stream))))

    async def _write(self, view: Any, target: Target) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not self._stop.is_set():
            started = loop.time()
            event_id = await view.store_event(target[1], progress_message(n))
            self.latencies.append((started, loop.time() - started))
            n += 1
            async with self._acks:
                self.acked[target].append(event_id)
                self._acks.notify_all()
            await asyncio.sleep(self._pace)  # the load's rate, not a wait for anything
        await view.store_event(target[1], response(int(target[1]), {}))

    async def wait_for_more_acks(self, count: int, timeout: float = 60) -> None:
        goal = self.total + count
        async with self._acks:
            await asyncio.wait_for(self._acks.wait_for(lambda: self.total >= goal), timeout)

    def latencies_since(self, moment: float) -> list[float]:
        return [seconds for started, seconds in self.latencies if started >= moment]

    async def finish(self) -> None:
        """Stop writing, end every stream, then check the database and every subscriber."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._writers), 60)
        for (session, stream), reading in self._readers.items():
            delivered = await reading
            stored = await replay(self.store.session(session), self._cursors[session, stream])
            acked = self.acked[session, stream]
            # Every acknowledged event is stored, once, in the order of its acknowledgement.
            assert [e.event_id for e in stored] == [*acked, stored[-1].event_id]
            assert [progress_number(e) for e in stored] == [*range(len(acked)), None]
            # The subscriber got exactly that: nothing missed, nothing doubled.
            assert [e.event_id for e in delivered] == [e.event_id for e in stored]


@pytest.fixture(scope="module")
def own_server() -> Iterator[OwnServer]:
    with start_own_server() as server:
        yield server


@pytest.fixture
async def own_dsn(own_server: OwnServer) -> AsyncIterator[str]:
    async with _database(own_server.uri, None) as dsn:
        await asyncio.to_thread(migrate.upgrade, dsn)
        yield dsn


# --- database outages under load -----------------------------------------------------------------


def ticking_app(store: PostgresEventStore, fault_over: asyncio.Event) -> Any:
    server = new_server("mcp-pg-events-faults", store)

    @server.tool()
    async def tick(ctx: Context, after_fault: int = 20) -> str:
        """Report progress every few ms until the fault is over, then ``after_fault`` times more."""
        count = 0
        while not fault_over.is_set() or after_fault > 0:
            if fault_over.is_set():
                after_fault -= 1
            count += 1
            await ctx.report_progress(count)
            await asyncio.sleep(0.005)  # the tool's pace
        return f"sent {count}"

    return streamable_app(server, store)


async def sdk_session(url: str, name: str, ticking: asyncio.Event) -> int:
    """One MCP session calling ``tick`` across the fault; returns how many progress events it got."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        client = McpClient(http)
        await client.initialize()
        request_id, call = client.call_tool("tick", {}, progress_token=name)
        async with call as stream:
            events = [await stream.next(), await stream.next()]  # priming, first progress
            ticking.set()
            events += await stream.until_response(request_id)
        got = progress_values([e for e in events if e], name)
        result = events[-1]
        assert result and result.message
        sent = int(result.message["result"]["content"][0]["text"].removeprefix("sent "))
        assert got == list(range(1, sent + 1))
        # The session lived through it: it still answers.
        request_id, call = client.call_tool("tick", {"after_fault": 1}, progress_token=f"{name}-after")
        async with call as stream:
            after = await stream.until_response(request_id)
        assert progress_values(after, f"{name}-after") == [1]
        return sent


async def ride_out(dsn: str, fault: Callable[[StreamLoad], Awaitable[None]]) -> None:
    """Writers, subscribers and SDK sessions busy across ``fault``; nothing lost, doubled or dead."""
    fault_over = asyncio.Event()
    # The deadline is the outage a session survives; the poll is an hour away, so
    # subscribers catch up through the listener's reconnect.
    async with (
        await PostgresEventStore.connect(dsn, retry_deadline=30, poll_interval=3600) as store,
        serve(ticking_app(store, fault_over)) as url,
    ):
        load = StreamLoad(store)
        await load.start()
        await store.listener.wait_listening()
        ticking = [asyncio.Event() for _ in range(4)]
        sessions = [
            asyncio.create_task(sdk_session(url, f"sdk{i}", started)) for i, started in enumerate(ticking)
        ]
        await asyncio.wait_for(asyncio.gather(*(started.wait() for started in ticking)), 60)
        await load.wait_for_more_acks(200)

        loop = asyncio.get_running_loop()
        began = loop.time()
        await fault(load)
        ended = loop.time()
        fault_over.set()
        # Writers go on once it is over.
        await load.wait_for_more_acks(200)
        sent = await asyncio.wait_for(asyncio.gather(*sessions), 120)
        await load.finish()
        assert store.listener.reconnects >= 1

    during = [s for started, s in load.latencies if began - 1 <= started <= ended]
    print(
        f"\nfault lasted {ended - began:.2f}s; {load.total} events acknowledged, stored and delivered once;"
        f" SDK sessions got {sent} progress events each and lived on;"
        f" appends started within the fault: {percentiles(during)};"
        f" after it: {percentiles(load.latencies_since(ended))}"
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["restart", "crash"])
async def test_a_restarted_or_crashed_server_loses_nothing_and_kills_no_session(
    own_server: OwnServer, own_dsn: str, mode: str
) -> None:
    async def restart(load: StreamLoad) -> None:
        await own_server.restart(mode, outage=1.0)

    await ride_out(own_dsn, restart)


async def test_every_backend_terminated_three_times_loses_nothing_and_kills_no_session(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async def terminate_everything(load: StreamLoad) -> None:
        for _ in range(3):
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert killed >= 2  # at least the listener and a pooled connection
            await load.wait_for_more_acks(100)

    await ride_out(dsn, terminate_everything)


# --- killed and concurrent writer processes --------------------------------------------------------


def stored_rows(rows: list[asyncpg.Record]) -> list[tuple[str, int]]:
    """(writer, n) of each stored progress notification, in seq order."""
    messages = [json.loads(row["message"]) for row in rows]
    return [(m["params"]["writer"], m["params"]["progress"]) for m in messages]


STREAM_ROWS = (
    "SELECT e.seq, e.message FROM mcp_events_events e "
    "JOIN mcp_events_streams st ON st.id = e.stream_key JOIN mcp_events_sessions se ON se.id = st.session_id "
    "WHERE se.key = $1 AND st.name = convert_to($2, 'UTF8') AND e.message IS NOT NULL ORDER BY e.seq"
)


async def test_a_writer_killed_with_sigkill_loses_no_acknowledged_event(
    dsn: str, store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    streams = ["1", "2", "3", "4"]
    acks: dict[str, list[Ack]] = {}
    # Killed at different points; each next writer goes on with the same streams.
    for writer_no, kill_after in enumerate((150, 600, 40)):
        tag = f"w{writer_no}"
        writer = await WriterProcess.start(dsn, "s", tag, streams)
        await writer.go()
        await writer.wait_for_acks(kill_after)
        await writer.kill()
        acks[tag] = writer.acks

    unacknowledged = 0
    view = store.session("s")
    for stream in streams:
        rows = await admin.fetch(STREAM_ROWS, "s", stream)
        stored = stored_rows(rows)
        for tag, written in acks.items():
            mine = [n for writer, n in stored if writer == tag]
            acked = [ack.n for ack in written if ack.stream == stream]
            # What a writer stored is the start of what it meant to write: no holes, no
            # half batch; and it holds every event it acknowledged.
            assert mine == list(range(len(mine)))
            assert len(mine) >= len(acked) and acked == list(range(len(acked)))
            unacknowledged += len(mine) - len(acked)
        # One writer after the other, in the stream's order too.
        assert [writer for writer, _ in stored] == sorted(writer for writer, _ in stored)
        # Every acknowledged id replays, in order, with the message it was given for.
        first = next(ack.event_id for ack in acks["w0"] if ack.stream == stream)
        replayed = {e.event_id: progress_number(e) for e in await replay(view, first)}
        for written in acks.values():
            for ack in written[1:]:
                if ack.stream == stream and ack.event_id != first:
                    assert replayed[ack.event_id] == ack.n
    print(
        f"\n{sum(map(len, acks.values()))} acknowledged, all stored; {unacknowledged} stored unacknowledged"
    )


async def test_two_processes_appending_to_one_stream_make_one_order_that_a_subscriber_follows(
    dsn: str,
) -> None:
    async with await PostgresEventStore.connect(dsn, poll_interval=3600) as store:
        view = store.session("s")
        cursor = await view.store_event("9", None)
        subscription = view.subscribe(cursor)
        assert await subscription.open()
        await store.listener.wait_listening()
        reading = asyncio.create_task(collect(subscription, timeout=120))

        count = 400
        writers = [await WriterProcess.start(dsn, "s", tag, ["9"], end=count) for tag in ("a", "b")]
        for writer in writers:
            await writer.go()
        assert [await writer.wait() for writer in writers] == [0, 0]
        await view.store_event("9", response(9, {}))
        delivered = await reading
        stored = await replay(view, cursor)

    assert [e.event_id for e in delivered] == [e.event_id for e in stored]
    seqs = [int(e.event_id.split("-")[1]) for e in stored]
    assert seqs == sorted(set(seqs))
    by_writer: dict[str, list[int]] = {"a": [], "b": []}
    for event in stored[:-1]:
        params = params_of(event)
        by_writer[params["writer"]].append(params["progress"])
    assert by_writer == {"a": list(range(count)), "b": list(range(count))}
    for writer in writers:
        assert [ack.event_id for ack in writer.acks] == [
            e.event_id for e in stored if e.event_id in {ack.event_id for ack in writer.acks}
        ]
    interleavings = sum(1 for x, y in itertools.pairwise(stored[:-1]) if _writer(x) != _writer(y))
    print(f"\n{2 * count} events from two processes, {interleavings} switches between them, one order")


def _writer(event: EventMessage) -> str:
    return str(params_of(event)["writer"])


# --- notifications: a stuck listener, a flood, a killed listener, NOTIFY refused -----------------


async def test_a_stuck_listener_a_flood_and_a_killed_listener_stall_no_append_and_lose_no_event(
    dsn: str, admin: asyncpg.Connection
) -> None:
    # A session that LISTENs and then sits in a transaction never reads: the queue
    # cannot be cleaned up behind it, and it fills.
    stuck = await asyncpg.connect(dsn)
    await stuck.execute(f"LISTEN {CHANNEL}")
    await stuck.execute("BEGIN; SELECT 1")
    flooding = asyncio.Event()

    async def flood() -> None:
        # Hostile payloads on our channel, thousands a second: numbers of streams that
        # do not exist, text, "*", the longest payload PostgreSQL takes.
        conn = await asyncpg.connect(dsn)
        try:
            while not flooding.is_set():
                await conn.execute(
                    "SELECT pg_notify($1, CASE i % 4 WHEN 0 THEN (i * 7919)::text WHEN 1 THEN 'x' || i "
                    "WHEN 2 THEN '*' ELSE repeat('9,', 3990) || i END) FROM generate_series(1, 200) i",
                    CHANNEL,
                )
        finally:
            await conn.close()

    try:
        async with await PostgresEventStore.connect(dsn, poll_interval=3600) as store:
            load = StreamLoad(store)
            await load.start()
            await store.listener.wait_listening()
            flooder = asyncio.create_task(flood())
            await load.wait_for_more_acks(300)
            killed = await kill_listener(admin)
            assert killed == 1
            await load.wait_for_more_acks(300)
            usage = await admin.fetchval("SELECT pg_notification_queue_usage()")
            assert usage > 0
            flooding.set()
            await flooder
            await load.finish()
            assert store.listener.reconnects >= 1
    finally:
        await stuck.close()
    print(f"\nqueue usage {usage:.2e}; appends: {percentiles([s for _, s in load.latencies])}")


async def test_appends_succeed_and_subscribers_catch_up_when_every_notify_fails(
    deployment: Deployment, empty_dsn: str
) -> None:
    # NOTIFY fails at commit when the queue is full; here it fails because nobody may
    # call pg_notify in this test's database. The store runs as the least-privileged
    # role of the docs, as in production.
    await _admin(empty_dsn, "REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC")
    async with deployment.connect(deployment.runtime) as refused:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await refused.execute("SELECT pg_notify($1, '1')", CHANNEL)
    async with deployment.store(poll_interval=0.2) as store:
        load = StreamLoad(store, sessions=3)
        await load.start()
        await load.wait_for_more_acks(300)
        await load.finish()
    print(f"\nwithout a single wake-up: appends {percentiles([s for _, s in load.latencies])}")
