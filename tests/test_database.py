"""The database gateway: which errors are retried, which pass through, and the schema's compatible range."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from mcp_pg_events import PostgresEventStore, SchemaNotReadyError
from mcp_pg_events.database import (
    OLDEST_SCHEMA,
    SCHEMA_REVISION,
    answer_lost,
    is_transient,
)
from mcp_pg_events.event_ids import parse_event_id

from .messages import progress_message

# The namespace of the per-stream append lock (sql.APPEND_BATCH).
APPEND_LOCK = 1835233381


async def test_a_value_the_driver_refuses_is_raised_at_once_not_retried_to_the_deadline(dsn: str) -> None:
    # asyncpg's DataError is an InterfaceError: it used to count as transient, so a
    # bad value was retried for the whole deadline and reported as an outage.
    async with await PostgresEventStore.connect(dsn, retry_deadline=3) as store:
        with pytest.raises(asyncpg.DataError):
            await store.database.fetchval("SELECT $1::int", "not a number")
        # The pool and the store are fine afterwards.
        assert await store.database.fetchval("SELECT 1") == 1


def test_permanent_client_errors_are_not_transient() -> None:
    for error in (
        asyncpg.DataError("bad value"),
        asyncpg.exceptions.ClientConfigurationError("bad setting"),
        asyncpg.exceptions.UnsupportedClientFeatureError("no"),
    ):
        assert not is_transient(error), error


def test_server_errors_are_classified_by_their_class() -> None:
    transient = [
        asyncpg.exceptions.DeadlockDetectedError(),  # 40P01
        asyncpg.exceptions.QueryCanceledError(),  # 57014, a statement timeout
        asyncpg.exceptions.DiskFullError(),  # 53100
        asyncpg.exceptions.AdminShutdownError(),  # 57P01
        asyncpg.exceptions.CannotConnectNowError(),  # 57P03, starting up
    ]
    permanent = [
        asyncpg.exceptions.UniqueViolationError(),
        asyncpg.exceptions.InsufficientPrivilegeError(),
        asyncpg.exceptions.SyntaxOrAccessError(),
    ]
    assert all(is_transient(error) for error in transient)
    assert not any(is_transient(error) for error in permanent)


async def test_a_query_on_a_connection_whose_server_process_ended_is_transient(
    dsn: str, admin: asyncpg.Connection
) -> None:
    # Pins what asyncpg raises on a pooled connection whose server process was
    # terminated while it sat idle (a failover, pg_terminate_backend): whatever the
    # class, the gateway must read it as transient, or the SDK ends the session.
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        pid = conn.get_server_pid()
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
        with pytest.raises(Exception) as raised:
            await conn.fetchval("SELECT 1")
        assert is_transient(raised.value, conn, pool), repr(raised.value)


async def test_an_error_the_server_reported_is_no_lost_answer() -> None:
    # An ERROR ends the statement and rolls its implicit transaction back; only a
    # lost connection, or the server ending it (FATAL), leaves a commit in doubt.
    assert not answer_lost(asyncpg.exceptions.QueryCanceledError())
    assert not answer_lost(asyncpg.exceptions.DeadlockDetectedError())
    assert answer_lost(ConnectionResetError())
    assert answer_lost(asyncpg.exceptions.ConnectionDoesNotExistError())
    fatal = asyncpg.exceptions.AdminShutdownError()
    fatal.severity = "FATAL"  # type: ignore[attr-defined]
    assert answer_lost(fatal)


class _Warned(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "transient" in record.getMessage():
            self.seen.set()


async def test_a_statement_timeout_on_an_append_kills_no_healthy_connection(
    dsn: str, admin: asyncpg.Connection
) -> None:
    """A batch the server cancelled (statement_timeout) committed nothing: its connection is healthy.

    It used to be taken for a batch whose answer was lost, and the writer then
    ended that connection's server process, which by then could be running
    another task's query.
    """
    database = await admin.fetchval("SELECT current_database()")
    await admin.execute(f'ALTER DATABASE "{database}" SET statement_timeout = 300')
    warned = _Warned()
    logger = logging.getLogger("mcp_pg_events.group_commit")
    logger.addHandler(warned)
    try:
        async with await PostgresEventStore.connect(dsn, retry_deadline=60, listen=False) as store:
            view = store.session("s")
            ref = parse_event_id(await view.store_event("1", None))
            assert ref is not None
            backends = set(
                await admin.fetch(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            # Hold the stream's append lock: the next append waits for it until its
            # statement times out, and is retried.
            await admin.execute("SELECT pg_advisory_lock($1, hashint8($2))", APPEND_LOCK, ref.stream_key)
            appending = asyncio.create_task(view.store_event("1", progress_message(1)))
            await asyncio.wait_for(warned.seen.wait(), 30)
            await admin.execute("SELECT pg_advisory_unlock($1, hashint8($2))", APPEND_LOCK, ref.stream_key)
            await asyncio.wait_for(appending, 30)
            alive = set(
                await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
            assert backends <= alive, "the writer ended a healthy connection's server process"
            assert (
                await admin.fetchval("SELECT count(*) FROM mcp_events_events WHERE message IS NOT NULL") == 1
            )
    finally:
        logger.removeHandler(warned)
        await admin.execute(f'ALTER DATABASE "{database}" RESET statement_timeout')


async def _set_revision(admin: asyncpg.Connection, revision: str, compatible_since: str | None) -> None:
    await admin.execute("UPDATE mcp_events_alembic_version SET version_num = $1", revision)
    if compatible_since is not None:
        await admin.execute(
            "CREATE OR REPLACE FUNCTION mcp_events_compatible_since() RETURNS text "
            f"LANGUAGE sql IMMUTABLE AS $$ SELECT '{compatible_since}'::text $$"
        )


async def test_a_newer_schema_that_only_added_serves_this_code(dsn: str, admin: asyncpg.Connection) -> None:
    # What the next release's additive migration leaves: a revision this code does
    # not know, still serving code of this revision.
    newer = f"{int(SCHEMA_REVISION) + 1:04d}"
    await _set_revision(admin, newer, SCHEMA_REVISION)
    async with await PostgresEventStore.connect(dsn) as store:
        view = store.session("s")
        assert await view.store_event("1", progress_message(1))


async def test_a_newer_schema_that_removed_what_this_code_needs_is_refused(
    dsn: str, admin: asyncpg.Connection
) -> None:
    newer = f"{int(SCHEMA_REVISION) + 2:04d}"
    await _set_revision(admin, newer, f"{int(SCHEMA_REVISION) + 1:04d}")
    with pytest.raises(SchemaNotReadyError, match=f"migrated to revision {newer}.*upgrade mcp-pg-events"):
        await PostgresEventStore.connect(dsn)


async def test_an_older_schema_is_refused_with_the_command_that_fixes_it(
    dsn: str, admin: asyncpg.Connection
) -> None:
    older = f"{int(OLDEST_SCHEMA) - 1:04d}"
    await _set_revision(admin, older, None)
    with pytest.raises(SchemaNotReadyError, match=f"mcp-pg-events migrate.*found revision {older}"):
        await PostgresEventStore.connect(dsn)
