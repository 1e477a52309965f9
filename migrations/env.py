"""Alembic environment for mcp-pg-events.

It keeps its own version table and looks only at ``mcp_events_*`` objects, so it can
share a database (and a host application's own alembic setup) without touching it.
"""

import asyncio
import sys
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from mcp_pg_events.dsn import resolve_dsn, sqlalchemy_url
from mcp_pg_events.schema import VERSION_TABLE, metadata, owns

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Only tables need filtering: the host app's, and our own partitions.
    if type_ == "table":
        return owns(name)
    return True


def _url() -> str:
    dsn = config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get("dsn")
    return sqlalchemy_url(resolve_dsn(dsn))


_OPTIONS = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,
    "include_name": _include_name,
    "compare_type": True,
}


def run_offline() -> None:
    # Offline mode only needs a dialect, never a server.
    context.configure(
        url=config.attributes.get("offline_url") or "postgresql://",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        # A script for a caller's own transaction (migrate.script) has no BEGIN/COMMIT.
        transactional_ddl=not config.attributes.get("bare"),
        **_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    context.configure(connection=connection, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


def _run() -> None:
    if context.is_offline_mode():
        run_offline()
    else:
        asyncio.run(_run_online())


if config.attributes.get("from_code"):
    _run()  # mcp-pg-events migrate, migrate.upgrade(): the caller reports errors its own way
else:
    # `alembic upgrade head`: what a user can fix in one line on stderr, not a traceback.
    from mcp_pg_events.cli import describe_error

    try:
        _run()
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        print(f"alembic: error: {message}", file=sys.stderr)
        sys.exit(2)
