"""rest_framework_mcp on PostgreSQL: the framework's own transport, over real HTTP, on two worker processes.

Two uvicorn processes (A and B) serve the test project (``tests/drf``) on one
migrated database; a third process plays the task worker. Every test drives
the framework's wire format with an HTTP client, and every claim is about what
one worker sees of what the other did.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest

from mcp_pg_events import migrate
from mcp_pg_events.database import SCHEMA_REVISION
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.rest_framework import REPLAY_GAP_METHOD
from mcp_pg_events.retention import run_retention

from .conftest import _admin, with_database
from .drf.database import django_database
from .drf_http import (
    ROOT,
    LegacyClient,
    ModernClient,
    Worker,
    django_command,
    running,
    texts,
    uvicorn_worker,
    wsgi_worker,
)


@pytest.fixture(scope="module")
def drf_dsn(server_dsn: str, template_database: str) -> Iterator[str]:
    """One migrated database for the module's workers (sessions keep the tests apart)."""
    name = f"mcp_events_test_drf_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    try:
        yield with_database(server_dsn, name)
    finally:
        asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def workers(drf_dsn: str) -> Iterator[tuple[Worker, Worker]]:
    """Workers A and B: two uvicorn processes of the test project."""
    with running(uvicorn_worker(drf_dsn), uvicorn_worker(drf_dsn)) as (a, b):
        yield a, b


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as client:
        yield client


async def test_a_get_stream_on_b_receives_what_a_view_on_a_publishes(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient
) -> None:
    a, b = workers
    client = LegacyClient(http)
    await client.initialize(a)
    assert (await client.call(a, "where"))["pid"] == a.pid
    async with client.get(b) as stream:
        big = "x" * 20_000  # more than a notification carries
        await client.push(a, "one", "two", big)
        events = await stream.take(3)
    assert texts(events) == ["one", "two", big]
    refs = [parse_event_id(e.id or "") for e in events]
    assert all(refs) and [r.seq for r in refs if r] == sorted(r.seq for r in refs if r)


async def test_a_reconnect_with_last_event_id_on_either_worker_replays_exactly_what_it_missed(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient
) -> None:
    a, b = workers
    client = LegacyClient(http)
    await client.initialize(a)
    async with client.get(b) as stream:
        await client.push(a, "m0", "m1", "m2")
        seen = await stream.take(3)
    await client.push(b, "m3", "m4")  # while no stream is open

    # On A, from m1: m2 to m4 replayed, then m5 live; nothing twice.
    async with client.get(a, last_event_id=seen[1].id) as stream:
        await client.push(b, "m5")
        resumed = await stream.take(4)
    assert texts(resumed) == ["m2", "m3", "m4", "m5"]
    assert resumed[0].id == seen[2].id

    # On B, from m5, while both workers push all along: the replay and the live
    # events are one read after one cursor, so whatever lands while the stream
    # opens comes once, in order.
    expected = [f"{worker}{i}" for worker in "ab" for i in range(30)]
    pushers = [
        asyncio.ensure_future(client.push(worker, *(f"{name}{i}" for i in range(30))))
        for worker, name in ((a, "a"), (b, "b"))
    ]
    try:
        await asyncio.sleep(0)
        async with client.get(b, last_event_id=resumed[-1].id) as stream:
            await asyncio.gather(*pushers)
            late = await stream.take(len(expected))
            await client.push(a, "end")
            assert texts(await stream.take(1)) == ["end"]
    finally:
        for pusher in pushers:
            pusher.cancel()
    assert sorted(texts(late)) == sorted(expected)
    refs = [parse_event_id(e.id or "") for e in seen[:2] + resumed + late]
    seqs = [ref.seq for ref in refs if ref]
    assert len(seqs) == len(refs) and seqs == sorted(set(seqs))


