"""The command line, run as users run it: a separate process, judged by exit status and output."""

from __future__ import annotations

import asyncio
import os
import sys
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from mcp_pg_events.database import SCHEMA_REVISION
from mcp_pg_events.dsn import redact


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


async def test_migrate_says_which_revision_the_database_is_at_and_keeps_alembic_quiet(
    empty_dsn: str,
) -> None:
    code, _, err = await run_cli("migrate", "--revision", "0005", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 0, err
    assert "from no schema yet to revision 0005\n" in err
    assert err.endswith(f"{redact(empty_dsn)} is at schema revision 0005\n"), err
    assert "Context impl" not in err and "Will assume" not in err
    code, _, err = await run_cli("migrate", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 0, err
    assert f"from revision 0005 to revision {SCHEMA_REVISION}" in err
    assert "Running upgrade 0005 -> 0006" in err
    code, _, err = await run_cli("migrate", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 0, err
    assert err == f"{redact(empty_dsn)} is at schema revision {SCHEMA_REVISION}: nothing to do\n"


async def test_migrate_to_a_revision_that_does_not_exist_is_one_line(empty_dsn: str) -> None:
    code, _, err = await run_cli("migrate", "--revision", "0099", MCP_PG_EVENTS_DSN=empty_dsn)
    assert code == 2
    assert err == (
        "mcp-pg-events: error: --revision 0099: no such revision; this mcp-pg-events has 0001 to "
        f"{SCHEMA_REVISION} (head)\n"
    )


async def test_migrate_against_a_database_ahead_of_the_code_is_one_line(dsn: str) -> None:
    ahead = f"{int(SCHEMA_REVISION) + 1:04d}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE mcp_events_alembic_version SET version_num = $1", ahead)
    finally:
        await conn.close()
    code, _, err = await run_cli("migrate", "--dsn", dsn)
    assert code == 2
    assert err == (
        f"mcp-pg-events: error: {redact(dsn)} is at schema revision {ahead}, newer than this mcp-pg-events "
        f"knows (up to {SCHEMA_REVISION}): nothing to migrate here; migrate with the newer mcp-pg-events\n"
    )


async def test_a_missing_database_is_named_without_its_password(server_dsn: str) -> None:
    from .conftest import with_database

    parts = urlsplit(with_database(server_dsn, "mcp_events_no_such_db"))
    host = parts.netloc.rsplit("@", 1)[-1]
    missing = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:hunter2@{host}"))
    code, _, err = await run_cli("migrate", "--dsn", missing)
    assert code == 2
    assert err.startswith(f"mcp-pg-events: error: cannot connect to {redact(missing)}: "), err
    assert "mcp_events_no_such_db" in redact(missing) and "hunter2" not in err


async def test_version_names_the_package_the_schema_and_the_sdk() -> None:
    from importlib.metadata import version

    code, out, _ = await run_cli("--version")
    assert code == 0
    ours, sdk = version("mcp-pg-events"), version("mcp")
    assert out == f"mcp-pg-events {ours} (schema revision {SCHEMA_REVISION}; mcp {sdk})\n"
