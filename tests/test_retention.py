"""Retention on a real PostgreSQL: what goes, what stays, and that readers never see a hole.

Events are made old by moving their created_at back, never by waiting. Tiny
partitions (a width of 10 seqs) let a few events fill several.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from mcp_pg_events import PostgresEventStore, SchemaNotReadyError
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.retention import RetentionReport, end_session, run_retention
from mcp_pg_events.settings import format_duration, parse_duration

from .messages import progress_message as message
from .test_cli import run_cli, start_cli
from .test_contract import Recorder

HOUR = timedelta(hours=1)
OLD = timedelta(hours=2)


def seq(event_id: str) -> int:
    ref = parse_event_id(event_id)
    assert ref is not None
    return ref.seq


async def tiny_partitions(admin: asyncpg.Connection, width: int = 10) -> None:
    """Replace the migration's partitions (1,000,000 seqs wide) with ``width``-seq ones."""
    for name in await partition_names(admin):
        await admin.execute(f"ALTER TABLE mcp_events_events DETACH PARTITION {name}")
        await admin.execute(f"DROP TABLE {name}")
    await admin.fetchval("SELECT mcp_events_ensure_partitions(2, $1)", width)


async def partition_names(admin: asyncpg.Connection) -> list[str]:
    rows = await admin.fetch("SELECT name FROM mcp_events_partitions() WHERE attached ORDER BY lower")
    return [r["name"] for r in rows]


async def tables(admin: asyncpg.Connection) -> set[str]:
    rows = await admin.fetch(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE 'mcp\\_events\\_events\\_p%'"
    )
    return {r["tablename"] for r in rows}


async def age(admin: asyncpg.Connection, event_ids: list[str], by: timedelta = OLD) -> None:
    """Make events look ``by`` older than they are."""
    await admin.execute(
        "UPDATE mcp_events_events SET created_at = created_at - $2::interval WHERE seq = ANY($1::bigint[])",
        [seq(e) for e in event_ids],
        by,
    )


async def seqs(admin: asyncpg.Connection) -> list[int]:
    return [r["seq"] for r in await admin.fetch("SELECT seq FROM mcp_events_events ORDER BY seq")]


async def replay(view: Any, cursor: str) -> tuple[str, list[Any]] | None:
    got = Recorder()
    stream = await view.replay_events_after(cursor, got)
    return None if stream is None else (stream, [e.message for e in got.events])


async def counts(admin: asyncpg.Connection) -> dict[str, Any]:
    """Everything retention could change, to prove a dry run changed none of it."""
    return {
        "events": await admin.fetchval("SELECT count(*) FROM mcp_events_events"),
        "streams": await admin.fetchval("SELECT count(*) FROM mcp_events_streams"),
        "sessions": await admin.fetchval("SELECT count(*) FROM mcp_events_sessions"),
        "tables": await tables(admin),
        "next_seq": await admin.fetchval("SELECT mcp_events_next_seq()"),
    }


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll a database condition that no notification announces, within a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def call_pid(admin: asyncpg.Connection) -> int | None:
    """The server process running a retention CALL, if any."""
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE '%CALL mcp_events_retention%' AND pid <> pg_backend_pid()"
    )
    return pid


# --- what goes ---------------------------------------------------------------------------------


