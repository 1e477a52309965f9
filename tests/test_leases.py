"""Worker leases, and the requests of dead workers: ended once, with an error, for every follower."""

from __future__ import annotations

import json

import asyncpg

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import WORKER_LOST_CODE

from .messages import progress_message, response


async def stream_of(admin: asyncpg.Connection, name: str) -> int:
    key: int = await admin.fetchval("SELECT id FROM mcp_events_streams WHERE name = $1", name.encode())
    return key


async def messages_of(admin: asyncpg.Connection, key: int) -> list[dict[str, object]]:
    rows = await admin.fetch(
        "SELECT message FROM mcp_events_events WHERE stream_key = $1 AND message IS NOT NULL ORDER BY seq",
        key,
    )
    return [json.loads(row["message"]) for row in rows]


async def test_a_dead_workers_unanswered_request_ends_once_with_an_error_and_nothing_else_does(
    dsn: str, admin: asyncpg.Connection
) -> None:
    workers = (
        "INSERT INTO mcp_events_workers (pid, seen_at) VALUES (1, now() - interval '1 minute') RETURNING id"
    )
    # Silent for a minute, its lease free: dead. Silent as long, its lease held: alive
    # (a lease connection that reconnected, say).
    dead, alive = await admin.fetchval(workers), await admin.fetchval(workers)
    holder = await asyncpg.connect(dsn)
    await holder.execute("SELECT pg_advisory_lock(1835233382, $1)", alive)
    try:
        async with await PostgresEventStore.connect(dsn, heartbeat_interval=0.2, worker_grace=1) as store:
            view = store.session("s")
            cursors = {}
            for name in ("5", "6", "7", '"x"'):
                cursors[name] = await view.store_event(name, None)
                await view.store_event(name, progress_message(1))
            await view.store_event("6", response(6, {"done": True}))
            for name, worker in (("5", dead), ("6", dead), ("7", alive), ('"x"', dead)):
                await admin.execute(
                    "UPDATE mcp_events_streams SET worker_id = $1 WHERE name = $2", worker, name.encode()
                )

            async with view.subscribe(cursors["5"]) as following:
                got = [event async for event in following]  # ends: no hang
            assert len(got) == 2
            # Another closer (another follower, another worker) finds it closed already.
            await store.orphans.check()
            key = await stream_of(admin, "5")
            assert not await store.orphans.close_request(key, dead)
            messages = await messages_of(admin, key)
            assert [m.get("method") for m in messages] == ["notifications/progress", None]
            ending = messages[-1]
            assert ending["id"] == 5 and ending["error"]["code"] == WORKER_LOST_CODE  # type: ignore[index]

            # Answered, or its worker alive: left alone.
            for name in ("6", "7"):
                key = await stream_of(admin, name)
                assert not await store.orphans.close_request(key, dead if name == "6" else alive)
                assert all("error" not in m for m in await messages_of(admin, key))

            # A request id that was a string stays one.
            async with view.subscribe(cursors['"x"']) as following:
                got = [event async for event in following]
            key = await stream_of(admin, '"x"')
            assert (await messages_of(admin, key))[-1]["id"] == '"x"'
    finally:
        await holder.close()


async def test_a_worker_holds_its_lease_and_ends_it_cleanly(dsn: str, admin: asyncpg.Connection) -> None:
    async with await PostgresEventStore.connect(dsn, heartbeat_interval=0.2, worker_grace=1) as store:
        await store.registry.start()
        worker = store.worker.id
        assert worker is not None
        row = await admin.fetchrow("SELECT pid, ended_at FROM mcp_events_workers WHERE id = $1", worker)
        assert row is not None and row["ended_at"] is None
        # Held: nobody else takes it.
        assert not await admin.fetchval("SELECT pg_try_advisory_lock(1835233382, $1)", worker)
        await store.registry.stop()
    assert await admin.fetchval("SELECT ended_at IS NOT NULL FROM mcp_events_workers WHERE id = $1", worker)
    assert await admin.fetchval("SELECT pg_try_advisory_lock(1835233382, $1)", worker)


async def test_one_store_serves_one_manager_after_another(dsn: str, admin: asyncpg.Connection) -> None:
    # Each run is a worker of its own: its own row, ended cleanly; the registry
    # listens again, and a store closed under a running registry stops it.
    async with await PostgresEventStore.connect(dsn, heartbeat_interval=0.2, worker_grace=1) as store:
        workers = []
        for _ in range(2):
            await store.registry.start()
            workers.append(store.worker.id)
            await store.registry.stop()
        await store.registry.start()
        workers.append(store.worker.id)
    assert None not in workers and len(set(workers)) == 3
    rows = await admin.fetch("SELECT ended_at IS NOT NULL AS ended FROM mcp_events_workers ORDER BY id")
    assert [row["ended"] for row in rows] == [True, True, True]
