"""What only the PostgreSQL store has: partitions, schema checks, outages, the pool."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest

from mcp_pg_events import (
    ConfigurationError,
    PostgresEventStore,
    SchemaNotReadyError,
    SessionEventStore,
    StoreSettings,
    StoreUnavailableError,
    sql,
)
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.settings import env_name

from .messages import notification, progress_message
from .proxy import FlakyProxy
from .test_contract import Recorder


async def partitions(admin: asyncpg.Connection) -> list[str]:
    rows = await admin.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'mcp_events_events'::regclass ORDER BY c.relname"
    )
    return [r["relname"] for r in rows]


async def replay_all(view: object, cursor: str) -> list[object]:
    got = Recorder()
    assert await view.replay_events_after(cursor, got) is not None  # type: ignore[attr-defined]
    return [e.message for e in got.events]


async def test_inserts_create_missing_partitions_and_cross_boundaries(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    # Replace the default partitions with tiny ones so a few events cross several.
    for name in await partitions(admin):
        await admin.execute(f"ALTER TABLE mcp_events_events DETACH PARTITION {name}")
        await admin.execute(f"DROP TABLE {name}")
    assert await admin.fetchval("SELECT mcp_events_ensure_partitions(1, 5)") == 1

    view = store.session("s")
    cursor = await view.store_event("1", None)
    sent = [notification("n", {"i": i}) for i in range(23)]
    for message in sent:
        await view.store_event("1", message)

    assert await replay_all(view, cursor) == sent
    assert len(await partitions(admin)) >= 5


async def test_inserts_continue_after_a_sequence_jump(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    view = store.session("s")
    cursor = await view.store_event("1", None)
    before = notification("before")
    await view.store_event("1", before)
    await admin.execute("SELECT setval('mcp_events_seq', 50000000)")
    after = notification("after")
    event_id = await view.store_event("1", after)

    # The insert that found no partition used up a value: gaps are harmless.
    ref = parse_event_id(event_id)
    assert ref is not None and ref.seq > 50000000
    assert await replay_all(view, cursor) == [before, after]
    lowers = [int(name.rsplit("_p", 1)[1]) for name in await partitions(admin)]
    assert any(50000000 < lower <= ref.seq for lower in lowers)


async def test_a_cursor_whose_event_is_gone_gives_none(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    view = store.session("s")
    cursor = await view.store_event("1", None)
    await view.store_event("1", notification("n"))
    ref = parse_event_id(cursor)
    assert ref is not None
    await admin.execute(
        "DELETE FROM mcp_events_events WHERE stream_key = $1 AND seq = $2", ref.stream_key, ref.seq
    )
    got = Recorder()
    assert await view.replay_events_after(cursor, got) is None
    assert got.events == []


async def test_replay_pages_through_long_streams(dsn: str) -> None:
    async with await PostgresEventStore.connect(dsn, replay_batch_size=3) as store:
        view = store.session("s")
        cursor = await view.store_event("1", None)
        sent = [notification("n", {"i": i}) for i in range(10)]
        for message in sent:
            await view.store_event("1", message)
        await view.store_event("1", None)
        assert await replay_all(view, cursor) == sent


@pytest.mark.parametrize("after", [0, 1, 2, 3, 4, 6, 7])
async def test_replay_sends_every_event_once_whatever_the_length_against_the_page(
    dsn: str, after: int
) -> None:
    # The first page comes with the cursor's check, the others on their own: the
    # seam between them, at every length around a page of 3.
    async with await PostgresEventStore.connect(dsn, replay_batch_size=3) as store:
        view = store.session("s")
        await view.store_event("1", notification("before"))
        cursor = await view.store_event("1", None)
        sent = [notification("n", {"i": i}) for i in range(after)]
        for message in sent:
            await view.store_event("1", message)
        recorder = Recorder()
        assert await view.replay_events_after(cursor, recorder) == "1"
        assert [event.message for event in recorder.events] == sent
        ids = [event.event_id for event in recorder.events]
        assert len(set(ids)) == len(ids)


async def test_connect_refuses_an_unmigrated_database(empty_dsn: str) -> None:
    with pytest.raises(SchemaNotReadyError, match="mcp-pg-events migrate"):
        await PostgresEventStore.connect(empty_dsn)


async def test_a_borrowed_pool_on_an_unmigrated_database_fails_clearly(empty_dsn: str) -> None:
    async with asyncpg.create_pool(empty_dsn, min_size=1, max_size=1) as pool:
        view = PostgresEventStore(pool).session("s")
        with pytest.raises(SchemaNotReadyError, match="mcp-pg-events migrate"):
            await view.store_event("1", None)
        with pytest.raises(SchemaNotReadyError):
            await view.replay_events_after("1-1-aaaaaaaaaaaa", Recorder())


async def test_closing_the_store_leaves_a_borrowed_pool_open(dsn: str) -> None:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        async with PostgresEventStore(pool) as store:
            await store.session("s").store_event("1", None)
        assert await pool.fetchval("SELECT 1") == 1


async def test_unreachable_database_is_one_clear_error_without_the_password() -> None:
    with pytest.raises(StoreUnavailableError, match="cannot reach") as caught:
        await PostgresEventStore.connect("postgresql://someone:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(caught.value)


async def test_missing_database_is_a_configuration_error(server_dsn: str) -> None:
    from .conftest import with_database

    with pytest.raises(ConfigurationError, match="does not exist"):
        await PostgresEventStore.connect(with_database(server_dsn, "mcp_events_no_such_db"))


async def test_no_dsn_anywhere_says_which_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCP_PG_EVENTS_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigurationError, match="MCP_PG_EVENTS_DSN"):
        await PostgresEventStore.connect()


@pytest.mark.parametrize("options", [{"retry_deadline": -1}, {"replay_batch_size": 0}])
async def test_bad_options_are_refused(dsn: str, options: dict[str, float]) -> None:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(ConfigurationError):
            PostgresEventStore(pool, **options)


# -- outages --------------------------------------------------------------------


class RetrySignal(logging.Handler):
    """Sets ``retrying`` when the store logs that it is retrying a transient error."""

    def __init__(self) -> None:
        super().__init__()
        self.retrying = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "transient" in record.getMessage():
            self.retrying.set()


@pytest.fixture
def retry_signal() -> Iterator[RetrySignal]:
    handler = RetrySignal()
    logger = logging.getLogger("mcp_pg_events")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_store_event_rides_out_an_outage_shorter_than_the_deadline(
    proxy: FlakyProxy, retry_signal: RetrySignal
) -> None:
    async with await PostgresEventStore.connect(proxy.dsn, retry_deadline=30) as store:
        view = store.session("s")
        cursor = await view.store_event("1", None)
        proxy.go_down()
        message = notification("during the outage")
        pending = asyncio.create_task(view.store_event("1", message))
        await retry_signal.retrying.wait()
        assert not pending.done()
        proxy.go_up()
        event_id = await pending
        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [(e.event_id, e.message) for e in got.events] == [(event_id, message)]


async def test_store_event_gives_up_clearly_after_the_deadline(proxy: FlakyProxy) -> None:
    async with await PostgresEventStore.connect(proxy.dsn, retry_deadline=0.5) as store:
        view = store.session("s")
        await view.store_event("1", None)
        proxy.go_down()
        with pytest.raises(StoreUnavailableError, match="event not stored"):
            await view.store_event("1", notification("lost cause"))


async def test_a_commit_whose_answer_was_lost_is_not_stored_twice(
    proxy: FlakyProxy, admin: asyncpg.Connection
) -> None:
    async with asyncpg.create_pool(proxy.dsn, min_size=1, max_size=1) as pool:
        view = PostgresEventStore(pool, retry_deadline=10, notify=False).session("s")
        cursor = await view.store_event("1", None)  # warms the prepared statement
        message = notification("committed, answer lost")
        proxy.cut_next_response()
        event_id = await view.store_event("1", message)
        assert proxy.cuts == 1

        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [(e.event_id, e.message) for e in got.events] == [(event_id, message)]
        assert await admin.fetchval("SELECT count(*) FROM mcp_events_events") == 2


async def test_a_lost_commit_answer_followed_by_an_outage_is_stored_once(
    proxy: FlakyProxy, admin: asyncpg.Connection, retry_signal: RetrySignal
) -> None:
    async with asyncpg.create_pool(proxy.dsn, min_size=1, max_size=1) as pool:
        view = PostgresEventStore(pool, retry_deadline=30, notify=False).session("s")
        cursor = await view.store_event("1", None)
        message = notification("committed, then the database went away")
        proxy.cut_next_response(then_go_down=True)
        pending = asyncio.create_task(view.store_event("1", message))
        await retry_signal.retrying.wait()
        assert await admin.fetchval("SELECT count(*) FROM mcp_events_events") == 2
        proxy.go_up()
        event_id = await pending

        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [(e.event_id, e.message) for e in got.events] == [(event_id, message)]
        assert await admin.fetchval("SELECT count(*) FROM mcp_events_events") == 2


async def lock_waiters(admin: asyncpg.Connection) -> list[int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )
    return [r["pid"] for r in rows]


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for a state of the server that nothing signals (bounded)."""

    async def poll() -> None:
        while not await condition():  # noqa: ASYNC110 - a server's lock table sends no signal
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 15)


