"""A real PostgreSQL for every test, found or started by the tests themselves.

Where the server comes from, first match wins:
1. ``MCP_PG_EVENTS_TEST_DSN`` (a server the caller runs; tests create and drop
   their own databases on it, never touching existing ones);
2. a PostgreSQL container, when testcontainers finds a Docker daemon;
3. an embedded PostgreSQL from the ``pgserver`` package, in a temporary folder.

The schema is migrated once into a template database, and each test gets its own
copy of it: tests are isolated, NOTIFY channels included.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from mcp_pg_events import PostgresEventStore, migrate

from .deployments import deployment  # noqa: F401 - a fixture, for every test module
from .proxy import FlakyProxy

TEST_DSN_ENV = "MCP_PG_EVENTS_TEST_DSN"


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    # docker-py leaks the socket of a failed ping; collect it here, not in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL server the tests may create databases on."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        yield dsn
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        import pgserver

        with (
            tempfile.TemporaryDirectory(prefix="mcp-pg-events-test-") as folder,
            pgserver.get_server(folder, cleanup_mode="stop") as server,
        ):
            yield server.get_uri()


async def _admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(server_dsn: str) -> Iterator[str]:
    """Name of a database migrated to head, copied for each test."""
    name = f"mcp_events_test_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"'))
    try:
        migrate.upgrade(with_database(server_dsn, name))
        yield name
    finally:
        asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def _database(server_dsn: str, template: str | None) -> AsyncIterator[str]:
    """A database of the test's own (a copy of ``template``, else empty), dropped afterwards."""
    name = f"mcp_events_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    await _admin(server_dsn, f'CREATE DATABASE "{name}"{clause}')
    try:
        yield with_database(server_dsn, name)
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def dsn(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database of the test's own."""
    async with _database(server_dsn, template_database) as dsn:
        yield dsn


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """DSN of a fresh database that has not been migrated."""
    async with _database(server_dsn, None) as dsn:
        yield dsn


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresEventStore]:
    """A store on the test's own database."""
    async with await PostgresEventStore.connect(dsn, retry_deadline=5.0) as store:
        yield store


@pytest.fixture
async def admin(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A separate connection to the test's database, for looking behind the store's back."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[FlakyProxy]:
    """A TCP proxy in front of the test's database that can drop connections on demand."""
    proxy = FlakyProxy(dsn)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
