"""Hostile input, property-based: what a client or a tool controls, against a real PostgreSQL.

Cursors (``Last-Event-ID``), stream ids (a client's JSON-RPC request ids), message
contents and HTTP headers. Each is stored and replayed exactly, or refused with a
clear error; no query error escapes, and no session ever gets another's events.

What these tests found out, and pin down:

- pydantic serializes a message nested up to about 255 levels, but its JSON parser
  stops at 200: a message in between was stored, then failed every replay (and
  took the rest of its stream down with it). ``load_message`` now falls back to
  Python's parser for it. Deeper messages are refused by ``store_event``.
- A request id over 2 KB (UTF-8) was refused with ``StreamIdTooLongError``: the SDK
  answered that POST with a 500 of its own, or, when the SDK's message router
  stored it, ended the session. Such an id is now indexed by its hash and kept in
  full beside it: it round-trips like any other. Only ids over 1 MB are refused.
- A request id holding a lone surrogate (``"\\ud800"`` in the JSON): mcp 2.x refuses
  the body (400); mcp 1.x parses it, then neither it nor the store can serialize
  the response, and the SDK's message router for that session stops. Only that
  session hangs.
- A request id of ``"_GET_stream"`` shares its stream with the session's standalone
  stream (the SDK's name for it): a quirk of the SDK, confined to that session.
- An empty ``Last-Event-ID`` header is no header to the SDK: it opens the
  standalone stream. Only non-empty values are resumption attempts.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mcp_pg_events import PostgresEventStore, SessionEventStore, StreamIdTooLongError, run_retention
from mcp_pg_events.compat import ROOT_MODEL, new_server, validate_python
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.event_log import INDEXED_STREAM_ID_BYTES, MAX_SESSION_KEY_LENGTH, MAX_STREAM_ID_BYTES
from mcp_pg_events.messages import dump_message
from mcp_pg_events.testing import SSEStream, streamable_app

from .mcp_http import SSE, McpClient, RecordingStore, build_app, data_events, serve
from .messages import MCP_MAJOR, notification, progress_message, response
from .test_contract import Recorder
from .test_live import collect

HOUR = timedelta(hours=1)
TIMEOUT = 15


def hostile(max_examples: int) -> Any:
    # The fixtures are built once per test and shared by its examples on purpose:
    # every example reads the same sessions, or makes a session of its own.
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


async def replay(view: SessionEventStore, cursor: str) -> tuple[str | None, list[tuple[str, Any]]]:
    got = Recorder()
    stream = await view.replay_events_after(cursor, got)
    return stream, [(e.event_id, e.message) for e in got.events]


async def follow(view: SessionEventStore, cursor: str) -> tuple[bool, list[tuple[str, Any]]]:
    """Whether a live subscription from ``cursor`` opens, and all it yields until its stream ends."""
    subscription = view.subscribe(cursor)
    try:
        opened = await subscription.open()
        events = await collect(subscription, TIMEOUT)
    finally:
        await subscription.aclose()
    return opened, [(e.event_id, e.message) for e in events]


# --- Last-Event-ID on the store ---------------------------------------------------------------


@dataclass
class Sessions:
    """Two sessions with colliding stream ids, and events that retention removed from both."""

    mine: SessionEventStore
    # This session's stream "1" as (event id, message or None for a priming event), in order.
    alive: list[tuple[str, Any]]
    expired: list[str]
    foreign: list[str]

    def after(self, cursor: str) -> list[tuple[str, Any]] | None:
        """What a replay from ``cursor`` must send: None when it is not this session's live event.

        An id is ``{stream_key}-{seq}-{tag}``; leading zeros name the same event.
        """
        match = re.fullmatch(r"([0-9]{1,18})-([0-9]{1,18})-([0-9a-f]{12})", cursor)
        if match is None:
            return None
        canonical = f"{int(match[1])}-{int(match[2])}-{match[3]}"
        ids = [event_id for event_id, _ in self.alive]
        if canonical not in ids:
            return None
        return [(e, m) for e, m in self.alive[ids.index(canonical) + 1 :] if m is not None]

    def parts(self) -> tuple[list[int], list[int], list[str]]:
        """The stream keys, seqs and tags of every id above, for forging ids out of real parts."""
        refs = [parse_event_id(e) for e in [*(e for e, _ in self.alive), *self.expired, *self.foreign]]
        return (
            sorted({r.stream_key for r in refs if r}),
            sorted({r.seq for r in refs if r}),
            sorted({r.tag for r in refs if r}),
        )


def progress(i: int) -> Any:
    return progress_message(i, progressToken="t")


@pytest.fixture
async def sessions(store: PostgresEventStore, admin: asyncpg.Connection, dsn: str) -> Sessions:
    mine, other = store.session("mine"), store.session("other")
    old_mine = [await mine.store_event("1", m) for m in (None, progress(0))]
    old_other = [
        await other.store_event("1", None),
        await other.store_event("1", progress(100)),
        await other.store_event("_GET_stream", progress(101)),
    ]
    # The oldest events of the whole sequence: those retention takes.
    await admin.execute(
        "UPDATE mcp_events_events SET created_at = created_at - interval '2 hours' WHERE seq = ANY($1)",
        [ref.seq for ref in map(parse_event_id, old_mine + old_other) if ref],
    )
    messages = [progress(1), progress(2), None, progress(3), response(1, {"content": []})]
    alive = [(await mine.store_event("1", m), m) for m in messages]
    foreign = [
        await other.store_event("1", progress(102)),
        await other.store_event("_GET_stream", progress(103)),
        await other.store_event("1", response(1, {"content": []})),
    ]
    report = await run_retention(dsn, ttl=HOUR)
    assert report.rows_deleted == len(old_mine) + len(old_other)
    return Sessions(store.session("mine"), alive, old_mine, old_other + foreign)


@hostile(max_examples=150)
@given(cursor=st.text() | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
@example(cursor="")
@example(cursor="x" * 10_000)
@example(cursor="1' OR '1'='1")
@example(cursor="1;DROP TABLE mcp_events_events;--")
@example(cursor="1-1-aaaaaaaaaaaa")
@example(cursor="9" * 40)
@example(cursor="9" * 19 + "-1-aaaaaaaaaaaa")
@example(cursor="1-1-aaaa\x00aaaaaaa")
@example(cursor="\u0661-\u0661-aaaaaaaaaaaa")  # Arabic-Indic digits: digits to Python, not to the id format
@example(cursor="1-1-AAAAAAAAAAAA")
@example(cursor="1-1-aaaaaaaaaaaa\n")
@example(cursor="\ud800-1-aaaaaaaaaaaa")
@example(cursor="é✓🎉")
async def test_any_text_as_last_event_id_gives_nothing_and_never_an_error(
    sessions: Sessions, cursor: str
) -> None:
    assert await replay(sessions.mine, cursor) == (None, [])
    assert await follow(sessions.mine, cursor) == (False, [])


async def test_other_sessions_and_expired_event_ids_give_nothing(sessions: Sessions) -> None:
    assert len(sessions.foreign) == 6 and len(sessions.expired) == 2
    for cursor in sessions.foreign + sessions.expired:
        assert await replay(sessions.mine, cursor) == (None, []), cursor
        assert await follow(sessions.mine, cursor) == (False, []), cursor


@hostile(max_examples=200)
@given(data=st.data())
async def test_ids_forged_from_real_parts_give_only_this_sessions_own_events(
    sessions: Sessions, data: st.DataObject
) -> None:
    # Keys, seqs and tags of this session, of the other one and of expired events,
    # mixed: only an id naming one of this session's live events may replay anything.
    keys, seqs, tags = sessions.parts()
    number = st.integers(0, 10**18 - 1)
    key = data.draw(st.sampled_from(keys) | number, "stream key")
    seq = data.draw(st.sampled_from(seqs) | number, "seq")
    tag = data.draw(st.sampled_from(tags) | st.text("0123456789abcdef", min_size=12, max_size=12), "tag")
    zeros = data.draw(st.sampled_from(["", "0", "00"]), "leading zeros")
    cursor = f"{zeros}{key}-{zeros}{seq}-{tag}"
    expected = sessions.after(cursor)

    stream, events = await replay(sessions.mine, cursor)
    if expected is None:
        assert (stream, events) == (None, [])
        assert await follow(sessions.mine, cursor) == (False, [])
    else:
        assert (stream, events) == ("1", expected)
        # The stream ends with its response: a subscription yields the rest, then stops.
        assert await follow(sessions.mine, cursor) == (bool(expected), expected)


async def test_every_live_event_of_this_session_resumes_its_own_stream(sessions: Sessions) -> None:
    for cursor, _ in sessions.alive:
        expected = sessions.after(cursor)
        assert expected is not None
        assert await replay(sessions.mine, cursor) == ("1", expected)
        assert await follow(sessions.mine, cursor) == (bool(expected), expected)


# --- stream ids and session keys ------------------------------------------------------------------


long_runs = st.builds(lambda ch, n: ch * n, st.characters(), st.integers(400, 2100))


@hostile(max_examples=120)
@given(stream_id=st.text(max_size=40) | long_runs)
@example(stream_id="")
@example(stream_id="\x00")
@example(stream_id="nul\x00inside")
@example(stream_id="\ud800")
@example(stream_id="\udfff\ud800")
@example(stream_id="\ud83c\udf89")  # a surrogate pair as two code points, not one 🎉
@example(stream_id="_GET_stream")
@example(stream_id="' OR 1=1 --")
@example(stream_id="x" * INDEXED_STREAM_ID_BYTES)
@example(stream_id="x" * (INDEXED_STREAM_ID_BYTES + 1))
@example(stream_id="é" * (INDEXED_STREAM_ID_BYTES // 2))
@example(stream_id="é" * (INDEXED_STREAM_ID_BYTES // 2) + "x")
@example(stream_id="🎉" * (INDEXED_STREAM_ID_BYTES // 4))
@example(stream_id="🎉" * (INDEXED_STREAM_ID_BYTES // 4 + 1))
@example(stream_id="\ud800" * INDEXED_STREAM_ID_BYTES)
@example(stream_id="x" * 100_000)
@example(stream_id="x" * MAX_STREAM_ID_BYTES)
@example(stream_id="x" * (MAX_STREAM_ID_BYTES + 1))
async def test_any_stream_id_round_trips_exactly_or_is_refused_as_too_long(
    store: PostgresEventStore, admin: asyncpg.Connection, stream_id: str
) -> None:
    key = uuid.uuid4().hex
    view = store.session(key)
    message = progress(1)
    if utf8_size(stream_id) > MAX_STREAM_ID_BYTES:
        for stored in (None, message):
            with pytest.raises(StreamIdTooLongError, match=r"stream id is \d+ bytes long"):
                await view.store_event(stream_id, stored)
        assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE key = $1", key) == 0
        return

    cursor = await view.store_event(stream_id, None)
    event_id = await view.store_event(stream_id, message)
    assert await replay(store.session(key), cursor) == (stream_id, [(event_id, message)])
    if not has_surrogate(stream_id) and stream_id != "_GET_stream":
        # A response whose id is the stream id ends a live subscription: the
        # stored name compares equal to the id, character for character.
        end = response(stream_id, {})
        end_id = await view.store_event(stream_id, end)
        assert await follow(store.session(key), cursor) == (True, [(event_id, message), (end_id, end)])


@hostile(max_examples=60)
@given(key=st.text(max_size=MAX_SESSION_KEY_LENGTH + 10) | long_runs)
@example(key="")
@example(key="\x00")
@example(key="a\ud800")
@example(key="x" * MAX_SESSION_KEY_LENGTH)
@example(key="🎉" * MAX_SESSION_KEY_LENGTH)
@example(key="x" * (MAX_SESSION_KEY_LENGTH + 1))
@example(key="1' OR '1'='1")
async def test_any_session_key_keeps_its_events_apart_or_is_refused_up_front(
    store: PostgresEventStore, key: str
) -> None:
    if not key or len(key) > MAX_SESSION_KEY_LENGTH or "\x00" in key or has_surrogate(key):
        with pytest.raises(ValueError, match="session key must be"):
            store.session(key)
        return
    view = store.session(key)
    # Every example shares the database: the stream is new whichever key came before.
    stream_id = uuid.uuid4().hex
    cursor = await view.store_event(stream_id, None)
    event_id = await view.store_event(stream_id, progress(1))
    assert await replay(store.session(key), cursor) == (stream_id, [(event_id, progress(1))])
    assert await replay(store.session(uuid.uuid4().hex), cursor) == (None, [])


# --- message contents ---------------------------------------------------------------------------


@hostile(max_examples=120)
@given(text=st.text(max_size=60))
@example(text="\x00")
@example(text="nul \x00 inside \x00\x00")
@example(text="\\u0000")
@example(text="\ud800")
@example(text="a\udfffb")
@example(text="\u2028\u2029\ufeff\uffff")
@example(text="é✓🎉 \" ' \\ </script>")
async def test_any_text_in_a_message_replays_exactly_or_is_refused_when_unserializable(
    store: PostgresEventStore, text: str
) -> None:
    view = store.session(uuid.uuid4().hex)
    message = notification(
        "notifications/message", {"level": "info", "data": text, text: [text, {text: text}]}
    )
    cursor = await view.store_event("1", None)
    if has_surrogate(text):
        # Not valid UTF-8: pydantic cannot write it, so neither could the SDK send it.
        with pytest.raises(ValueError, match="surrogates not allowed"):
            await view.store_event("1", message)
        assert await replay(view, cursor) == ("1", [])
        return
    event_id = await view.store_event("1", message)
    assert await replay(view, cursor) == ("1", [(event_id, message)])


# Any JSON a message's params, result or error data may hold (pydantic writes no NaN, no
# infinity, and no lone surrogate: it refuses to), and the ids JSON-RPC allows.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(
    st.text(max_size=8).filter(lambda t: not has_surrogate(t)), json_values, max_size=4
)
request_id_values = st.integers(-(2**63), 2**63) | st.text(max_size=10).filter(lambda t: not has_surrogate(t))
method_names = st.text(max_size=20).filter(lambda t: not has_surrogate(t))


def message_shapes() -> Any:
    """JSON-RPC messages of every kind as the SDK validates them, with and without their optional parts."""
    base = {"jsonrpc": st.just("2.0")}
    optional_params = {"params": json_objects | st.none()}
    return st.one_of(
        st.fixed_dictionaries(
            {**base, "id": request_id_values, "method": method_names}, optional=optional_params
        ),
        st.fixed_dictionaries({**base, "method": method_names}, optional=optional_params),
        st.fixed_dictionaries({**base, "id": request_id_values, "result": json_objects}),
        st.fixed_dictionaries(
            {
                **base,
                "id": request_id_values | st.none(),
                "error": st.fixed_dictionaries(
                    {"code": st.integers(-(2**31), 2**31), "message": method_names},
                    optional={"data": json_values},
                ),
            }
        ),
        # Extra members, which the SDK's models ignore (2.x) or keep (1.x).
        st.fixed_dictionaries(
            {**base, "method": method_names, "id": st.booleans() | st.floats(-5, 5) | request_id_values},
            optional={"params": json_objects, "result": json_objects, "extra": json_values},
        ),
    )


def bare(message: Any) -> Any:
    """The model inside mcp 1.x's RootModel, or the message itself."""
    return message.root if ROOT_MODEL is not None and isinstance(message, ROOT_MODEL) else message