async def test_an_append_still_running_when_its_connection_drops_is_not_stored_twice(
    proxy: FlakyProxy, admin: asyncpg.Connection, retry_signal: RetrySignal
) -> None:
    async with asyncpg.create_pool(proxy.dsn, min_size=1, max_size=2) as pool:
        view = PostgresEventStore(pool, retry_deadline=30, notify=False).session("s")
        cursor = await view.store_event("1", None)
        ref = parse_event_id(cursor)
        assert ref is not None
        # Hold the stream's lock so that the next append waits inside the server.
        await admin.execute("SELECT pg_advisory_lock(1835233381, hashint8($1))", ref.stream_key)
        message = notification("in flight when the connection dropped")
        pending = asyncio.create_task(view.store_event("1", message))
        try:
            await until(lambda: _has_waiters(admin, 1))
            (orphan,) = await lock_waiters(admin)
            proxy.go_down()  # the client loses the connection; the server process waits on
            proxy.go_up()
            await retry_signal.retrying.wait()
            # The retry must end the orphan before appending again, or both would commit.
            await until(lambda: _only_waiter_is_not(admin, orphan))
        finally:
            await admin.execute("SELECT pg_advisory_unlock_all()")
        event_id = await pending

        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [(e.event_id, e.message) for e in got.events] == [(event_id, message)]


