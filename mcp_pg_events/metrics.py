"""OpenTelemetry metrics: what the store does, on the dashboards its users already have.

Recorded through the OpenTelemetry API, an optional dependency
(``pip install "mcp-pg-events[otel]"``; mcp 2.x depends on it anyway), as the
MCP SDK records its own spans. Without the API every function here returns at
once; with the API but no SDK configured, the API's instruments do nothing.
An application (or ``opentelemetry-instrument``) that configures a meter
provider gets the metrics of ``METRICS`` under the meter ``mcp_pg_events``.

Each function is called by the layer that owns the fact (the writer for
batches, the event log for appends and replays, the live tail, the listener,
the gateway for retries, retention for its runs). Attributes are few and of
low cardinality: never a session id, a stream or a payload.

The instruments are made on first use, from the global meter provider or the
one given to ``use_meter_provider``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

try:
    from opentelemetry import metrics as _otel
except ImportError:  # the optional dependency is absent: every function below is a no-op
    _otel = None  # type: ignore[assignment, unused-ignore]

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

METER_NAME = "mcp_pg_events"

# Attribute names: OpenTelemetry's own where one fits (error.type), ours under our namespace.
ERROR_TYPE = "error.type"
OUTCOME = "mcp_pg_events.outcome"
REASON = "mcp_pg_events.reason"
CREATED_BY = "mcp_pg_events.created_by"

# Seconds: from a fraction of a millisecond (an append alone) to the retry deadline.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Appends per batch: up to max_batch's default, 512.
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Metric:
    """One instrument: what docs/operations.md lists, and what ``_Instruments`` creates."""

    name: str
    kind: str  # counter, histogram or observable up-down counter
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


METRICS = (
    Metric(
        "mcp_pg_events.append.duration", "histogram", "s",
        "Time an append takes until its event is committed (what the SDK waits for on every message).",
        (ERROR_TYPE,), _SECONDS,
    ),
    Metric(
        "mcp_pg_events.appended.events", "counter", "{event}",
        "Events committed (priming events included).",
    ),
    Metric(
        "mcp_pg_events.appended.size", "counter", "By",
        "Message bytes committed.",
    ),
    Metric(
        "mcp_pg_events.batch.events", "histogram", "{event}",
        "Appends per committed batch (group commit): near 1 when idle, larger under load.",
        (), _BATCH,
    ),
    Metric(
        "mcp_pg_events.commit.duration", "histogram", "s",
        "Time from a batch's first INSERT until its commit is known, retries included.",
        (), _SECONDS,
    ),
    Metric(
        "mcp_pg_events.replays", "counter", "{replay}",
        "Streams resumed from a Last-Event-ID: by replay or by a subscription from a cursor.",
        (OUTCOME,),
    ),
    Metric(
        "mcp_pg_events.replayed.events", "counter", "{event}",
        "Events sent by replays (a subscription's count in mcp_pg_events.live.events).",
    ),
    Metric(
        "mcp_pg_events.live.subscription.count", "observable up-down counter", "{subscription}",
        "Streams followed live right now (subscriptions and stream followers).",
    ),
    Metric(
        "mcp_pg_events.live.wakeups", "counter", "{notification}",
        "Wake-up notifications read by the live tail (repeats between two reads count once).",
    ),
    Metric(
        "mcp_pg_events.live.catch_ups", "counter", "{catch_up}",
        "Catch-ups of every followed stream: after the listener (re)connected, or by the poll.",
        (REASON,),
    ),
    Metric(
        "mcp_pg_events.live.fetches", "counter", "{query}",
        "Queries the live tail ran to read what follows its followers' cursors.",
    ),
    Metric(
        "mcp_pg_events.live.events", "counter", "{event}",
        "Events the live tail handed to followers.",
    ),
    Metric(
        "mcp_pg_events.listener.reconnects", "counter", "{reconnect}",
        "Times the LISTEN connection was lost and opened again.",
        (ERROR_TYPE,),
    ),
    Metric(
        "mcp_pg_events.db.retries", "counter", "{retry}",
        "Statements tried again after a transient database error.",
        (ERROR_TYPE,),
    ),
    Metric(
        "mcp_pg_events.db.give_ups", "counter", "{error}",
        "Operations that failed after retrying for the whole retry deadline (StoreUnavailableError).",
        (ERROR_TYPE,),
    ),
    Metric(
        "mcp_pg_events.partitions.created", "counter", "{partition}",
        "Partitions created: ahead by retention, or by an append that found none (retention is late).",
        (CREATED_BY,),
    ),
    Metric(
        "mcp_pg_events.retention.runs", "counter", "{run}",
        "Retention runs: complete, incomplete (a lock not granted in time), locked_out (another "
        "run held the lock), dry_run or failed.",
        (OUTCOME,),
    ),
    Metric(
        "mcp_pg_events.retention.duration", "histogram", "s",
        "Time of a retention run.",
        (OUTCOME,), _SECONDS,
    ),
    Metric(
        "mcp_pg_events.retention.dropped.partitions", "counter", "{partition}",
        "Expired partitions dropped whole.",
    ),
    Metric(
        "mcp_pg_events.retention.deleted.events", "counter", "{event}",
        "Events deleted row by row (expired ones, and those of ended sessions).",
    ),
    Metric(
        "mcp_pg_events.retention.freed.size", "counter", "By",
        "Bytes freed by retention (dropped partitions, and an estimate for deleted rows).",
    ),
    Metric(
        "mcp_pg_events.retention.removed.sessions", "counter", "{session}",
        "Sessions removed, once ended or left without a stream.",
    ),
)  # fmt: skip


class _Followed(Protocol):
    @property
    def subscriptions(self) -> int: ...


class _RetentionReport(Protocol):
    """What ``retention_ran`` reads of ``retention.RetentionReport``."""

    @property
    def outcome(self) -> str: ...

    @property
    def seconds(self) -> float: ...

    @property
    def dry_run(self) -> bool: ...

    @property
    def locked_out(self) -> bool: ...

    @property
    def partitions_dropped(self) -> int: ...

    @property
    def rows_deleted(self) -> int: ...

    @property
    def bytes_freed(self) -> int: ...

    @property
    def sessions_removed(self) -> int: ...

    @property
    def partitions_created(self) -> int: ...


class _Instruments:
    """The instruments of ``METRICS`` on one meter, by the last part of their name."""

    def __init__(self, meter: Any) -> None:
        made: dict[str, Any] = {}
        for metric in METRICS:
            if metric.kind == "counter":
                made[metric.name] = meter.create_counter(metric.name, metric.unit, metric.description)
            elif metric.kind == "histogram":
                made[metric.name] = _histogram(meter, metric)
            else:
                made[metric.name] = meter.create_observable_up_down_counter(
                    metric.name, [_observe_followed], metric.unit, metric.description
                )
        self.append_duration = made["mcp_pg_events.append.duration"]
        self.appended_events = made["mcp_pg_events.appended.events"]
        self.appended_size = made["mcp_pg_events.appended.size"]
        self.batch_events = made["mcp_pg_events.batch.events"]
        self.commit_duration = made["mcp_pg_events.commit.duration"]
        self.replays = made["mcp_pg_events.replays"]
        self.replayed_events = made["mcp_pg_events.replayed.events"]
        self.wakeups = made["mcp_pg_events.live.wakeups"]
        self.catch_ups = made["mcp_pg_events.live.catch_ups"]
        self.fetches = made["mcp_pg_events.live.fetches"]
        self.live_events = made["mcp_pg_events.live.events"]
        self.reconnects = made["mcp_pg_events.listener.reconnects"]
        self.retries = made["mcp_pg_events.db.retries"]
        self.give_ups = made["mcp_pg_events.db.give_ups"]
        self.partitions_created = made["mcp_pg_events.partitions.created"]
        self.retention_runs = made["mcp_pg_events.retention.runs"]
        self.retention_duration = made["mcp_pg_events.retention.duration"]
        self.dropped_partitions = made["mcp_pg_events.retention.dropped.partitions"]
        self.deleted_events = made["mcp_pg_events.retention.deleted.events"]
        self.freed_size = made["mcp_pg_events.retention.freed.size"]
        self.removed_sessions = made["mcp_pg_events.retention.removed.sessions"]


def _histogram(meter: Any, metric: Metric) -> Any:
    try:
        return meter.create_histogram(
            metric.name,
            metric.unit,
            metric.description,
            explicit_bucket_boundaries_advisory=metric.buckets,
        )
    except TypeError:  # an API older than 1.30 (mcp 2.x accepts 1.28): the SDK's default buckets
        return meter.create_histogram(metric.name, metric.unit, metric.description)


_provider: MeterProvider | None = None
_instruments: _Instruments | None = None
# Every live tail of the process: the subscription count sums theirs. Read by the
# metric reader's thread, hence an int each tail keeps, never its registry.
_tails: weakref.WeakSet[_Followed] = weakref.WeakSet()


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mcp-pg-events")
    except PackageNotFoundError:
        return None


def _make() -> _Instruments:
    global _instruments
    assert _otel is not None
    provider = _provider if _provider is not None else _otel.get_meter_provider()
    _instruments = _Instruments(provider.get_meter(METER_NAME, _version()))
    return _instruments


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record through ``provider`` from now on, instead of the global one (None: the global one again)."""
    global _provider, _instruments
    _provider = provider
    _instruments = None


