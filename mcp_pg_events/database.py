"""The one layer that talks to PostgreSQL: the pool, the retry policy and the error mapping.

Everything above this module names statements (``sql.py``) and hands them here.
One policy for every call:

- a transient error (a restart, a failover, a dropped connection, too many
  connections, a deadlock) is retried with backoff until the deadline, then
  raised as ``StoreUnavailableError``;
- a missing table or function becomes ``SchemaNotReadyError``;
- anything else (a bad value, a bug) passes through unchanged, at once.

The SDK ends a session whose store raises, so an outage must be ridden out here
rather than surface at the first failure. ``DjangoConnection`` runs the same
statements under the same policy on Django's connection, for synchronous callers
in a Django process (``rest_framework.py``). Which errors are which is decided in
this module only (``is_transient``, ``answer_lost``, ``not_migrated``,
``no_partition``), on asyncpg's exception types and the connection's state, never
on message text, which the server translates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from . import metrics, sql
from .dsn import redact
from .errors import ConfigurationError, McpPgEventsError, SchemaNotReadyError, StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from asyncpg.pool import PoolConnectionProxy

    Connection = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

logger = logging.getLogger(__name__)

# The revision `mcp-pg-events migrate` brings a database to: this code's head. A
# test checks it is the migrations' head.
SCHEMA_REVISION = "0007"
# The oldest revision this code runs on: it writes the registry's columns (0006)
# and the rest_framework stores use the tasks table (0007). Raise it with every
# migration the code starts to use; migrate before deploying code that needs it.
OLDEST_SCHEMA = "0007"
EVENTS = "mcp_events_events"

NOT_MIGRATED = (
    "the mcp-pg-events tables are missing or outdated in this database: "
    "run `mcp-pg-events migrate` (or `alembic upgrade head`) first"
)

_T = TypeVar("_T")

# --- which errors are which ----------------------------------------------------------------

_TRANSIENT_SERVER_ERRORS = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, restart, cancel, timeout
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization, deadlock
)
# A value or a setting the client got wrong: the same call fails again, however often.
_PERMANENT_CLIENT_ERRORS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)


def is_transient(
    exc: BaseException,
    conn: Connection | None = None,
    pool: asyncpg.Pool[Any] | None = None,
) -> bool:
    """True when the same call may succeed if tried again a little later.

    ``conn`` is the connection the call ran on, if any, and ``pool`` the pool it
    came from: their state tells a lost connection from a misuse of a good one.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, _TRANSIENT_SERVER_ERRORS)
    if isinstance(exc, _PERMANENT_CLIENT_ERRORS):
        return False
    if pool is not None and pool.is_closing():
        # The application closed the pool (shutting down): nothing comes back.
        return False
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # A connection in a state asyncpg cannot use, e.g. one whose server process
        # ended while it was idle: the error has arrived, its end of stream not yet,
        # and asyncpg refuses the next query before sending anything. The pool
        # replaces the connection.
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "another operation is in progress" on a connection
        # that just broke; on a healthy connection it is a misuse, and permanent.
        return conn is None or _is_closed(conn)
    return False


