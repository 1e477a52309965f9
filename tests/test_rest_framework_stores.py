"""mcp_pg_events.rest_framework in one process: the framework's protocols, each collaborator's promises,
and every assumption the module makes about the framework, asgiref and Django.

The two-worker behaviour over HTTP is in test_rest_framework.py; here the
collaborators are driven directly, against a real PostgreSQL, from the loops and
threads the framework calls them from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from mcp_pg_events import PostgresEventStore, rest_framework
from mcp_pg_events.engine import Engine
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.rest_framework import (
    REPLAY_GAP_METHOD,
    PostgresEvents,
    PostgresSessionStore,
    PostgresSSEBroker,
    PostgresSSEReplayBuffer,
    PostgresSubscriptionBroker,
    PostgresTaskStore,
    postgres_collaborators,
    under_asgi_request,
)
from mcp_pg_events.retention import run_retention
from mcp_pg_events.settings import RestFrameworkSettings, StoreSettings

from .drf.database import django_database
from .test_postgres_store import until

_T = TypeVar("_T")
MODULE = Path(rest_framework.__file__).read_text()


@pytest.fixture(scope="module", autouse=True)
def django_project() -> None:
    """Django configured in this process, as in a project (the framework needs it to import)."""
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"],
            DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "unset"}},
            USE_TZ=True,
            REST_FRAMEWORK_MCP={"ALLOWED_ORIGINS": ["*"]},
        )
        import django

        django.setup()


def use_django_database(dsn: str) -> None:
    """Point Django's default alias at the test's database (as Django's test runner does)."""
    from django.conf import settings

    settings.DATABASES["default"].update(django_database(dsn))


async def in_thread(call: Callable[[], _T]) -> _T:
    """``call()`` in a plain thread, as in a WSGI or task worker; its Django connections closed after."""

    def run() -> _T:
        from django.db import connections

        try:
            return call()
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)


def make_events(dsn: str, **options: Any) -> PostgresEvents:
    store = {k: options.pop(k) for k in list(options) if k in StoreSettings.__dataclass_fields__}
    return PostgresEvents(
        RestFrameworkSettings(dsn=dsn, **options), StoreSettings.from_env(retry_deadline=5.0, **store)
    )


@asynccontextmanager
async def own_events(dsn: str, **options: Any) -> AsyncIterator[PostgresEvents]:
    """The collaborators' database with ``options``: the engine on the test's database, Django's alias too."""
    use_django_database(dsn)
    made = make_events(dsn, **options)
    try:
        yield made
    finally:
        await asyncio.to_thread(made.engine.close)


@pytest.fixture
async def events(dsn: str) -> AsyncIterator[PostgresEvents]:
    async with own_events(dsn) as made:
        yield made


async def within(awaitable: Any, seconds: float = 30) -> Any:
    """``await awaitable`` in the calling task (unlike wait_for), failing after ``seconds``."""
    task = asyncio.current_task()
    assert task is not None
    expired = asyncio.get_running_loop().call_later(seconds, task.cancel)
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise AssertionError(f"nothing within {seconds}s") from None
    finally:
        expired.cancel()


def message(text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}}


# --- the framework's protocols --------------------------------------------------------------


def test_the_collaborators_satisfy_the_frameworks_protocols_on_its_installed_release() -> None:
    from rest_framework_mcp import (
        MCPServer,
        SessionStore,
        SSEBroker,
        SSEReplayBuffer,
        SubscriptionBroker,
        TaskStore,
    )

    collaborators = postgres_collaborators("tests", events=make_events("postgresql://nowhere/x"))
    protocols = {
        "sse_replay_buffer": SSEReplayBuffer,
        "sse_broker": SSEBroker,
        "subscription_broker": SubscriptionBroker,
        "session_store": SessionStore,
        "task_store": TaskStore,
    }
    for name, protocol in protocols.items():
        ours = collaborators[name]
        assert isinstance(ours, protocol), name
        # isinstance() checks names only: sync and async must match the protocol too.
        for member, declared in vars(protocol).items():
            if member.startswith("_") or not callable(declared) or member == "replay":
                continue
            assert inspect.iscoroutinefunction(declared) == inspect.iscoroutinefunction(
                getattr(ours, member)
            ), f"{name}.{member}"
    # The replay buffer's replay returns an async iterator when called.
    assert inspect.isasyncgenfunction(PostgresSSEReplayBuffer.replay)
    server = MCPServer(name="tests", **collaborators)
    assert server.task_store is collaborators["task_store"]
    assert server.subscription_broker is collaborators["subscription_broker"]


