"""The command line, run as users run it: a separate process, judged by exit status and output."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from mcp_pg_events.database import SCHEMA_REVISION


async def start_cli(
    *args: str, stdout: int = asyncio.subprocess.PIPE, **env: str
) -> asyncio.subprocess.Process:
    """The command, its stderr piped; of ``MCP_PG_EVENTS_*`` and ``DATABASE_URL`` it sees ``env``'s only."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("MCP_PG_EVENTS_") and k != "DATABASE_URL"
    }
    environment.update(env)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.cli", *args,
        env=environment, stdout=stdout, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_cli(*args: str, **env: str) -> tuple[int, str, str]:
    process = await start_cli(*args, **env)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_migrate_creates_the_schema_and_says_what_it_does(empty_dsn: str) -> None:
    code, _, err = await run_cli("migrate", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 0, err
    assert "Running upgrade" in err and "migrations done" in err
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT version_num FROM mcp_events_alembic_version") == SCHEMA_REVISION
    finally:
        await conn.close()
    # A second run is a no-op, not an error.
    code, _, err = await run_cli("migrate", "--dsn", empty_dsn)
    assert code == 0, err


async def test_migrate_sql_prints_the_ddl_without_a_database() -> None:
    code, out, err = await run_cli("migrate", "--sql")
    assert code == 0, err
    assert "CREATE TABLE mcp_events_events" in out
    assert "PARTITION BY RANGE (seq)" in out
    assert "mcp_events_alembic_version" in out


async def test_migrate_sql_into_a_closed_pipe_ends_quietly() -> None:
    read, write = os.pipe()
    os.close(read)
    process = await start_cli("migrate", "--sql", stdout=write)
    os.close(write)
    _, err = await process.communicate()
    assert process.returncode == 0
    assert b"error" not in err


async def test_no_dsn_is_one_line_naming_the_variable() -> None:
    code, _, err = await run_cli("migrate")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert "MCP_PG_EVENTS_DSN" in err and "Traceback" not in err


async def test_unreachable_database_is_one_line_without_the_password() -> None:
    code, _, err = await run_cli("migrate", "--dsn", "postgresql://me:hunter2@127.0.0.1:1/nowhere")
    assert code == 2
    assert err.splitlines()[-1].startswith("mcp-pg-events: error: cannot reach"), err
    assert "Traceback" not in err and "hunter2" not in err


async def test_a_database_that_does_not_exist_is_one_line(server_dsn: str) -> None:
    from .conftest import with_database

    code, _, err = await run_cli("migrate", "--dsn", with_database(server_dsn, "mcp_events_no_such_db"))
    assert code == 2
    assert err.splitlines()[-1].startswith("mcp-pg-events: error:"), err
    assert "does not exist" in err and "Traceback" not in err


async def test_help_shows_the_environment_variables() -> None:
    code, out, _ = await run_cli("migrate", "--help")
    assert code == 0
    assert "MCP_PG_EVENTS_DSN" in out and "MCP_PG_EVENTS_SQL" in out
