"""The behaviour every store must have, run against the PostgreSQL store and the test double."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp.server.streamable_http import EventMessage

from mcp_pg_events import PostgresEventStore, StreamIdTooLongError, UnscopedEventStoreError
from mcp_pg_events.event_log import INDEXED_STREAM_ID_BYTES, MAX_STREAM_ID_BYTES
from mcp_pg_events.testing import MemoryEventStore

from .messages import error, notification, progress_message, request, response

VISIBLE_ASCII = re.compile(r"\A[\x21-\x7e]{1,64}\Z")

ODD_MESSAGES = [
    notification("notifications/message", {"data": "nul \u0000 inside", "level": "info"}),
    notification("notifications/message", {"data": "unicode é ✓ 🎉 \u2028 \\ \" '", "level": "info"}),
    notification("n/deep", {"a": [[[[[[[[[[{"b": [1, 2.5, None, True, "x"]}]]]]]]]]]]}),
    notification("n/no-params"),
    response(7, {"content": [], "structuredContent": {"k": "v"}}),
    response("string-id", {"_meta": {"progressToken": 5}}),
    request(9, "sampling/createMessage", {"messages": [], "maxTokens": 3}),
    error(10, -32602, "bad params \u0000"),
]

GARBAGE_IDS = [
    "",
    "abc",
    "9" * 40,
    "1-1-",
    "1-1-000000000000-extra",
    "-1--1-aaaaaaaaaaaa",
    "99999999999999999999-1-aaaaaaaaaaaa",
    "é✓-1-aaaaaaaaaaaa",
    "1-1-aaaa\x00aaaaaaa",
    "1' OR '1'='1",
    "1;DROP TABLE mcp_events_events;--",
    "x" * 10_000,
]


# Any JSON a message may carry. Lone surrogates are left out: pydantic cannot
# serialize them, so the SDK could never send them either.
json_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=25,
)
request_ids = st.integers(min_value=-(2**53), max_value=2**53) | json_text
json_objects = st.dictionaries(json_text, json_values, max_size=5)
any_message = (
    st.builds(notification, json_text.filter(bool), json_objects)
    | st.builds(response, request_ids, json_objects)
    | st.builds(request, request_ids, json_text.filter(bool), json_objects)
    | st.builds(error, request_ids, st.integers(min_value=-32768, max_value=32767), json_text)
)
# The fixture's store is shared by the examples on purpose (each uses a session of its
# own), and each store's subclass runs the same method: with no example database,
# neither can mix up examples between runs.
properties = settings(
    max_examples=75,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[EventMessage] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: EventMessage) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, count: int, timeout: float = 15) -> list[EventMessage]:
        """Wait until ``count`` events have been sent (bounded)."""

        async def wait() -> None:
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)
        return self.events


class StoreContract:
    """Subclasses provide ``root``: a store shared by all sessions, with session(key)."""

    async def test_replay_sends_what_follows_the_cursor_in_order(self, root: Any) -> None:
        view = root.session("s1")
        priming = await view.store_event("1", None)
        stored = [progress_message(i) for i in range(5)]
        ids = [await view.store_event("1", m) for m in stored]

        got = Recorder()
        assert await view.replay_events_after(priming, got) == "1"
        assert [e.event_id for e in got.events] == ids
        assert [e.message for e in got.events] == stored

        got = Recorder()
        assert await view.replay_events_after(ids[2], got) == "1"
        assert [e.event_id for e in got.events] == ids[3:]

    async def test_replay_returns_the_stream_when_nothing_follows(self, root: Any) -> None:
        view = root.session("s1")
        last = await view.store_event("1", notification("n"))
        got = Recorder()
        assert await view.replay_events_after(last, got) == "1"
        assert got.events == []

    async def test_priming_events_are_cursors_but_never_replayed(self, root: Any) -> None:
        view = root.session("s1")
        first = await view.store_event("1", None)
        message = notification("n", {"i": 1})
        await view.store_event("1", message)
        second_priming = await view.store_event("1", None)
        got = Recorder()
        assert await view.replay_events_after(first, got) == "1"
        assert [e.message for e in got.events] == [message]
        got = Recorder()
        assert await view.replay_events_after(second_priming, got) == "1"
        assert got.events == []

    async def test_streams_of_one_session_stay_apart(self, root: Any) -> None:
        view = root.session("s1")
        cursor = await view.store_event("1", None)
        await view.store_event("2", notification("other stream"))
        mine = notification("mine")
        await view.store_event("1", mine)
        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [e.message for e in got.events] == [mine]

    @pytest.mark.parametrize("stream_id", ["1", "_GET_stream"])
    async def test_sessions_with_colliding_stream_ids_never_see_each_other(
        self, root: Any, stream_id: str
    ) -> None:
        alice, bob = root.session("alice"), root.session("bob")
        alice_cursor = await alice.store_event(stream_id, None)
        bob_cursor = await bob.store_event(stream_id, None)
        alice_message = notification("for alice")
        bob_message = notification("for bob")
        await alice.store_event(stream_id, alice_message)
        await bob.store_event(stream_id, bob_message)

        got = Recorder()
        assert await alice.replay_events_after(alice_cursor, got) == stream_id
        assert [e.message for e in got.events] == [alice_message]
        got = Recorder()
        assert await bob.replay_events_after(bob_cursor, got) == stream_id
        assert [e.message for e in got.events] == [bob_message]

        # Each with the other's cursor: nothing, and no error.
        got = Recorder()
        assert await alice.replay_events_after(bob_cursor, got) is None
        assert await bob.replay_events_after(alice_cursor, got) is None
        assert got.events == []

    async def test_another_view_of_the_same_session_sees_its_events(self, root: Any) -> None:
        cursor = await root.session("s1").store_event("1", None)
        message = notification("n")
        await root.session("s1").store_event("1", message)
        got = Recorder()
        assert await root.session("s1").replay_events_after(cursor, got) == "1"
        assert [e.message for e in got.events] == [message]

    @pytest.mark.parametrize("garbage", GARBAGE_IDS, ids=lambda g: repr(g[:20]))
    async def test_malformed_cursors_give_none(self, root: Any, garbage: str) -> None:
        view = root.session("s1")
        await view.store_event("1", notification("n"))
        got = Recorder()
        assert await view.replay_events_after(garbage, got) is None
        assert got.events == []

    async def test_forged_cursor_gives_none(self, root: Any) -> None:
        view = root.session("s1")
        real = await view.store_event("1", None)
        await view.store_event("1", notification("n"))
        forged = real[:-1] + ("0" if real[-1] != "0" else "1")
        got = Recorder()
        assert await view.replay_events_after(forged, got) is None
        assert got.events == []

    @pytest.mark.parametrize("message", ODD_MESSAGES, ids=lambda m: type(m).__name__)
    async def test_every_message_round_trips_exactly(self, root: Any, message: Any) -> None:
        view = root.session("s1")
        cursor = await view.store_event("1", None)
        await view.store_event("1", message)
        got = Recorder()
        await view.replay_events_after(cursor, got)
        assert [e.message for e in got.events] == [message]
        assert got.events[0].message.model_dump_json(
            by_alias=True, exclude_unset=True
        ) == message.model_dump_json(by_alias=True, exclude_unset=True)

    @pytest.mark.parametrize(
        "stream_id",
        [
            "",
            "ünïcødé-✓",
            "nul\x00inside",
            "lone\ud800surrogate",
            "x" * INDEXED_STREAM_ID_BYTES,
            "é" * INDEXED_STREAM_ID_BYTES,
            "x" * MAX_STREAM_ID_BYTES,
            "' OR 1=1 --",
        ],
        ids=["empty", "unicode", "nul", "surrogate", "longest-indexed", "hashed", "longest", "sql"],
    )
    async def test_odd_stream_ids_round_trip(self, root: Any, stream_id: str) -> None:
        view = root.session("s1")
        cursor = await view.store_event(stream_id, None)
        message = notification("n")
        await view.store_event(stream_id, message)
        got = Recorder()
        assert await view.replay_events_after(cursor, got) == stream_id
        assert [e.message for e in got.events] == [message]

    @properties
    @given(message=any_message)
    async def test_any_message_round_trips_exactly(self, root: Any, message: Any) -> None:
        view = root.session(uuid.uuid4().hex)
        cursor = await view.store_event("1", None)
        event_id = await view.store_event("1", message)
        got = Recorder()
        assert await view.replay_events_after(cursor, got) == "1"
        assert [(e.event_id, e.message) for e in got.events] == [(event_id, message)]

    @properties
    @given(cursor=st.text(max_size=80) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
    async def test_any_string_as_cursor_gives_none_or_this_sessions_events(
        self, root: Any, cursor: str
    ) -> None:
        mine, other = root.session(uuid.uuid4().hex), root.session(uuid.uuid4().hex)
        await other.store_event("1", None)
        await other.store_event("1", notification("not yours"))
        got = Recorder()
        assert await mine.replay_events_after(cursor, got) is None
        assert got.events == []

    async def test_long_stream_ids_alike_but_for_their_end_are_two_streams(self, root: Any) -> None:
        view = root.session("s1")
        first, second = "x" * 5000 + "1", "x" * 5000 + "2"
        cursors = [await view.store_event(stream_id, None) for stream_id in (first, second)]
        await view.store_event(first, notification("first"))
        await view.store_event(second, notification("second"))
        for cursor, stream_id, text in zip(cursors, (first, second), ("first", "second"), strict=True):
            got = Recorder()
            assert await view.replay_events_after(cursor, got) == stream_id
            assert [e.message for e in got.events] == [notification(text)]

    async def test_too_long_stream_id_is_refused_clearly(self, root: Any) -> None:
        with pytest.raises(StreamIdTooLongError, match="stream id"):
            await root.session("s1").store_event("x" * (MAX_STREAM_ID_BYTES + 1), None)

    async def test_event_ids_are_short_visible_ascii_and_unique_across_streams(self, root: Any) -> None:
        view = root.session("s1")
        ids = [await view.store_event(stream, None) for stream in ("1", "2", "_GET_stream") for _ in range(3)]
        assert all(VISIBLE_ASCII.match(i) for i in ids), ids
        assert len(set(ids)) == len(ids)

    async def test_the_shared_store_refuses_to_be_one_sessions_store(self, root: Any) -> None:
        with pytest.raises(UnscopedEventStoreError) as refused:
            await root.store_event("1", None)
        with pytest.raises(UnscopedEventStoreError):
            await root.store_event("_GET_stream", None)
        advice = str(refused.value)
        # It points to the wiring that scopes each session ...
        assert "scope_sessions(server.session_manager)" in advice
        assert "PostgresSessionManager(app, event_store=store)" in advice
        # ... and never to one session's view as a server's store: streamable_http_app(
        # event_store=store.session("my-server")) gives every session the same scope.
        assert "or use store.session(key)" not in advice
        assert "ONE MCP session's" in advice and "never hand one view to a whole server" in advice
        # A session's own cursor is nothing to the shared store.
        own = await root.session("s1").store_event("1", None)
        await root.session("s1").store_event("1", notification("n"))
        recorder = Recorder()
        assert await root.replay_events_after(own, recorder) is None
        assert await root.replay_events_after("1-1-aaaaaaaaaaaa", recorder) is None
        assert recorder.events == []

    async def test_fastmcp_scoped_stream_ids_are_sessions_of_their_own(self, root: Any) -> None:
        # What FastMCP's SessionScopedEventStore sends the shared store: "{len}:{scope}:{stream}".
        scope_a, scope_b = uuid.uuid4().hex, uuid.uuid4().hex
        stream_a, stream_b = f"32:{scope_a}:1", f"32:{scope_b}:1"
        cursor_a = await root.store_event(stream_a, None)
        await root.store_event(stream_a, notification("for-a"))
        cursor_b = await root.store_event(stream_b, None)
        await root.store_event(stream_b, notification("for-b"))
        recorder = Recorder()
        assert await root.replay_events_after(cursor_a, recorder) == stream_a
        assert [e.message for e in recorder.events] == [notification("for-a")]
        # B's cursor comes back under B's scope, which FastMCP's wrapper of A drops.
        assert await root.replay_events_after(cursor_b, Recorder()) == stream_b
        # The scope is not an MCP session id: a session of that id sees none of it.
        assert await root.session(scope_a).replay_events_after(cursor_a, Recorder()) is None
        for malformed in ("33:" + scope_a + ":1", "0::1", "32:" + scope_a, "x:1"):
            with pytest.raises(UnscopedEventStoreError):
                await root.store_event(malformed, None)


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def root(self) -> MemoryEventStore:
        return MemoryEventStore()


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def root(self, store: PostgresEventStore) -> PostgresEventStore:
        return store
