"""Every knob of the store and of retention, with its default, its check and its environment variable.

One frozen dataclass per component that users configure. Nothing else in the
package types a default: the store, ``connect()``, retention and the CLI all read
these. A value comes from the argument, else from the environment
(``MCP_PG_EVENTS_<NAME>``), else from the default here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from .errors import ConfigurationError

if TYPE_CHECKING:
    from typing_extensions import Self

ENV_PREFIX = "MCP_PG_EVENTS_"


def env_name(name: str) -> str:
    """The environment variable of the setting ``name``."""
    return ENV_PREFIX + name.upper()


# --- values from text (environment variables, command-line flags) ---------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# PostgreSQL's interval holds far more, but a timestamp minus this must stay a timestamp.
MAX_DURATION = timedelta(days=365 * 1000)
# Retention's --loop runs at most once a second.
MIN_INTERVAL = timedelta(seconds=1)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``7d``, ``1h30m``, ``500ms``; ``0`` needs no unit, any other number does.

    A bare number is refused rather than read as seconds (``--ttl 10`` meant 10 what?);
    so are negative durations and any longer than ``MAX_DURATION``.
    """
    expected = "expected e.g. 90s, 30m, 1h, 7d; units ms, s, m, h, d, w"
    value = text.strip().lower()
    if value.startswith("-"):
        raise ValueError(f"not a duration: {text!r} (durations are never negative)")
    if _NUMBER.fullmatch(value):
        if float(value) == 0:
            return timedelta(0)
        raise ValueError(f"not a duration: {text!r} has no unit ({expected})")
    if not value or _DURATION_PART.sub("", value):
        raise ValueError(f"not a duration: {text!r} ({expected})")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"too long: {text!r} (at most {MAX_DURATION.days:,} days)")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest of ``parse_duration``'s spellings, for messages: ``1h30m``, ``0s``."""
    left = round(value.total_seconds() * 1000)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


def parse_switch(text: str) -> bool:
    """On for 1/true/yes/on, off for empty/0/false/no/off (any case); anything else is an error."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"not on or off: {text!r} (expected one of {', '.join(_TRUE)} / 0, false, no, off)")


# A field's type as written in the class (this module postpones annotations).
_PARSERS: dict[str, Any] = {
    "bool": parse_switch,
    "int": int,
    "float": float,
    "timedelta": parse_duration,
    "timedelta | None": parse_duration,
    "str": str,
    "str | None": str,
}


# --- the settings --------------------------------------------------------------------------

_Settings = TypeVar("_Settings", bound="_FromEnv")


class _FromEnv:
    @classmethod
    def from_env(
        cls: type[_Settings], environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> _Settings:
        """The settings from ``overrides``, else the environment, else the defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
            if spec.name in overrides:
                continue
            text = environ.get(env_name(spec.name))
            if text is None or (text == "" and spec.type != "bool"):
                continue
            try:
                values[spec.name] = _PARSERS[str(spec.type)](text)
            except ValueError as exc:
                raise ConfigurationError(f"{env_name(spec.name)}: {exc}") from None
        return cls(**values, **overrides)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigurationError(f"{name} must be at least {low:g}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{name} must be more than 0, got {value!r}")


# The values of PostgreSQL's synchronous_commit (its boolean spellings aside).
SYNCHRONOUS_COMMIT = ("off", "local", "remote_write", "on", "remote_apply")

# Retention waits this much longer than a session's idle timeout before it ends a
# session nobody holds (migration 0006): the activity a worker has not written yet.
MAX_ACTIVITY_INTERVAL = 300.0