def _is_closed(conn: Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # A pool detaches the proxy of a connection that closed under it.
        return True


def answer_lost(exc: BaseException) -> bool:
    """True when a statement's outcome is unknown: it may have committed.

    A server that reports an ERROR has ended the statement and rolled back its
    implicit transaction (a deadlock, a statement timeout, a full disk), and the
    connection is still good. Only a connection lost with no answer, or ended by
    the server (FATAL) at a moment that may follow the commit, leaves the outcome open.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "severity", None) in ("FATAL", "PANIC") or isinstance(
            exc, asyncpg.PostgresConnectionError
        )
    return True


def not_migrated(exc: BaseException) -> bool:
    """True for the errors a database without our tables or functions gives."""
    return isinstance(exc, (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError))


def no_partition(exc: BaseException) -> bool:
    """True for "no partition of relation ... found for row" on the events table.

    A check violation (23514) on the events table with no constraint named;
    matched on fields, not on the message, which the server translates to its
    lc_messages.
    """
    return (
        isinstance(exc, asyncpg.CheckViolationError)
        and getattr(exc, "table_name", None) == EVENTS
        and getattr(exc, "constraint_name", None) is None
    )


def connection_error(dsn: str, exc: BaseException) -> McpPgEventsError:
    """What a failed connect means to the user, in one line without the password.

    Unreachable (network, timeout, a server starting up or full) may pass;
    anything else (bad credentials, no such database, a malformed DSN) is the
    configuration's to fix.
    """
    if is_transient(exc):
        return StoreUnavailableError(f"cannot reach the database at {redact(dsn)}: {exc}")
    return ConfigurationError(f"cannot connect to {redact(dsn)}: {exc}")


# Connecting fails with these; they become ``connection_error``.
_CONNECT_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError)


class Backoff:
    """Exponential backoff with full jitter, bounded by a deadline."""

    __slots__ = ("_cap", "_deadline", "_delay", "_loop", "_seconds", "attempts")

    def __init__(self, deadline: float, *, first: float = 0.02, cap: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._seconds = deadline
        self._deadline = loop.time() + deadline
        self._delay = first
        self._cap = cap
        self.attempts = 0

    async def wait(self) -> bool:
        """Sleep before the next try; False when the deadline leaves no room for one."""
        self.attempts += 1
        remaining = self._deadline - self._loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, random.uniform(0, self._delay)))  # noqa: S311 - jitter, not crypto
        self._delay = min(self._cap, self._delay * 2)
        return True

    def gave_up(self, exc: BaseException, what: str = "") -> StoreUnavailableError:
        """The error once ``wait()`` said no: for how long, how many tries, the last error."""
        error = StoreUnavailableError(
            f"{what}database unavailable for {self._seconds:.1f}s ({self.attempts} attempts): {exc}"
        )
        error.__cause__ = exc
        metrics.gave_up(exc)
        logger.error("giving up: %s", error)
        return error


async def keep_session_state(conn: asyncpg.Connection[Any]) -> None:
    """A pool ``reset`` that skips asyncpg's reset query.

    asyncpg runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    on every release: a server round trip after every query, which nearly
    doubles an append's latency. The store changes no session state (no SET,
    no LISTEN on pooled connections, only transaction-level advisory locks), so
    there is nothing to reset; asyncpg still rolls back a transaction left open.
    Pass it as ``reset=`` to a pool you give the store, if that holds for your
    other uses of the pool too.
    """


async def connect_one(
    dsn: str,
    *,
    timeout: float = 60,
    application_name: str | None = None,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Connection[Any]:
    """One connection outside any pool (the listener, retention, the CLI), with the connect error mapping."""
    settings = dict(server_settings or {})
    if application_name:
        settings["application_name"] = application_name
    try:
        return await asyncpg.connect(dsn, timeout=timeout, server_settings=settings or None)
    except _CONNECT_ERRORS as exc:
        raise connection_error(dsn, exc) from exc


async def check_schema(executor: Database | Connection) -> None:
    """Raise ``SchemaNotReadyError`` unless the database is at a revision this code runs on.

    Migrations are expand/contract: a revision that only adds keeps the oldest
    code it serves in ``mcp_events_compatible_since()``, so that the previous
    release keeps running while the next one migrates (a rolling deploy); a
    revision that removes something raises it. This code runs on any revision
    from ``OLDEST_SCHEMA`` on whose compatible-since is at most ``SCHEMA_REVISION``.
    """
    try:
        version = await executor.fetchval(sql.SCHEMA_VERSION)
    except asyncpg.UndefinedTableError as exc:
        raise SchemaNotReadyError(NOT_MIGRATED) from exc
    if version is None or not str(version).isdigit():
        raise SchemaNotReadyError(f"{NOT_MIGRATED} (found revision {version})")
    if int(version) < int(OLDEST_SCHEMA):
        raise SchemaNotReadyError(f"{NOT_MIGRATED} (found revision {version}, need {OLDEST_SCHEMA} or newer)")
    if int(version) <= int(SCHEMA_REVISION):
        return
    since = await executor.fetchval(sql.COMPATIBLE_SINCE)
    if since is None or int(since) > int(SCHEMA_REVISION):
        raise SchemaNotReadyError(
            f"the database was migrated to revision {version}, which no longer serves this version "
            f"of mcp-pg-events (revision {SCHEMA_REVISION}; the schema serves {since} and newer): "
            "upgrade mcp-pg-events"
        )


class Database:
    """The pool and the policy for every call made on it.

    Args:
        pool: an asyncpg pool. Borrowed unless ``owns_pool``: then ``close()`` closes it.
        retry_deadline: seconds a transient error is retried before
            ``StoreUnavailableError``.
        dsn: where the pool connects, for connections outside it (the listener).
    """

    __slots__ = ("_owns_pool", "dsn", "pool", "retry_deadline")

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        retry_deadline: float,
        owns_pool: bool = False,
        dsn: str | None = None,
    ) -> None:
        self.pool = pool
        self.retry_deadline = retry_deadline
        self.dsn = dsn
        self._owns_pool = owns_pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int, max_size: int, retry_deadline: float) -> Database:
        """Open a pool that the returned ``Database`` owns."""
        try:
            pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, reset=keep_session_state
            )
        except _CONNECT_ERRORS as exc:
            raise connection_error(dsn, exc) from exc
        return cls(pool, retry_deadline=retry_deadline, owns_pool=True, dsn=dsn)

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    def backoff(self, deadline: float | None = None, *, cap: float = 1.0) -> Backoff:
        """A backoff until ``deadline`` seconds from now (the retry deadline by default)."""
        return Backoff(self.retry_deadline if deadline is None else deadline, cap=cap)

    def is_transient(self, exc: BaseException, conn: Connection | None = None) -> bool:
        return is_transient(exc, conn, self.pool)

    # Each call is retried under the policy unless ``retry=False``: then it is tried
    # once and its error raised as it is (a missing schema aside), for a caller with
    # a retry loop of its own (the writer) or a statement a later one makes good (a
    # wake-up). ``deadline`` shortens the retries for a caller that answers someone
    # waiting (an HTTP request). Retried calls must be reads or idempotent writes.

    async def fetch(
        self, query: str, *args: Any, retry: bool = True, deadline: float | None = None
    ) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(query, *args), retry, deadline)

    async def fetchrow(
        self, query: str, *args: Any, retry: bool = True, deadline: float | None = None
    ) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(query, *args), retry, deadline)

    async def fetchval(
        self, query: str, *args: Any, retry: bool = True, deadline: float | None = None
    ) -> Any:
        return await self._run(lambda conn: conn.fetchval(query, *args), retry, deadline)

    async def execute(self, query: str, *args: Any, retry: bool = True, deadline: float | None = None) -> str:
        return await self._run(lambda conn: conn.execute(query, *args), retry, deadline)

    async def _run(
        self, call: Callable[[Connection], Awaitable[_T]], retry: bool, deadline: float | None = None
    ) -> _T:
        backoff: Backoff | None = None
        while True:
            conn: PoolConnectionProxy[Any] | None = None
            try:
                conn = await self.pool.acquire()
                return await call(conn)
            except Exception as exc:
                if not_migrated(exc):
                    raise SchemaNotReadyError(NOT_MIGRATED) from exc
                # Before the release: a released connection tells nothing of its state.
                if not retry or not self.is_transient(exc, conn):
                    raise
                error = exc
            finally:
                if conn is not None:
                    await self.pool.release(conn)
            backoff = backoff or self.backoff(deadline)
            if not await backoff.wait():
                raise backoff.gave_up(error) from error
            metrics.retrying(error)

    async def acquire(self) -> PoolConnectionProxy[Any]:
        """A pool connection for the caller to keep a while (the writer's); give it back with ``release``."""
        return await self.pool.acquire()

    async def release(self, conn: PoolConnectionProxy[Any]) -> None:
        await self.pool.release(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy[Any]]:
        """A pool connection for the length of a block (a run of statements, a CALL)."""
        async with self.pool.acquire() as conn:
            yield conn

    async def connect_outside_pool(
        self,
        dsn: str | None,
        application_name: str,
        timeout: float,
        server_settings: dict[str, str] | None = None,
    ) -> asyncpg.Connection[Any]:
        """A connection of its own, e.g. for LISTEN, which a pooled connection loses on release."""
        target = dsn or self.dsn
        if target is None:
            raise ConfigurationError("no DSN to open a connection outside the pool with")
        return await connect_one(
            target, timeout=timeout, application_name=application_name, server_settings=server_settings
        )

    async def check_schema(self) -> None:
        await check_schema(self)


# --- Django's connection, for synchronous callers ----------------------------------------

_PARAMETER = re.compile(r"\$(\d+)")
# SQLSTATE classes that the same statement may get past a little later: connection
# exception, insufficient resources, operator intervention, transaction rollback.
_TRANSIENT_CLASSES = ("08", "53", "57", "40")
_NOT_MIGRATED_STATES = ("42P01", "42883")  # undefined table, undefined function


def to_format_style(query: str, args: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """``query`` with ``$n`` parameters as the ``%s`` that Django's cursor takes, and its arguments in order.

    One text per statement in ``sql.py``, whichever driver runs it; a ``%`` of
    the statement's own is doubled so the driver does not read it as a placeholder.
    """
    order: list[int] = []

    def placeholder(match: re.Match[str]) -> str:
        order.append(int(match[1]) - 1)
        return "%s"

    text = _PARAMETER.sub(placeholder, query.replace("%", "%%"))
    return text, [args[i] for i in order]


class DjangoConnection:
    """The statements of ``sql.py`` on Django's connection of one database alias, in the calling thread.

    For synchronous callers where that connection serves (a sync view, a task
    worker, a management command), so that they need no pool of ours. The same
    policy as ``Database``: a missing table or function is ``SchemaNotReadyError``;
    a transient error (connection lost, server restarting, too many
    connections, deadlock) is retried with backoff on a new connection until the
    deadline, then ``StoreUnavailableError``; anything else passes through. Django
    is imported on first use, so that this module never needs it.

    Rows come back as tuples; bytea as ``bytes`` (psycopg 2 gives a memoryview).
    """

    __slots__ = ("alias", "retry_deadline")

    def __init__(self, alias: str, *, retry_deadline: float) -> None:
        self.alias = alias
        self.retry_deadline = retry_deadline

    def fetchrow(self, query: str, *args: Any) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._run(query, args, lambda cursor: cursor.fetchone())
        return row

    def fetchval(self, query: str, *args: Any) -> Any:
        row = self.fetchrow(query, *args)
        return None if row is None else row[0]

    def execute(self, query: str, *args: Any) -> int:
        """Run a statement; the number of rows it touched."""
        count: int = self._run(query, args, lambda cursor: cursor.rowcount)
        return count

    def _run(self, query: str, args: tuple[Any, ...], result: Callable[[Any], Any]) -> Any:
        from django.db import connections

        text, params = to_format_style(query, args)
        deadline = time.monotonic() + self.retry_deadline
        delay = 0.02
        attempts = 0
        while True:
            connection = connections[self.alias]
            attempts += 1
            try:
                with connection.cursor() as cursor:
                    cursor.execute(text, params)
                    value = result(cursor)
            except Exception as exc:
                state = _sqlstate(exc)
                if state in _NOT_MIGRATED_STATES:
                    raise SchemaNotReadyError(NOT_MIGRATED) from exc
                if connection.in_atomic_block or not _django_transient(exc, state):
                    raise
                # A connection that failed this way is of no more use: the next
                # cursor() opens a new one.
                connection.close()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreUnavailableError(
                        f"database unavailable for {self.retry_deadline:.1f}s ({attempts} attempts): {exc}"
                    ) from exc
                time.sleep(min(remaining, random.uniform(0, delay)))  # noqa: S311 - jitter, not crypto
                delay = min(1.0, delay * 2)
                continue
            return _plain(value)


def _sqlstate(exc: BaseException) -> str | None:
    # Django wraps the driver's error; psycopg 3 names the code sqlstate, psycopg 2 pgcode.
    for error in (exc, exc.__cause__):
        state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _django_transient(exc: BaseException, state: str | None) -> bool:
    from django.db import InterfaceError, OperationalError

    if state is not None:
        return state[:2] in _TRANSIENT_CLASSES
    # No SQLSTATE: the connection broke before the server answered.
    return isinstance(exc, (OperationalError, InterfaceError))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(bytes(item) if isinstance(item, memoryview) else item for item in value)
    return value
