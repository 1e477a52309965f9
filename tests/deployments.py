"""A deployment as docs/operations.md describes it, for tests that run as least-privileged roles.

An ordinary (non-superuser) role owns the database and runs the migrations, then
applies migrations/grants.sql with psql (or, without psql, as the file says); the
MCP server and retention then run as roles that have exactly those grants.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from mcp_pg_events import PostgresEventStore, migrate

ROOT = Path(__file__).resolve().parent.parent
GRANTS = ROOT / "migrations" / "grants.sql"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grants_without_psql(runtime: str, retention: str) -> str:
    """grants.sql as its header says to run it without psql (the ``sed`` there, in Python)."""
    lines = [line for line in GRANTS.read_text().splitlines() if not line.startswith("\\")]
    script = "\n".join(lines)
    return script.replace(':"runtime_role"', quote_ident(runtime)).replace(
        ':"retention_role"', quote_ident(retention)
    )


async def apply_grants(owner_dsn: str, runtime: str, retention: str, *, psql: str | None) -> None:
    """Apply grants.sql as the owner: with ``psql`` as documented, else the way the file says without it."""
    if psql is None:
        conn = await asyncpg.connect(owner_dsn)
        try:
            await conn.execute(grants_without_psql(runtime, retention))
        finally:
            await conn.close()
        return
    process = await asyncio.create_subprocess_exec(
        psql, "-X", "-q", owner_dsn, "-v", f"runtime_role={runtime}", "-v", f"retention_role={retention}",
        "-f", str(GRANTS), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out + err).decode()
    # Should the file lose its ON_ERROR_STOP, psql would go on after an error and exit 0.
    assert b"ERROR" not in err, err.decode()


@dataclass
class Deployment:
    """A database that ``owner`` owns and migrated, with grants.sql applied for the two other roles."""

    admin_dsn: str
    owner: str
    runtime: str
    retention: str
    password: str

    def dsn(self, role: str) -> str:
        parts = urlsplit(self.admin_dsn)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{role}:{self.password}@{host}"))

    @asynccontextmanager
    async def connect(self, role: str) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.dsn(role))
        try:
            yield conn
        finally:
            await conn.close()

    @asynccontextmanager
    async def store(self, **options: Any) -> AsyncIterator[PostgresEventStore]:
        """A store connected as the runtime role."""
        async with await PostgresEventStore.connect(
            self.dsn(self.runtime), retry_deadline=5, **options
        ) as store:
            yield store


@asynccontextmanager
async def new_roles(admin_dsn: str, *kinds: str) -> AsyncIterator[tuple[list[str], str]]:
    """Login roles with a shared random password; all they own and were granted here goes with them."""
    names = [f"mcp_events_{kind}_{secrets.token_hex(4)}" for kind in kinds]
    password = secrets.token_hex(16)
    created: list[str] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            # A password, so that the roles log in wherever the server asks for one.
            await admin.execute(f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD '{password}'")
            created.append(name)
        yield names, password
    finally:
        if created:
            quoted = ", ".join(map(quote_ident, created))
            await admin.execute(f"REASSIGN OWNED BY {quoted} TO CURRENT_USER; DROP OWNED BY {quoted}")
            await admin.execute(f"DROP ROLE {quoted}")
        await admin.close()


@pytest.fixture
async def deployment(empty_dsn: str) -> AsyncIterator[Deployment]:
    async with new_roles(empty_dsn, "own", "rt", "rn") as ((owner, runtime, retention), password):
        admin = await asyncpg.connect(empty_dsn)
        try:
            # The database's owner may create in its schema public (PostgreSQL 15+),
            # as an application's database owner usually does; on 14 PUBLIC may too.
            database = await admin.fetchval("SELECT current_database()")
            await admin.execute(f"ALTER DATABASE {quote_ident(database)} OWNER TO {quote_ident(owner)}")
            if admin.get_server_version().major < 15:
                await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # as the docs say
        finally:
            await admin.close()
        deployed = Deployment(empty_dsn, owner, runtime, retention, password)
        await asyncio.to_thread(migrate.upgrade, deployed.dsn(owner))
        await apply_grants(deployed.dsn(owner), runtime, retention, psql=shutil.which("psql"))
        yield deployed