@dataclass(frozen=True)
class StoreSettings(_FromEnv):
    """How a ``PostgresEventStore`` uses its database. Each setting also reads ``MCP_PG_EVENTS_<NAME>``."""

    min_pool_size: int = 1
    """Connections the pool the store opens keeps open."""
    max_pool_size: int = 10
    """Connections of that pool at most."""
    check_schema: bool = True
    """Fail at connect time when the database is not migrated, rather than at the first event."""
    listen: bool = True
    """Keep one LISTEN connection that wakes live subscriptions at once; off: they poll only."""
    listen_dsn: str | None = None
    """DSN of that connection when it must differ from the store's (the store's goes through
    PgBouncer in transaction mode, say). None: the store's DSN."""
    retry_deadline: float = 30.0
    """Seconds a transient database error (restart, failover, dropped connection) is retried
    with backoff before the store gives up with ``StoreUnavailableError``. The SDK ends a
    session whose store raises, so this is the outage a session survives."""
    replay_batch_size: int = 500
    """Rows per query while replaying or tailing; bounds the memory a reader holds, whatever
    the length of the stream."""
    poll_interval: float = 5.0
    """Seconds between two catch-ups of every live subscription: the safety net for lost
    notifications, or the delivery delay without a listener."""
    ping_interval: float = 5.0
    """Seconds between two liveness probes of an idle listener connection."""
    notify: bool = True
    """Send a wake-up after each commit, so that live readers in any process see new events
    at once. Off only if nothing subscribes; readers then see new events at their next poll."""
    notify_interval: float = 0.0005
    """Seconds between two wake-ups at least: a writer committing back to back sends one per
    interval, naming every stream that changed; the first after a quiet spell goes at once."""
    max_batch: int = 512
    """Appends written in one INSERT (one commit) at most."""
    max_batch_bytes: int = 4 << 20
    """Message bytes per INSERT at most (a batch holds at least one append, however large)."""
    max_inflight: int = 2
    """Batches written at once, each on its own pool connection."""
    max_pending: int = 10_000
    """Appends queued or in flight at most; more callers wait (back-pressure when the
    database is slower than the writers)."""
    writer_linger: float = 0.1
    """Seconds the writer keeps a connection between batches before giving it back to the pool."""
    synchronous_commit: str | None = None
    """PostgreSQL's ``synchronous_commit`` for the store's appends only (``SET LOCAL`` in each
    append's transaction): ``off`` answers ``store_event`` before the commit reaches the disk,
    so a database crash (not an application crash) may lose the last events (up to three
    times ``wal_writer_delay``, 600 ms by default), never corrupt or reorder them; ``local``,
    ``remote_write``, ``on``, ``remote_apply`` as PostgreSQL means them. None: the server's
    own setting (PostgreSQL's default is ``on``, every event on disk before it is sent)."""
    tail_batch: int = 1000
    """Live subscriptions caught up per query at most."""
    adopt_sessions: bool = True
    """Serve a request for an MCP session that this process does not hold (another worker
    opened it, or this one restarted since) when the session registry knows it as live and
    the principal matches; off: such requests get the SDK's 404, as without this package.
    Sessions are registered either way."""
    activity_interval: float = 30.0
    """Seconds between two writes of when the sessions this process serves were last
    active (one statement for all of them): a session in use costs no write per request.
    Also the slack after which another worker counts a session idle past its timeout.
    At most 300 (retention allows that much, and more, before it ends idle sessions)."""
    heartbeat_interval: float = 3.0
    """Seconds between two heartbeats of this process's worker row, and between two
    checks, while a resumed stream follows another worker's request, that its worker lives."""
    worker_grace: float = 10.0
    """Seconds a worker may go without a heartbeat before its lease is asked whether it
    lives; a worker found dead has its unanswered requests ended with an error. Longer
    than a blip of its lease connection; the time a client waits, at most, to learn
    that the worker running its request is gone."""

    def __post_init__(self) -> None:
        for name in ("min_pool_size", "retry_deadline"):
            _at_least(name, getattr(self, name), 0)
        for name in ("max_pool_size", "replay_batch_size", "max_batch", "max_batch_bytes"):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_inflight", "max_pending", "tail_batch"):
            _at_least(name, getattr(self, name), 1)
        for name in ("poll_interval", "ping_interval", "activity_interval", "heartbeat_interval"):
            _positive(name, getattr(self, name))
        if self.activity_interval > MAX_ACTIVITY_INTERVAL:
            raise ConfigurationError(
                f"activity_interval must be at most {MAX_ACTIVITY_INTERVAL:g}, got {self.activity_interval!r}"
            )
        if not self.worker_grace > self.heartbeat_interval:
            raise ConfigurationError(
                f"worker_grace ({self.worker_grace!r}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval!r}): a live worker would be asked whether it lives"
            )
        _at_least("notify_interval", self.notify_interval, 0)
        _at_least("writer_linger", self.writer_linger, 0)
        if self.min_pool_size > self.max_pool_size:
            raise ConfigurationError(
                f"min_pool_size ({self.min_pool_size}) must not exceed max_pool_size ({self.max_pool_size})"
            )
        if self.synchronous_commit is not None and self.synchronous_commit not in SYNCHRONOUS_COMMIT:
            raise ConfigurationError(
                f"synchronous_commit must be one of {', '.join(SYNCHRONOUS_COMMIT)} (or unset), "
                f"got {self.synchronous_commit!r}"
            )
        if self.max_inflight > self.max_pool_size:
            raise ConfigurationError(
                f"max_inflight ({self.max_inflight}) must not exceed max_pool_size ({self.max_pool_size}): "
                "each batch in flight holds a pool connection"
            )


