"""The ``mcp-pg-events`` command. Every flag has an environment variable, shown in ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.exc import SQLAlchemyError

from . import sql, wakeups
from .database import OLDEST_SCHEMA, SCHEMA_REVISION, check_schema, connect_one
from .dsn import DSN_ENV, FALLBACK_DSN_ENV, redact, resolve_dsn
from .embedded import DATA_ENV, default_data_dir, embedded_postgres, reset_embedded
from .errors import ConfigurationError, McpPgEventsError
from .event_ids import format_event_id
from .listener import LISTENER_NAME
from .retention import counted, format_bytes, run_retention
from .settings import (
    MAX_PARTITIONS_AHEAD,
    RetentionSettings,
    env_name,
    format_duration,
    parse_duration,
    parse_switch,
)
from .waiting import wait_set

# Retention's defaults, written once in settings.py.
_RETENTION = RetentionSettings()
# A shorter --ttl is a typo more often than a plan (`--ttl 0` deletes every event): it takes --force.
_MIN_TTL = timedelta(minutes=5)


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


@dataclass(frozen=True)
class _SwitchFromEnv:
    """A switch's value as its environment variable gives it, read once the command is known
    (a bad value of another command's variable must not stop this one)."""

    env: str
    text: str

    def value(self) -> bool:
        try:
            return parse_switch(self.text)
        except ValueError as exc:
            raise ConfigurationError(f"{self.env}: {exc}") from None


def _switch(parser: argparse.ArgumentParser, flag: str, env: str, help: str) -> None:
    """An on/off flag, also on when ``env`` says so: 1, true, yes, on; off: empty, 0, false, no, off."""
    text = os.environ.get(env)
    default: bool | _SwitchFromEnv = False if text is None else _SwitchFromEnv(env, text)
    parser.add_argument(flag, action="store_true", default=default, help=f"{help} [env: {env}]")


def _read_switches(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        if isinstance(value, _SwitchFromEnv):
            setattr(args, name, value.value())


# A value of these flags that starts with "-" is theirs: argparse would take "--ttl -5m"
# for two options and say only "expected one argument".
_VALUE_FLAGS = (
    "--ttl", "--partition-max-age", "--ended-grace", "--interval", "--lock-timeout",
    "--batch-size", "--partitions-ahead", "--limit", "--events", "--drop-after", "--pace", "--port",
)  # fmt: skip


def _attach_dashed_values(argv: Sequence[str]) -> list[str]:
    """``--ttl -5m`` as ``--ttl=-5m``, so that the flag's own check says what is wrong."""
    joined: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            joined.append(word)
            joined.extend(words)
            break
        if word in _VALUE_FLAGS:
            following = next(words, None)
            if following is not None and following.startswith("-") and following[1:2].isdigit():
                joined.append(f"{word}={following}")
                continue
            joined.append(word)
            if following is not None:
                joined.append(following)
            continue
        joined.append(word)
    return joined


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _retention_bounds(parser: argparse.ArgumentParser) -> None:
    """The flags of what retention keeps: what it runs with, and what `status` holds the database to."""
    _option(
        parser,
        "--ttl",
        env_name("ttl"),
        format_duration(_RETENTION.ttl),
        "events older than this go",
        _duration,
    )
    _option(
        parser,
        "--partition-max-age",
        env_name("partition_max_age"),
        None,
        "start a new partition when the one in use holds an event older than this; also how long "
        "expired events may wait to go with their partition instead of row by row",
        _duration,
        shown="a quarter of the --ttl",
    )
    _option(
        parser,
        "--ended-grace",
        env_name("ended_grace"),
        format_duration(_RETENTION.ended_grace),
        "events of sessions that ended longer ago than this go too, whatever their age",
        _duration,
    )
    _option(
        parser,
        "--interval",
        env_name("interval"),
        format_duration(_RETENTION.interval),
        "time between two retention runs (of --loop)",
        _duration,
    )


def _dsn_option(parser: argparse.ArgumentParser) -> None:
    # Resolved later, so that the error for a missing DSN names both variables.
    parser.add_argument(
        "--dsn", default=None, help=f"PostgreSQL DSN [env: {DSN_ENV}, else {FALLBACK_DSN_ENV}]"
    )


def _demo_dsn_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help=f"PostgreSQL DSN [env: {DSN_ENV}; not {FALLBACK_DSN_ENV}, the application's; "
        "default: an embedded PostgreSQL]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-pg-events",
        description="PostgreSQL event log for resumable MCP Streamable HTTP streams.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
        help="show a stream dropped on one worker resumed on another (embedded PostgreSQL without a DSN)",
        description=(
            "Serve an MCP tool that streams progress over Streamable HTTP from two worker processes, "
            "drop the client's stream half-way on one, resume it with Last-Event-ID on the other, check "
            "that nothing was lost or doubled, then kill the first and go on with the session. "
            "Without a DSN it runs an embedded PostgreSQL in its own folder (kept between runs)."
        ),
    )
    _demo_dsn_option(demo)
    _option(demo, "--data-dir", DATA_ENV, default_data_dir(), "folder of the embedded PostgreSQL", Path)
    # No environment variable: one left set would wipe the data at every run.
    demo.add_argument(
        "--reset",
        action="store_true",
        help="stop the embedded PostgreSQL and delete its folder (--data-dir), then exit",
    )
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
    _retention_bounds(retention)
    _switch(retention, "--dry-run", "MCP_PG_EVENTS_DRY_RUN", "print what would go and change nothing")
    _switch(retention, "--loop", "MCP_PG_EVENTS_LOOP", "keep running, once every --interval (a sidecar)")
    _switch(
        retention,
        "--force",
        "MCP_PG_EVENTS_FORCE",
        f"run with a --ttl below {format_duration(_MIN_TTL)} (nearly every event goes, and clients can "
        "resume only that far back)",
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
        "--lock-timeout",
        env_name("lock_timeout"),
        format_duration(_RETENTION.lock_timeout),
        "how long a detach, drop or roll-over may wait for its lock (appends wait behind it) before "
        "leaving it to the next run",
        _duration,
    )

    status = commands.add_parser(
        "status",
        help="is it healthy? schema, partitions, retention, listeners, sessions (exit 0, 1 or 2)",
        description=(
            "Check the database as the store and retention need it: the connection and the server's "
            "version, the schema revision, the partitions ahead of the sequence and their sizes, the "
            "oldest event against the bound retention keeps (TTL + partition max age + 2 x interval), "
            "ended sessions waiting for retention, the stores listening on this database and the "
            "notification queue, and the sessions and streams. One line per check, one line per "
            "problem with what to do. Exit status 0: healthy; 1: degraded (a problem was found); 2: "
            "cannot tell (no connection, or a check this role may not run). Run it as the tables' owner "
            "or the runtime role; it reads no session id and changes nothing. Retention's bounds come "
            "from the same flags and environment variables as `retention`."
        ),
        epilog=_examples(
            "mcp-pg-events status --dsn postgresql://app@db/app",
            "mcp-pg-events status --ttl 7d --json   # for a probe or a script",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _dsn_option(status)
    _retention_bounds(status)
    _switch(status, "--json", "MCP_PG_EVENTS_JSON", "print one JSON object instead of lines")

    sessions = commands.add_parser(
        "sessions",
        help="list the sessions, show one's streams, end one",
        description="The MCP sessions stored in the database, by id (the mcp-session-id header).",
        epilog=_examples(
            "mcp-pg-events sessions list                # open sessions, newest first",
            "mcp-pg-events sessions list --all --json   # ended ones too, for a script",
            "mcp-pg-events sessions show 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c",
            "mcp-pg-events sessions end 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = sessions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="the newest sessions: id, created, last active, streams, events, bytes",
        description=(
            "The newest sessions first: id, when created and last active, and their streams, events "
            "and message bytes (plus principal and protocol where the schema records them)."
        ),
        epilog=_examples(
            "mcp-pg-events sessions list --limit 200", "mcp-pg-events sessions list --all --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _dsn_option(listing)
    _switch(listing, "--all", "MCP_PG_EVENTS_ALL", "ended sessions too")
    _option(listing, "--limit", "MCP_PG_EVENTS_LIMIT", 50, "sessions shown at most", _positive_int)
    _switch(listing, "--json", "MCP_PG_EVENTS_JSON", "print a JSON array")
    show = actions.add_parser(
        "show",
        help="one session and its streams",
        description="One session: when created, last active and ended, and each stream with its events.",
        epilog=_examples("mcp-pg-events sessions show 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c --json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("session", metavar="SESSION", help="the session id")
    _dsn_option(show)
    _switch(show, "--json", "MCP_PG_EVENTS_JSON", "print one JSON object")
    end = actions.add_parser(
        "end",
        help="mark a session ended: retention then removes its events",
        description=(
            "Mark a session ended, as a client's DELETE does: retention removes its events after the "
            "ended-session grace (retention's --ended-grace), whatever their age. Ending a session "
            "twice keeps the first end."
        ),
        epilog=_examples("mcp-pg-events sessions end 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    end.add_argument("session", metavar="SESSION", help="the session id")
    _dsn_option(end)

    tail = commands.add_parser(
        "tail",
        help="follow a session's events live, one line each (Ctrl-C ends)",
        description=(
            "Follow the events of a session (or of one of its streams) as they are stored, from any "
            "worker: one line per event with the time it was stored, its stream, its method (or "
            "result, error), its size and its id; or, with --json, one JSON object per event with the "
            "raw message. From now on, or from just after the event --after names (its stream from "
            "there, the session's other streams from what was stored after it). Streams the session "
            "opens meanwhile are followed too. Ctrl-C (or SIGTERM) ends it with status 0."
        ),
        epilog=_examples(
            "mcp-pg-events tail 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c",
            "mcp-pg-events tail 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c 7 --after 812-1042-9c0ffee1d2a3",
            "mcp-pg-events tail 3f2a9c1b0d6e4f5a8b7c6d5e4f3a2b1c --json | jq .message",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail.add_argument("session", metavar="SESSION", help="the session id")
    tail.add_argument(
        "stream",
        metavar="STREAM",
        nargs="?",
        help="only this stream: a request's id, or _GET_stream for the server's own messages",
    )
    _dsn_option(tail)
    _option(
        tail,
        "--after",
        "MCP_PG_EVENTS_AFTER",
        None,
        "start just after this event id (from the session's events) instead of now",
        shown="now",
    )
    _switch(tail, "--json", "MCP_PG_EVENTS_JSON", "one JSON object per event, with the raw message")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from . import migrate
    from .demo import say

    # Only a DSN given for it: $DATABASE_URL is the host application's database, by
    # convention, and the demo's tables and events have no business there.
    dsn = args.dsn or os.environ.get(DSN_ENV)
    if args.reset:
        if dsn:
            raise ConfigurationError(
                "--reset deletes the embedded PostgreSQL's folder; with a DSN the demo's tables are "
                "in your database, for `mcp-pg-events migrate` and your own DROP"
            )
        gone = reset_embedded(args.data_dir)
        say(f"deleted {args.data_dir}" if gone else f"nothing to delete: no {args.data_dir}")
        return 0
    if not 1 <= args.drop_after < args.events:
        raise ConfigurationError(f"--drop-after must be from 1 to --events - 1 ({args.events - 1})")
    with contextlib.ExitStack() as stack:
        # SIGTERM (a service manager, kill) and SIGHUP (its terminal closed) unwind like
        # Ctrl-C does, so that the embedded server and the workers are stopped too.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            stack.callback(signal.signal, signum, signal.signal(signum, _stop_on_signal))
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
        stopped_by: list[int] = []
        try:
            code = asyncio.run(_demo_async(dsn, args, stopped_by))
        finally:
            # Closing the loop set them back to the default, which ends the process at once.
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN if stopped_by else _stop_on_signal)
        if stopped_by:
            raise _Stopped(stopped_by[0])  # the embedded server stops on the way out
        return code


class _Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, raised where the program is, as Ctrl-C is.

    A KeyboardInterrupt, since asyncio lets only that (and SystemExit) through the
    task it interrupts.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signal(signum: int, frame: object) -> None:
    # One is enough: a second signal must not cut the clean-up short.
    for other in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise _Stopped(signum)


async def _demo_async(dsn: str, args: argparse.Namespace, stopped_by: list[int]) -> int:
    from .demo import run_demo, say, serve_forever
    from .store import PostgresEventStore

    # Inside the loop a signal cancels the demo, which then stops its workers and its
    # store; an exception raised by a signal handler would land in whichever task runs.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def stop(signum: int) -> None:
        if not stopped_by:  # a second signal must not cut the clean-up short
            stopped_by.append(signum)
            main.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop, signum)
    try:
        if args.serve:
            async with await PostgresEventStore.connect(dsn) as store:
                await serve_forever(store, args.port, args.pace)
            return 0
        ok = await run_demo(dsn, events=args.events, drop_after=args.drop_after, pace=args.pace, say=say)
        return 0 if ok else 1
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        return 128 + stopped_by[0]


def _migrate(args: argparse.Namespace) -> int:
    from . import migrate

    if args.sql:
        migrate.print_sql(args.revision)
        return 0
    known = migrate.revisions()
    target = known[-1] if args.revision in ("head", "heads") else args.revision
    if target not in known:
        raise ConfigurationError(
            f"--revision {args.revision}: no such revision; this mcp-pg-events has {known[0]} to "
            f"{known[-1]} (head)"
        )
    dsn = resolve_dsn(args.dsn)
    current = asyncio.run(_schema_revision(dsn))
    if current is not None and current not in known:
        raise ConfigurationError(
            f"{redact(dsn)} is at schema revision {current}, newer than this mcp-pg-events knows "
            f"(up to {known[-1]}): nothing to migrate here; migrate with the newer mcp-pg-events"
        )
    if current is not None and known.index(current) >= known.index(target):
        print(
            f"{redact(dsn)} is at schema revision {current}"
            + (": nothing to do" if current == target else f", past {target}: migrate only goes up"),
            file=sys.stderr,
        )
        return 0
    since = "no schema yet" if current is None else f"revision {current}"
    print(f"migrating {redact(dsn)} from {since} to revision {target}", file=sys.stderr)
    migrate.upgrade(dsn, target)
    print(f"migrations done: {redact(dsn)} is at schema revision {target}", file=sys.stderr)
    return 0


async def _schema_revision(dsn: str) -> str | None:
    """The schema revision alembic recorded in the database; None before the first migration."""
    conn = await connect_one(dsn, timeout=_STATUS_TIMEOUT, application_name="mcp-pg-events migrate")
    try:
        revision = await conn.fetchval(sql.SCHEMA_VERSION)
    except asyncpg.UndefinedTableError:
        revision = None
    finally:
        await conn.close()
    return None if revision is None else str(revision)


def _retention(args: argparse.Namespace) -> int:
    if args.ttl < _MIN_TTL and not args.dry_run and not args.force:
        raise ConfigurationError(
            f"--ttl {format_duration(args.ttl)} is below {format_duration(_MIN_TTL)}: every event older "
            "than that would go, and clients could resume only that far back; --dry-run shows what "
            "would go, --force (MCP_PG_EVENTS_FORCE=1) runs it"
        )
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
            message = describe_error(exc)
            if message is None:
                raise
            print(f"mcp-pg-events: error: {message}", file=sys.stderr, flush=True)
        await wait_set(stop, settings.interval.total_seconds())
    progress("stopped")
    return 0


# --- status ---------------------------------------------------------------------------------

# How long status waits for the server: to connect, and for each statement.
_STATUS_TIMEOUT = 10.0
# A session or stream with an event this recent counts as active.
_ACTIVE_WINDOW = timedelta(minutes=5)
# The notification queue is shared by every database of the server; PostgreSQL itself
# warns from half full, and NOTIFY fails when it is full.
_QUEUE_WARNING = 0.5
_SCHEDULE_RETENTION = "schedule `mcp-pg-events retention` (docs/operations.md#scheduling)"


@dataclass
class _Check:
    """One line of `status`: what was found, and a problem with what to do, if any.

    ``ok`` is None when the check could not run (this role may not read what it needs).
    """

    name: str
    ok: bool | None
    summary: str
    problem: str | None = None
    details: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _status(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    try:
        checks = asyncio.run(_status_checks(dsn, args))
    except McpPgEventsError as exc:
        if args.json:  # a probe reading stdout gets an answer too
            print(json.dumps({"status": "unknown", "error": str(exc), "checks": []}))
        raise
    problems = [check for check in checks if check.ok is False]
    unknown = [check for check in checks if check.ok is None]
    code, verdict = (1, "degraded") if problems else (2, "unknown") if unknown else (0, "healthy")
    if args.json:
        print(
            json.dumps(
                {"status": verdict, "checks": [asdict(check) for check in checks]}, default=_json_value
            )
        )
        return code
    for check in checks:
        print(f"{check.name:<11} {check.summary}")
        for line in check.details:
            print(f"{'':<13}{line}")
    for check in problems:
        print(f"problem: {check.name}: {check.problem}")
    for check in unknown:
        print(f"cannot tell: {check.name}: {check.problem}")
    if problems:
        print(f"status: degraded, {counted(len(problems), 'problem')}")
    elif unknown:
        print(f"status: cannot tell, {counted(len(unknown), 'check')} could not run")
    else:
        print("status: healthy")
    return code


def _json_value(value: Any) -> Any:
    """What json.dumps cannot write by itself: times as ISO 8601, anything else as text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


async def _status_checks(dsn: str, args: argparse.Namespace) -> list[_Check]:
    bounds = RetentionSettings(
        ttl=args.ttl,
        partition_max_age=args.partition_max_age,
        ended_grace=args.ended_grace,
        interval=args.interval,
    )
    conn = await connect_one(dsn, timeout=_STATUS_TIMEOUT, application_name="mcp-pg-events status")
    try:
        await conn.execute(sql.STATEMENT_TIMEOUT, f"{_STATUS_TIMEOUT:g}s")
        server = await conn.fetchrow(sql.SERVER)
        assert server is not None
        checks = [_database_check(server)]
        schema = await _guarded("schema", _schema_check(conn))
        checks.append(schema)
        if schema.ok is False:
            return checks  # nothing else is there to look at
        checks.append(await _guarded("partitions", _partitions_check(conn)))
        checks.append(await _guarded("retention", _retention_check(conn, bounds)))
        checks.append(await _guarded("sessions", _sessions_check(conn, bounds)))
        checks.append(await _guarded("listeners", _listeners_check(conn)))
        return checks
    finally:
        await conn.close()


async def _guarded(name: str, check: Awaitable[_Check]) -> _Check:
    """The check, or why it could not run; never an exception a user cannot act on."""
    try:
        return await check
    except asyncpg.InsufficientPrivilegeError as exc:
        return _Check(
            name,
            None,
            "not checked",
            f"this role may not read what it needs ({exc}): run status as the tables' owner "
            "or the runtime role of migrations/grants.sql",
        )
    except asyncpg.QueryCanceledError:
        return _Check(
            name,
            None,
            "not checked",
            f"no answer within {_STATUS_TIMEOUT:g}s (a lock held by a long transaction, or a "
            "server that is very busy): look at pg_stat_activity",
        )


def _database_check(server: asyncpg.Record) -> _Check:
    version = server["version"].split()[0]  # without the packager's suffix
    major = int(version.split(".")[0])
    facts = {"server_version": version, "database": server["db"], "role": server["role"]}
    summary = f"PostgreSQL {version}, database {server['db']} as {server['role']}"
    if major < 14:
        return _Check("database", False, summary, "mcp-pg-events needs PostgreSQL 14 or newer", facts=facts)
    return _Check("database", True, summary, facts=facts)


async def _schema_check(conn: asyncpg.Connection[Any]) -> _Check:
    try:
        revision = await conn.fetchval(sql.SCHEMA_VERSION)
    except asyncpg.UndefinedTableError:
        revision = None
    facts = {"revision": revision, "code_revision": SCHEMA_REVISION, "oldest_supported": OLDEST_SCHEMA}
    try:
        await check_schema(conn)
    except McpPgEventsError as exc:  # SchemaNotReadyError: says what to do
        found = "not migrated" if revision is None else f"revision {revision}"
        return _Check(
            "schema", False, f"{found}, this version needs {SCHEMA_REVISION}", str(exc), facts=facts
        )
    return _Check(
        "schema", True, f"revision {revision} (this version of mcp-pg-events: {SCHEMA_REVISION})", facts=facts
    )


async def _next_seq(conn: asyncpg.Connection[Any]) -> int | None:
    """The seq of the next append; None when this role cannot tell (see sql.NEXT_SEQ_FROM_USAGE)."""
    try:
        value = await conn.fetchval(sql.NEXT_SEQ)
    except asyncpg.InsufficientPrivilegeError:
        value = await conn.fetchval(sql.NEXT_SEQ_FROM_USAGE)
    return None if value is None else int(value)


async def _partitions_check(conn: asyncpg.Connection[Any]) -> _Check:
    partitions = await conn.fetch(sql.PARTITION_SIZES)
    next_seq = await _next_seq(conn)
    total = sum(p["bytes"] for p in partitions)
    facts: dict[str, Any] = {
        "next_seq": next_seq,
        "bytes": total,
        "partitions": [dict(p) for p in partitions],
    }
    in_use = None
    ahead = 0
    table = [["PARTITION", "FIRST SEQ", "LAST SEQ", "SIZE", "EVENTS", ""]]
    for p in partitions:
        role = ""
        if next_seq is not None and p["lower"] <= next_seq < p["upper"]:
            in_use, role = p, "in use"
        elif next_seq is not None and p["lower"] > next_seq:
            ahead, role = ahead + 1, "ahead"
        rows = f"~{p['rows']:,}" if p["rows"] >= 0 else "?"
        table.append(
            [p["name"], f"{p['lower']:,}", f"{p['upper'] - 1:,}", format_bytes(p["bytes"]), rows, role]
        )
    details = _table(table, right={"FIRST SEQ", "LAST SEQ", "SIZE", "EVENTS"}) if partitions else []
    facts["ahead"] = ahead
    size = f"{counted(len(partitions), 'partition')}, {format_bytes(total)}"
    if next_seq is None:
        return _Check(
            "partitions",
            None,
            size,
            "this role may use the sequence but not read it, and so cannot see where it is until its "
            "next use after a roll-over: run status as the tables' owner or the retention role",
            details,
            facts,
        )
    if in_use is None:
        return _Check(
            "partitions",
            False,
            f"{size}; none holds the next event (seq {next_seq:,})",
            f"no partition for the next event (seq {next_seq:,}): each append that finds none creates "
            f"it first, and waits; {_SCHEDULE_RETENTION}, which keeps partitions ahead",
            details,
            facts,
        )
    summary = f"{size}; the next event (seq {next_seq:,}) goes to {in_use['name']}, {ahead} ahead"
    if ahead == 0:
        return _Check(
            "partitions",
            False,
            summary,
            f"no partition ahead of {in_use['name']}: once it is full, appends create the next one "
            f"themselves, and wait; {_SCHEDULE_RETENTION}, which keeps partitions ahead",
            details,
            facts,
        )
    return _Check("partitions", True, summary, None, details, facts)


def _retention_bound(bounds: RetentionSettings) -> tuple[timedelta, str]:
    """How old the oldest event may be while retention runs as ``bounds`` say, and why."""
    max_age = bounds.partition_max_age if bounds.partition_max_age is not None else bounds.ttl / 4
    why = (
        f"TTL {format_duration(bounds.ttl)} + partition max age {format_duration(max_age)} "
        f"+ 2 x interval {format_duration(bounds.interval)}"
    )
    return bounds.ttl + max_age + 2 * bounds.interval, why


async def _retention_check(conn: asyncpg.Connection[Any], bounds: RetentionSettings) -> _Check:
    limit, why = _retention_bound(bounds)
    age = await conn.fetchval(sql.OLDEST_AGE_BEYOND, limit)
    facts = {"limit_seconds": limit.total_seconds(), "oldest_age_seconds": _seconds(age)}
    if age is None:
        return _Check("retention", True, f"no event older than {format_duration(limit)} ({why})", facts=facts)
    return _Check(
        "retention",
        False,
        f"events up to {_age(age)} old, beyond {format_duration(limit)} ({why})",
        f"events older than retention keeps them (up to {_age(age)} old): retention is not running, "
        f"failing or runs with a longer --ttl; {_SCHEDULE_RETENTION}, or pass status the --ttl it runs with",
        facts=facts,
    )


async def _sessions_check(conn: asyncpg.Connection[Any], bounds: RetentionSettings) -> _Check:
    row = await conn.fetchrow(sql.SESSION_COUNTS, _ACTIVE_WINDOW)
    assert row is not None
    facts = {key: _seconds(value) if key.endswith("_age") else value for key, value in dict(row).items()}
    summary = (
        f"{row['open_sessions']:,} not ended ({counted(row['open_streams'], 'stream')}), "
        f"{row['active_sessions']:,} active in the last {format_duration(_ACTIVE_WINDOW)} "
        f"({counted(row['active_streams'], 'stream')}); "
        f"{row['ended_sessions']:,} ended, waiting for retention"
    )
    age = row["oldest_end_age"]
    if age is not None:
        summary += f" (the first ended {_age(age)} ago)"
    limit = bounds.ended_grace + 2 * bounds.interval
    if age is not None and age > limit:
        return _Check(
            "sessions",
            False,
            summary,
            f"sessions ended {_age(age)} ago still hold their events (grace "
            f"{format_duration(bounds.ended_grace)} + 2 x interval {format_duration(bounds.interval)}): "
            f"retention is not running; {_SCHEDULE_RETENTION}",
            facts=facts,
        )
    return _Check("sessions", True, summary, facts=facts)


async def _listeners_check(conn: asyncpg.Connection[Any]) -> _Check:
    row = await conn.fetchrow(sql.LISTENERS, LISTENER_NAME)
    assert row is not None
    facts = dict(row)
    usage = float(row["queue_usage"])
    summary = (
        f"{counted(row['listeners'], 'store')} listening on this database; "
        f"notification queue {usage:.1%} full"
    )
    hidden = row["listeners"] - row["visible"]
    if hidden:
        summary += f" (the state of {hidden} hidden from this role)"
    if row["stuck"]:
        return _Check(
            "listeners",
            False,
            summary,
            f"{row['stuck']} listener(s) idle in a transaction, which keeps the notification queue from "
            "being cleaned up: find them in pg_stat_activity (application_name "
            f"'{LISTENER_NAME}') and end them with pg_terminate_backend(pid)",
            facts=facts,
        )
    if usage >= _QUEUE_WARNING:
        return _Check(
            "listeners",
            False,
            summary,
            f"the server's notification queue is {usage:.0%} full: a listening session of some database "
            "does not read its notifications (often one idle in a transaction); find it in "
            "pg_stat_activity (oldest xact_start) and end it; appends go on, live readers fall back "
            "to polling",
            facts=facts,
        )
    return _Check("listeners", True, summary, facts=facts)


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _age(value: timedelta) -> str:
    """A duration to the second, for people: ``3d4h``, ``12m5s``."""
    return format_duration(timedelta(seconds=round(value.total_seconds())))


# --- sessions -------------------------------------------------------------------------------

# Columns of the session registry shown by `sessions list` when the schema has them.
_PRINCIPAL_KEYS = ("principal", "subject", "sub", "client_id", "user", "name")


class _CommandError(McpPgEventsError):
    """What a command was asked for does not exist: one line, exit 2."""


def _sessions(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    if args.action == "list":
        return asyncio.run(_sessions_list(dsn, args))
    if args.action == "show":
        return asyncio.run(_sessions_show(dsn, args))
    return asyncio.run(_sessions_end(dsn, args.session))


@asynccontextmanager
async def _operator_connection(dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A connection for one command, on a migrated database."""
    conn = await connect_one(dsn, timeout=_STATUS_TIMEOUT, application_name="mcp-pg-events cli")
    try:
        await check_schema(conn)
        yield conn
    finally:
        await conn.close()


async def _sessions_list(dsn: str, args: argparse.Namespace) -> int:
    async with _operator_connection(dsn) as conn:
        rows = await conn.fetch(sql.SESSIONS, args.all, args.limit)
    sessions = [_session_facts(row) for row in rows]
    if args.json:
        print(json.dumps(sessions, default=_json_value))
        return 0
    if not sessions:
        print("no sessions" if args.all else "no open sessions (--all shows ended ones too)", file=sys.stderr)
        return 0
    registry = any(s.get("owner") is not None or s.get("protocol_version") for s in sessions)
    header = ["SESSION", "CREATED", "LAST ACTIVE"]
    if registry:
        header += ["PRINCIPAL", "PROTOCOL"]
    header += ["STREAMS", "EVENTS", "BYTES"]
    if args.all:
        header.append("ENDED")
    table = [header]
    for s in sessions:
        line = [s["key"], _when(s["created_at"]), _when(s["last_active"])]
        if registry:
            line += [_principal(s.get("owner")), str(s.get("protocol_version") or "-")]
        line += [f"{s['streams']:,}", f"{s['events']:,}", format_bytes(s["bytes"])]
        if args.all:
            line.append(_when(s["ended_at"]) if s["ended_at"] else "-")
        table.append(line)
    _print_table(table, right={"STREAMS", "EVENTS", "BYTES"})
    more = " (--limit shows more)" if len(sessions) == args.limit else ""
    print(f"{counted(len(sessions), 'session')}, newest first{more}", file=sys.stderr)
    return 0


def _session_facts(row: asyncpg.Record) -> dict[str, Any]:
    """A session row as a dict: its own columns, the registry's (when the schema has them), and totals."""
    facts = dict(row)
    registry = json.loads(facts.pop("registry") or "{}")
    facts.update(registry)
    newest = facts.pop("newest_event", None)
    # The registry's own record of activity, where the schema keeps one; else the newest event.
    facts["last_active"] = registry.get("last_active_at") or newest
    facts["newest_event"] = newest
    return facts


def _principal(owner: Any) -> str:
    if isinstance(owner, dict):
        for key in _PRINCIPAL_KEYS:
            if owner.get(key):
                return str(owner[key])
    if owner in (None, {}, ""):
        return "-"
    text = owner if isinstance(owner, str) else json.dumps(owner, separators=(",", ":"))
    return text if len(text) <= 40 else text[:39] + "..."


def _when(value: Any) -> str:
    """A time for a table: local, to the second; registry values come as ISO text."""
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    when: datetime = value
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_table(rows: list[list[str]], right: Collection[str] = ()) -> None:
    for line in _table(rows, right):
        print(line)


def _table(rows: list[list[str]], right: Collection[str] = ()) -> list[str]:
    """Rows of cells as aligned lines; the columns whose header is in ``right`` aligned right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    aligned = [name in right for name in rows[0]]
    return [
        "  ".join(
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(row, widths, aligned, strict=True)
        ).rstrip()
        for row in rows
    ]


async def _sessions_show(dsn: str, args: argparse.Namespace) -> int:
    async with _operator_connection(dsn) as conn:
        session = await conn.fetchrow(sql.SESSION, args.session)
        if session is None:
            raise _CommandError(f"no session {args.session!r} in this database")
        streams = await conn.fetch(sql.SESSION_STREAMS, args.session)
    facts = {key: session[key] for key in ("key", "created_at", "ended_at")}
    facts.update(json.loads(session["registry"]) if session["registry"] else {})
    client = json.loads(session["client"]) if session["client"] else None
    listed = [
        {
            "stream": bytes(row["name"]).decode("utf-8", "surrogatepass"),
            "stream_key": row["id"],
            "created_at": row["created_at"],
            "events": row["events"],
            "bytes": row["bytes"],
            "first_seq": row["first_seq"],
            "last_seq": row["last_seq"],
            "newest_event": row["newest"],
            "last_event_id": None
            if row["last_seq"] is None
            else format_event_id(row["id"], row["last_seq"], row["tag"]),
        }
        for row in streams
    ]
    if args.json:
        print(json.dumps({**facts, "client": client, "streams": listed}, default=_json_value))
        return 0
    print(f"{'session':<17}{facts['key']}")
    print(f"{'created':<17}{_when(facts['created_at'])}")
    print(f"{'ended':<17}{_when(facts['ended_at']) if facts['ended_at'] else 'no'}")
    if client:
        print(f"{'client':<17}{client.get('name', '?')} {client.get('version', '')}".rstrip())
    for key, value in facts.items():
        if key not in ("key", "created_at", "ended_at"):
            shown = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            print(f"{key:<17}{shown}")
    events = sum(s["events"] for s in listed)
    size = sum(s["bytes"] for s in listed)
    print(f"{'streams':<17}{len(listed):,}, {counted(events, 'event')}, {format_bytes(size)}")
    if listed:
        table = [["STREAM", "KEY", "CREATED", "EVENTS", "BYTES", "NEWEST EVENT", "LAST EVENT ID"]]
        for s in listed:
            table.append(
                [
                    _stream_label(s["stream"]),
                    str(s["stream_key"]),
                    _when(s["created_at"]),
                    f"{s['events']:,}",
                    format_bytes(s["bytes"]),
                    _when(s["newest_event"]),
                    s["last_event_id"] or "-",
                ]
            )
        print()
        _print_table(table, right={"KEY", "EVENTS", "BYTES"})
    return 0


def _stream_label(text: str) -> str:
    """A stream id for a terminal: as it is when plain, else JSON-quoted (control characters, spaces)."""
    if text and text.isprintable() and " " not in text and len(text) <= 40:
        return text
    quoted = json.dumps(text)
    return quoted if len(quoted) <= 40 else quoted[:39] + "..."


async def _sessions_end(dsn: str, key: str) -> int:
    async with _operator_connection(dsn) as conn:
        # The statement the store runs when a client ends its session with DELETE,
        # and the announcement that makes every worker holding it drop it at once.
        row_id = await conn.fetchval(sql.END_SESSION, key, "operator")
        if row_id is not None:
            await conn.execute(sql.NOTIFY, wakeups.ENDED_CHANNEL, [str(row_id)])
            print(
                f"session {key} ended: retention removes its events after the ended-session grace "
                f"(retention's --ended-grace)"
            )
            return 0
        session = await conn.fetchrow(sql.SESSION, key)
    if session is None:
        raise _CommandError(f"no session {key!r} in this database")
    print(f"session {key} had ended already, at {_when(session['ended_at'])}")
    return 0


# --- tail -----------------------------------------------------------------------------------

# How often `tail` looks for streams the session opened since (each request is one).
# Their events are not missed meanwhile: a new stream is followed from its start.
_NEW_STREAMS_EVERY = 1.0


def _tail(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args.dsn)
    return asyncio.run(_tail_async(dsn, args))


async def _tail_async(dsn: str, args: argparse.Namespace) -> int:
    from .event_ids import parse_event_id
    from .store import PostgresEventStore

    if args.after is not None and parse_event_id(args.after) is None:
        raise _CommandError(f"--after {args.after!r} is not an event id of this store")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    # It only reads: a small pool, no wake-ups of its own.
    async with await PostgresEventStore.connect(
        dsn, min_pool_size=1, max_pool_size=2, max_inflight=1, notify=False
    ) as store:
        floor: int | None = None
        if args.after is not None:
            cursor = await store.log.open_cursor(args.session, args.after)
            if cursor is None:
                raise _CommandError(
                    f"--after {args.after}: no such event in session {args.session!r} "
                    "(unknown, expired, or another session's)"
                )
            floor = cursor.ref.seq
        printer = _TailPrinter(store, args.json)
        follow = _SessionFollower(store, args.session, args.stream, floor, printer)
        if not await follow.discover():
            raise _CommandError(f"no session {args.session!r} in this database")
        what = f"stream {args.stream!r} of session" if args.stream is not None else "session"
        since = f"just after {args.after}" if args.after is not None else "now"
        print(
            f"following {what} {args.session} from {since} "
            f"({counted(len(follow.streams), 'stream')} so far); Ctrl-C ends",
            file=sys.stderr,
            flush=True,
        )
        tasks = [
            loop.create_task(printer.run()),
            loop.create_task(follow.run()),
            loop.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure of printing or discovery ends the tail with its error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            follow.close()
    print(
        f"followed {counted(printer.printed, 'event')} on {counted(len(follow.streams), 'stream')}",
        file=sys.stderr,
    )
    return 0


class _SessionFollower:
    """A ``StreamFollower`` on each stream of one session, including the streams it opens later.

    New streams are found by asking every ``_NEW_STREAMS_EVERY`` seconds for the
    session's streams newer than the newest known one (stream keys only grow). A
    stream found that way is followed from its first event, or from ``floor``:
    nothing it holds is newer than the tail's start and missed.
    """

    def __init__(
        self, store: Any, session: str, stream: str | None, floor: int | None, printer: _TailPrinter
    ) -> None:
        self._store = store
        self._session = session
        self._only = stream
        self._floor = floor
        self._printer = printer
        self._newest_key = 0
        self._started = False
        self._ended_seen = False
        self.streams: dict[int, Any] = {}

    async def discover(self) -> bool:
        """Follow the streams created since the last look; False when the session does not exist."""
        from .event_log import StreamHead

        rows = await self._store.database.fetch(sql.NEW_STREAMS, self._session, self._newest_key)
        if not rows:
            return False
        if rows[0]["ended_at"] is not None and not self._ended_seen:
            self._ended_seen = True
            print(f"the session ended at {_when(rows[0]['ended_at'])}", file=sys.stderr, flush=True)
        for row in rows:
            if row["id"] is None:
                continue
            self._newest_key = max(self._newest_key, row["id"])
            name = bytes(row["name"]).decode("utf-8", "surrogatepass")
            if self._only is not None and name != self._only:
                continue
            if self._floor is not None:
                after = self._floor
            elif self._started:
                after = 0  # created after the tail started: all of it is new
            else:
                after = row["last_seq"] or 0
            head = StreamHead(row["id"], row["tag"], after)
            self.streams[row["id"]] = self._store.log.follow(
                head, functools.partial(self._printer.take, row["id"], row["tag"], name)
            )
        self._started = True
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(_NEW_STREAMS_EVERY)
            if not await self.discover():
                print("the session is gone (retention removed it)", file=sys.stderr, flush=True)
                return

    def close(self) -> None:
        for follower in self.streams.values():
            self._store.log.unfollow(follower)


class _TailPrinter:
    """Prints what the followers hand over, one line (or JSON object) per event, in arrival order.

    The followers' callback runs inside the live tail and must not wait: it only
    queues. The printer looks up when the events were stored, one query per batch.
    """

    def __init__(self, store: Any, as_json: bool) -> None:
        self._store = store
        self._json = as_json
        self._queue: asyncio.Queue[tuple[int, str, str, list[tuple[int, bytes | None]]]] = asyncio.Queue()
        self.printed = 0

    def take(self, stream_key: int, tag: str, stream: str, rows: list[tuple[int, bytes | None]]) -> None:
        self._queue.put_nowait((stream_key, tag, stream, rows))

    async def run(self) -> None:
        while True:
            stream_key, tag, stream, rows = await self._queue.get()
            times = dict(
                await self._store.database.fetch(sql.EVENT_TIMES, stream_key, [seq for seq, _ in rows])
            )
            for seq, data in rows:
                event_id = format_event_id(stream_key, seq, tag)
                stored = times.get(seq)
                if self._json:
                    print(_tail_json(stored, stream, event_id, data))
                else:
                    when = stored.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if stored else "-"
                    size = 0 if data is None else len(data)
                    print(
                        f"{when}  {_stream_label(stream):<12} {_describe_message(data):<40} "
                        f"{format_bytes(size):>9}  {event_id}"
                    )
                self.printed += 1
            sys.stdout.flush()


def _tail_json(stored: datetime | None, stream: str, event_id: str, data: bytes | None) -> str:
    head = json.dumps(
        {"time": stored.isoformat() if stored else None, "stream": stream, "event_id": event_id}
    )
    # The message as stored, byte for byte: it is JSON already.
    message = "null" if data is None else data.decode("utf-8", "replace")
    return f'{head[:-1]}, "message": {message}}}'


def _describe_message(data: bytes | None) -> str:
    """What a stored message is, in a few words: its method, or whose result or error it is."""
    if data is None:
        return "(priming event: a cursor, no message)"
    try:
        message = json.loads(data)
    except ValueError:
        return "(not JSON)"
    if not isinstance(message, dict):
        return "(not a JSON-RPC message)"
    request = f" (id {json.dumps(message['id'])})" if "id" in message else ""
    if "method" in message:
        kind = "request" if request else ""
        line = f"{kind} {str(message['method'])[:60]}{request}".strip()
        params = message.get("params")
        if message["method"] == "notifications/progress" and isinstance(params, dict):
            total = params.get("total")
            line += f" {params.get('progress')}" + (f"/{total}" if total is not None else "")
        return line
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        return f"error {error.get('code', '?')}{request}: {str(error.get('message', ''))[:40]}"
    if "result" in message:
        return f"result{request}"
    return "(not a JSON-RPC message)"


def _quiet_alembic(record: logging.LogRecord) -> bool:
    """Leave out alembic's lines about itself ("Context impl PostgresqlImpl.", "Will assume
    transactional DDL."): the progress of `migrate` is which migrations run."""
    return not (
        record.name == "alembic.runtime.migration"
        and record.getMessage().startswith(("Context impl", "Will assume"))
    )


def describe_error(exc: BaseException) -> str | None:
    """The one line to print for an error a user can act on; None for a bug."""
    from alembic.util import CommandError

    if isinstance(exc, (McpPgEventsError, CommandError)):
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


def _version() -> str:
    """This package's version and the schema revision it needs, and the SDK's version."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"{of('mcp-pg-events')} (schema revision {SCHEMA_REVISION}; mcp {of('mcp')})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(_attach_dashed_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_alembic)
    # Alembic's log says which migration runs: that is the progress of `migrate`.
    for name in ("alembic.runtime.migration", "mcp_pg_events"):
        logging.getLogger(name).setLevel(logging.INFO)
    # `retention` prints each run's summary on stdout itself.
    logging.getLogger("mcp_pg_events.retention").setLevel(logging.WARNING)
    try:
        _read_switches(args)
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "retention":
            return _retention(args)
        if args.command == "status":
            return _status(args)
        if args.command == "sessions":
            return _sessions(args)
        if args.command == "tail":
            return _tail(args)
    except _Stopped as stopped:
        with contextlib.suppress(OSError):  # after a SIGHUP the terminal may be gone
            print(f"mcp-pg-events: stopped by {signal.Signals(stopped.signum).name}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print("mcp-pg-events: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`migrate --sql | head`): nothing is wrong, stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        print(f"mcp-pg-events: error: {message}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