async def test_expired_events_go_oldest_first_and_their_cursors_expire(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    view = store.session("s")
    sent = [message(i) for i in range(6)]
    ids = [await view.store_event("1", m) for m in sent]
    await age(admin, ids[:3])

    lines: list[str] = []
    report = await run_retention(dsn, ttl=HOUR, batch_size=2, progress=lines.append)

    assert (report.rows_deleted, report.partitions_dropped) == (3, 0)
    assert report.complete and not report.locked_out and not report.dry_run
    assert report.bytes_freed > 0 and report.seconds >= 0
    assert any(line.startswith("deleted ") for line in lines), lines
    assert await seqs(admin) == [seq(e) for e in ids[3:]]
    # A cursor that retention removed is an expired cursor, not a partial replay.
    assert await replay(view, ids[2]) is None
    assert await replay(view, ids[3]) == ("1", sent[4:])


async def test_whole_expired_partitions_are_detached_and_dropped(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin)
    view = store.session("s")
    sent = [message(i) for i in range(25)]
    ids = [await view.store_event("1", m) for m in sent]  # seqs 1..25: three partitions
    await age(admin, ids[:20])

    lines: list[str] = []
    report = await run_retention(dsn, ttl=HOUR, progress=lines.append)

    assert (report.partitions_dropped, report.rows_deleted) == (2, 0)
    assert report.bytes_freed > 0
    assert {"mcp_events_events_p1", "mcp_events_events_p11"}.isdisjoint(await tables(admin))
    assert "detached mcp_events_events_p1" in lines and "detached mcp_events_events_p11" in lines
    assert await replay(view, ids[19]) is None
    assert await replay(view, ids[20]) == ("1", sent[21:])
    # Nothing is left to do.
    again = await run_retention(dsn, ttl=HOUR)
    assert (again.partitions_dropped, again.rows_deleted) == (0, 0)


async def test_a_partition_stays_while_an_older_one_holds_a_live_event(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin)
    view = store.session("s")
    sent = [message(i) for i in range(22)]
    ids = [await view.store_event("a", m) for m in sent]  # seqs 1..22
    # Seq 1 is recent, the rest of its partition and all of the next have expired.
    await age(admin, ids[1:20])

    report = await run_retention(dsn, ttl=HOUR)

    # Dropping the second partition would leave a hole after the cursor at seq 1.
    assert (report.partitions_dropped, report.rows_deleted) == (0, 0)
    assert await replay(view, ids[0]) == ("a", sent[1:])

    await age(admin, ids[:1])
    report = await run_retention(dsn, ttl=HOUR)
    assert report.partitions_dropped == 2
    assert await replay(view, ids[0]) is None
    assert await replay(view, ids[20]) == ("a", sent[21:])


async def test_expired_events_wait_for_a_partition_that_expires_whole_soon(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin)
    view = store.session("s")
    ids = [await view.store_event("1", message(i)) for i in range(12)]
    # The first partition: five expired events, five that expire in 10 minutes.
    await age(admin, ids[:5])
    await age(admin, ids[5:10], by=timedelta(minutes=50))

    lines: list[str] = []
    report = await run_retention(
        dsn, ttl=HOUR, partition_max_age=timedelta(minutes=15), progress=lines.append
    )

    # Deleting them now would write WAL for rows the drop takes for free.
    assert (report.partitions_dropped, report.rows_deleted) == (0, 0)
    assert any("expires whole within" in line for line in lines), lines
    dry = await run_retention(dsn, ttl=HOUR, partition_max_age=timedelta(minutes=15), dry_run=True)
    assert (dry.partitions_dropped, dry.rows_deleted) == (0, 0)

    await age(admin, ids[5:10], by=timedelta(minutes=20))
    report = await run_retention(dsn, ttl=HOUR, partition_max_age=timedelta(minutes=15))
    assert (report.partitions_dropped, report.rows_deleted) == (1, 0)

    # Not so when the partition keeps a live event beyond the max age: row by row.
    await age(admin, ids[10:11])
    report = await run_retention(dsn, ttl=HOUR, partition_max_age=timedelta(minutes=15))
    assert (report.partitions_dropped, report.rows_deleted) == (0, 1)
    assert await replay(view, ids[10]) is None
    assert await replay(view, ids[11]) == ("1", [])


async def test_an_expired_event_after_a_live_one_stays(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    view = store.session("s")
    sent = [message(i) for i in range(4)]
    ids = [await view.store_event("u", m) for m in sent[:3]]
    ids.append(await store.session("other").store_event("v", sent[3]))
    # created_at is the time a transaction began, not the order of seqs: an older
    # event may follow a newer one. Only the prefix before the first live event goes.
    await age(admin, [ids[0], ids[2], ids[3]])

    report = await run_retention(dsn, ttl=HOUR, partition_max_age=timedelta(days=7))

    assert report.rows_deleted == 1
    assert await replay(view, ids[0]) is None
    assert await replay(view, ids[1]) == ("u", sent[2:3])
    assert await seqs(admin) == [seq(e) for e in ids[1:]]


async def test_appends_cross_partition_boundaries_and_sequence_jumps(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin, width=5)
    view = store.session("s")
    cursor = await view.store_event("1", None)
    sent: list[Any] = []
    jumps = []
    for _ in range(3):
        for _ in range(7):  # more than a partition's width: crosses a boundary every round
            sent.append(message(len(sent)))
            await view.store_event("1", sent[-1])
        # A partition max age of 0: every run rolls over, as a quiet deployment's would.
        report = await run_retention(dsn, ttl=timedelta(days=1), partition_max_age=timedelta(0))
        assert report.rolled_over_to is not None and report.partitions_created >= 1
        jumps.append(report.rolled_over_to)
        sent.append(message(len(sent)))
        # The first append after a jump gets the next partition's lower bound.
        assert seq(await view.store_event("1", sent[-1])) == report.rolled_over_to

    assert await replay(view, cursor) == ("1", sent)
    names = await partition_names(admin)
    assert all(f"mcp_events_events_p{lower}" in names for lower in jumps)


async def test_appends_during_retention_never_fail(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin, width=20)
    views = [store.session(f"s{i}") for i in range(4)]
    cursors = [await v.store_event("1", None) for v in views]
    sent: list[list[Any]] = [[] for _ in views]
    stop = asyncio.Event()

    async def write(i: int) -> None:
        while not stop.is_set():
            sent[i].append(message(len(sent[i])))
            await views[i].store_event("1", sent[i][-1])

    writers = [asyncio.create_task(write(i)) for i in range(len(views))]
    try:
        for _ in range(5):
            # Rolls over, creates partitions and attaches them under the writers' feet.
            report = await run_retention(dsn, ttl=timedelta(days=1), partition_max_age=timedelta(0))
            assert report.complete
    finally:
        stop.set()
        await asyncio.gather(*writers)
    for view, cursor, messages in zip(views, cursors, sent, strict=True):
        assert await replay(view, cursor) == ("1", messages)


async def test_roll_over_by_time_lets_a_quiet_partition_go(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    view = store.session("s")
    ids = [await view.store_event("1", message(i)) for i in range(3)]  # in the first 1,000,000-seq partition
    await age(admin, ids)
    await admin.execute("UPDATE mcp_events_streams SET created_at = created_at - $1::interval", OLD)

    lines: list[str] = []
    report = await run_retention(dsn, ttl=HOUR, progress=lines.append)

    # The partition in use held an event older than the max age (the ttl): the
    # sequence moved on, and the whole partition could go at once.
    assert report.rolled_over_to == 1_000_001
    assert report.partitions_dropped == 1 and report.rows_deleted == 0
    assert report.streams_removed == 1
    assert any(line.startswith("rolled over") for line in lines), lines
    assert "mcp_events_events_p1" not in await tables(admin)
    assert await replay(view, ids[-1]) is None
    # The stream was removed while idle; appending to it again just works (the
    # insert that found it gone used up a seq: gaps are harmless).
    again = await view.store_event("1", message(3))
    assert seq(again) > 1_000_000
    assert await replay(view, again) == ("1", [])


# --- sessions ----------------------------------------------------------------------------------


async def test_ended_sessions_go_after_the_grace_period(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    ended, live = store.session("ended"), store.session("live")
    ended_ids = [await ended.store_event(s, message(i)) for i, s in enumerate(["1", "1", "2"])]
    live_ids = [await live.store_event("1", message(i)) for i in range(2)]
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        await end_session(pool, "ended")
        await end_session(pool, "ended")  # the first end counts
        await end_session(pool, "no-such-session")
    first_end = await admin.fetchval("SELECT ended_at FROM mcp_events_sessions WHERE key = 'ended'")
    assert first_end is not None

    report = await run_retention(dsn, ttl=HOUR, ended_grace=HOUR)
    assert (report.rows_deleted, report.streams_removed, report.sessions_removed) == (0, 0, 0)
    assert await replay(ended, ended_ids[0]) == ("1", [message(1)])

    await admin.execute(
        "UPDATE mcp_events_sessions SET ended_at = ended_at - $1::interval WHERE key = 'ended'", OLD
    )
    report = await run_retention(dsn, ttl=HOUR, ended_grace=HOUR)

    assert (report.rows_deleted, report.streams_removed, report.sessions_removed) == (3, 2, 1)
    assert await replay(ended, ended_ids[0]) is None
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE key = 'ended'") == 0
    assert await replay(live, live_ids[0]) == ("1", [message(1)])


async def test_old_empty_sessions_are_removed_unless_a_worker_may_still_hold_them(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await admin.execute(
        "INSERT INTO mcp_events_sessions (key, created_at, registered_at, last_active_at) VALUES "
        "('old-empty', now() - interval '2 hours', NULL, NULL), ('new-empty', now(), NULL, NULL), "
        "('provisional-abc', now(), NULL, NULL), "
        "('old-in-use', now() - interval '2h', now() - interval '2h', now() - interval '1 minute'), "
        "('old-unused', now() - interval '2h', now() - interval '2h', now() - interval '90 minutes')"
    )
    await store.session("provisional-busy").store_event("1", message(0))

    report = await run_retention(dsn, ttl=HOUR)

    # Since revision 0006 a session is one row: a key that looks provisional is no
    # longer special. A registered session used within the ttl may be held by a
    # worker, even with no stream left.
    assert report.sessions_removed == 2
    rows = await admin.fetch("SELECT key FROM mcp_events_sessions ORDER BY key")
    assert [r["key"] for r in rows] == ["new-empty", "old-in-use", "provisional-abc", "provisional-busy"]


async def test_registered_sessions_idle_past_their_timeout_end_and_old_workers_are_forgotten(
    admin: asyncpg.Connection, dsn: str
) -> None:
    await admin.execute(
        "INSERT INTO mcp_events_sessions (key, registered_at, idle_timeout, last_active_at) VALUES "
        # Idle an hour with a timeout of a minute: its worker died, or lost it.
        "('idle', now(), 60, now() - interval '1 hour'), "
        # Within its timeout plus the slack of the workers' batched activity writes.
        "('recent', now(), 60, now() - interval '5 minutes'), "
        "('no-timeout', now(), NULL, now() - interval '1 hour'), "
        "('unregistered', NULL, 60, now() - interval '1 hour')"
    )
    await admin.execute(
        "INSERT INTO mcp_events_workers (pid, seen_at, ended_at) VALUES (1, now() - interval '2h', NULL), "
        "(2, now(), NULL), (3, now() - interval '2h', now() - interval '2h')"
    )
    idle = await admin.fetchval("SELECT id FROM mcp_events_sessions WHERE key = 'idle'")
    heard: asyncio.Queue[str] = asyncio.Queue()
    await admin.add_listener("mcp_events_ended_v1", lambda *args: heard.put_nowait(args[-1]))

    await run_retention(dsn, ttl=HOUR)

    rows = await admin.fetch("SELECT key, ended_reason FROM mcp_events_sessions WHERE ended_at IS NOT NULL")
    assert [tuple(r) for r in rows] == [("idle", "expired")]
    # Workers that held it, if any, are told (by row id: never the session id).
    assert await asyncio.wait_for(heard.get(), 10) == str(idle)
    assert [r["pid"] for r in await admin.fetch("SELECT pid FROM mcp_events_workers")] == [2]


# --- one run at a time, and safe to kill ---------------------------------------------------------


@pytest.fixture
async def blocked_run_setup(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> AsyncIterator[tuple[list[str], asyncpg.Connection]]:
    """Four events, three expired; a second connection holds a row lock on the second.

    A run with a batch size of 1 deletes the first event, reports it, then waits
    for that lock while holding the retention lock: a run stopped half-way.
    """
    view = store.session("s")
    ids = [await view.store_event("1", message(i)) for i in range(4)]
    await age(admin, ids[:3])
    blocker = await asyncpg.connect(dsn)
    try:
        # Plain BEGIN: the test ends the transaction with ROLLBACK when it chooses.
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT FROM mcp_events_events WHERE seq = $1 FOR UPDATE", seq(ids[1]))
        yield ids, blocker
    finally:
        await blocker.close()


async def start_blocked_run(dsn: str) -> tuple[asyncio.Task[RetentionReport], list[str]]:
    """A run stopped in its second delete batch (see ``blocked_run_setup``)."""
    lines: list[str] = []
    first_batch = asyncio.Event()

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("deleted "):
            first_batch.set()

    task = asyncio.create_task(
        run_retention(dsn, ttl=HOUR, batch_size=1, partition_max_age=timedelta(days=7), progress=progress)
    )
    await asyncio.wait_for(first_batch.wait(), 10)
    return task, lines


async def test_a_second_run_says_another_holds_the_lock_and_exits_0(
    blocked_run_setup: tuple[list[str], asyncpg.Connection], admin: asyncpg.Connection, dsn: str
) -> None:
    ids, blocker = blocked_run_setup
    first, _ = await start_blocked_run(dsn)

    code, out, err = await run_cli("retention", "--ttl", "1h", MCP_PG_EVENTS_DSN=dsn)
    assert code == 0, err
    assert "another retention run holds the lock" in err and out == ""
    report = await run_retention(dsn, ttl=HOUR)
    assert report.locked_out and "another retention run" in report.summary()
    # pg_cron's way in takes the same lock.
    row = await admin.fetchrow("CALL mcp_events_retention(interval '1 hour')")
    assert row is not None and row["locked_out"]

    await blocker.execute("ROLLBACK")
    report = await asyncio.wait_for(first, 10)
    assert not report.locked_out and report.rows_deleted == 3
    assert await seqs(admin) == [seq(ids[3])]


async def test_a_killed_run_is_finished_by_the_next(
    blocked_run_setup: tuple[list[str], asyncpg.Connection],
    store: PostgresEventStore,
    admin: asyncpg.Connection,
    dsn: str,
) -> None:
    ids, blocker = blocked_run_setup
    process = await start_cli(
        "retention", "--dsn", dsn, "--ttl", "1h", "--batch-size", "1", "--partition-max-age", "7d"
    )
    assert process.stderr is not None
    line = b""
    while not line.startswith(b"deleted "):
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, "the run ended before its first delete batch"
    assert line.startswith(b"deleted 1 expired event ("), line
    # Kill the command and its server process, as a node failure would.
    process.kill()
    await process.wait()
    pid = await call_pid(admin)
    assert pid is not None
    assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
    await blocker.execute("ROLLBACK")
    # The killed batch rolled back: the first event is gone, the next two are not.
    assert await seqs(admin) == [seq(e) for e in ids[1:]]

    report = await run_retention(dsn, ttl=HOUR)
    assert report.rows_deleted == 2 and report.complete
    view = store.session("s")
    assert await replay(view, ids[2]) is None
    assert await replay(view, ids[3]) == ("1", [])


async def test_a_cancelled_run_is_finished_by_the_next(
    blocked_run_setup: tuple[list[str], asyncpg.Connection], admin: asyncpg.Connection, dsn: str
) -> None:
    ids, blocker = blocked_run_setup
    task, _ = await start_blocked_run(dsn)
    pid = await call_pid(admin)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def gone() -> bool:
        return not await admin.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid)

    await until(gone)
    await blocker.execute("ROLLBACK")
    report = await run_retention(dsn, ttl=HOUR)
    assert not report.locked_out and report.rows_deleted == 2
    assert await seqs(admin) == [seq(ids[3])]


async def test_a_partition_left_detached_is_dropped_by_the_next_run(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin)
    view = store.session("s")
    ids = [await view.store_event("1", message(i)) for i in range(12)]
    await age(admin, ids[:10])
    # What a run killed between its detach and its drop leaves behind.
    await admin.execute("ALTER TABLE mcp_events_events DETACH PARTITION mcp_events_events_p1")

    lines: list[str] = []
    report = await run_retention(dsn, ttl=HOUR, progress=lines.append)

    assert report.partitions_dropped == 1 and report.bytes_freed > 0
    assert "mcp_events_events_p1" not in await tables(admin)
    assert any("left detached by an earlier run" in line for line in lines), lines
    assert await replay(view, ids[10]) == ("1", [message(11)])


async def test_a_busy_table_leaves_the_work_for_the_next_run(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await tiny_partitions(admin)
    view = store.session("s")
    ids = [await view.store_event("1", message(i)) for i in range(13)]
    await age(admin, ids[:12])
    async with admin.transaction():
        # A long transaction on the events table: DETACH must not wait for it
        # (appends would queue behind the DETACH), nor delete past the partition.
        await admin.execute("LOCK TABLE mcp_events_events IN ACCESS SHARE MODE")
        report = await run_retention(
            dsn, ttl=HOUR, partition_max_age=timedelta(days=7), lock_timeout=timedelta(milliseconds=50)
        )
    assert not report.complete and "next run" in report.summary()
    assert (report.partitions_dropped, report.rows_deleted) == (0, 0)

    report = await run_retention(dsn, ttl=HOUR, partition_max_age=timedelta(days=7))
    assert report.complete and (report.partitions_dropped, report.rows_deleted) == (1, 2)
    assert await replay(view, ids[11]) is None
    assert await replay(view, ids[12]) == ("1", [])


# --- dry run and the SQL procedure -------------------------------------------------------------


async def dry_run_setup(store: PostgresEventStore, admin: asyncpg.Connection) -> None:
    """A bit of everything: a whole partition, loose rows, an ended session, empty sessions."""
    await tiny_partitions(admin)
    s, ended = store.session("s"), store.session("ended")
    old_stream = [await s.store_event("c", message(i)) for i in range(3)]  # seqs 1..3
    kept_stream = [await s.store_event("a", message(i)) for i in range(10)]  # seqs 4..13
    [await ended.store_event("b", message(i)) for i in range(2)]  # seqs 14, 15
    await age(admin, old_stream + kept_stream[:9])
    await admin.execute("UPDATE mcp_events_streams SET created_at = created_at - $1::interval", OLD)
    await admin.execute("UPDATE mcp_events_sessions SET ended_at = now() WHERE key = 'ended'")
    await admin.execute("INSERT INTO mcp_events_sessions (key) VALUES ('provisional-x')")


async def test_dry_run_changes_nothing_and_says_what_would_go(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await dry_run_setup(store, admin)
    before = await counts(admin)

    code, out, err = await run_cli("retention", "--dry-run", MCP_PG_EVENTS_DSN=dsn, MCP_PG_EVENTS_TTL="1h")
    assert code == 0, err
    assert out.startswith("dry run in ") and "1 partition to drop" in out, out
    assert "would drop partition mcp_events_events_p1" in err and "would roll over" in err
    assert await counts(admin) == before

    dry = await run_retention(dsn, ttl=HOUR, dry_run=True)
    assert await counts(admin) == before
    real = await run_retention(dsn, ttl=HOUR)

    fields = ("partitions_dropped", "rows_deleted", "streams_removed", "sessions_removed", "rolled_over_to")
    assert [getattr(dry, f) for f in fields] == [getattr(real, f) for f in fields]
    # p1; seqs 11, 12 by age, 14, 15 as the ended session's; streams c and b; session ended
    assert [getattr(real, f) for f in fields] == [1, 4, 2, 1, 21]
    assert dry.bytes_freed > 0 and real.bytes_freed > 0
    assert await counts(admin) != before


async def test_the_sql_procedure_does_the_same_work_for_pg_cron(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    await dry_run_setup(store, admin)
    # pg_cron runs the job's command as one simple query outside a transaction block.
    await admin.execute("CALL mcp_events_retention(interval '1 hour')")

    assert "mcp_events_events_p1" not in await tables(admin)
    assert await seqs(admin) == [13]
    rows = await admin.fetch("SELECT key FROM mcp_events_sessions ORDER BY key")
    # provisional-x is new, and no longer special (revision 0006).
    assert [r["key"] for r in rows] == ["provisional-x", "s"]
    assert await admin.fetchval("SELECT mcp_events_next_seq()") == 21

    # Inside a transaction block it cannot commit between steps: it fails at
    # once, before taking the lock, and a later run is not locked out.
    with pytest.raises(asyncpg.InvalidTransactionTerminationError):
        async with admin.transaction():
            await admin.execute("CALL mcp_events_retention(interval '1 hour')")
    row = await admin.fetchrow("CALL mcp_events_retention(interval '1 hour', batch_size => 5)")
    assert row is not None and not row["locked_out"] and row["complete"]
    with pytest.raises(asyncpg.RaiseError, match="batch_size must be at least 1"):
        await admin.execute("CALL mcp_events_retention(interval '1 hour', batch_size => 0)")


# --- the command line --------------------------------------------------------------------------


async def test_a_run_reports_progress_on_stderr_and_a_summary_on_stdout(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await dry_run_setup(store, admin)
    code, out, err = await run_cli(
        "retention", "--dsn", dsn, "--ttl", "1h", "--batch-size", "1", MCP_PG_EVENTS_ENDED_GRACE="0s"
    )
    assert code == 0, err
    # One of each reads as one: the procedure's NOTICEs say "1 expired events".
    assert "dropped mcp_events_events_p1" in err and "deleted 1 expired event (2 so far)" in err
    assert out.count("\n") == 1 and out.startswith("retention in ")
    assert "1 partition dropped, 4 rows deleted, 2 streams and 1 session removed" in out


async def test_unreachable_database_is_one_line_without_the_password() -> None:
    code, out, err = await run_cli("retention", "--dsn", "postgresql://me:hunter2@127.0.0.1:1/nowhere")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("mcp-pg-events: error: cannot reach the database"), err
    assert "hunter2" not in err and "Traceback" not in err


async def test_an_unmigrated_database_is_one_line_naming_the_fix(empty_dsn: str) -> None:
    code, _, err = await run_cli("retention", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert "mcp-pg-events migrate" in err and "Traceback" not in err
    with pytest.raises(SchemaNotReadyError):
        await run_retention(empty_dsn)


async def test_bad_values_are_usage_errors() -> None:
    code, _, err = await run_cli("retention", "--ttl", "soon")
    assert code == 2 and "--ttl: not a duration: 'soon'" in err
    code, _, err = await run_cli("retention", MCP_PG_EVENTS_BATCH_SIZE="0")
    assert code == 2 and "--batch-size" in err


async def test_switches_from_the_environment_read_off_as_off_and_refuse_what_is_neither(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    await dry_run_setup(store, admin)
    before = await counts(admin)
    # "off" once meant on: a dry run that never deleted, a loop that never ended.
    code, out, err = await asyncio.wait_for(
        run_cli(
            "retention", MCP_PG_EVENTS_DSN=dsn, MCP_PG_EVENTS_TTL="1h",
            MCP_PG_EVENTS_DRY_RUN="off", MCP_PG_EVENTS_LOOP="off",
        ),
        60,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("retention in ") and out.count("\n") == 1, out
    assert "running retention every" not in err
    assert await counts(admin) != before

    for variable in ("MCP_PG_EVENTS_DRY_RUN", "MCP_PG_EVENTS_LOOP", "MCP_PG_EVENTS_FORCE"):
        code, out, err = await run_cli("retention", MCP_PG_EVENTS_DSN=dsn, **{variable: "nope"})
        assert code == 2 and out == ""
        assert err.strip() == (
            f"mcp-pg-events: error: {variable}: not on or off: 'nope' "
            "(expected one of 1, true, yes, on / 0, false, no, off)"
        )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ttl", "10"], "argument --ttl: not a duration: '10' has no unit"),
        (["--ttl", "-5m"], "argument --ttl: not a duration: '-5m' (durations are never negative)"),
        (["--ttl=-5m"], "argument --ttl: not a duration: '-5m' (durations are never negative)"),
        (["--ttl", "99999999d"], "argument --ttl: too long: '99999999d' (at most 365,000 days)"),
        (["--interval", "0s", "--loop"], "interval must be at least 1s, got 0s"),
        (["--interval", "500ms", "--loop"], "interval must be at least 1s, got 500ms"),
        (["--ttl", "0"], "--ttl 0s is below 5m"),
        (["--ttl", "4m59s"], "--ttl 4m59s is below 5m"),
    ],
)
async def test_durations_have_guard_rails(dsn: str, args: list[str], says: str) -> None:
    code, out, err = await asyncio.wait_for(run_cli("retention", "--dsn", dsn, *args), 60)
    assert code == 2 and out == "", out
    assert says in err.splitlines()[-1], err
    assert "Traceback" not in err


async def test_a_ttl_below_five_minutes_runs_when_forced_or_dry(
    store: PostgresEventStore, admin: asyncpg.Connection, dsn: str
) -> None:
    view = store.session("s")
    for i in range(3):
        await view.store_event("1", message(i))
    code, out, err = await run_cli("retention", "--dsn", dsn, "--ttl", "0", "--dry-run")
    assert code == 0, err
    assert out.startswith("dry run in ")
    code, out, err = await run_cli("retention", "--dsn", dsn, "--ttl", "1m", MCP_PG_EVENTS_FORCE="1")
    assert code == 0, err
    code, out, err = await run_cli("retention", "--dsn", dsn, "--ttl", "0", "--force")
    assert code == 0, err
    assert out.startswith("retention in ")


async def test_help_shows_every_environment_variable() -> None:
    code, out, _ = await run_cli("retention", "--help")
    assert code == 0
    for name in (
        "MCP_PG_EVENTS_DSN", "MCP_PG_EVENTS_TTL", "MCP_PG_EVENTS_DRY_RUN", "MCP_PG_EVENTS_LOOP",
        "MCP_PG_EVENTS_INTERVAL", "MCP_PG_EVENTS_BATCH_SIZE", "MCP_PG_EVENTS_PARTITIONS_AHEAD",
        "MCP_PG_EVENTS_PARTITION_MAX_AGE", "MCP_PG_EVENTS_ENDED_GRACE", "MCP_PG_EVENTS_LOCK_TIMEOUT",
    ):  # fmt: skip
        assert name in out


async def test_loop_runs_until_sigterm(dsn: str) -> None:
    process = await start_cli("retention", "--loop", "--interval", "1h", MCP_PG_EVENTS_DSN=dsn)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line.startswith(b"retention in "), line
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
    assert b"running retention every 1h" in err and err.rstrip().endswith(b"stopped")


# --- small parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), ("1h30m", 5400), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize("text", ["", "soon", "-1h", "1x", "h", "1h-", "inf", "nan", "90", "1.5", "-0"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["365001d", "99999999d", "9" * 400 + "s"])
def test_durations_past_what_a_timestamp_can_lose_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"too long: .* \(at most 365,000 days\)"):
        parse_duration(text)
