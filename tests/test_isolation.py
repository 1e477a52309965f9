"""Session isolation under load, over real HTTP: many sessions, the same stream ids, many resumes.

Every session of the SDK numbers its requests from 1 and calls its standalone
stream ``_GET_stream``, so here 200 concurrent sessions all write streams "2"
and ``_GET_stream`` into one event store at once, and each drops and resumes
them several times. A session must get back exactly its own events: each is
checked by its content (the session's own progress token or announcement) and
by its id, which the database resolves to the session that owns the stream.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import httpx

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.event_ids import parse_event_id
from mcp_pg_events.testing import SSEStream

from .mcp_http import SSE, McpClient, RecordingStore, build_app, serve

SESSIONS = 200
# The tool reports COUNT progress notifications and waits at PAUSE_AT until every
# session has got that far, so the resumed stream open across the wait is
# followed live, not only replayed.
COUNT = 12
PAUSE_AT = 4
# Progress notifications read per connection before the client drops it.
PER_CONNECTION = 3
ANNOUNCEMENTS = 3
DEADLINE = 300.0

T = TypeVar("T")


@dataclass
class Received:
    """What one session got, on which connection, and what it checked."""

    token: str
    session_id: str = ""
    # Every event of every connection, in order, with the connection's label.
    events: list[tuple[str, SSE]] = field(default_factory=list)
    # Reconnections with Last-Event-ID, of the tool call's stream and of the standalone one.
    progress_resumes: int = 0
    get_resumes: int = 0
    progress_cursors: list[str] = field(default_factory=list)
    announce_cursor: str = ""

    async def read(self, stream: SSEStream, label: str, done: Callable[[list[SSE]], bool]) -> list[SSE]:
        """Events of ``stream`` until ``done``; a foreign one fails the session at once."""
        events: list[SSE] = []
        while not done(events):
            event = await stream.next()
            assert event is not None, f"{self.token}: {label} ended early, after {events}"
            self.events.append((label, event))
            token = token_of(event)
            # Fail fast: a session that reads other sessions' streams would
            # otherwise read on through all of them, for minutes.
            assert token in (None, self.token), f"{self.token}: foreign event on {label}: {event}"
            events.append(event)
        return events


def token_of(event: SSE) -> str | None:
    """The session token a progress notification or an announcement carries, if any."""
    message = event.message
    if not message:
        return None
    params = message.get("params") or {}
    if message.get("method") == "notifications/progress":
        return str(params["progressToken"])
    if message.get("method") == "notifications/resources/updated":
        return str(params["uri"]).removeprefix("test://").split("/")[0]
    return None


def is_progress(event: SSE) -> bool:
    return bool(event.message and event.message.get("method") == "notifications/progress")


def progress_count(n: int) -> Callable[[list[SSE]], bool]:
    return lambda events: sum(map(is_progress, events)) >= n


def has_response(request_id: int) -> Callable[[list[SSE]], bool]:
    return lambda events: any(e.message and e.message.get("id") == request_id for e in events)


class Barrier:
    """Opens ``gate`` once ``parties`` have arrived (asyncio.Barrier is Python 3.11+)."""

    def __init__(self, parties: int, gate: asyncio.Event) -> None:
        self._left, self._gate = parties, gate

    def arrive(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._gate.set()


async def all_or_nothing(coros: list[Awaitable[T]], timeout: float) -> list[T]:
    """Run ``coros`` at once; the first failure (or the deadline) cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(tasks)} sessions not done after {timeout}s")
        return [task.result() for task in tasks]
    finally:
        # Cancel until every task has ended: on Python 3.11 a cancellation that lands
        # as a client's request completes can be swallowed (asyncio.wait_for, anyio),
        # and the task then waits on, for a gate that will never open.
        for _ in range(60):
            pending = [task for task in tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: asyncio logs no "never retrieved"


async def one_session(
    http: httpx.AsyncClient, barrier: Barrier, gate: asyncio.Event, out: Received
) -> McpClient:
    client = McpClient(http)
    await client.initialize()
    assert client.session_id
    out.session_id = client.session_id

    # The tool call: request id 2 in every session, so every session writes stream "2".
    request_id, call = client.call_tool(
        "progress", {"count": COUNT, "pause_after": PAUSE_AT}, progress_token=out.token
    )
    assert request_id == 2
    async with call as stream:
        first = await out.read(stream, "post", progress_count(PER_CONNECTION - 1))
    cursor = first[-1].id
    assert cursor
    out.progress_cursors.append(first[0].id or "")  # the priming event
    out.progress_cursors.append(cursor)

    async def resume(
        label: str,
        done: Callable[[list[SSE]], bool],
        before_reading: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        nonlocal cursor
        out.progress_resumes += 1
        async with client.get(last_event_id=cursor) as resumed:
            assert resumed.response.status_code == 200
            if before_reading is not None:
                await before_reading()
            got = await out.read(resumed, label, done)
        assert got[-1].id
        cursor = got[-1].id

    # Up to where the tool waits for the gate.
    await resume("resume-1", progress_count(PAUSE_AT - (PER_CONNECTION - 1)))

    async def wait_for_everyone() -> None:
        # The connection stays open while the tool waits: what follows the gate
        # reaches it live.
        barrier.arrive()
        await gate.wait()

    await resume("resume-2", progress_count(PER_CONNECTION), wait_for_everyone)
    while not has_response(request_id)([e for _, e in out.events]):
        await resume(
            f"resume-{out.progress_resumes + 1}",
            lambda events: progress_count(PER_CONNECTION)(events) or has_response(request_id)(events),
        )

    # The standalone stream: all sessions' are called "_GET_stream".
    names = [f"{out.token}/a{k}" for k in range(1, ANNOUNCEMENTS + 1)]
    async with client.get() as standalone:
        request_id, call = client.call_tool("announce", {"text": names[0]})
        async with call as stream:
            await out.read(stream, "announce", has_response(request_id))
        first_get = await out.read(standalone, "get", lambda events: any(e.data for e in events))
    announced = next(e for e in first_get if e.data)
    assert announced.id
    out.announce_cursor = announced.id
    # Nobody listens on the standalone stream now: these are only stored.
    for name in names[1:]:
        request_id, call = client.call_tool("announce", {"text": name})
        async with call as stream:
            await out.read(stream, "announce", has_response(request_id))
    out.get_resumes += 1
    async with client.get(last_event_id=announced.id) as resumed:
        last = f"test://{names[-1]}"
        await out.read(resumed, "get-resume", lambda events: any(last in e.data for e in events))
    return client


async def foreign_cursor(client: McpClient, cursor: str) -> list[SSE]:
    """What resuming from ``cursor`` gives: the first event, if any (a followed stream may never end)."""
    async with client.get(last_event_id=cursor) as resumed:
        assert resumed.response.status_code == 200
        event = await resumed.next()
        return [] if event is None else [event]


async def owners(admin: asyncpg.Connection) -> dict[int, str]:
    """The session key owning each stream, by stream key."""
    rows = await admin.fetch(
        "SELECT st.id, se.key FROM mcp_events_streams st JOIN mcp_events_sessions se ON se.id = st.session_id"
    )
    return {row["id"]: row["key"] for row in rows}


def check(out: Received, owner_of: dict[int, str]) -> tuple[int, list[str]]:
    """(foreign events, other problems) of one session's events."""
    foreign, problems = 0, []
    for label, event in out.events:
        token = token_of(event)
        ref = parse_event_id(event.id or "")
        if (token is not None and token != out.token) or (
            ref is not None and owner_of.get(ref.stream_key) != out.session_id
        ):
            foreign += 1
            problems.append(f"{out.token}: foreign event on {label}: {event}")
        if ref is None:
            problems.append(f"{out.token}: event without a valid id on {label}: {event}")
    messages = [e.message for _, e in out.events if e.message]
    progress = [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]
    if progress != list(range(1, COUNT + 1)):
        problems.append(f"{out.token}: progress {progress}")
    responses = [m for m in messages if m.get("id") == 2]
    if len(responses) != 1 or responses[0]["result"]["content"][0]["text"] != f"sent {COUNT}":
        problems.append(f"{out.token}: responses to the tool call {responses}")
    uris = [m["params"]["uri"] for m in messages if m.get("method") == "notifications/resources/updated"]
    if uris != [f"test://{out.token}/a{k}" for k in range(1, ANNOUNCEMENTS + 1)]:
        problems.append(f"{out.token}: announcements {uris}")
    doubled = [i for i, n in Counter(e.id for _, e in out.events).items() if n > 1]
    if doubled:
        problems.append(f"{out.token}: events received twice {doubled}")
    return foreign, problems


async def test_200_concurrent_sessions_resuming_colliding_streams_get_no_foreign_event(
    store: PostgresEventStore, admin: asyncpg.Connection
) -> None:
    recorder = RecordingStore(store)
    gate = asyncio.Event()
    barrier = Barrier(SESSIONS, gate)
    received = [Received(token=f"s{i:03d}") for i in range(SESSIONS)]
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + DEADLINE
    async with serve(build_app(recorder, gate)) as url:
        # One client (one connection pool) per session. The server is plain HTTP, yet
        # each client builds a default SSL context: 200 of them take seconds.
        tls = ssl.create_default_context()
        https = [httpx.AsyncClient(base_url=url, timeout=30, verify=tls) for _ in range(SESSIONS)]
        try:
            clients = await all_or_nothing(
                [one_session(https[i], barrier, gate, received[i]) for i in range(SESSIONS)], DEADLINE
            )
            sessions_done = time.perf_counter() - started

            # Each session tries the cursors of the next one: the priming event and
            # a progress event of its stream "2", and an event of its "_GET_stream".
            def steal(i: int) -> list[Awaitable[list[SSE]]]:
                victim = received[(i + 1) % SESSIONS]
                cursors = [*victim.progress_cursors, victim.announce_cursor]
                return [foreign_cursor(clients[i], cursor) for cursor in cursors]

            stolen = await all_or_nothing(
                [c for i in range(SESSIONS) for c in steal(i)], deadline - asyncio.get_running_loop().time()
            )
        finally:
            gate.set()  # after a failure, no tool may stay waiting for sessions that are gone
            await asyncio.gather(*(http.aclose() for http in https))
    elapsed = time.perf_counter() - started

    owner_of = await owners(admin)
    foreign, problems = 0, []
    for out in received:
        assert out.progress_resumes >= 3 and out.get_resumes >= 1
        session_foreign, session_problems = check(out, owner_of)
        foreign += session_foreign
        problems += session_problems
    # What the stolen cursors gave: not one event, not even a priming one.
    foreign += sum(len(events) for events in stolen)
    problems += [f"a stolen cursor gave {events}" for events in stolen if events]
    # And the store filed every event under the session whose token it carries.
    session_of = {out.token: out.session_id for out in received}
    for key, _, message in recorder.stored:
        token = message and message.get("params", {}).get("progressToken")
        if token is not None and session_of[token] != key:
            foreign += 1
            problems.append(f"stored under {key}: {message}")

    checked = sum(len(out.events) for out in received)
    resumes = [out.progress_resumes + out.get_resumes for out in received]
    print(
        f"{SESSIONS} sessions, {sum(resumes)} resumes ({min(resumes)} to {max(resumes)} per session), "
        f"{len(stolen)} stolen cursors, "
        f"{checked} events checked, {foreign} foreign; sessions done in {sessions_done:.1f}s, "
        f"all in {elapsed:.1f}s"
    )
    assert problems == []
    assert foreign == 0
    # Per session: the tool call's priming event, progress and response; each
    # announcement's priming event, response and notification.
    assert checked == SESSIONS * (1 + COUNT + 1 + 3 * ANNOUNCEMENTS)