async def test_a_session_created_on_a_is_owned_checked_and_destroyed_from_b(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient
) -> None:
    a, b = workers
    alice = LegacyClient(http, "alice")
    session = await alice.initialize(a)
    assert (await alice.post(b, "ping")).status_code == 200
    # The same id, presented by someone else, is no session at all.
    mallory = LegacyClient(http, "mallory")
    mallory.session_id = session
    assert (await mallory.post(b, "ping")).status_code == 404
    assert await mallory.delete(b) == 404
    assert (await alice.post(a, "ping")).status_code == 200

    assert await alice.delete(b) == 204
    assert (await alice.post(a, "ping")).status_code == 404
    assert (await alice.post(b, "ping")).status_code == 404
    request = http.build_request("GET", a.url + "/mcp/", headers=alice.headers())
    response = await http.send(request)
    assert response.status_code == 404


async def test_sessions_are_shared_with_djangos_sync_view_on_a_wsgi_worker(
    workers: tuple[Worker, Worker], drf_dsn: str, http: httpx.AsyncClient
) -> None:
    # The sync view runs the session store on Django's own connection; the ASGI
    # workers on the engine's pool: the same rows either way.
    a, _ = workers
    with running(wsgi_worker(drf_dsn)) as (w,):
        client = LegacyClient(http)
        await client.initialize(w, path="/sync/mcp/")
        assert (await client.post(a, "ping")).status_code == 200
        assert (await client.call(w, "where", path="/sync/mcp/"))["asgi"] is False
        assert (await client.call(a, "where"))["asgi"] is True
        other = LegacyClient(http)
        await other.initialize(a)
        assert (await other.post(w, "ping", path="/sync/mcp/")).status_code == 200
        other.principal = "mallory"
        assert (await other.post(w, "ping", path="/sync/mcp/")).status_code == 404
        other.principal = "alice"
        delete = await http.delete(w.url + "/sync/mcp/", headers=other.headers())
        assert delete.status_code == 204
        assert (await other.post(a, "ping")).status_code == 404


async def test_a_subscription_on_b_receives_a_resource_update_published_on_a_and_no_other_topic(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient
) -> None:
    a, b = workers
    client = ModernClient(http)
    uri = f"notes://{uuid.uuid4().hex}"
    async with client.listen(b, {"resourceSubscriptions": [uri]}) as stream:
        # Topics go through one stream in publish order: had the other note's
        # update been delivered, it would come first.
        await client.call(a, "touch", key="someone-else")
        await client.call(a, "touch", key=uri.removeprefix("notes://"))
        event = await stream.next()
    assert event.message is not None
    assert event.message["method"] == "notifications/resources/updated"
    assert event.message["params"]["uri"] == uri


async def test_a_task_created_on_a_is_read_finished_and_deleted_on_b(
    workers: tuple[Worker, Worker], drf_dsn: str, http: httpx.AsyncClient
) -> None:
    a, b = workers
    client = ModernClient(http)
    created = [await client.call(a, "work", tasks=True, text=f"job {i}") for i in range(3)]
    assert [c["resultType"] for c in created] == ["task"] * 3
    first, second, third = (c["taskId"] for c in created)
    read = await client.task(b, "tasks/get", first)
    assert read["result"]["status"] == "working"

    assert "error" not in await client.task(b, "tasks/cancel", third)
    assert (await client.task(a, "tasks/get", third))["result"]["status"] == "cancelled"

    async with client.listen(b, {"taskIds": [first, second]}) as stream:
        # The worker is a third process, plain sync code: it runs two tasks one
        # after the other (each publish on a fresh event loop), and the third,
        # cancelled meanwhile, not at all.
        out = await django_command(drf_dsn, "run_mcp_task", "--", first, second, third)
        assert out.split() == [first, "completed", second, "completed", third, "cancelled"]
        notified = await stream.take(2)
    assert {(e.message or {})["params"]["taskId"] for e in notified} == {first, second}
    assert all((e.message or {})["params"]["status"] == "completed" for e in notified)

    done = await client.task(b, "tasks/get", first)
    assert done["result"]["status"] == "completed"
    assert done["result"]["result"]["structuredContent"]["echo"] == "job 0"
    assert (await client.task(a, "tasks/get", third))["result"]["status"] == "cancelled"

    await client.call(b, "discard_task", task_id=first)
    gone = await client.task(a, "tasks/get", first)
    assert gone["error"]["code"] == -32602