def _observe_followed(options: CallbackOptions) -> Iterable[Observation]:
    assert _otel is not None
    return [_otel.Observation(sum(tail.subscriptions for tail in list(_tails)))]


def _error(error: BaseException) -> dict[str, str]:
    return {ERROR_TYPE: type(error).__name__}


# --- what the layers record -----------------------------------------------------------------


def appended(seconds: float, error: BaseException | None = None) -> None:
    """An append ended after ``seconds``: committed, or failed with ``error``."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    instruments.append_duration.record(seconds, None if error is None else _error(error))


def batch_committed(messages: Sequence[bytes | None], seconds: float) -> None:
    """A batch of ``messages`` (None: a priming event) committed; its INSERT took ``seconds``."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    instruments.appended_events.add(len(messages))
    instruments.appended_size.add(sum(len(data) for data in messages if data is not None))
    instruments.batch_events.record(len(messages))
    instruments.commit_duration.record(seconds)


def replayed(events: int | None) -> None:
    """A stream was resumed and ``events`` sent by replay; None: the cursor was not valid here."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    instruments.replays.add(1, {OUTCOME: "unknown_cursor" if events is None else "resumed"})
    if events:
        instruments.replayed_events.add(events)


def follow_tail(tail: _Followed) -> None:
    """Count ``tail.subscriptions`` in the live subscription count while ``tail`` exists."""
    if _otel is None:
        return
    _tails.add(tail)


def woken(notifications: int) -> None:
    """The live tail read ``notifications`` distinct wake-ups."""
    if _otel is None:
        return
    (_instruments or _make()).wakeups.add(notifications)


def caught_up(reason: str) -> None:
    """Every followed stream is due for a catch-up: ``listener_connect`` or ``poll``."""
    if _otel is None:
        return
    (_instruments or _make()).catch_ups.add(1, {REASON: reason})


def fetched(events: int) -> None:
    """The live tail ran one query, which read ``events`` events for its followers."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    instruments.fetches.add(1)
    if events:
        instruments.live_events.add(events)


