"""The migrations: upgrade, no drift from the schema, downgrade, and living beside a host app."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from alembic import command
from alembic.script import ScriptDirectory

from mcp_pg_events import PostgresEventStore, migrate, run_retention
from mcp_pg_events.database import SCHEMA_REVISION

from .deployments import new_roles, quote_ident
from .messages import notification

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


async def test_in_a_schema_named_anyhow_every_function_is_pinned_to_it_and_works(empty_dsn: str) -> None:
    schema = 'mcp events "tenant"'
    async with new_roles(empty_dsn, "own") as ((owner,), password):
        admin = await asyncpg.connect(empty_dsn)
        try:
            await admin.execute(f"CREATE SCHEMA {quote_ident(schema)} AUTHORIZATION {quote_ident(owner)}")
            # How an application puts its tables in a schema of its own.
            await admin.execute(f"ALTER ROLE {quote_ident(owner)} SET search_path = {quote_ident(schema)}")
        finally:
            await admin.close()
        parts = urlsplit(empty_dsn)
        owner_dsn = urlunsplit(parts._replace(netloc=f"{owner}:{password}@{parts.netloc.rpartition('@')[2]}"))
        await asyncio.to_thread(migrate.upgrade, owner_dsn)
        conn = await asyncpg.connect(owner_dsn)
        try:
            events_schema = "SELECT relnamespace::regnamespace::text FROM pg_class WHERE relname = $1"
            assert await conn.fetchval(events_schema, "mcp_events_events") == quote_ident(schema)
            configs = await conn.fetch(
                "SELECT p.proname, p.proconfig FROM pg_proc p WHERE p.proname LIKE 'mcp\\_events\\_%' "
                "AND p.prokind = 'f' AND p.pronamespace = to_regnamespace($1)",
                quote_ident(schema),
            )
            assert len(configs) == 13
            assert {tuple(r["proconfig"]) for r in configs} == {
                (f"search_path=pg_catalog, {quote_ident(schema)}, pg_temp",)
            }
            # The functions' own DDL lands in that schema, and retention finds it there.
            assert await conn.fetchval("SELECT mcp_events_ensure_partitions(5)") == 3
            async with await PostgresEventStore.connect(owner_dsn) as store:
                for i in range(25):
                    await store.session("s").store_event("1", None if i == 0 else notification(str(i)))
            in_schema = await conn.fetchval(
                "SELECT count(*) FROM mcp_events_partitions() p JOIN pg_class c ON c.oid = p.relid "
                "WHERE p.attached AND c.relnamespace = to_regnamespace($1)",
                quote_ident(schema),
            )
            assert in_schema == 5
            report = await run_retention(owner_dsn, ttl=timedelta(0))
            assert report.complete and report.partitions_dropped >= 1
        finally:
            await conn.close()
        await asyncio.to_thread(migrate.downgrade, owner_dsn, "0003")
        await asyncio.to_thread(migrate.upgrade, owner_dsn)


async def test_alembic_upgrade_head_without_a_dsn_is_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PG_EVENTS_") and k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "upgrade", "head",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert err.decode().splitlines()[-1] == (
        "alembic: error: no database given: pass a DSN or set MCP_PG_EVENTS_DSN (or DATABASE_URL), "
        "e.g. postgresql://user@localhost:5432/app"
    )
    assert b"Traceback" not in err
