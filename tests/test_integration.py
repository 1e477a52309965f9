"""Session scoping of the SDK's session manager, without HTTP."""

from __future__ import annotations

import asyncio

import pytest
from mcp.server.lowlevel import Server
from mcp.server.streamable_http import EventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from mcp_pg_events import PostgresEventStore, PostgresSessionManager, scope_sessions
from mcp_pg_events.testing import MemoryEventStore

from .messages import notification
from .test_contract import Recorder


async def test_every_session_gets_its_own_view(store: PostgresEventStore) -> None:
    manager = PostgresSessionManager(app=Server("t"), event_store=store)
    first, second = manager.event_store, manager.event_store
    assert isinstance(first, EventStore) and isinstance(second, EventStore)
    assert first is not second

    cursor = await first.store_event("_GET_stream", None)
    await second.store_event("_GET_stream", None)
    message = notification("only for the first")
    await first.store_event("_GET_stream", message)

    got = Recorder()
    assert await second.replay_events_after(cursor, got) is None
    # The session's own store follows the stream live from the cursor (the
    # standalone stream never ends), so replay runs until the client leaves.
    following = asyncio.create_task(first.replay_events_after(cursor, got))
    assert [e.message for e in await got.until(1)] == [message]
    later = notification("sent while following")
    await first.store_event("_GET_stream", later)
    assert [e.message for e in await got.until(2)] == [message, later]
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
    assert store.live_tail.subscriptions == 0


def test_scope_sessions_is_idempotent_and_keeps_the_store() -> None:
    backing = MemoryEventStore()
    manager = StreamableHTTPSessionManager(app=Server("t"), event_store=backing)
    assert scope_sessions(manager) is manager
    assert isinstance(manager, StreamableHTTPSessionManager)
    assert scope_sessions(manager) is manager
    assert manager.event_store is not backing
    assert manager.event_store is not manager.event_store


def test_a_manager_without_a_store_stays_without_one() -> None:
    manager = scope_sessions(StreamableHTTPSessionManager(app=Server("t")))
    assert manager.event_store is None


class PlainStore(EventStore):
    async def store_event(self, stream_id: str, message: object) -> str:
        return "x"

    async def replay_events_after(self, last_event_id: str, send_callback: object) -> None:
        return None


def test_a_store_that_cannot_scope_sessions_is_refused() -> None:
    with pytest.raises(TypeError, match=r"session\(key\)"):
        PostgresSessionManager(app=Server("t"), event_store=PlainStore())
    manager = StreamableHTTPSessionManager(app=Server("t"), event_store=PlainStore())
    with pytest.raises(TypeError, match=r"session\(key\)"):
        scope_sessions(manager)
    assert type(manager) is StreamableHTTPSessionManager