class StoreOptions(TypedDict, total=False):
    """The keyword arguments that ``PostgresEventStore`` and ``connect()`` take: ``StoreSettings``' fields."""

    min_pool_size: int
    max_pool_size: int
    check_schema: bool
    listen: bool
    listen_dsn: str | None
    retry_deadline: float
    replay_batch_size: int
    poll_interval: float
    ping_interval: float
    notify: bool
    notify_interval: float
    max_batch: int
    max_batch_bytes: int
    max_inflight: int
    max_pending: int
    writer_linger: float
    synchronous_commit: str | None
    tail_batch: int
    adopt_sessions: bool
    activity_interval: float
    heartbeat_interval: float
    worker_grace: float


# Roles other than the tables' owner may ask for at most 100 partitions ahead
# (migration 0003), and a roll-over asks for one more than this. The retention
# procedure refuses more too (a test holds the two together).
MAX_PARTITIONS_AHEAD = 99


@dataclass(frozen=True)
class RetentionSettings(_FromEnv):
    """What a retention run removes and how gently. Each setting also reads ``MCP_PG_EVENTS_<NAME>``."""

    ttl: timedelta = timedelta(days=1)
    """Events older than this go. Replaying from a cursor that went returns None, so this is
    how long a client may take to resume."""
    batch_size: int = 2_000
    """Rows per delete transaction, and seqs per delete window; bounds how long each
    transaction holds its locks and how much WAL it writes at once."""
    ended_grace: timedelta = timedelta(0)
    """Events of sessions that ended longer ago than this go too, whatever their age."""
    partition_max_age: timedelta | None = None
    """When the partition being written holds an event older than this, the sequence jumps to
    the next partition, so that low traffic still yields whole partitions to drop. Also how
    long expired events may wait for their partition to expire whole rather than be deleted
    row by row. None: a quarter of the ttl."""
    partitions_ahead: int = 2
    """Partitions kept ready above the sequence, so appends never wait for one."""
    lock_timeout: timedelta = timedelta(seconds=1)
    """How long a detach, drop or roll-over waits for its lock before leaving the work to the
    next run. Appends queue behind a waiting DETACH, so keep it short."""
    interval: timedelta = timedelta(minutes=5)
    """Time between two runs of ``retention --loop``."""

    def __post_init__(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        if not 1 <= self.partitions_ahead <= MAX_PARTITIONS_AHEAD:
            raise ConfigurationError(
                f"partitions_ahead must be between 1 and {MAX_PARTITIONS_AHEAD}, got {self.partitions_ahead}"
            )
        for name in ("ttl", "ended_grace", "partition_max_age", "lock_timeout", "interval"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < timedelta(0):
                raise ConfigurationError(f"{name} must not be negative, got -{format_duration(-value)}")
            if value > MAX_DURATION:
                raise ConfigurationError(f"{name} must be at most {MAX_DURATION.days:,} days")
        if self.lock_timeout <= timedelta(0):
            raise ConfigurationError(
                f"lock_timeout must be more than 0, got {format_duration(self.lock_timeout)}"
            )
        if self.interval < MIN_INTERVAL:
            # Shorter, a sidecar looping on an empty database would hammer it unnoticed.
            raise ConfigurationError(
                f"interval must be at least {format_duration(MIN_INTERVAL)}, "
                f"got {format_duration(self.interval)}"
            )


class RetentionOptions(TypedDict, total=False):
    """The keyword arguments that ``run_retention`` takes: ``RetentionSettings``' fields."""

    ttl: timedelta
    batch_size: int
    ended_grace: timedelta
    partition_max_age: timedelta | None
    partitions_ahead: int
    lock_timeout: timedelta
    interval: timedelta


@dataclass(frozen=True)
class RestFrameworkSettings(_FromEnv):
    """How ``mcp_pg_events.rest_framework`` serves ``rest_framework_mcp``. Each setting also reads
    ``MCP_PG_EVENTS_<NAME>``; in a Django project, the ``MCP_PG_EVENTS`` setting (a dict of
    upper-case names) wins over the environment."""

    database: str = "default"
    """The Django database alias: its ``DATABASES`` entry gives the DSN (unless ``dsn`` is set),
    and the synchronous stores run on its connection where Django's connection serves (a sync
    view, a worker, a command; not an ASGI request, whose connection Django keeps until the
    response ends, and not inside a transaction, which would hold back the write)."""
    dsn: str | None = None
    """A ``postgresql://`` DSN for the event store instead of ``DATABASES[database]``; the
    synchronous stores then use the event store's pool too (Django's may be another database)."""
    sse_queue_size: int = 1024
    """Events an open GET stream holds in memory at most; past it the stream's reader in the
    database pauses until the client catches up (nothing is dropped: the events wait in the
    table)."""
    subscription_queue_size: int = 1024
    """Notifications a subscription holds in memory at most; past it the subscription reads
    from the table at its own pace until it catches up (nothing is dropped)."""
    task_ttl_fallback: timedelta = timedelta(days=7)
    """How long a task that asked for no expiry (``ttlMs`` null) is kept."""
    session_activity_interval: timedelta = timedelta(minutes=1)
    """How often at most a session's last activity is written: ``owner()`` on every request
    updates the row only when the last write is older than this."""
    replay_gap_notice: bool = True
    """Tell a client that resumes from an event retention removed, with one
    ``notifications/mcp_pg_events/replay_gap`` before the events still held; off: silence, as
    for an unknown id."""

    def __post_init__(self) -> None:
        if not self.database:
            raise ConfigurationError("database must name a Django database alias")
        for name in ("sse_queue_size", "subscription_queue_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("task_ttl_fallback", "session_activity_interval"):
            value = getattr(self, name)
            if value < timedelta(0) or value > MAX_DURATION:
                raise ConfigurationError(
                    f"{name} must be from 0 to {MAX_DURATION.days:,} days, got {format_duration(abs(value))}"
                )


class RestFrameworkOptions(TypedDict, total=False):
    """The keyword arguments ``RestFrameworkSettings`` takes: its fields."""

    database: str
    dsn: str | None
    sse_queue_size: int
    subscription_queue_size: int
    task_ttl_fallback: timedelta
    session_activity_interval: timedelta
    replay_gap_notice: bool


__all__ = [
    "MAX_PARTITIONS_AHEAD",
    "RestFrameworkOptions",
    "RestFrameworkSettings",
    "RetentionOptions",
    "RetentionSettings",
    "StoreOptions",
    "StoreSettings",
    "env_name",
    "format_duration",
    "parse_duration",
    "parse_switch",
]