@hostile(max_examples=150)
@given(shapes=st.lists(message_shapes(), min_size=1, max_size=6))
async def test_replayed_messages_are_the_stored_ones_of_the_same_type_with_the_same_fields_set(
    store: PostgresEventStore, shapes: list[dict[str, Any]]
) -> None:
    # What the SDK inspects (their type) and sends (model_dump_json of the fields set)
    # must be what it stored, whichever way replay parses and validates a page.
    messages = []
    for shape in shapes:
        try:
            messages.append(validate_python(shape))
        except ValueError:
            continue  # not a message: the SDK would never hand it to the store
    view = store.session(uuid.uuid4().hex)
    cursor = await view.store_event("1", None)
    ids = [await view.store_event("1", message) for message in messages]
    stream, got = await replay(view, cursor)
    assert stream == "1"
    assert [event_id for event_id, _ in got] == ids
    for (_, replayed), message in zip(got, messages, strict=True):
        assert type(replayed) is type(message)
        assert type(bare(replayed)) is type(bare(message))
        assert replayed == message
        assert bare(replayed).model_fields_set == bare(message).model_fields_set
        assert dump_message(replayed) == dump_message(message)


def nested(depth: int, shape: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if shape == "list" else {"k": value}
    return value


# pydantic's JSON parser gives up at 200 levels; nothing that shallow may be refused.
PARSER_DEPTH = 200


@hostile(max_examples=40)
@given(depth=st.integers(1, 320), shape=st.sampled_from(["list", "dict"]))
@example(depth=100, shape="list")
@example(depth=197, shape="list")
@example(depth=198, shape="dict")
@example(depth=199, shape="list")
@example(depth=230, shape="dict")
@example(depth=250, shape="list")
@example(depth=254, shape="dict")
@example(depth=255, shape="list")
@example(depth=500, shape="dict")
@example(depth=5000, shape="list")
async def test_a_deeply_nested_message_replays_exactly_or_is_refused_as_too_deep(
    store: PostgresEventStore, depth: int, shape: str
) -> None:
    view = store.session(uuid.uuid4().hex)
    deep = response(1, {"structuredContent": {"v": nested(depth, shape)}})
    before = progress(1)
    cursor = await view.store_event("1", None)
    before_id = await view.store_event("1", before)
    try:
        deep_id = await view.store_event("1", deep)
    except ValueError as exc:
        refused: ValueError | None = exc
    else:
        refused = None
    if refused is not None:
        assert "depth" in str(refused)
        assert depth > PARSER_DEPTH
        assert await replay(view, cursor) == ("1", [(before_id, before)])
        return
    # Replay decodes a page of rows at once, the live tail one row at a time: both.
    expected = [(before_id, before), (deep_id, deep)]
    assert await replay(view, cursor) == ("1", expected)
    assert await follow(view, cursor) == (True, expected)


TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize(
    "text",
    ["x" * TEN_MB, ('ab\x00é🎉"\\\u2028' * (TEN_MB // 8))],
    ids=["ascii", "escapes-and-unicode"],
)
async def test_a_10_mb_message_is_stored_and_replayed_exactly(store: PostgresEventStore, text: str) -> None:
    view = store.session("big")
    message = notification("notifications/message", {"level": "info", "data": text})
    cursor = await view.store_event("1", None)
    event_id = await view.store_event("1", message)
    end = response(1, {})
    end_id = await view.store_event("1", end)
    assert await replay(view, cursor) == ("1", [(event_id, message), (end_id, end)])
    assert await follow(view, cursor) == (True, [(event_id, message), (end_id, end)])


# --- over HTTP --------------------------------------------------------------------------------


@dataclass
class Peers:
    """Two MCP sessions on one server, each with a finished tool call."""

    http: httpx.AsyncClient
    recorder: RecordingStore
    alice: McpClient
    bob: McpClient
    alice_events: list[SSE]
    # Bob's opening stream and his tool call's: ids of both of his scopes.
    bob_events: list[SSE]

    async def alice_still_resumes(self) -> None:
        """Alice's tool call still replays from its priming event: all of it, and only it."""
        async with self.alice.get(last_event_id=self.alice_events[0].id) as resumed:
            assert resumed.response.status_code == 200
            replayed = await resumed.until_response(2)
        assert data_events(replayed) == data_events(self.alice_events)


@pytest.fixture
async def peers(store: PostgresEventStore) -> AsyncIterator[Peers]:
    recorder = RecordingStore(store)
    gate = asyncio.Event()
    gate.set()
    async with (
        serve(build_app(recorder, gate)) as url,
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http,
    ):
        alice, bob = McpClient(http), McpClient(http)
        await alice.initialize()
        bob_events = await bob.initialize()
        events = []
        for client, token in ((alice, "alice"), (bob, "bob")):
            request_id, call = client.call_tool("progress", {"count": 2}, progress_token=token)
            assert request_id == 2
            async with call as stream:
                events.append(await stream.rest())
        yield Peers(http, recorder, alice, bob, events[0], bob_events + events[1])


def header_text(text: str) -> bytes:
    """``text`` as a header value HTTP can carry: no control characters, no blanks around it."""
    kept = "".join(ch for ch in text if ch == "\t" or (ch >= " " and ch != "\x7f"))
    return kept.strip(" \t").encode("utf-8", "surrogatepass")


latin1 = st.binary(min_size=1).map(lambda b: b.decode("latin-1"))
header_values = (st.text(min_size=1) | latin1).map(header_text).filter(bool)


class BobsCursor(int):
    """The n-th of Bob's event ids (modulo their count): a real cursor of another session."""


@hostile(max_examples=50)
@given(value=header_values | st.integers(0, 20).map(BobsCursor))
@example(value=b"x" * 10_000)
@example(value=b"1' OR '1'='1")
@example(value=b"9" * 40)
@example(value=b"1-1-aaaaaaaaaaaa")
@example(value="é✓🎉".encode())
@example(value=b"\xff\xfe\x80")
@example(value=b"%00")
@example(value=BobsCursor(0))
@example(value=BobsCursor(2))
@example(value=BobsCursor(4))
async def test_hostile_last_event_id_headers_get_an_empty_stream_never_a_500_nor_anothers_events(
    peers: Peers, value: bytes | BobsCursor
) -> None:
    if isinstance(value, BobsCursor):
        bobs = [e.id for e in peers.bob_events if e.id]
        value = bobs[value % len(bobs)].encode()
    async with peers.alice.get(last_event_id=value) as resumed:  # type: ignore[arg-type]
        assert resumed.response.status_code == 200
        assert data_events(await resumed.rest()) == []


class Unregistered(int):
    """A key with a row of its own that no MCP session registered (a store user's, or a provisional key
    of an earlier release), sent as a session id."""


@hostile(max_examples=40)
@given(
    session_id=header_values | st.just(b"") | st.just(Unregistered()),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
)
@example(session_id=b"", method="GET")
@example(session_id=b"x" * 10_000, method="POST")
@example(session_id=b"1' OR '1'='1", method="DELETE")
@example(session_id="é✓🎉".encode(), method="GET")
@example(session_id=Unregistered(), method="GET")
@example(session_id=Unregistered(), method="DELETE")
async def test_odd_session_ids_are_refused_never_with_a_500_nor_anothers_events(
    peers: Peers, session_id: bytes | Unregistered, method: str
) -> None:
    if isinstance(session_id, Unregistered):
        key = "provisional-0123456789abcdef"
        await peers.recorder.session(key).store_event("1", None)
        session_id = key.encode()
    if session_id.decode("latin-1") in (peers.alice.session_id, peers.bob.session_id):
        return  # a real session id is the session's credential, not an odd one
    headers: dict[str, Any] = {**peers.alice._headers(), "mcp-session-id": session_id}
    body = None
    if method == "GET":
        headers["last-event-id"] = peers.bob_events[-1].id
    elif method == "POST":
        body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/list"})
        headers["content-type"] = "application/json"
    answer = await peers.http.request(method, "/mcp", headers=headers, content=body)
    assert 400 <= answer.status_code < 500, answer.text
    assert "data:" not in answer.text and "progress" not in answer.text
    if method == "DELETE":
        await peers.alice_still_resumes()


async def sse_events(answer: httpx.Response) -> list[SSE]:
    """The events of a whole SSE response (read already or not), as the demo client parses them."""
    return await SSEStream(answer).rest()


def call_with_id(request_id: Any, tool: str = "progress", arguments: Any = None) -> bytes:
    """A ``tools/call`` with any JSON as its id (or, given bytes, that raw JSON text)."""
    raw = request_id if isinstance(request_id, bytes) else json.dumps(request_id).encode()
    arguments = {"count": 1} if arguments is None else arguments
    params = json.dumps({"name": tool, "arguments": arguments}).encode()
    return b'{"jsonrpc": "2.0", "method": "tools/call", "params": ' + params + b', "id": ' + raw + b"}"


async def post_raw(client: McpClient, body: bytes, *, stream: bool = False) -> httpx.Response:
    """POST ``body`` as the session's client; read all of the answer unless ``stream``."""
    headers = {**client._headers(), "content-type": "application/json"}
    request = client.http.build_request("POST", "/mcp", content=body, headers=headers)
    return await client.http.send(request, stream=stream)


async def resume(client: McpClient, last_event_id: str | None) -> list[SSE]:
    """Every event of a resumed stream that ends (a request's, its response stored)."""
    assert last_event_id
    async with client.get(last_event_id=last_event_id) as resumed:
        assert resumed.response.status_code == 200
        return await resumed.rest()


async def still_answers(client: McpClient) -> None:
    _, call = client.call_tool("progress", {"count": 1})
    async with call as stream:
        (reply,) = [e.message for e in data_events(await stream.rest())]
    assert reply is not None and reply["result"]["content"][0]["text"] == "sent 1"


async def answered_on_a_stream_that_resumes(
    client: McpClient, answer: httpx.Response, request_id: Any
) -> None:
    """``answer`` (to a ``progress`` call of ``call_with_id``) is the reply; its stream resumes exactly."""
    assert answer.status_code == 200
    events = await sse_events(answer)
    (reply,) = [e.message for e in data_events(events)]
    assert reply is not None and reply["id"] == request_id
    assert reply["result"]["content"][0]["text"] == "sent 1"
    # The stream id is the request id: its stream resumes, exactly.
    assert data_events(await resume(client, events[0].id)) == data_events(events)


request_ids = (
    st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
    | st.builds(lambda ch, n: ch * n, st.characters(exclude_categories=["Cs"]), st.integers(500, 2100))
    | st.integers(-(2**80), 2**80)
).filter(lambda request_id: str(request_id) != "1")  # the session's initialize: see below


@hostile(max_examples=15)
@given(request_id=request_ids)
@example(request_id="x" * 3000)
@example(request_id="é" * (INDEXED_STREAM_ID_BYTES // 2 + 1))
@example(request_id="x" * INDEXED_STREAM_ID_BYTES)
@example(request_id="x" * (MAX_STREAM_ID_BYTES + 1))
@example(request_id="nul\x00id")
@example(request_id="ünï ✓ 🎉 \u2028 \x85 \r\n")
@example(request_id="1' OR '1'='1")
@example(request_id="")
@example(request_id=2**70)
async def test_a_hostile_request_id_is_answered_on_its_own_stream_or_refused_and_others_never_notice(
    peers: Peers, request_id: str | int
) -> None:
    evil = McpClient(peers.http)
    await evil.initialize()
    answer = await post_raw(evil, call_with_id(request_id))
    if utf8_size(str(request_id)) > MAX_STREAM_ID_BYTES:
        # Over a megabyte the store refuses the stream id (StreamIdTooLongError);
        # the SDK answers any store that raises with a 500, to this one request.
        assert answer.status_code == 500
        assert "data:" not in answer.text
    else:
        await answered_on_a_stream_that_resumes(evil, answer, request_id)
    await still_answers(evil)
    await peers.alice_still_resumes()


async def test_a_request_id_repeating_an_earlier_ones_text_stays_in_its_own_session(peers: Peers) -> None:
    # The SDK files both 1 (the initialize) and "1" under stream "1". The live
    # resume takes the stream as ended by the first one's response, which comes
    # before the cursor, so it may give nothing; whatever it gives is this session's.
    evil = McpClient(peers.http)
    await evil.initialize()
    answer = await post_raw(evil, call_with_id("1"))
    events = await sse_events(answer)
    (reply,) = [e.message for e in data_events(events)]
    assert reply is not None and reply["id"] == "1"
    assert data_events(await resume(evil, events[0].id)) in ([], data_events(events))
    await still_answers(evil)
    await peers.alice_still_resumes()


async def test_a_request_id_with_a_lone_surrogate_stops_at_most_its_own_session(peers: Peers) -> None:
    evil = McpClient(peers.http)
    await evil.initialize()
    answer = await post_raw(evil, call_with_id(b'"a\\ud800"'), stream=True)
    try:
        if MCP_MAJOR == 2:
            assert answer.status_code == 400  # its JSON parser refuses a lone surrogate
        else:
            # mcp 1.x parses it with json.loads: the priming event (stream ids keep
            # lone surrogates) is stored and sent, the response never is: the store
            # cannot serialize it, nor could the SDK, whose message router then stops.
            assert answer.status_code == 200
            priming = await SSEStream(answer).next()
            assert priming is not None and priming.id and priming.data == ""
        await peers.alice_still_resumes()
        await still_answers(peers.bob)
    finally:
        await answer.aclose()


# The SDK keeps a request's stream under str(request id), and the standalone GET
# stream under "_GET_stream": a request with that id shares the standalone stream's
# name, in its own session's scope only.
async def test_a_request_id_naming_the_standalone_stream_stays_in_its_own_session(peers: Peers) -> None:
    evil = McpClient(peers.http)
    await evil.initialize()
    answer = await post_raw(evil, call_with_id("_GET_stream"))
    assert answer.status_code == 200
    (reply,) = [e.message for e in data_events(await sse_events(answer))]
    assert reply is not None and reply["id"] == "_GET_stream"
    stored = {key for key, stream, _ in peers.recorder.stored if stream == "_GET_stream"}
    assert stored == {evil.session_id}
    await still_answers(evil)
    await peers.alice_still_resumes()


async def test_a_10_mb_tool_result_resumes_exactly_over_http(store: PostgresEventStore) -> None:
    server = new_server("hostile-big", store)
    blob = ('\x00é🎉"\\\u2028\x85' + "x" * 1000) * (TEN_MB // 1007)

    @server.tool()  # type: ignore[misc]
    async def big() -> str:
        """A result of 10 MB of text, some of which JSON must escape, some not."""
        return blob

    async with (
        serve(streamable_app(server, store)) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as http,
    ):
        client = McpClient(http)
        await client.initialize()
        answer = await post_raw(client, call_with_id(2, "big", {}))
        live = await sse_events(answer)
        replayed = await resume(client, live[0].id)
    assert data_events(replayed) == data_events(live)
    (reply,) = [e.message for e in data_events(replayed)]
    assert reply is not None and reply["id"] == 2
    assert reply["result"]["content"][0]["text"] == blob


@pytest.mark.parametrize("key", ["a\x00b", "a\ud800", "", "k" * (MAX_SESSION_KEY_LENGTH + 1)])
async def test_ending_a_session_by_a_key_no_session_can_have_ends_nothing(
    store: PostgresEventStore, admin: asyncpg.Connection, key: str
) -> None:
    await store.session("s").store_event("1", progress(0))
    await store.end_session(key)
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE ended_at IS NOT NULL") == 0