def listener_reconnecting(error: BaseException) -> None:
    """The LISTEN connection was lost (or could not be opened) with ``error``."""
    if _otel is None:
        return
    (_instruments or _make()).reconnects.add(1, _error(error))


def retrying(error: BaseException) -> None:
    """A statement failed with the transient ``error`` and will be tried again."""
    if _otel is None:
        return
    (_instruments or _make()).retries.add(1, _error(error))


def gave_up(error: BaseException) -> None:
    """An operation failed for good after retrying until the deadline; ``error`` was the last."""
    if _otel is None:
        return
    (_instruments or _make()).give_ups.add(1, _error(error))


def partitions_created(count: int, created_by: str) -> None:
    """``count`` partitions were created, by ``append`` (none was there) or ``retention``."""
    if _otel is None or not count:
        return
    (_instruments or _make()).partitions_created.add(count, {CREATED_BY: created_by})


def retention_ran(report: _RetentionReport) -> None:
    """A retention run ended with ``report`` (a dry run or a locked-out run removed nothing)."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    attributes = {OUTCOME: report.outcome}
    instruments.retention_runs.add(1, attributes)
    instruments.retention_duration.record(report.seconds, attributes)
    if report.dry_run or report.locked_out:
        return
    instruments.dropped_partitions.add(report.partitions_dropped)
    instruments.deleted_events.add(report.rows_deleted)
    instruments.freed_size.add(report.bytes_freed)
    instruments.removed_sessions.add(report.sessions_removed)
    if report.partitions_created:
        instruments.partitions_created.add(report.partitions_created, {CREATED_BY: "retention"})


def retention_failed(seconds: float) -> None:
    """A retention run raised after ``seconds``."""
    if _otel is None:
        return
    instruments = _instruments or _make()
    attributes = {OUTCOME: "failed"}
    instruments.retention_runs.add(1, attributes)
    instruments.retention_duration.record(seconds, attributes)