HOSTILE_IDS = [
    "garbage",
    "(",
    "-",
    "0-0",
    "0-0-000000000000",
    "99999999999999999999-0",
    "99999999999999999999-99999999999999999999-aaaaaaaaaaaa",
    "1-1-zzzzzzzzzzzz",
    "'; DROP TABLE mcp_events_events; --",
    "x" * 8000,
]


@pytest.mark.parametrize("hostile", HOSTILE_IDS, ids=lambda value: value[:24])
async def test_a_hostile_last_event_id_gets_a_clean_empty_replay(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient, hostile: str
) -> None:
    a, b = workers
    client = LegacyClient(http)
    await client.initialize(a)
    await client.push(a, "before")
    # Nothing replayed, nothing broken: the stream stays open and the next
    # event is the first one it gets.
    async with client.get(b, last_event_id=hostile) as stream:
        await client.push(a, "after")
        assert texts(await stream.take(1)) == ["after"]


async def test_another_sessions_or_a_forged_event_id_gets_a_clean_empty_replay(
    workers: tuple[Worker, Worker], http: httpx.AsyncClient
) -> None:
    a, b = workers
    victim, attacker = LegacyClient(http), LegacyClient(http)
    await victim.initialize(a)
    await attacker.initialize(a)
    async with victim.get(b) as stream:
        await victim.push(a, "secret 1", "secret 2")
        secrets = await stream.take(2)
    first = secrets[0].id or ""
    ref = parse_event_id(first)
    assert ref is not None
    forged = f"{ref.stream_key}-{ref.seq}-{'0' * 12}"
    for cursor in (first, forged):
        async with attacker.get(b, last_event_id=cursor) as stream:
            await attacker.push(a, "mine")
            assert texts(await stream.take(1)) == ["mine"]
    async with victim.get(a, last_event_id=forged) as stream:
        await victim.push(a, "later")
        assert texts(await stream.take(1)) == ["later"]


async def test_a_resume_from_an_event_retention_removed_says_so_then_gives_what_is_left(
    workers: tuple[Worker, Worker], drf_dsn: str, http: httpx.AsyncClient
) -> None:
    a, b = workers
    client = LegacyClient(http)
    await client.initialize(a)
    async with client.get(b) as stream:
        await client.push(a, "old 1", "old 2", "kept")
        events = await stream.take(3)
    kept_ref = parse_event_id(events[2].id or "")
    assert kept_ref is not None
    # Retention removes a prefix of the sequence: everything before "kept" (the
    # earlier tests' events too) looks two days old.
    conn = await asyncpg.connect(drf_dsn)
    try:
        await conn.execute(
            "UPDATE mcp_events_events SET created_at = created_at - interval '2 days' WHERE seq < $1",
            kept_ref.seq,
        )
    finally:
        await conn.close()
    report = await run_retention(drf_dsn, ttl=timedelta(days=1), partition_max_age=timedelta(0))
    assert report.rows_deleted >= 2

    expired = events[0].id
    assert expired is not None
    async with client.get(a, last_event_id=expired) as stream:
        notice, kept = await stream.take(2)
        await client.push(b, "live")
        live = await stream.next()
    assert notice.message == {
        "jsonrpc": "2.0",
        "method": REPLAY_GAP_METHOD,
        "params": {"lastEventId": expired},
    }
    # The notice keeps the client's cursor where it was.
    assert notice.id == expired
    assert texts([kept, live]) == ["kept", "live"]
    assert kept.id == events[2].id


async def test_open_get_streams_do_not_hold_a_database_connection_each(
    workers: tuple[Worker, Worker], drf_dsn: str, http: httpx.AsyncClient
) -> None:
    # Django keeps a request thread's connection until the response ends: a
    # store on it would hold one per open stream. Ours run on the worker's pool.
    _, b = workers
    conn = await asyncpg.connect(drf_dsn)
    count = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    clients = [LegacyClient(http) for _ in range(6)]
    try:
        for client in clients:
            await client.initialize(b)
        async with clients[0].get(b):
            one_open = await conn.fetchval(count)
            async with (
                clients[1].get(b),
                clients[2].get(b),
                clients[3].get(b),
                clients[4].get(b),
                clients[5].get(b),
            ):
                six_open = await conn.fetchval(count)
    finally:
        await conn.close()
    assert six_open - one_open < 5, (one_open, six_open)


