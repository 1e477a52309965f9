"""The ``mcp-pg-events`` command. Every flag has an environment variable, shown in ``--help``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import asyncpg
from sqlalchemy.exc import SQLAlchemyError

from .config import DSN_ENV, FALLBACK_DSN_ENV, redact, resolve_dsn
from .errors import McpPgEventsError


def _env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-pg-events",
        description="PostgreSQL event log for resumable MCP Streamable HTTP streams.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the mcp_events_* tables",
        description="Migrate the database to the schema this version needs (alembic, own version table).",
    )
    migrate.add_argument(
        "--dsn",
        default=None,
        help=f"PostgreSQL DSN [env: {DSN_ENV}, else {FALLBACK_DSN_ENV}]",
    )
    migrate.add_argument(
        "--revision",
        default=_env_default("MCP_PG_EVENTS_REVISION", "head"),
        help="target revision [env: MCP_PG_EVENTS_REVISION; default: head]",
    )
    migrate.add_argument(
        "--sql",
        action="store_true",
        default=_env_default("MCP_PG_EVENTS_SQL", "") not in ("", "0", "false"),
        help="print the SQL instead of running it; needs no database [env: MCP_PG_EVENTS_SQL]",
    )
    return parser


def _migrate(args: argparse.Namespace) -> int:
    from . import migrate

    if args.sql:
        migrate.print_sql(args.revision)
        return 0
    dsn = resolve_dsn(args.dsn)
    print(f"migrating {redact(dsn)} to {args.revision}", file=sys.stderr)
    migrate.upgrade(dsn, args.revision)
    print("migrations done", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Alembic's log says which migration runs: that is the progress of `migrate`.
    for name in ("alembic.runtime.migration", "mcp_pg_events"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        if args.command == "migrate":
            return _migrate(args)
    except McpPgEventsError as exc:
        print(f"mcp-pg-events: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError) as exc:
        print(f"mcp-pg-events: error: cannot reach the database: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Alembic reaches the database through SQLAlchemy, which wraps the driver's error.
        cause = getattr(exc, "orig", None) or exc
        cause = cause.__cause__ or cause
        message = " ".join(str(cause).split())
        print(f"mcp-pg-events: error: {type(cause).__name__}: {message}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
