"""The ``mcp-pg-events`` command. Every flag has an environment variable, shown in ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.exc import SQLAlchemyError

from .database import SCHEMA_REVISION
from .dsn import DSN_ENV, FALLBACK_DSN_ENV, redact, resolve_dsn
from .embedded import DATA_ENV, default_data_dir, embedded_postgres
from .errors import ConfigurationError, McpPgEventsError
from .retention import run_retention
from .settings import MAX_PARTITIONS_AHEAD, RetentionSettings, env_name, format_duration, parse_duration

# Retention's defaults, written once in settings.py.
_RETENTION = RetentionSettings()


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: object,
    help: str,
    type: Any = str,
    shown: str | None = None,
) -> None:
    """A flag whose default comes from ``env``; argparse checks that value like a typed one.

    ``shown`` describes a default that is worked out later (None in the namespace).
    """
    parser.add_argument(
        flag,
        type=type,
        default=os.environ.get(env, default),
        help=f"{help} [env: {env}; default: {default if shown is None else shown}]",
    )


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def _switch(parser: argparse.ArgumentParser, flag: str, env: str, help: str) -> None:
    """An on/off flag, also on when ``env`` is set to anything but empty, 0 or false."""
    on = os.environ.get(env, "").lower() not in ("", "0", "false", "no")
    parser.add_argument(flag, action="store_true", default=on, help=f"{help} [env: {env}]")


def _dsn_option(parser: argparse.ArgumentParser) -> None:
    # Resolved later, so that the error for a missing DSN names both variables.
    parser.add_argument(
        "--dsn", default=None, help=f"PostgreSQL DSN [env: {DSN_ENV}, else {FALLBACK_DSN_ENV}]"
    )


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
    _dsn_option(migrate)
    _option(migrate, "--revision", "MCP_PG_EVENTS_REVISION", "head", "target revision")
    _switch(migrate, "--sql", "MCP_PG_EVENTS_SQL", "print the SQL instead of running it; needs no database")

    demo = commands.add_parser(
        "demo",
        help="show a dropped MCP stream resumed with nothing lost (embedded PostgreSQL without a DSN)",
        description=(
            "Serve an MCP tool that streams progress over Streamable HTTP, drop the client's stream "
            "half-way, resume it with Last-Event-ID, and check that nothing was lost or doubled. "
            "Without a DSN it runs an embedded PostgreSQL in its own folder (kept between runs)."
        ),
    )
    _dsn_option(demo)
    _option(demo, "--data-dir", DATA_ENV, default_data_dir(), "folder of the embedded PostgreSQL", Path)
    _switch(
        demo,
        "--serve",
        "MCP_PG_EVENTS_DEMO_SERVE",
        "only run the server, for a client such as the MCP Inspector",
    )
    _option(demo, "--port", "MCP_PG_EVENTS_DEMO_PORT", 8000, "port of --serve on 127.0.0.1", int)
    _option(demo, "--events", "MCP_PG_EVENTS_DEMO_EVENTS", 10, "progress notifications the tool sends", int)
    _option(
        demo, "--drop-after", "MCP_PG_EVENTS_DEMO_DROP_AFTER", 4, "notifications before the client drops", int
    )
    _option(demo, "--pace", "MCP_PG_EVENTS_DEMO_PACE", 0.05, "seconds between notifications", float)

    retention = commands.add_parser(
        "retention",
        help="delete expired events, keep partitions ahead, clear ended sessions (cron, sidecar)",
        description=(
            "Drop whole expired partitions (detach, then drop), delete the remaining expired events in "
            "small batches, oldest first, create partitions ahead of the sequence, roll partitions over "
            "by time, and remove the events of ended sessions and the streams and sessions left empty. "
            "One run at a time per database: a second one says so and exits 0. Safe to kill at any "
            "point; the next run finishes the job. Durations: 90s, 30m, 1h, 7d, 1h30m."
        ),
    )
    _dsn_option(retention)
    _option(
        retention,
        "--ttl",
        env_name("ttl"),
        format_duration(_RETENTION.ttl),
        "events older than this go",
        _duration,
    )
    _switch(retention, "--dry-run", "MCP_PG_EVENTS_DRY_RUN", "print what would go and change nothing")
    _switch(retention, "--loop", "MCP_PG_EVENTS_LOOP", "keep running, once every --interval (a sidecar)")
    _option(
        retention,
        "--interval",
        env_name("interval"),
        format_duration(_RETENTION.interval),
        "time between --loop runs",
        _duration,
    )
    _option(
        retention,
        "--batch-size",
        env_name("batch_size"),
        _RETENTION.batch_size,
        "events deleted per transaction",
        _positive_int,
    )
    _option(
        retention,
        "--partitions-ahead",
        env_name("partitions_ahead"),
        _RETENTION.partitions_ahead,
        f"partitions kept ready above the sequence (at most {MAX_PARTITIONS_AHEAD})",
        _positive_int,
    )
    _option(
        retention,
        "--partition-max-age",
        env_name("partition_max_age"),
        None,
        "start a new partition when the one in use holds an event older than this; also how long "
        "expired events may wait to go with their partition instead of row by row",
        _duration,
        shown="a quarter of the --ttl",
    )
    _option(
        retention,
        "--ended-grace",
        env_name("ended_grace"),
        format_duration(_RETENTION.ended_grace),
        "events of sessions that ended longer ago than this go too, whatever their age",
        _duration,
    )
    _option(
        retention,
        "--lock-timeout",
        env_name("lock_timeout"),
        format_duration(_RETENTION.lock_timeout),
        "how long a detach, drop or roll-over may wait for its lock (appends wait behind it) before "
        "leaving it to the next run",
        _duration,
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    from . import migrate
    from .demo import say

    if not 1 <= args.drop_after < args.events:
        raise ConfigurationError(f"--drop-after must be from 1 to --events - 1 ({args.events - 1})")
    dsn = args.dsn or os.environ.get(DSN_ENV) or os.environ.get(FALLBACK_DSN_ENV)
    with contextlib.ExitStack() as stack:
        if dsn:
            say(f"database {redact(dsn)}")
        else:
            folder = args.data_dir
            reused = (folder / "PG_VERSION").exists()
            say(f"database embedded PostgreSQL in {folder} ({'reused' if reused else 'new'})")
            dsn = stack.enter_context(embedded_postgres(folder))
        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
        migrate.upgrade(dsn)
        say(f"schema   migrated to revision {SCHEMA_REVISION}")
        return asyncio.run(_demo_async(dsn, args))


async def _demo_async(dsn: str, args: argparse.Namespace) -> int:
    from .demo import run_demo, say, serve_forever
    from .store import PostgresEventStore

    async with await PostgresEventStore.connect(dsn) as store:
        if args.serve:
            await serve_forever(store, args.port, args.pace)
            return 0
        ok = await run_demo(store, events=args.events, drop_after=args.drop_after, pace=args.pace, say=say)
    return 0 if ok else 1


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


def _retention(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    return asyncio.run(_retention_async(dsn, args))


async def _retention_async(dsn: str, args: argparse.Namespace) -> int:

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    settings = RetentionSettings(
        ttl=args.ttl,
        batch_size=args.batch_size,
        ended_grace=args.ended_grace,
        partition_max_age=args.partition_max_age,
        partitions_ahead=args.partitions_ahead,
        lock_timeout=args.lock_timeout,
        interval=args.interval,
    )

    async def once() -> None:
        report = await run_retention(dsn, settings=settings, dry_run=args.dry_run, progress=progress)
        # A locked-out run has said so in its progress line already.
        if not report.locked_out:
            print(report.summary(), flush=True)

    if not args.loop:
        await once()
        return 0
    # A sidecar is stopped with SIGTERM: between runs that is a normal end. (A run
    # killed half-way is safe too; the next one finishes it.)
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    progress(f"running retention every {format_duration(settings.interval)}")
    while not stop.is_set():
        try:
            await once()
        except ConfigurationError:
            raise
        except Exception as exc:
            # The database may come back, or be migrated, before the next run.
            message = _describe(exc)
            if message is None:
                raise
            print(f"mcp-pg-events: error: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.interval.total_seconds())
    progress("stopped")
    return 0


def _describe(exc: BaseException) -> str | None:
    """The one line to print for an error a user can act on; None for a bug."""
    if isinstance(exc, McpPgEventsError):
        return str(exc)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach the database: {exc}"
    if isinstance(exc, OSError):  # e.g. a data folder it may not write, several hosts all refusing
        return str(exc)
    if isinstance(exc, (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError)):
        # Alembic reaches the database through SQLAlchemy, which wraps the driver's error.
        cause = getattr(exc, "orig", None) or exc
        cause = cause.__cause__ or cause
        message = " ".join(str(cause).split())
        return f"{type(cause).__name__}: {message}"
    return None


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
        if args.command == "demo":
            return _demo(args)
        if args.command == "retention":
            return _retention(args)
    except KeyboardInterrupt:
        print("mcp-pg-events: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`migrate --sql | head`): nothing is wrong, stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        message = _describe(exc)
        if message is None:
            raise
        print(f"mcp-pg-events: error: {message}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