async def _has_waiters(admin: asyncpg.Connection, count: int) -> bool:
    return len(await lock_waiters(admin)) == count


async def _only_waiter_is_not(admin: asyncpg.Connection, pid: int) -> bool:
    waiters = await lock_waiters(admin)
    return len(waiters) == 1 and waiters[0] != pid


async def test_a_session_with_many_streams_keeps_a_bounded_cache(store: PostgresEventStore) -> None:
    from mcp_pg_events.store import MAX_CACHED_STREAMS

    view = store.session("s")
    first = await view.store_event("0", None)
    for i in range(1, MAX_CACHED_STREAMS + 50):
        await view.store_event(str(i), None)
    assert len(view._streams) <= MAX_CACHED_STREAMS
    # A forgotten stream carries on where it was.
    message = notification("after eviction")
    again = await view.store_event("0", message)
    got = Recorder()
    assert await view.replay_events_after(first, got) == "0"
    assert [(e.event_id, e.message) for e in got.events] == [(again, message)]


async def test_concurrent_appends_share_commits_and_keep_each_streams_order(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    views = [store.session(f"s{i}") for i in range(40)]
    cursors = [await view.store_event("1", None) for view in views]

    async def write(view: SessionEventStore, n: int) -> list[str]:
        return [await view.store_event("1", progress_message(i)) for i in range(n)]

    ids = await asyncio.gather(*(write(view, 25) for view in views))
    assert len({event_id for stream in ids for event_id in stream}) == 40 * 25
    for view, cursor, stream_ids in zip(views, cursors, ids, strict=True):
        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [e.event_id for e in got.events] == stream_ids
        assert [e.message for e in got.events] == [progress_message(i) for i in range(25)]
    # Rows committed together share a transaction id: far fewer commits than rows.
    commits = await admin.fetchval("SELECT count(DISTINCT xmin::text) FROM mcp_events_events")
    assert commits < 40 * 25 / 4


async def test_an_append_on_a_closed_pool_fails_at_once(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    view = PostgresEventStore(pool, retry_deadline=60, notify=False).session("s")
    await view.store_event("1", None)
    await pool.close()
    # Not retried for the deadline: a closed pool does not come back.
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await asyncio.wait_for(view.store_event("1", notification("after close")), 10)


# Records, inside every transaction that appends, the synchronous_commit it commits with.
_RECORD_DURABILITY = [
    "CREATE TABLE seen_durability (setting text NOT NULL)",
    """CREATE FUNCTION record_durability() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO seen_durability VALUES (current_setting('synchronous_commit'));
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER record_durability AFTER INSERT ON mcp_events_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION record_durability()",
]


@pytest.mark.parametrize(("setting", "expected"), [(None, "on"), ("off", "off"), ("local", "local")])
async def test_synchronous_commit_applies_to_the_stores_appends_only(
    dsn: str, admin: asyncpg.Connection, setting: str | None, expected: str
) -> None:
    for statement in _RECORD_DURABILITY:
        await admin.execute(statement)
    async with await PostgresEventStore.connect(
        dsn, synchronous_commit=setting, min_pool_size=1, max_pool_size=1, max_inflight=1
    ) as store:
        view = store.session("s")
        cursor = await view.store_event("1", None)
        await asyncio.gather(
            *(store.session(f"s{i}").store_event("1", progress_message(i)) for i in range(5))
        )
        await view.store_event("1", progress_message(9))
        # The setting ends with each append's transaction: the pool's one connection,
        # which wrote every batch, runs everything else with the server's setting.
        assert await store.database.fetchval("SELECT current_setting('synchronous_commit')") == "on"
        assert await replay_all(view, cursor) == [progress_message(9)]
    seen = await admin.fetch("SELECT setting FROM seen_durability")
    assert len(seen) >= 3
    assert {row["setting"] for row in seen} == {expected}


def test_synchronous_commit_takes_only_postgresqls_values() -> None:
    assert StoreSettings().synchronous_commit is None
    assert StoreSettings.from_env({env_name("synchronous_commit"): "off"}).synchronous_commit == "off"
    with pytest.raises(ConfigurationError, match="synchronous_commit must be one of off, local"):
        StoreSettings.from_env({env_name("synchronous_commit"): "sometimes"})


async def test_pages_of_a_long_stream_read_the_index_in_order_before_any_analyze(
    admin: asyncpg.Connection,
) -> None:
    # Without statistics the planner guesses a few dozen rows per stream: with a
    # limit it knows it read the whole rest of the stream and sorted it, every page.
    assert (
        await admin.fetchval("SELECT count(*) FROM pg_stats WHERE tablename LIKE 'mcp_events_events%'") == 0
    )
    await admin.execute(
        "INSERT INTO mcp_events_sessions (key) VALUES ('s');"
        "INSERT INTO mcp_events_streams (session_id, name, tag)"
        " SELECT id, '\\x31', 't' FROM mcp_events_sessions;"
        "INSERT INTO mcp_events_events (stream_key, message)"
        " SELECT (SELECT id FROM mcp_events_streams), '\\x7b7d' FROM generate_series(1, 10000)"
    )
    key = await admin.fetchval("SELECT id FROM mcp_events_streams")
    first = await admin.fetchval("SELECT min(seq) FROM mcp_events_events")
    for query, args in (
        (sql.REPLAY_PAGE, (key, first + 100, 500)),
        (sql.REPLAY_FROM_CURSOR, (key, first + 100, "t", "s", 500)),
        (sql.TAIL_PAGES, ([key], [first + 100], 500)),
    ):
        plan = json.dumps(json.loads(await admin.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)))
        assert '"Index Scan"' in plan and "Bitmap" not in plan, plan
        seqs = [row["seq"] for row in await admin.fetch(query, *args)]
        assert seqs == list(range(first + 101, first + 601))
    # The replay's first query names the stream (up to 1 MiB) once, not on every row.
    rows = await admin.fetch(sql.REPLAY_FROM_CURSOR, key, first + 100, "t", "s", 500)
    assert rows[0]["name"] == b"1" and not any(row["name"] for row in rows[1:])


async def test_a_lone_append_cancelled_with_its_caller_gives_its_connection_back(
    dsn: str, admin: asyncpg.Connection
) -> None:
    # A lone append writes in its caller's task; cancelled with it, it must still
    # give the connection back, or closing the store waits for it for ever.
    async with await PostgresEventStore.connect(dsn) as store:
        view = store.session("s")
        await view.store_event("1", None)
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM mcp_events_streams FOR UPDATE")  # the append waits for it
            append = asyncio.ensure_future(view.store_event("1", progress_message(1)))

            async def waiting() -> bool:
                query = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> $1"
                )
                return bool(await admin.fetchval(query, admin.get_server_pid()) == 1)

            await until(waiting)
            append.cancel()
            with pytest.raises(asyncio.CancelledError):
                await append
        await asyncio.wait_for(store.close(), 10)  # timed out: the connection was never given back
