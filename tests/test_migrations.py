"""The migrations: upgrade, no drift from the schema, downgrade, and living beside a host app."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
from alembic import command
from alembic.script import ScriptDirectory

from mcp_pg_events import migrate
from mcp_pg_events.database import SCHEMA_REVISION

ROOT = Path(__file__).resolve().parent.parent


async def our_tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE 'mcp\\_events\\_%'")
    return {r["tablename"] for r in rows}


def test_the_code_expects_the_newest_migration() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_current_head() == SCHEMA_REVISION


async def test_upgrade_check_downgrade_upgrade_beside_a_host_app(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        # The host application's own alembic and tables must survive us.
        await conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        await conn.execute("INSERT INTO alembic_version VALUES ('hostapp1')")
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")

        await asyncio.to_thread(migrate.upgrade, empty_dsn)
        assert await conn.fetchval("SELECT version_num FROM mcp_events_alembic_version") == SCHEMA_REVISION
        # No drift between the migrations and schema.py, partitions and host tables ignored.
        await asyncio.to_thread(command.check, migrate.alembic_config(empty_dsn))

        await asyncio.to_thread(migrate.downgrade, empty_dsn, "base")
        assert await our_tables(conn) == {"mcp_events_alembic_version"}
        assert await conn.fetchval("SELECT count(*) FROM mcp_events_alembic_version") == 0

        await asyncio.to_thread(migrate.upgrade, empty_dsn)
        assert "mcp_events_events" in await our_tables(conn)
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == "hostapp1"
        assert await conn.fetchval("SELECT to_regclass('orders') IS NOT NULL")
    finally:
        await conn.close()


async def test_alembic_upgrade_head_from_the_repository_root(empty_dsn: str) -> None:
    env = {**os.environ, "MCP_PG_EVENTS_DSN": empty_dsn}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "alembic",
        "upgrade",
        "head",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert b"Running upgrade" in err
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT version_num FROM mcp_events_alembic_version") == SCHEMA_REVISION
    finally:
        await conn.close()
