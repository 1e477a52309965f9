"""Live subscriptions: LISTEN/NOTIFY wake-ups, catch-up after a lost listener, poll-only mode."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore, live, metrics
from mcp_pg_events.listener import LISTENER_NAME

from .messages import model_of, notification, params_of, progress_message, response
from .proxy import FlakyProxy
from .writer_process import WriterProcess


def progress(event: EventMessage) -> Any:
    params = params_of(event)
    return params["progress"] if params else ("response", model_of(event.message).id)


async def collect(subscription: Any, timeout: float = 30) -> list[EventMessage]:
    async def read() -> list[EventMessage]:
        return [event async for event in subscription]

    return await asyncio.wait_for(read(), timeout)


async def store_backends(admin: asyncpg.Connection, application_name: str = "") -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND ($1 = '' OR application_name = $1)",
        application_name,
    )
    return count


async def backends_left_after_close(admin: asyncpg.Connection) -> int:
    """``store_backends`` once closed connections' server processes have exited (up to 10 s).

    A server process leaves pg_stat_activity a moment after its client closed the
    connection, and nothing announces it: poll.
    """
    for _ in range(200):
        if not (count := await store_backends(admin)):
            break
        await asyncio.sleep(0.05)
    return count


async def kill_listener(admin: asyncpg.Connection) -> int:
    """Terminate the store's listening connection; returns how many backends that was.

    Returns once they have ended: a notification committed after this cannot
    reach the old connection in its last moments, only the new one or a catch-up.
    """
    killed: int = await admin.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1",
        LISTENER_NAME,
    )
    return killed


async def progress_stream(view: Any, count: int) -> str:
    """A priming event, then ``count`` progress notifications and a response, on stream "1": the cursor."""
    cursor: str = await view.store_event("1", None)
    for i in range(count):
        await view.store_event("1", progress_message(i))
    await view.store_event("1", response(1, {}))
    return cursor


@pytest.fixture
async def live_store(dsn: str) -> AsyncIterator[PostgresEventStore]:
    """A store whose subscriptions can only be woken by notifications or a reconnect's catch-up."""
    async with await PostgresEventStore.connect(dsn, poll_interval=3600, retry_deadline=10) as store:
        yield store


async def test_a_subscriber_gets_what_another_process_writes_in_order(
    live_store: PostgresEventStore, dsn: str
) -> None:
    view = live_store.session("s")
    cursor = await view.store_event("7", None)
    subscription = view.subscribe(cursor)
    assert await subscription.open()
    await live_store.listener.wait_listening()

    count = 300
    writer = await WriterProcess.start(dsn, "s", "w", ["7"], end=count, respond=True)
    await writer.go()

    events = await collect(subscription)
    assert await writer.wait() == 0
    assert [progress(e) for e in events] == [*range(count), ("response", 7)]
    assert len({e.event_id for e in events}) == len(events)


async def test_a_killed_listener_misses_nothing_and_doubles_nothing(
    dsn: str, proxy: FlakyProxy, admin: asyncpg.Connection
) -> None:
    # The listener goes through the proxy, so that it can be kept from coming back
    # until everything has been written: only the catch-up after its reconnect can
    # deliver what was announced while it was gone (the poll is an hour away).
    async with await PostgresEventStore.connect(
        dsn, listen_dsn=proxy.dsn, poll_interval=3600, retry_deadline=10
    ) as store:
        view, writer_view = store.session("s"), store.session("s")
        cursor = await view.store_event("3", None)
        subscription = view.subscribe(cursor)
        assert await subscription.open()
        await store.listener.wait_listening()
        reading = asyncio.create_task(collect(subscription))

        async def write(numbers: range) -> None:
            for i in numbers:
                await writer_view.store_event("3", progress_message(i))

        await write(range(100))
        proxy.refuse_new_connections()
        killed = await kill_listener(admin)
        assert killed == 1
        await write(range(100, 200))
        await writer_view.store_event("3", response(3, {}))
        proxy.go_up()

        events = await reading
        assert [progress(e) for e in events] == [*range(200), ("response", 3)]
        assert len({e.event_id for e in events}) == len(events)
        assert store.listener.reconnects >= 1


