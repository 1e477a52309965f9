"""Metrics, read back through the OpenTelemetry SDK's in-memory reader; and nothing without the API."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp.server.streamable_http import EventMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from mcp_pg_events import PostgresEventStore, StoreUnavailableError, metrics
from mcp_pg_events.retention import run_retention

from .messages import progress_message
from .proxy import FlakyProxy
from .test_live import kill_listener

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """The package's metrics, recorded through a meter provider of this test's own."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.use_meter_provider(provider)
    try:
        yield reader
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()


class Points:
    """One reading: each metric's unit and data points, by name."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.units: dict[str, str] = {}
        self.points: dict[str, list[Any]] = {}
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != metrics.METER_NAME:
                    continue
                for metric in scope.metrics:
                    self.units[metric.name] = metric.unit or ""
                    self.points[metric.name] = list(metric.data.data_points)

    def total(self, name: str, attributes: dict[str, str] | None = None) -> float:
        """A counter's or histogram's sum over the points that carry ``attributes``."""
        found = 0.0
        for point in self.points.get(name, ()):
            if all(point.attributes.get(k) == v for k, v in (attributes or {}).items()):
                found += point.sum if hasattr(point, "bucket_counts") else point.value
        return found

    def count(self, name: str) -> int:
        """How many values a histogram recorded."""
        return sum(point.count for point in self.points.get(name, ()))

    def attributes(self, name: str) -> list[dict[str, Any]]:
        return [dict(point.attributes) for point in self.points.get(name, ())]


async def test_appends_replays_a_subscription_and_a_retry_are_read_back(
    dsn: str, proxy: FlakyProxy, reader: InMemoryMetricReader
) -> None:
    # Nothing else talks to the database meanwhile (no listener, no wake-ups), so
    # the response the proxy cuts below is the append's.
    async with await PostgresEventStore.connect(
        proxy.dsn, listen=False, notify=False, poll_interval=0.05, retry_deadline=30
    ) as store:
        view = store.session("metrics")
        first = await view.store_event("1", None)
        ids = [await view.store_event("1", progress_message(i, pad="x" * 100)) for i in range(10)]
        appended = Points(reader)
        assert appended.total("mcp_pg_events.appended.events") == 11
        assert appended.total("mcp_pg_events.appended.size") >= 10 * 100
        assert appended.count("mcp_pg_events.append.duration") == 11
        assert appended.count("mcp_pg_events.commit.duration") >= 1
        assert appended.total("mcp_pg_events.batch.events") == 11

        replayed: list[EventMessage] = []

        async def collect(event: EventMessage) -> None:
            replayed.append(event)

        assert await view.replay_events_after(first, collect) == "1"
        assert await view.replay_events_after("not-an-event-id", collect) is None
        assert len(replayed) == 10

        subscription = view.subscribe(ids[4])
        assert await subscription.open()
        following = Points(reader)
        assert following.total("mcp_pg_events.live.subscription.count") == 1
        for _ in range(5):  # what follows the cursor
            await asyncio.wait_for(subscription.__anext__(), 30)
        await view.store_event("1", progress_message(10))
        await asyncio.wait_for(subscription.__anext__(), 30)  # only a poll can bring it
        await subscription.aclose()

        proxy.cut_next_response()
        await view.store_event("1", progress_message(11))
        assert proxy.cuts == 1

    points = Points(reader)
    assert points.total("mcp_pg_events.appended.events") == 13
    # One replay, one subscription.
    assert points.total("mcp_pg_events.replays", {metrics.OUTCOME: "resumed"}) == 2
    assert points.total("mcp_pg_events.replays", {metrics.OUTCOME: "unknown_cursor"}) == 1
    assert points.total("mcp_pg_events.replayed.events") == 10
    assert points.total("mcp_pg_events.live.events") >= 6
    assert points.total("mcp_pg_events.live.fetches") >= 1
    assert points.total("mcp_pg_events.live.catch_ups", {metrics.REASON: "poll"}) >= 1
    assert points.total("mcp_pg_events.live.subscription.count") == 0
    assert points.total("mcp_pg_events.db.retries") >= 1
    assert all(a[metrics.ERROR_TYPE] for a in points.attributes("mcp_pg_events.db.retries"))
    assert points.total("mcp_pg_events.db.give_ups") == 0
    assert points.units["mcp_pg_events.append.duration"] == "s"
    assert points.units["mcp_pg_events.appended.size"] == "By"
    # No attribute names a session, a stream or a payload.
    for name in points.points:
        for attributes in points.attributes(name):
            assert set(attributes) <= {metrics.ERROR_TYPE, metrics.OUTCOME, metrics.REASON}


async def test_wakeups_and_a_listener_reconnect_are_read_back(
    dsn: str, admin: asyncpg.Connection, reader: InMemoryMetricReader
) -> None:
    # The poll is an hour away: only a wake-up or the catch-up after a reconnect delivers.
    async with await PostgresEventStore.connect(dsn, poll_interval=3600, retry_deadline=10) as store:
        assert store.listener is not None
        view = store.session("woken")
        cursor = await view.store_event("1", None)
        subscription = view.subscribe(cursor)
        assert await subscription.open()
        await store.listener.wait_listening()
        # The catch-up after the listener connected may bring the first; then only a
        # wake-up can bring the second.
        for i in range(2):
            await view.store_event("1", progress_message(i))
            await asyncio.wait_for(subscription.__anext__(), 30)
        assert Points(reader).total("mcp_pg_events.live.wakeups") >= 1

        assert await kill_listener(admin) == 1
        await view.store_event("1", progress_message(2))
        await asyncio.wait_for(subscription.__anext__(), 30)
        await subscription.aclose()

    points = Points(reader)
    assert points.total("mcp_pg_events.listener.reconnects") >= 1
    assert points.total("mcp_pg_events.live.catch_ups", {metrics.REASON: "listener_connect"}) >= 2


async def test_a_give_up_is_counted_and_logged_without_the_payload(
    dsn: str, proxy: FlakyProxy, reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    async with await PostgresEventStore.connect(
        proxy.dsn, listen=False, notify=False, retry_deadline=0.3
    ) as store:
        view = store.session("a-session-key-of-some-length")
        await view.store_event("7", None)
        proxy.go_down()
        with caplog.at_level(logging.INFO, "mcp_pg_events"), pytest.raises(StoreUnavailableError):
            await view.store_event("7", progress_message(1, secret="do-not-log-me"))
        proxy.go_up()

    points = Points(reader)
    assert points.total("mcp_pg_events.db.give_ups") == 1
    failed = [a for a in points.attributes("mcp_pg_events.append.duration") if a]
    assert failed == [{metrics.ERROR_TYPE: "StoreUnavailableError"}]
    assert "giving up" in caplog.text
    assert "store_event failed for session a-sessio..." in caplog.text
    assert "do-not-log-me" not in caplog.text and "a-session-key-of-some-length" not in caplog.text


async def test_a_partition_repair_and_a_retention_run_are_read_back(
    store: PostgresEventStore,
    admin: asyncpg.Connection,
    dsn: str,
    reader: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    view = store.session("s")
    await view.store_event("1", None)
    await admin.execute("SELECT setval('mcp_events_seq', 50000000)")
    with caplog.at_level(logging.INFO, "mcp_pg_events"):
        await view.store_event("1", progress_message(1))
        report = await run_retention(dsn)
    assert "no partition for the next events" in caplog.text
    assert report.summary() in caplog.text

    points = Points(reader)
    assert points.total("mcp_pg_events.partitions.created", {metrics.CREATED_BY: "append"}) >= 1
    assert points.total("mcp_pg_events.retention.runs", {metrics.OUTCOME: "complete"}) == 1
    assert points.count("mcp_pg_events.retention.duration") == 1


async def test_without_the_opentelemetry_api_nothing_is_recorded_and_everything_works(dsn: str) -> None:
    script = """