async def test_manage_py_migrate_applies_the_schema_and_agrees_with_the_cli(empty_dsn: str) -> None:
    # The schema, by Django's migrate with Django's own connection...
    out = await django_command(empty_dsn, "migrate", "mcp_pg_events")
    assert "Applying mcp_pg_events.0001_event_log... OK" in out
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT version_num FROM mcp_events_alembic_version") == SCHEMA_REVISION
        # ... which the CLI finds done,
        await asyncio.to_thread(migrate.upgrade, empty_dsn)
        assert await conn.fetchval("SELECT count(*) FROM mcp_events_alembic_version") == 1
        # ... and takes away again, reversed.
        await django_command(empty_dsn, "migrate", "mcp_pg_events", "zero")
        assert await conn.fetchval("SELECT to_regclass('mcp_events_events')") is None
        # The other way round: the CLI first, then Django's migrate records it without a change.
        await asyncio.to_thread(migrate.upgrade, empty_dsn)
        await django_command(empty_dsn, "migrate", "mcp_pg_events")
        assert await conn.fetchval("SELECT version_num FROM mcp_events_alembic_version") == SCHEMA_REVISION
        applied = await conn.fetchval("SELECT count(*) FROM django_migrations WHERE app = 'mcp_pg_events'")
        assert applied == 1
    finally:
        await conn.close()


def test_the_last_django_migration_reaches_the_codes_schema_revision() -> None:
    folder = ROOT / "mcp_pg_events" / "django" / "migrations"
    last = sorted(p for p in folder.glob("0*.py"))[-1]
    assert f'apply_schema("{SCHEMA_REVISION}"' in last.read_text()


EXAMPLE = ROOT / "examples" / "django"


def libpq_env(dsn: str) -> dict[str, str]:
    """The example reads its database from the libpq variables, as its README says."""
    database = django_database(dsn)
    return {
        "PGDATABASE": database["NAME"],
        "PGHOST": database["HOST"],
        "PGPORT": database["PORT"] or "5432",
        "PGUSER": database["USER"],
        "PGPASSWORD": database["PASSWORD"],
    }


async def test_the_example_migrates_and_serves_on_two_uvicorn_workers(
    empty_dsn: str, http: httpx.AsyncClient
) -> None:
    env = libpq_env(empty_dsn)
    settings = "notes_project.settings"
    out = await django_command(empty_dsn, "migrate", cwd=EXAMPLE, settings=settings, **env)
    assert "Applying mcp_pg_events.0001_event_log... OK" in out and "Applying notes.0001_initial... OK" in out
    server = uvicorn_worker(
        empty_dsn, app="notes_project.asgi:application", workers=2, cwd=EXAMPLE,
        DJANGO_SETTINGS_MODULE=settings, **env,
    )  # fmt: skip
    with running(server) as (worker,):
        client = LegacyClient(http, principal=None)
        await client.initialize(worker)
        # Requests reach either worker (the kernel picks): all the same.
        async with client.get(worker) as stream:
            for i in range(4):
                assert (await client.call(worker, "remind", text=f"r{i}"))["delivered"] is True
            assert texts(await stream.take(4)) == [f"r{i}" for i in range(4)]
        modern = ModernClient(http)
        async with modern.listen(worker, {"resourceSubscriptions": ["notes://todo"]}) as stream:
            await modern.call(worker, "write_note", key="todo", text="write the report")
            assert (await stream.next()).message["params"]["uri"] == "notes://todo"  # type: ignore[index]
        task = (await modern.call(worker, "count_words", tasks=True, key="todo"))["taskId"]
        # Subscribed (acknowledged) before the read: a task not finished yet will say so.
        async with modern.listen(worker, {"taskIds": [task]}) as stream:
            got = (await modern.task(worker, "tasks/get", task))["result"]
            if got["status"] != "completed":
                got = (await stream.next()).message["params"]  # type: ignore[index]
        assert got["status"] == "completed"
        assert got["result"]["structuredContent"] == {"key": "todo", "words": 3}
    assert sum("Application startup complete" in line for line in worker.log) == 2