async def test_poll_only_mode_delivers_everything(dsn: str) -> None:
    async with await PostgresEventStore.connect(dsn, listen=False, poll_interval=0.05) as store:
        view = store.session("s")
        cursor = await view.store_event("1", None)
        subscription = view.subscribe(cursor)
        reading = asyncio.create_task(collect(subscription))
        for i in range(20):
            await view.store_event("1", progress_message(i))
        await view.store_event("1", response(1, {}))
        events = await reading
        assert [progress(e) for e in events] == [*range(20), ("response", 1)]


async def test_a_subscription_ends_with_its_stream_and_leaves_nothing_behind(
    dsn: str, admin: asyncpg.Connection
) -> None:
    store = await PostgresEventStore.connect(dsn, poll_interval=3600)
    try:
        view = store.session("s")
        cursor = await view.store_event("5", None)
        first = await view.store_event("5", progress_message(0))
        async with view.subscribe(cursor) as subscription:
            reading = asyncio.create_task(collect(subscription))
            await view.store_event("5", response(5, {}))
            assert [progress(e) for e in await reading] == [0, ("response", 5)]
        assert store.live_tail.subscriptions == 0
        # A cursor at or past the response has nothing to wait for.
        assert await collect(view.subscribe(first)) != []
        done = view.subscribe(await view.store_event("5", None))
        assert not await done.open()
        assert await collect(done) == []
        assert await store_backends(admin, LISTENER_NAME) == 1
    finally:
        await store.close()
    assert await backends_left_after_close(admin) == 0
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not any(name.startswith("mcp-pg-events") for name in names)


async def test_a_cancelled_reader_stops_following(live_store: PostgresEventStore) -> None:
    view = live_store.session("s")
    cursor = await view.store_event("_GET_stream", None)
    received = asyncio.Event()

    async def read() -> None:
        async for _ in view.subscribe(cursor):
            received.set()

    reading = asyncio.create_task(read())
    await view.store_event("_GET_stream", notification("notifications/message"))
    await asyncio.wait_for(received.wait(), 15)
    assert live_store.live_tail.subscriptions == 1
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert live_store.live_tail.subscriptions == 0


@pytest.mark.parametrize("cursor", ["", "garbage", "1-1-000000000000", "9" * 40, "x\x00y"])
async def test_a_bad_cursor_gives_an_empty_iterator(live_store: PostgresEventStore, cursor: str) -> None:
    subscription = live_store.session("s").subscribe(cursor)
    assert not await subscription.open()
    assert await collect(subscription) == []


async def test_another_sessions_cursor_gives_an_empty_iterator(live_store: PostgresEventStore) -> None:
    mine = live_store.session("mine")
    cursor = await mine.store_event("1", None)
    await mine.store_event("1", notification("notifications/message", {"secret": True}))
    theirs = live_store.session("theirs").subscribe(cursor)
    assert not await theirs.open()
    assert await collect(theirs) == []


@pytest.mark.parametrize("page", [10, 1])
async def test_a_lagging_reader_holds_a_bounded_buffer_and_reads_on(dsn: str, page: int) -> None:
    # The tail reads a page at a time for a reader that does not keep up, and only
    # while it holds less than a page: under two pages, whatever the lag. A starved
    # reader asks for more once it has read half of what it held, a page of one too.
    async with await PostgresEventStore.connect(dsn, replay_batch_size=page, poll_interval=3600) as store:
        view = store.session("s")
        cursor = await progress_stream(view, 100)
        subscription = view.subscribe(cursor)
        seen = []

        async def read() -> None:
            async for event in subscription:
                seen.append(progress(event))
                assert len(subscription._buffer or ()) < 2 * page
                await asyncio.sleep(0)  # lag: the tail fills the buffer meanwhile

        await asyncio.wait_for(read(), 30)  # polls are an hour apart
        assert seen == [*range(100), ("response", 1)]


