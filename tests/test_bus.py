"""``PostgresSubscriptionBus``: the 2026-07-28 revision's server events across server processes.

The servers are ``uvicorn tests.wiring_app:app`` processes (``with_postgres`` of an
``MCPServer``); the clients are the SDK's own ``Client`` pinned to 2026-07-28,
calling tools and opening ``subscriptions/listen`` streams over real HTTP.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.listener import LISTENER_NAME
from mcp_pg_events.testing import McpClient, serve

from .worker_processes import WorkerProcess, listening_socket

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mcp.shared.subscriptions") is None,
    reason="subscriptions/listen (the 2026-07-28 revision) needs mcp >= 2.3",
)

MODERN = "2026-07-28"
WAIT = 15.0


@asynccontextmanager
async def server_process(dsn: str, **env: str) -> AsyncIterator[WorkerProcess]:
    sock = listening_socket()
    worker = await WorkerProcess.start(dsn, sock, app="tests.wiring_app:app", TEST_FRAMEWORK="sdk", **env)
    try:
        yield worker
    finally:
        await worker.kill()
        sock.close()


@asynccontextmanager
async def modern_client(url: str) -> AsyncIterator[Any]:
    from mcp.client.client import Client

    async with Client(f"{url}/mcp", mode=MODERN, read_timeout_seconds=WAIT) as client:
        yield client


async def next_event(subscription: Any, timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(subscription.__anext__(), timeout)


async def test_a_listen_stream_on_one_process_gets_what_a_tool_on_another_publishes(dsn: str) -> None:
    from mcp.shared.subscriptions import ResourceUpdated, ToolsListChanged

    async with (
        server_process(dsn) as a,
        server_process(dsn) as b,
        modern_client(a.url) as on_a,
        modern_client(b.url) as on_b,
        on_b.listen(resource_subscriptions=["test://one", "test://big"]) as resources,
        on_b.listen(tools_list_changed=True) as tools,
    ):
        big = "test://big?" + "x" * 10_000  # past what one NOTIFY carries
        await on_a.call_tool("touch", {"uri": "test://one"})
        await on_a.call_tool("touch", {"uri": "test://other"})  # asked for by nobody
        await on_a.call_tool("tools_changed", {})
        await on_a.call_tool("touch", {"uri": big})
        await on_a.call_tool("touch", {"uri": "test://big"})
        # The tool-list stream's first event is the tool-list change: it got none of the
        # resource events published before it, by the same publisher, in order.
        assert await next_event(tools) == ToolsListChanged()
        assert await next_event(resources) == ResourceUpdated(uri="test://one")
        assert await next_event(resources) == ResourceUpdated(uri="test://big")


async def test_an_event_larger_than_a_notification_arrives_whole(dsn: str) -> None:
    from mcp.shared.subscriptions import ResourceUpdated

    big = "test://big/" + "y" * 12_000
    async with (
        server_process(dsn) as a,
        server_process(dsn) as b,
        modern_client(a.url) as on_a,
        modern_client(b.url) as on_b,
        on_b.listen(resource_subscriptions=[big]) as resources,
    ):
        await on_a.call_tool("touch", {"uri": big})
        assert await next_event(resources) == ResourceUpdated(uri=big)


async def test_nothing_published_while_the_listener_is_down_is_lost(
    dsn: str, admin: asyncpg.Connection, server_dsn: str
) -> None:
    from mcp.shared.subscriptions import ResourceUpdated

    database = await admin.fetchval("SELECT current_database()")
    # A database cannot refuse connections from a session inside it.
    outside = await asyncpg.connect(server_dsn)
    uris = [f"test://during/{i}" for i in range(20)]
    # Every pool connection open from the start: while the database refuses new
    # ones, publishing and catching up go on, on the connections the pools hold.
    full_pools = {"MCP_PG_EVENTS_MIN_POOL_SIZE": "10", "MCP_PG_EVENTS_MAX_POOL_SIZE": "10"}
    async with (
        server_process(dsn, **full_pools) as a,
        server_process(dsn, **full_pools) as b,
        modern_client(a.url) as on_a,
        modern_client(b.url) as on_b,
        on_b.listen(resource_subscriptions=uris) as resources,
    ):
        # No new connection to the database, then every LISTEN connection killed:
        # the listeners cannot come back until connections are allowed again.
        await outside.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = $1",
                LISTENER_NAME,
            )
            assert killed == 2
            for uri in uris:
                await on_a.call_tool("touch", {"uri": uri})
            listening = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = $1",
                LISTENER_NAME,
            )
            assert listening == 0  # published while no process listened
        finally:
            await outside.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await outside.close()
        # Back within the listener's reconnect backoff (5 s at most) or the poll (5 s).
        received = [await next_event(resources, 2 * WAIT) for _ in uris]
    assert received == [ResourceUpdated(uri=uri) for uri in uris]


async def test_a_2025_11_25_client_and_a_2026_07_28_client_on_one_server(dsn: str) -> None:
    # Resumable streams through the store, listen streams through the bus: one server, one database.
    from mcp.shared.subscriptions import ResourceUpdated

    async with (
        server_process(dsn) as a,
        modern_client(a.url) as modern,
        modern.listen(resource_subscriptions=["test://both"]) as resources,
        httpx.AsyncClient(base_url=a.url, timeout=WAIT) as http,
    ):
        legacy = McpClient(http)
        await legacy.initialize()
        request_id, opened = legacy.call_tool("touch", {"uri": "test://both"}, progress_token="t")
        async with opened as stream:
            first = await stream.next()
        assert first is not None and first.id  # the priming event: a cursor
        async with legacy.get(last_event_id=first.id) as resumed:
            rest = await resumed.until_response(request_id)
        assert rest[-1].message is not None and "result" in rest[-1].message
        assert await next_event(resources) == ResourceUpdated(uri="test://both")


async def test_bus_events_are_in_no_session_and_retention_drops_them(store: PostgresEventStore) -> None:
    from mcp.shared.subscriptions import ResourceUpdated

    from mcp_pg_events import PostgresSubscriptionBus, run_retention
    from mcp_pg_events.bus import BUS_SESSION

    got: list[Any] = []
    arrived = asyncio.Event()

    def listener(event: Any) -> None:
        got.append(event)
        arrived.set()

    def raising(event: Any) -> None:
        raise RuntimeError("a listener's own failure")

    bus = await PostgresSubscriptionBus.from_store(store, namespace="n")
    try:
        bus.subscribe(raising)
        unsubscribe = bus.subscribe(listener)
        await bus.publish(ResourceUpdated(uri="test://kept"))
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert got == [ResourceUpdated(uri="test://kept")]  # the raising listener stopped nothing
        unsubscribe()
        unsubscribe()
        head = await store.log.stream_head(BUS_SESSION, "n")
        assert head is not None and head.last_seq > 0
        cursor = f"{head.key}-{head.last_seq}-{head.tag}"
        # No session can resume the bus's stream, not even one that names the bus's key in a header.
        for key in ("s1", BUS_SESSION.replace(" ", "-"), "provisional-x"):
            assert await store.session(key).replay_events_after(cursor, _never) is None
        assert await store.replay_events_after(cursor, _never) is None
        assert await store.registry.lookup(BUS_SESSION) is None  # never adopted
    finally:
        await bus.close()
    await store.database.execute("UPDATE mcp_events_events SET created_at = now() - interval '2 days'")
    await run_retention(store.database, ttl=timedelta(hours=1))
    assert await store.database.fetchval("SELECT count(*) FROM mcp_events_events") == 0


async def _never(event: Any) -> None:
    raise AssertionError(f"replayed {event!r}")


async def test_a_bus_follows_its_stream_when_retention_removed_it_and_a_publish_made_it_again(
    dsn: str,
) -> None:
    from mcp.shared.subscriptions import ResourceUpdated

    from mcp_pg_events import PostgresSubscriptionBus, run_retention

    got: list[Any] = []
    arrived = asyncio.Event()

    def listener(event: Any) -> None:
        got.append(event)
        arrived.set()

    async with (
        await PostgresEventStore.connect(dsn, poll_interval=0.2) as here,
        await PostgresEventStore.connect(dsn) as there,
    ):
        bus = await PostgresSubscriptionBus.from_store(here)
        try:
            bus.subscribe(listener)
            await bus.publish(ResourceUpdated(uri="test://before"))
            await asyncio.wait_for(arrived.wait(), WAIT)
            old = bus._follower.stream_key if bus._follower else None
            # Everything expired: the events go, then the stream they left empty.
            for table in ("mcp_events_events", "mcp_events_streams"):
                await here.database.execute(f"UPDATE {table} SET created_at = now() - interval '2 days'")
            report = await run_retention(here.database, ttl=timedelta(hours=1))
            assert report.streams_removed == 1
            arrived.clear()
            # Another worker publishes: its append makes the stream again, under a new key.
            other = await PostgresSubscriptionBus.from_store(there)
            try:
                await other.publish(ResourceUpdated(uri="test://after"))
            finally:
                await other.close()
            await asyncio.wait_for(arrived.wait(), WAIT)
            assert got == [ResourceUpdated(uri="test://before"), ResourceUpdated(uri="test://after")]
            assert bus._follower is not None and bus._follower.stream_key != old
        finally:
            await bus.close()


async def test_a_bus_made_at_import_time_runs_with_the_app_or_on_a_store_of_its_own(dsn: str) -> None:
    from mcp.server.mcpserver import MCPServer
    from mcp.shared.subscriptions import ToolsListChanged

    from mcp_pg_events import PostgresSubscriptionBus, with_postgres

    bus = PostgresSubscriptionBus(namespace="imported")  # no loop, no database yet
    with pytest.raises(RuntimeError, match="not started"):
        await bus.publish(ToolsListChanged())
    app = with_postgres(MCPServer("imported", subscriptions=bus), dsn)
    assert app.state.subscriptions is bus
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        await McpClient(http).initialize()  # served: the lifespan has run
        assert bus.started and bus.store is app.state.store
    assert not bus.started

    # Started by hand: a store of its own, from the DSN, closed with the bus.
    got: list[Any] = []
    arrived = asyncio.Event()
    async with PostgresSubscriptionBus(dsn, namespace="imported") as own:
        own.subscribe(lambda event: (got.append(event), arrived.set()))
        await own.publish(ToolsListChanged())
        await asyncio.wait_for(arrived.wait(), WAIT)
        store = own.store
    assert got == [ToolsListChanged()]
    assert store is not None and store.database.pool.is_closing()