def test_every_assumption_about_the_framework_has_its_test() -> None:
    assumed = set(re.findall(r"ASSUMES: (\w+)", MODULE))
    assert assumed == {"notify_wrapper", "subscribe_then_replay", "task_record_fields", "asgi_request_thread"}
    tests = {name for name in globals() if name.startswith("test_assumes_")}
    assert {f"test_assumes_{name}" for name in assumed} == tests


class _Recorder:
    """A buffer and a broker that record how the framework calls them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, asyncio.Task[Any] | None]] = []
        self.queue: asyncio.Queue[Any] | None = None

    async def record(self, session_id: str, payload: Any) -> str:
        self.calls.append(("record", payload, asyncio.current_task()))
        return "the-id"

    async def replay(self, session_id: str, after_id: str | None) -> AsyncIterator[tuple[str, Any]]:
        self.calls.append(("replay", after_id, asyncio.current_task()))
        return
        yield

    async def forget(self, session_id: str) -> None: ...

    def subscribe(self, session_id: str) -> asyncio.Queue[Any]:
        self.calls.append(("subscribe", session_id, asyncio.current_task()))
        self.queue = asyncio.Queue()
        return self.queue

    def unsubscribe(self, session_id: str, queue: asyncio.Queue[Any]) -> None: ...

    async def publish(self, session_id: str, payload: Any) -> bool:
        self.calls.append(("publish", payload, asyncio.current_task()))
        return True

    def has_subscriber(self, session_id: str) -> bool:
        return False

    @property
    def active_streams(self) -> int:
        return 0


async def test_assumes_notify_wrapper() -> None:
    from rest_framework_mcp import MCPServer

    recorder = _Recorder()
    server = MCPServer(name="tests", sse_broker=recorder, sse_replay_buffer=recorder)
    assert await server.notify("s", {"hello": 1})
    assert [(what, payload) for what, payload, _ in recorder.calls] == [
        ("record", {"hello": 1}),
        ("publish", {rest_framework.EVENT_ID_KEY: "the-id", rest_framework.PAYLOAD_KEY: {"hello": 1}}),
    ]


async def test_assumes_subscribe_then_replay() -> None:
    from rest_framework_mcp.transport.sse_response import stream_events

    recorder = _Recorder()
    frames = stream_events(
        recorder, "s", replay_buffer=recorder, last_event_id="cursor", keepalive_interval=60
    )
    # Iterated by one task, as Django's ASGI handler sends a streaming response.
    assert await within(anext(frames)) == b": stream open\n\n"
    assert [what for what, _, _ in recorder.calls] == ["subscribe"]
    assert recorder.queue is not None
    recorder.queue.put_nowait({rest_framework.EVENT_ID_KEY: "e1", rest_framework.PAYLOAD_KEY: {"n": 1}})
    # The next frame: the replay first, in the task that subscribed, then the queue.
    assert await within(anext(frames)) == b'id: e1\ndata: {"n":1}\n\n'
    assert [what for what, _, _ in recorder.calls] == ["subscribe", "replay"]
    assert recorder.calls[0][2] is recorder.calls[1][2] is asyncio.current_task()
    await frames.aclose()


def test_assumes_task_record_fields() -> None:
    from rest_framework_mcp.protocol.types.task import Task
    from rest_framework_mcp.tasks.types.task_record import TaskRecord

    mapped_task = {name for _, name in rest_framework._TASK_FIELDS} | {"status"}
    mapped_record = {name for _, name in rest_framework._RECORD_FIELDS} | {"task", "scopes"}
    assert {f.name for f in dataclasses.fields(Task)} == mapped_task
    assert {f.name for f in dataclasses.fields(TaskRecord)} == mapped_record


async def test_assumes_asgi_request_thread() -> None:
    from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
    from django.core.handlers import asgi

    # Django's ASGI handler runs each request inside a ThreadSensitiveContext...
    assert "ThreadSensitiveContext()" in inspect.getsource(asgi.ASGIHandler.__call__)
    # ... whose context variable reaches the thread that runs the sync code...
    async with ThreadSensitiveContext():
        assert await sync_to_async(under_asgi_request)()
    # ... and no other thread.
    assert not await sync_to_async(under_asgi_request)()
    assert not await asyncio.to_thread(under_asgi_request)
    assert SyncToAsync.thread_sensitive_context.get(None) is None


# --- the SSE buffer and broker ---------------------------------------------------------------


async def test_an_event_recorded_between_subscribe_and_replay_comes_once(events: PostgresEvents) -> None:
    from rest_framework_mcp.transport.sse_response import stream_events

    buffer = PostgresSSEReplayBuffer(events=events)
    broker = PostgresSSEBroker(replay_buffer=buffer, events=events)
    first = await buffer.record("s", message("first"))
    frames = stream_events(broker, "s", replay_buffer=buffer, last_event_id=first, keepalive_interval=60)
    # Iterated by one task, as Django's ASGI handler sends a streaming response.
    assert await within(anext(frames)) == b": stream open\n\n"
    # The transport has subscribed and not replayed yet: the window in which an
    # event is both "after the cursor" and "after the subscription".
    between = await buffer.record("s", message("between"))
    await broker.publish(
        "s", {rest_framework.EVENT_ID_KEY: between, rest_framework.PAYLOAD_KEY: message("between")}
    )
    after = await buffer.record("s", message("after"))
    frames_read = [await within(anext(frames)) for _ in range(2)]
    assert frames_read == [
        f"id: {between}\ndata: {json.dumps(message('between'), separators=(',', ':'))}\n\n".encode(),
        f"id: {after}\ndata: {json.dumps(message('after'), separators=(',', ':'))}\n\n".encode(),
    ]
    # Nothing else is waiting: the next frame is the next event.
    last = await buffer.record("s", message("last"))
    assert (await within(anext(frames))).startswith(f"id: {last}\n".encode())
    await frames.aclose()
    assert broker.active_streams == 0


async def test_a_get_stream_that_is_not_read_pauses_and_loses_nothing(dsn: str) -> None:
    async with own_events(dsn, sse_queue_size=4) as events:
        buffer = PostgresSSEReplayBuffer(events=events)
        broker = PostgresSSEBroker(replay_buffer=buffer, events=events)
        queue = broker.subscribe("s")
        assert broker.has_subscriber("s") and broker.active_streams == 1
        ids = [await buffer.record("s", message(str(i))) for i in range(60)]
        first = await asyncio.wait_for(queue.get(), 30)
        # The reader in the database stopped at the bound (a page at most past
        # it), while the events wait in the table.
        witness = broker.subscribe("witness")
        await buffer.record("witness", message("w"))
        await asyncio.wait_for(witness.get(), 30)  # a fetch round has passed
        assert queue.qsize() <= 4 + events.store_settings.replay_batch_size
        got = [first] + [await asyncio.wait_for(queue.get(), 30) for _ in range(59)]
        assert [item[rest_framework.EVENT_ID_KEY] for item in got] == ids
        assert [item[rest_framework.PAYLOAD_KEY]["params"]["data"] for item in got] == [
            str(i) for i in range(60)
        ]
        broker.unsubscribe("s", queue)
        broker.unsubscribe("witness", witness)
        assert not broker.has_subscriber("s") and broker.active_streams == 0


async def test_a_broker_without_a_buffer_writes_what_it_publishes_and_delivers_it_as_it_is(
    events: PostgresEvents,
) -> None:
    broker = PostgresSSEBroker(events=events)
    queue = broker.subscribe("s")
    payloads = [message("raw"), [1, "two", None], "a string", {"_mcp_event_id": "x", "_mcp_payload": 1}]
    for payload in payloads:
        assert await broker.publish("s", payload) is True
    assert [await asyncio.wait_for(queue.get(), 30) for _ in payloads] == payloads
    broker.unsubscribe("s", queue)


async def test_replay_without_its_broker_pages_from_the_cursor_and_ignores_other_ids(dsn: str) -> None:
    async with own_events(dsn, replay_batch_size=3) as events:
        buffer = PostgresSSEReplayBuffer(events=events)
        ids = [await buffer.record("s", {"n": i}) for i in range(8)]
        other = await buffer.record("other", {"n": "theirs"})

        async def replay(session: str, after: str | None) -> list[tuple[str, Any]]:
            return [pair async for pair in buffer.replay(session, after)]

        assert await replay("s", ids[1]) == [(ids[i], {"n": i}) for i in range(2, 8)]
        assert await replay("s", ids[-1]) == []
        for hostile in (None, "garbage", other, "0-0-000000000000", "1" * 60, ids[0][:-1] + "x"):
            assert await replay("s", hostile) == []
        assert await replay("other", ids[0]) == []


async def test_replay_from_an_expired_cursor_gives_the_gap_notice_then_what_is_left(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    buffer = PostgresSSEReplayBuffer(events=events)
    ids = [await buffer.record("s", {"n": i}) for i in range(4)]
    await admin.execute("DELETE FROM mcp_events_events WHERE seq <= $1", parse_event_id(ids[1]).seq)  # type: ignore[union-attr]
    got = [pair async for pair in buffer.replay("s", ids[0])]
    assert got == [
        (ids[0], {"jsonrpc": "2.0", "method": REPLAY_GAP_METHOD, "params": {"lastEventId": ids[0]}}),
        (ids[2], {"n": 2}),
        (ids[3], {"n": 3}),
    ]
    async with own_events(events.settings.dsn or "", replay_gap_notice=False) as quiet_events:
        quiet = PostgresSSEReplayBuffer(events=quiet_events)
        assert [pair async for pair in quiet.replay("s", ids[0])] == [(ids[2], {"n": 2}), (ids[3], {"n": 3})]


async def test_forget_ends_the_session_and_ids_that_are_no_session_id_are_refused(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    buffer = PostgresSSEReplayBuffer(events=events)
    broker = PostgresSSEBroker(replay_buffer=buffer, events=events)
    await buffer.record("s", {"n": 1})
    await buffer.forget("s")
    assert await admin.fetchval("SELECT ended_at IS NOT NULL FROM mcp_events_sessions WHERE key = 's'")
    for bad in ("", "a b", "x" * 600, "tab\there", rest_framework.TOPIC_SESSION):
        with pytest.raises(ValueError, match="not an MCP session id"):
            await buffer.record(bad, {})
        with pytest.raises(ValueError, match="not an MCP session id"):
            await broker.publish(bad, {})
        assert [pair async for pair in buffer.replay(bad, "1-1-000000000000")] == []
        await buffer.forget(bad)  # nothing to end


async def test_the_async_pieces_work_from_a_fresh_event_loop_per_call(events: PostgresEvents) -> None:
    # Sync workers (WSGI, Celery, commands) reach async code through
    # async_to_sync or asyncio.run: a new loop each time, closed after.
    from asgiref.sync import async_to_sync

    buffer = PostgresSSEReplayBuffer(events=events)
    subscriptions = PostgresSubscriptionBroker(namespace="fresh", events=events)
    queue = await subscriptions.subscribe(frozenset({"t"}))

    def worker() -> list[str]:
        ids = [asyncio.run(buffer.record("s", {"n": i})) for i in range(2)]
        ids += [async_to_sync(buffer.record)("s", {"n": i}) for i in range(2, 4)]
        for i in range(3):
            async_to_sync(subscriptions.publish)("t", {"n": i})
        return ids

    ids = await asyncio.to_thread(worker)
    assert [pair async for pair in buffer.replay("s", ids[0])] == [(ids[i], {"n": i}) for i in range(1, 4)]
    assert [await asyncio.wait_for(queue.get(), 30) for _ in range(3)] == [{"n": i} for i in range(3)]
    subscriptions.unsubscribe(queue)


# --- the subscription broker -----------------------------------------------------------------


async def test_a_subscription_gets_its_topics_only_and_counts_are_this_process(
    events: PostgresEvents,
) -> None:
    one = PostgresSubscriptionBroker(namespace="a", events=events)
    other_namespace = PostgresSubscriptionBroker(namespace="b", events=events)
    queue = await one.subscribe(frozenset({"resource:x", "kind:tools"}))
    both = await one.subscribe(frozenset({"resource:x"}))
    assert one.active_subscriptions == 2
    assert await other_namespace.publish("resource:x", {"from": "b"}) == 0
    assert await one.publish("resource:y", {"n": 0}) == 0
    assert await one.publish("resource:x", {"n": 1}) == 2
    assert await one.publish("kind:tools", {"n": 2}) == 1
    big = {"n": 3, "big": "x" * 20_000}
    await one.publish("resource:x", big)
    assert [await asyncio.wait_for(queue.get(), 30) for _ in range(3)] == [{"n": 1}, {"n": 2}, big]
    assert [await asyncio.wait_for(both.get(), 30) for _ in range(2)] == [{"n": 1}, big]
    empty = await one.subscribe(frozenset())
    assert one.active_subscriptions == 2  # nothing can arrive: not counted
    one.unsubscribe(empty)
    one.unsubscribe(queue)
    one.unsubscribe(both)
    assert one.active_subscriptions == 0


async def test_a_lagging_subscription_catches_up_from_the_table_and_stalls_nobody(dsn: str) -> None:
    async with own_events(dsn, subscription_queue_size=3, replay_batch_size=4) as events:
        broker = PostgresSubscriptionBroker(namespace="lag", events=events)
        slow = await broker.subscribe(frozenset({"t", "u"}))
        fast = await broker.subscribe(frozenset({"t"}))
        await asyncio.gather(*(broker.publish("t" if i % 3 else "u", {"n": i}) for i in range(40)))
        expected_fast = [{"n": i} for i in range(40) if i % 3]
        got_fast = [await asyncio.wait_for(fast.get(), 30) for _ in expected_fast]
        # Publishes that ran at once may share a row, in any order between them;
        # each reader gets every one of its notifications once.
        assert sorted(p["n"] for p in got_fast) == [p["n"] for p in expected_fast]
        assert slow.qsize() <= 3 + 40  # the bound holds in rows of the table, not in notifications
        got_slow = [await asyncio.wait_for(slow.get(), 30) for _ in range(40)]
        assert sorted(p["n"] for p in got_slow) == list(range(40))
        # Caught up: it takes from the router again, in order.
        for i in range(40, 46):
            await broker.publish("t", {"n": i})
        assert [await asyncio.wait_for(slow.get(), 30) for _ in range(6)] == [{"n": i} for i in range(40, 46)]
        broker.unsubscribe(slow)
        broker.unsubscribe(fast)


async def test_the_topic_stream_is_followed_again_after_retention_removed_it(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with own_events(dsn, poll_interval=0.2) as events:
        broker = PostgresSubscriptionBroker(namespace="watch", events=events)
        queue = await broker.subscribe(frozenset({"t"}))
        await broker.publish("t", {"n": 1})
        assert await asyncio.wait_for(queue.get(), 30) == {"n": 1}
        # Everything of the topic stream older than the ttl: retention empties it and removes it.
        await admin.execute(
            "UPDATE mcp_events_events SET created_at = created_at - interval '2 days';"
            "UPDATE mcp_events_streams SET created_at = created_at - interval '2 days'"
        )
        report = await run_retention(dsn, ttl=timedelta(days=1), partition_max_age=timedelta(0))
        assert report.streams_removed >= 1
        await broker.publish("t", {"n": 2})  # into a new stream
        assert await asyncio.wait_for(queue.get(), 30) == {"n": 2}
        broker.unsubscribe(queue)


# --- the session store -----------------------------------------------------------------------


async def test_a_session_is_owned_until_idle_too_long_or_too_old_or_destroyed(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    store = PostgresSessionStore(namespace="tests", ttl_seconds=3600, max_age_seconds=7200, events=events)
    other_server = PostgresSessionStore(namespace="other", events=events)
    ids = [await in_thread(lambda: store.create(principal_id="user:1")) for _ in range(4)]
    assert len(set(ids)) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,128}", i) for i in ids)
    idle, old, destroyed, live = ids
    assert await in_thread(lambda: store.owner(live)) == "user:1"
    assert await in_thread(lambda: store.exists(live))
    assert await in_thread(lambda: other_server.owner(live)) is None

    await admin.execute(
        "UPDATE mcp_events_sessions SET last_active_at = now() - interval '2 hours' WHERE key = $1", idle
    )
    await admin.execute(
        "UPDATE mcp_events_sessions SET created_at = now() - interval '3 hours' WHERE key = $1", old
    )
    await in_thread(lambda: store.destroy(destroyed))
    for gone in (idle, old, destroyed):
        assert await in_thread(lambda gone=gone: store.owner(gone)) is None
        assert not await in_thread(lambda gone=gone: store.exists(gone))
    assert await admin.fetchval(
        "SELECT ended_at IS NOT NULL FROM mcp_events_sessions WHERE key = $1", destroyed
    )
    for malformed in ("", "a b", "x" * 200, "tests_../x", "../../etc"):
        assert await in_thread(lambda m=malformed: store.owner(m)) is None


async def test_ownership_records_activity_at_most_once_per_interval(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    store = PostgresSessionStore(ttl_seconds=3600, max_age_seconds=None, events=events)
    session = await in_thread(lambda: store.create(principal_id="anonymous"))
    active = "SELECT last_active_at FROM mcp_events_sessions WHERE key = $1"
    created = await admin.fetchval(active, session)
    assert await in_thread(lambda: store.owner(session)) == "anonymous"
    assert await admin.fetchval(active, session) == created  # within the interval: no write
    await admin.execute(
        "UPDATE mcp_events_sessions SET last_active_at = now() - interval '5 minutes' WHERE key = $1", session
    )
    stale = await admin.fetchval(active, session)
    assert await in_thread(lambda: store.owner(session)) == "anonymous"
    assert await admin.fetchval(active, session) > stale
    # An SSE stream's session row, made by an append, belongs to nobody.
    await PostgresSSEReplayBuffer(events=events).record("made-by-an-append", {})
    assert await in_thread(lambda: store.owner("made-by-an-append")) is None


async def test_sync_stores_use_djangos_connection_in_a_plain_thread_and_the_pool_in_a_transaction(
    dsn: str, admin: asyncpg.Connection
) -> None:
    from django.db import connections, transaction

    async with own_events(dsn) as events:
        # The DSN from DATABASES, as in a project.
        events.settings = dataclasses.replace(events.settings, dsn=None)
        store = PostgresSessionStore(events=events)

        def plain() -> tuple[str, bool, bool]:
            session = store.create(principal_id="user:7")
            return session, connections["default"].connection is not None, events.engine._loop is not None

        session, on_django, engine_started = await in_thread(plain)
        assert (on_django, engine_started) == (True, False)
        assert (
            await admin.fetchval("SELECT principal FROM mcp_events_sessions WHERE key = $1", session)
            == "user:7"
        )

        seen_inside: list[Any] = []

        def in_a_transaction() -> str:
            with transaction.atomic():
                inside = store.create(principal_id="user:8")
                # Committed on return, whatever becomes of the caller's transaction.
                seen_inside.append(asyncio.run(_principal(dsn, inside)))
                transaction.set_rollback(True)
            return inside

        inside = await in_thread(in_a_transaction)
        assert seen_inside == ["user:8"]
        assert events.engine._loop is not None
        assert (
            await admin.fetchval("SELECT principal FROM mcp_events_sessions WHERE key = $1", inside)
            == "user:8"
        )


async def _principal(dsn: str, key: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT principal FROM mcp_events_sessions WHERE key = $1", key)
    finally:
        await conn.close()


async def test_a_synchronous_call_on_an_event_loop_is_refused_not_run(events: PostgresEvents) -> None:
    # Blocking the loop on the engine would stall the server (and deadlock on the engine's own loop).
    with pytest.raises(RuntimeError, match="would block it"):
        events.engine.run(lambda store: store.check_schema())


# --- the task store --------------------------------------------------------------------------


def task_record(task_id: str | None = None, **changes: Any) -> Any:
    from rest_framework_mcp.constants import TaskStatus
    from rest_framework_mcp.protocol.types.task import Task
    from rest_framework_mcp.tasks.types.task_record import TaskRecord

    task = Task(
        task_id=task_id or uuid.uuid4().hex,
        status=TaskStatus.WORKING,
        created_at="2026-12-01T10:00:00+00:00",
        last_updated_at="2026-12-01T10:00:00+00:00",
        ttl_ms=60_000,
        poll_interval_ms=500,
    )
    record = TaskRecord(
        task=task,
        tool_name="work",
        arguments={"text": "nul \u0000 and \u2028 é"},
        principal_id="user:1",
        user_pk=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        scopes=("read", "write"),
        audience="https://mcp.example",
    )
    return dataclasses.replace(record, **changes) if changes else record


async def test_a_task_comes_back_as_it_was_stored_and_finished_tasks_stay_finished(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    from rest_framework_mcp.constants import TaskStatus

    store = PostgresTaskStore(namespace="tests", events=events)
    other_server = PostgresTaskStore(namespace="other", events=events)
    record = task_record()
    await in_thread(lambda: store.create(record))
    got = await in_thread(lambda: store.get(record.task_id))
    assert got == dataclasses.replace(record, user_pk=str(record.user_pk))  # a UUID pk comes back as text
    assert await in_thread(lambda: other_server.get(record.task_id)) is None

    progressed = dataclasses.replace(record, progress=3.0, total=10.0, enqueued=True)
    await in_thread(lambda: store.save(progressed))
    assert (await in_thread(lambda: store.get(record.task_id))).progress == 3.0

    cancelled = record.with_task(status=TaskStatus.CANCELLED, status_message="stop")
    await in_thread(lambda: store.save(cancelled))
    # A late write from a worker that had not heard of the cancel: refused.
    await in_thread(lambda: store.save(progressed.with_task(status=TaskStatus.WORKING)))
    await in_thread(lambda: store.save(record.with_task(status=TaskStatus.COMPLETED, result={})))
    final = await in_thread(lambda: store.get(record.task_id))
    assert (final.status, final.task.status_message) == (TaskStatus.CANCELLED, "stop")
    assert (
        await admin.fetchval("SELECT status FROM mcp_events_tasks WHERE task_id = $1", record.task_id)
        == "cancelled"
    )

    await in_thread(lambda: store.delete(record.task_id))
    assert await in_thread(lambda: store.get(record.task_id)) is None
    # Deleted stays deleted: a save does not bring it back.
    await in_thread(lambda: store.save(progressed))
    assert await in_thread(lambda: store.get(record.task_id)) is None


async def test_a_task_expires_after_its_ttl_and_retention_removes_it(
    events: PostgresEvents, admin: asyncpg.Connection, dsn: str
) -> None:
    store = PostgresTaskStore(events=events)
    expiring = task_record(task=task_record().task)
    forever = task_record(task=dataclasses.replace(task_record().task, ttl_ms=None))
    await in_thread(lambda: store.create(expiring))
    await in_thread(lambda: store.create(forever))
    lifetime = "SELECT expires_at - created_at FROM mcp_events_tasks WHERE task_id = $1"
    assert await admin.fetchval(lifetime, expiring.task_id) == timedelta(seconds=60)
    assert await admin.fetchval(lifetime, forever.task_id) == timedelta(days=7)

    await admin.execute(
        "UPDATE mcp_events_tasks SET expires_at = now() - interval '1 second' WHERE task_id = $1",
        expiring.task_id,
    )
    assert await in_thread(lambda: store.get(expiring.task_id)) is None
    await in_thread(lambda: store.save(expiring))  # an expired task is not brought back
    assert await in_thread(lambda: store.get(expiring.task_id)) is None

    notices: list[str] = []
    dry = await run_retention(dsn, dry_run=True, progress=notices.append)
    assert "would remove 1 expired task" in notices
    assert dry.dry_run
    notices.clear()
    await run_retention(dsn, progress=notices.append)
    assert any(n.startswith("removed 1 expired task ") for n in notices), notices
    assert await admin.fetchval("SELECT array_agg(task_id) FROM mcp_events_tasks") == [forever.task_id]


async def test_malformed_or_unreadable_tasks_are_a_miss(
    events: PostgresEvents, admin: asyncpg.Connection
) -> None:
    store = PostgresTaskStore(events=events)
    for malformed in ("", "a b", "x" * 129, "../x", "é"):
        assert await in_thread(lambda m=malformed: store.get(m)) is None
        await in_thread(lambda m=malformed: store.delete(m))
    record = task_record()
    await in_thread(lambda: store.create(record))
    for garbage in (b"not json", b"[]", b'{"taskId": 1}', json.dumps({"status": "unknown"}).encode()):
        await admin.execute(
            "UPDATE mcp_events_tasks SET record = $1 WHERE task_id = $2", garbage, record.task_id
        )
        assert await in_thread(lambda: store.get(record.task_id)) is None


# --- retention of sessions -------------------------------------------------------------------


async def test_retention_removes_idle_sessions_not_old_ones_in_use(
    events: PostgresEvents, admin: asyncpg.Connection, dsn: str
) -> None:
    store = PostgresSessionStore(ttl_seconds=3 * 86400, events=events)
    in_use, idle = [await in_thread(lambda: store.create(principal_id="anonymous")) for _ in range(2)]
    await admin.execute("UPDATE mcp_events_sessions SET created_at = now() - interval '2 days'")
    await admin.execute(
        "UPDATE mcp_events_sessions SET last_active_at = now() - interval '2 days' WHERE key = $1", idle
    )
    report = await run_retention(dsn, ttl=timedelta(days=1))
    assert report.sessions_removed == 1
    keys = await admin.fetchval("SELECT array_agg(key) FROM mcp_events_sessions")
    assert keys == [in_use]
    assert await in_thread(lambda: store.owner(in_use)) == "anonymous"


def test_the_engine_thread_is_named_for_operators(events: PostgresEvents) -> None:
    events.engine.loop  # noqa: B018 - starts it
    assert any(t.name == "mcp-pg-events" and t.daemon for t in threading.enumerate())


async def test_the_engine_closes_right_after_a_caller_cancelled_its_query(
    dsn: str, admin: asyncpg.Connection
) -> None:
    # A caller's cancellation (an unsubscribe cancelling a catch-up) leaves asyncpg
    # returning the connection; the close must let it, not wait for it for ever.
    engine = Engine(lambda: PostgresEventStore.connect(dsn))
    running = engine.submit(lambda store: store.database.fetch("SELECT pg_sleep(60)"))

    async def sleeping(count: int) -> bool:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
        )
        return bool(await admin.fetchval(query) == count)

    await until(lambda: sleeping(1))
    running.cancel()
    await asyncio.to_thread(engine.close, 10)  # raised TimeoutError after 10 s
    await until(lambda: sleeping(0))


# --- configuration ---------------------------------------------------------------------------


def test_settings_come_from_the_mcp_pg_events_setting_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.conf import settings

    from mcp_pg_events import ConfigurationError

    monkeypatch.setattr(
        settings,
        "MCP_PG_EVENTS",
        {"SSE_QUEUE_SIZE": 8, "MAX_POOL_SIZE": 3, "DATABASE": "events"},
        raising=False,
    )
    monkeypatch.setenv("MCP_PG_EVENTS_SUBSCRIPTION_QUEUE_SIZE", "9")
    monkeypatch.setenv("MCP_PG_EVENTS_SSE_QUEUE_SIZE", "99")  # the setting wins
    events = PostgresEvents.from_django()
    assert (events.settings.sse_queue_size, events.settings.subscription_queue_size) == (8, 9)
    assert (events.settings.database, events.store_settings.max_pool_size) == ("events", 3)
    with pytest.raises(ConfigurationError, match=r"MCP_PG_EVENTS\['DATABASE'\] is 'events', which DATABASES"):
        events.dsn()
    monkeypatch.setattr(settings, "MCP_PG_EVENTS", {"SSE_QUEUE": 8}, raising=False)
    with pytest.raises(ConfigurationError, match="MCP_PG_EVENTS: unknown setting SSE_QUEUE"):
        PostgresEvents.from_django()
    monkeypatch.setattr(settings, "MCP_PG_EVENTS", {"SSE_QUEUE_SIZE": 0}, raising=False)
    with pytest.raises(ConfigurationError, match="sse_queue_size must be at least 1"):
        PostgresEvents.from_django()


def test_the_dsn_of_a_databases_entry_carries_what_asyncpg_understands() -> None:
    from mcp_pg_events import ConfigurationError
    from mcp_pg_events.dsn import dsn_from_django

    engine = "django.db.backends.postgresql"
    options = {
        "sslmode": "require",
        "options": "-c search_path=app,public --statement_timeout=5s",
        "pool": True,
    }
    entry = {
        "ENGINE": engine, "NAME": "app db", "USER": "me@corp", "PASSWORD": "p:w/d@",
        "HOST": "db", "PORT": 6432, "OPTIONS": options,
    }  # fmt: skip
    assert dsn_from_django("default", entry) == (
        "postgresql://me%40corp:p%3Aw%2Fd%40@db:6432/app%20db"
        "?sslmode=require&search_path=app%2Cpublic&statement_timeout=5s"
    )
    socket = {"ENGINE": engine, "NAME": "app", "HOST": "/var/run/postgresql", "PORT": "5433"}
    assert dsn_from_django("default", socket) == "postgresql:///app?host=%2Fvar%2Frun%2Fpostgresql&port=5433"
    for entry, says in (
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}, "is not PostgreSQL"),
        ({"ENGINE": engine}, "has no NAME"),
        ({"ENGINE": engine, "NAME": "x", "OPTIONS": {"options": "search_path=x"}}, "cannot read"),
    ):
        with pytest.raises(ConfigurationError, match=says):
            dsn_from_django("default", entry)