async def test_a_failed_query_after_the_streams_end_was_taken_does_not_fail_its_reader(
    live_store: PostgresEventStore,
) -> None:
    # The reader ends its subscription when it reads the response; the tail's next
    # query, for a batch it was still in, may fail meanwhile. That is not the
    # reader's concern: it read the whole stream.
    view = live_store.session("s")
    cursor = await progress_stream(view, 3)
    subscription = view.subscribe(cursor)
    assert progress(await asyncio.wait_for(anext(subscription), 30)) == 0
    subscription._fail(ConnectionError("a later catch-up query failed"))  # as the tail does
    rest = await collect(subscription)
    assert [progress(e) for e in rest] == [1, 2, ("response", 1)]


async def test_each_reader_decodes_its_own_rows_as_it_reads_them(
    live_store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tail's one fetch task serves every subscription of the process. When it
    # decoded the rows it fetched, a crowd of resumed streams caught up by one query
    # all waited for every row of that query to be decoded before any got its first
    # event; each reader now decodes its own rows, in its own task.
    decoded: list[bytes] = []
    load_message = live.load_message

    def counting_load(data: bytes) -> Any:
        decoded.append(data)
        return load_message(data)

    monkeypatch.setattr(live, "load_message", counting_load)
    view = live_store.session("s")
    cursor = await progress_stream(view, 50)
    subscription = view.subscribe(cursor)
    first = await asyncio.wait_for(anext(subscription), 30)
    assert progress(first) == 0
    assert len(subscription._buffer or ()) >= live.FIRST_PAGE - 1  # fetched
    assert len(decoded) == 1  # decoded: only what was read
    rest = await collect(subscription)
    assert [progress(e) for e in rest] == [*range(1, 50), ("response", 1)]
    assert len(decoded) == 51


async def test_a_crowd_of_lagging_readers_is_caught_up_a_bounded_number_of_rows_per_query(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 streams resumed at once each read a full page in one query before: a
    # spike of memory, and every reader waiting for all of it. Now the first query
    # reads a short page for each, and later ones a bounded number of rows.
    fetched: list[int] = []
    monkeypatch.setattr(metrics, "fetched", fetched.append)
    monkeypatch.setattr(live, "ROWS_PER_FETCH", 30)
    page = 10
    async with await PostgresEventStore.connect(dsn, replay_batch_size=page, poll_interval=3600) as store:
        subscriptions = []
        for s in range(8):
            view = store.session(f"s{s}")
            cursor = await progress_stream(view, 45)
            subscriptions.append(view.subscribe(cursor))
        for subscription in subscriptions:
            await subscription.open()  # all due before the tail's first query
        seen = await asyncio.gather(*(collect(subscription) for subscription in subscriptions))
    assert all([progress(e) for e in events] == [*range(45), ("response", 1)] for events in seen)
    # A follower is added to a query while it has read fewer rows than the bound.
    assert fetched and max(fetched) <= 30 - 1 + page


async def test_a_row_that_will_not_decode_fails_its_subscription_not_the_others(
    live_store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    broken, healthy = live_store.session("broken"), live_store.session("healthy")
    broken_cursor = await broken.store_event("1", None)
    healthy_cursor = await healthy.store_event("1", None)
    event_id = await broken.store_event("1", notification("notifications/message"))
    stream_key = int(event_id.split("-")[0])
    await admin.execute(
        "UPDATE mcp_events_events SET message = 'not json' WHERE stream_key = $1 AND message IS NOT NULL",
        stream_key,
    )
    # Both due at once, so that they are fetched in the same query.
    broken_sub, healthy_sub = broken.subscribe(broken_cursor), healthy.subscribe(healthy_cursor)
    await healthy.store_event("1", response(1, {}))
    reading = asyncio.gather(collect(broken_sub), collect(healthy_sub), return_exceptions=True)
    failed, delivered = await reading
    assert isinstance(failed, ValueError)
    assert not isinstance(delivered, BaseException)
    assert [progress(e) for e in delivered] == [("response", 1)]
    assert live_store.live_tail.subscriptions == 0


async def test_a_stream_follower_gets_every_row_after_the_head_across_a_lost_listener(
    live_store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    # The raw follower (the subscription bus's, the brokers'): from "now", in
    # order, rows written while the listener was down included, a failing
    # callback no reason to stop.
    log = live_store.log
    view = live_store.session("bus")
    await view.store_event("topic", notification("before the head"))
    head = await log.stream_head("bus", "topic")
    assert head is not None and head.last_seq > 0
    got: list[bytes | None] = []
    enough = asyncio.Event()
    calls = 0

    def on_rows(rows: list[tuple[int, bytes | None]]) -> None:
        nonlocal calls
        calls += 1
        got.extend(data for _, data in rows)
        if len(got) >= 40:
            enough.set()
        if calls == 1:
            raise RuntimeError("a consumer's bug")

    follower = log.follow(head, on_rows)
    await live_store.listener.wait_listening()
    big = "x" * 20_000  # more than a notification carries: it is in the row
    for i in range(20):
        await view.store_event("topic", notification("n", {"i": i, "big": big}))
    assert await kill_listener(admin) == 1
    for i in range(20, 40):
        await view.store_event("topic", notification("n", {"i": i}))
    await asyncio.wait_for(enough.wait(), 30)
    log.unfollow(follower)
    numbers = [json.loads(data)["params"]["i"] for data in got if data]
    assert numbers == list(range(40))
    assert json.loads(got[0] or b"")["params"]["big"] == big
    assert live_store.live_tail.subscriptions == 0


async def test_the_head_of_a_stream_that_does_not_exist_is_none_unless_created(
    live_store: PostgresEventStore,
) -> None:
    assert await live_store.log.stream_head("nobody", "nothing") is None
    head = await live_store.log.stream_head("nobody", "nothing", create=True)
    assert head is not None and head.last_seq == 0
    assert await live_store.log.stream_head("nobody", "nothing") == head


async def test_a_paused_stream_follower_reads_nothing_until_resumed_then_everything_in_order(
    live_store: PostgresEventStore,
) -> None:
    # The brokers' back-pressure: a consumer that cannot keep up pauses its
    # follower; the rows wait in the table, and resume() picks up at the cursor.
    log = live_store.log
    view = live_store.session("bus")
    head = await log.stream_head("bus", "topic", create=True)
    assert head is not None
    paused: list[int] = []
    witness: list[int] = []
    witness_saw = asyncio.Event()
    caught_up = asyncio.Event()

    def on_paused_rows(rows: list[tuple[int, bytes | None]]) -> None:
        paused.extend(json.loads(data or b"")["params"]["i"] for _, data in rows)
        if len(paused) == 10:
            caught_up.set()

    def on_witness_rows(rows: list[tuple[int, bytes | None]]) -> None:
        witness.extend(json.loads(data or b"")["params"]["i"] for _, data in rows)
        if len(witness) == 10:
            witness_saw.set()

    follower = log.follow(head, on_paused_rows)
    follower.pause()
    assert follower.paused
    other = log.follow(head, on_witness_rows)
    for i in range(10):
        await view.store_event("topic", notification("n", {"i": i}))
    # The witness follows the same stream in the same fetch rounds: once it has
    # every row, the paused follower was passed over.
    await asyncio.wait_for(witness_saw.wait(), 30)
    assert paused == []
    follower.resume()
    follower.resume()  # idempotent
    await asyncio.wait_for(caught_up.wait(), 30)
    assert paused == witness == list(range(10))
    log.unfollow(follower)
    log.unfollow(other)
