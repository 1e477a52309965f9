"""End to end over real HTTP: an MCP server on loopback, clients that drop and resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.testing import READ_TIMEOUT

from .mcp_http import (
    SSE,
    McpClient,
    RecordingStore,
    build_app,
    data_events,
    is_response,
    progress_values,
    serve,
)


@dataclass
class Server:
    url: str
    recorder: RecordingStore
    gate: asyncio.Event

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=15)


@pytest.fixture
async def server(store: PostgresEventStore) -> AsyncIterator[Server]:
    recorder = RecordingStore(store)
    gate = asyncio.Event()
    async with serve(build_app(recorder, gate)) as url:
        yield Server(url, recorder, gate)


async def test_a_dropped_post_stream_resumes_with_nothing_lost_or_doubled(server: Server) -> None:
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        request_id, call = client.call_tool("progress", {"count": 6, "pause_after": 3}, progress_token="p")
        async with call as stream:
            priming = await stream.next()
            # Protocol 2025-11-25: the stream opens with a stored, empty priming event.
            assert priming is not None and priming.id and priming.data == ""
            live = [await stream.next() for _ in range(3)]
        # The stream is gone; the tool goes on and everything it sends is stored.
        server.gate.set()
        await server.recorder.wait_for(is_response(request_id), READ_TIMEOUT)

        last = live[-1]
        assert last is not None and last.id
        async with client.get(last_event_id=last.id) as resumed:
            replayed = await resumed.until_response(request_id)

    received = [e for e in live if e is not None] + data_events(replayed)
    assert progress_values(received, "p") == [1, 2, 3, 4, 5, 6]
    result = received[-1].message
    assert result is not None and result["result"]["content"][0]["text"] == "sent 6"


async def test_resuming_from_the_priming_event_replays_the_whole_stream(server: Server) -> None:
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        server.gate.set()
        _, call = client.call_tool("progress", {"count": 3}, progress_token="q")
        async with call as stream:
            events = await stream.rest()
        priming = events[0]
        assert priming.id and priming.data == ""
        async with client.get(last_event_id=priming.id) as resumed:
            replayed = [await resumed.next() for _ in range(4)]
    assert [e.id for e in replayed if e] == [e.id for e in events[1:]]
    assert progress_values([e for e in replayed if e], "q") == [1, 2, 3]


async def test_close_sse_stream_then_the_client_resumes(server: Server) -> None:
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        request_id, call = client.call_tool("progress", {"count": 4, "close_after": 2}, progress_token="c")
        async with call as stream:
            before_close = await stream.rest()  # ends when the server closes it
        # Where the cut falls depends on delivery; what was stored does not.
        assert progress_values(before_close, "c") in ([], [1], [1, 2])
        await server.recorder.wait_for(is_response(request_id), READ_TIMEOUT)
        async with client.get(last_event_id=before_close[-1].id) as resumed:
            after = await resumed.until_response(request_id)
    assert progress_values(before_close + after, "c") == [1, 2, 3, 4]


async def test_the_standalone_get_stream_resumes(server: Server) -> None:
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        async with client.get() as standalone:
            _, call = client.call_tool("announce", {"text": "first"})
            async with call as stream:
                await stream.rest()
            first = await standalone.next()
        assert first is not None and first.id and first.message
        assert first.message["params"]["uri"] == "test://first"

        # Nobody is listening on the GET stream now: these are only stored.
        for text in ("second", "third"):
            _, call = client.call_tool("announce", {"text": text})
            async with call as stream:
                await stream.rest()
        async with client.get(last_event_id=first.id) as resumed:
            missed = [await resumed.next() for _ in range(2)]
    assert [e.message["params"]["uri"] for e in missed if e and e.message] == [
        "test://second",
        "test://third",
    ]


@pytest.mark.parametrize(
    "garbage",
    ["garbage", "9" * 40, "1-1-aaaaaaaaaaaa", "1' OR '1'='1", "x" * 4000],
    ids=["word", "digits", "forged", "sql", "long"],
)
async def test_a_garbage_last_event_id_gets_an_empty_stream_not_an_error(
    server: Server, garbage: str
) -> None:
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        async with client.get(last_event_id=garbage) as resumed:
            assert resumed.response.status_code == 200
            assert data_events(await resumed.rest()) == []


async def test_sessions_with_colliding_stream_ids_never_see_each_others_events(server: Server) -> None:
    server.gate.set()
    async with server.client() as http_a, server.client() as http_b:
        alice, bob = McpClient(http_a), McpClient(http_b)
        await asyncio.gather(alice.initialize(), bob.initialize())

        async def run(client: McpClient, name: str) -> tuple[list[SSE], SSE]:
            # Same request id in both sessions: both POST streams are stream "2".
            request_id, call = client.call_tool("progress", {"count": 3}, progress_token=name)
            assert request_id == 2
            async with call as stream:
                events = await stream.rest()
            async with client.get() as standalone:
                _, call = client.call_tool("announce", {"text": name})
                async with call as stream:
                    await stream.rest()
                announcement = await standalone.next()
            assert announcement is not None
            return events, announcement

        (a_events, a_get), (b_events, b_get) = await asyncio.gather(run(alice, "alice"), run(bob, "bob"))

        for client, own, own_get, other, other_get in (
            (alice, a_events, a_get, b_events, b_get),
            (bob, b_events, b_get, a_events, a_get),
        ):
            # The other session's cursors, on either colliding stream: nothing at all.
            for cursor in (other[0].id, other[1].id, other_get.id):
                async with client.get(last_event_id=cursor) as resumed:
                    assert data_events(await resumed.rest()) == []
            # Its own cursor: only its own events.
            async with client.get(last_event_id=own[0].id) as resumed:
                replayed = [await resumed.next() for _ in range(4)]
            name = "alice" if client is alice else "bob"
            assert progress_values([e for e in replayed if e], name) == [1, 2, 3]
            assert all(
                e is not None and e.message and e.message.get("params", {}).get("progressToken", name) == name
                for e in replayed
            )
            assert own_get.message and own_get.message["params"]["uri"] == f"test://{name}"


async def test_the_opening_initialize_stream_resumes_with_its_response(server: Server) -> None:
    # Its priming event is stored before the session id is known, its response after:
    # both must still be one stream.
    async with server.client() as http:
        client = McpClient(http)
        opening = await client.initialize()
        priming = opening[0]
        assert priming.id and priming.data == ""
        async with client.get(last_event_id=priming.id) as resumed:
            replayed = await resumed.until_response(1)
    (response,) = [e for e in replayed if e.data]
    assert response.message is not None and "serverInfo" in response.message["result"]


async def test_streams_are_filed_under_the_real_mcp_session_id(server: Server, admin: object) -> None:
    server.gate.set()
    async with server.client() as http:
        client = McpClient(http)
        await client.initialize()
        _, call = client.call_tool("progress", {"count": 1}, progress_token="k")
        async with call as stream:
            await stream.rest()
    keys = {key for key, stream, _ in server.recorder.stored if stream == "2"}
    assert keys == {client.session_id}


async def test_a_deleted_session_is_marked_ended_for_retention(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    gate = asyncio.Event()
    gate.set()
    async with serve(build_app(store, gate)) as url, httpx.AsyncClient(base_url=url, timeout=15) as http:
        client = McpClient(http)
        await client.initialize()
        _, call = client.call_tool("progress", {"count": 1}, progress_token="k")
        async with call as stream:
            await stream.rest()
        assert client.session_id
        deleted = await http.delete("/mcp", headers=client._headers())
        assert deleted.status_code < 300
    rows = await admin.fetch(
        "SELECT key, ended_at IS NOT NULL AS ended, ended_reason FROM mcp_events_sessions"
    )
    # One session, one row: the opening stream is filed under the session id too.
    assert [tuple(row) for row in rows] == [(client.session_id, True, "deleted")]


class _HookedSubscription:
    """Runs ``hook`` once the first event after the cursor has gone to the client."""

    def __init__(self, inner: Any, hook: Callable[[], Awaitable[None]] | None) -> None:
        self._inner, self._hook, self._sent = inner, hook, 0

    async def open(self) -> bool:
        result: bool = await self._inner.open()
        return result

    def __aiter__(self) -> _HookedSubscription:
        return self

    async def __anext__(self) -> Any:
        if self._sent == 1 and self._hook is not None:
            hook, self._hook = self._hook, None
            await hook()
        event = await self._inner.__anext__()
        self._sent += 1
        return event

    async def aclose(self) -> None:
        await self._inner.aclose()


class _WindowStore:
    """Forwards to a store; the next resumed stream runs ``hook`` between its replay and live parts."""

    def __init__(self, backing: Any) -> None:
        self._backing = backing
        self.hook: Callable[[], Awaitable[None]] | None = None

    def session(self, key: str) -> Any:
        return _WindowView(self, self._backing.session(key))


class _WindowView(EventStore):
    def __init__(self, owner: _WindowStore, view: Any) -> None:
        self._owner, self._view = owner, view

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        event_id: EventId = await self._view.store_event(stream_id, message)
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        stream_id: StreamId | None = await self._view.replay_events_after(last_event_id, send_callback)
        return stream_id

    def subscribe(self, last_event_id: EventId) -> _HookedSubscription:
        hook, self._owner.hook = self._owner.hook, None
        return _HookedSubscription(self._view.subscribe(last_event_id), hook)


async def test_events_stored_between_replay_and_live_delivery_reach_the_resumed_stream(
    store: PostgresEventStore,
) -> None:
    # The SDK registers a resumed connection as its stream's live tail only after
    # the store's replay returned, and drops what is stored in between. Here the
    # rest of the tool's output, response included, is stored exactly then.
    recorder = RecordingStore(store)
    window = _WindowStore(recorder)
    gate = asyncio.Event()
    async with serve(build_app(window, gate)) as url, httpx.AsyncClient(base_url=url, timeout=15) as http:
        client = McpClient(http)
        await client.initialize()
        request_id, call = client.call_tool("progress", {"count": 6, "pause_after": 3}, progress_token="p")
        async with call as stream:
            await stream.next()  # priming
            live = [await stream.next() for _ in range(3)]

        async def write_the_rest() -> None:
            gate.set()
            await recorder.wait_for(is_response(request_id), READ_TIMEOUT)

        window.hook = write_the_rest
        cursor = live[-2]
        assert cursor is not None and cursor.id
        async with client.get(last_event_id=cursor.id) as resumed:
            replayed = await asyncio.wait_for(resumed.until_response(request_id), READ_TIMEOUT)

    assert window.hook is None  # the hook ran
    assert progress_values([e for e in live[:-1] if e is not None], "p") == [1, 2]
    assert progress_values(data_events(replayed), "p") == [3, 4, 5, 6]