import asyncio, sys
sys.modules["opentelemetry.metrics"] = None  # as if the API were not installed
from mcp_pg_events import PostgresEventStore, metrics
from mcp_pg_events.retention import run_retention

async def main(dsn):
    assert metrics._otel is None
    async with await PostgresEventStore.connect(dsn) as store:
        view = store.session("s")
        first = await view.store_event("1", None)
        await view.store_event("1", None)
        sent = []
        async def collect(event):
            sent.append(event)
        assert await view.replay_events_after(first, collect) == "1"
        subscription = view.subscribe(first)
        assert await subscription.open()
        await subscription.aclose()
        await store.end_session("s")
    await run_retention(dsn)
    assert metrics._instruments is None
    print("ok")

asyncio.run(main(sys.argv[1]))
"""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, dsn, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "ok"


def test_every_metric_is_listed_in_the_operations_guide() -> None:
    text = OPERATIONS.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(
        r"^\| `(mcp_pg_events\.[a-z_.]+)` \| ([a-z -]+) \| `([^`]+)` \| ([^|]*) \|", section, re.M
    )
    listed = {name: (kind, unit, attributes.strip()) for name, kind, unit, attributes in rows}
    defined = {
        metric.name: (metric.kind, metric.unit, ", ".join(f"`{a}`" for a in metric.attributes) or "none")
        for metric in metrics.METRICS
    }
    assert listed == defined
