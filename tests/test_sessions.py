"""Sessions that outlive their worker: two workers in one process, each with a store of its own.

Each worker here has its own pool, listener, lease and worker row: to the
database they are two processes. (tests/test_workers.py runs real processes.)
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from mcp_pg_events import compat
from mcp_pg_events.registry import ENDED_CHANNEL
from mcp_pg_events.testing import PROTOCOL_VERSION, SSE, McpClient

from .mcp_http import data_events, progress_values
from .proxy import FlakyProxy
from .worker_app import PRINCIPAL_HEADER
from .worker_processes import in_process_worker

UNKNOWN = "0123456789abcdef0123456789abcdef"

# Before mcp 1.27 the SDK never ends an idle session.
ends_idle_sessions = pytest.mark.skipif(
    "session_idle_timeout" not in inspect.signature(StreamableHTTPSessionManager.__init__).parameters,
    reason="this SDK never ends an idle session",
)


async def call(
    client: McpClient, tool: str, arguments: dict[str, Any], token: str | None = None
) -> list[SSE]:
    """Call ``tool`` and read its stream up to its response."""
    request_id, opened = client.call_tool(tool, arguments, progress_token=token)
    async with opened as stream:
        return await stream.until_response(request_id)


def result_text(events: list[SSE]) -> str:
    message = events[-1].message
    assert message is not None and "result" in message, message
    text: str = message["result"]["content"][0]["text"]
    return text


def as_principal(client: McpClient, principal: str | None) -> McpClient:
    """Send every request of ``client`` as ``principal`` (None: unauthenticated)."""
    if principal is not None:
        client.http.headers[PRINCIPAL_HEADER.decode()] = principal
    return client


async def probe(url: str, session_id: str, principal: str | None = None) -> tuple[int, str]:
    """A request of session ``session_id`` on the worker at ``url``: its status and body."""
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL_VERSION,
        "mcp-session-id": session_id,
    }
    if principal is not None:
        headers[PRINCIPAL_HEADER.decode()] = principal
    async with httpx.AsyncClient(base_url=url, timeout=15) as http:
        answer = await http.post(
            "/mcp", json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"}, headers=headers
        )
    return answer.status_code, answer.text


async def resume(url: str, session_id: str, cursor: str, principal: str | None = None) -> tuple[int, str]:
    """A GET resuming ``cursor`` of session ``session_id`` on the worker at ``url``: status and body."""
    headers = {
        "accept": "text/event-stream",
        "mcp-protocol-version": PROTOCOL_VERSION,
        "mcp-session-id": session_id,
        "last-event-id": cursor,
    }
    if principal is not None:
        headers[PRINCIPAL_HEADER.decode()] = principal
    async with httpx.AsyncClient(base_url=url, timeout=15) as http:
        answer = await http.get("/mcp", headers=headers)
    return answer.status_code, answer.text


@asynccontextmanager
async def ended_sessions(dsn: str) -> AsyncIterator[asyncio.Queue[int]]:
    """The row ids of sessions as their end is announced, from now on."""
    conn = await asyncpg.connect(dsn)
    ended: asyncio.Queue[int] = asyncio.Queue()

    def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        for row in payload.split(","):
            ended.put_nowait(int(row))

    await conn.add_listener(ENDED_CHANNEL, heard)
    try:
        yield ended
    finally:
        await conn.close()


async def until_ended(ended: asyncio.Queue[int], row_id: int) -> None:
    while await asyncio.wait_for(ended.get(), 60) != row_id:
        pass


async def session_row(admin: asyncpg.Connection, session_id: str | None) -> asyncpg.Record:
    row = await admin.fetchrow(
        "SELECT id, ended_at IS NOT NULL AS ended, ended_reason FROM mcp_events_sessions WHERE key = $1",
        session_id,
    )
    assert row is not None
    return row


async def test_a_session_is_one_row_registered_with_its_handshake_and_a_shutdown_does_not_end_it(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with in_process_worker(dsn) as a, a.client() as http:
        client = McpClient(http)
        await client.initialize(capabilities={"sampling": {}})
        await call(client, "progress", {"count": 2}, token="p")
    rows = await admin.fetch(
        "SELECT key, registered_at IS NOT NULL AS registered, protocol_version, handshake::text, owner, "
        "idle_timeout, last_active_at IS NOT NULL AS active, ended_at FROM mcp_events_sessions"
    )
    # One session, one row: the opening stream too is filed under the session id.
    assert [row["key"] for row in rows] == [client.session_id]
    (row,) = rows
    assert row["registered"] and row["active"] and row["protocol_version"] == PROTOCOL_VERSION
    handshake = json.loads(row["handshake"])
    assert handshake["clientInfo"]["name"] == "mcp-pg-events-demo" and handshake["capabilities"] == {
        "sampling": {}
    }
    assert row["owner"] is None and row["idle_timeout"] == compat.session_idle_timeout(a.manager)
    # The worker stopped: that ends none of its sessions.
    assert row["ended_at"] is None
    names = await admin.fetch(
        "SELECT convert_from(st.name, 'UTF8') AS name, st.worker_id FROM mcp_events_streams st ORDER BY 1"
    )
    # (mcp 1.27 to 1.29 send a tool's progress on the standalone stream.)
    assert {r["name"] for r in names} - {"_GET_stream"} == {"1", "2"}
    worker = await admin.fetchrow("SELECT id, ended_at IS NOT NULL AS ended FROM mcp_events_workers")
    assert worker is not None and worker["ended"]  # a clean end
    assert {r["worker_id"] for r in names} == {worker["id"]}


async def test_another_worker_serves_the_session_as_initialized_as_it_was_opened(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        in_process_worker(dsn) as a,
        in_process_worker(dsn) as b,
        a.client() as http_a,
        b.client() as http_b,
    ):
        client = McpClient(http_a)
        await client.initialize(capabilities={"sampling": {}})
        assert a.holds(client.session_id) and not b.holds(client.session_id)

        client.http = http_b
        seen_by_b = json.loads(result_text(await call(client, "whoami", {})))
        assert b.holds(client.session_id)
        # Initialized from the stored handshake: the client's name and capabilities,
        # and (mcp 2.x, which keeps it) the protocol version it was told.
        assert seen_by_b["client"] == "mcp-pg-events-demo"
        assert "sampling" in seen_by_b["capabilities"]
        if compat.MCP_MAJOR == 2:
            assert seen_by_b["protocol_version"] == PROTOCOL_VERSION

        client.http = http_a
        assert json.loads(result_text(await call(client, "whoami", {})))["client"] == "mcp-pg-events-demo"
    # Nothing of the replayed handshake (mcp 1.x) was stored.
    names = await admin.fetch("SELECT convert_from(name, 'UTF8') AS name FROM mcp_events_streams ORDER BY id")
    assert compat.ADOPT_REQUEST_ID not in {r["name"] for r in names}
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions") == 1


async def test_with_adoption_off_another_worker_answers_404_and_the_holder_goes_on(dsn: str) -> None:
    async with (
        in_process_worker(dsn, adopt_sessions=False) as a,
        in_process_worker(dsn, adopt_sessions=False) as b,
        a.client() as http_a,
    ):
        client = McpClient(http_a)
        await client.initialize()
        assert client.session_id is not None
        assert (await probe(b.url, client.session_id))[0] == 404
        assert not b.holds(client.session_id)
        assert (await probe(a.url, client.session_id))[0] == 200


async def test_unknown_deleted_expired_and_foreign_sessions_all_get_the_sdks_own_404(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        in_process_worker(dsn, authenticate=True) as a,
        in_process_worker(dsn, authenticate=True) as b,
        a.client() as http_a,
        ended_sessions(dsn) as ended,
    ):
        # What the SDK answers for an id it never had, on a worker that holds nothing.
        unknown = await probe(b.url, UNKNOWN, "alice")
        assert unknown[0] in (400, 404)  # 400 before mcp 1.27

        async def open_session() -> tuple[McpClient, str]:
            client = as_principal(McpClient(http_a), "alice")
            await client.initialize()
            events = await call(client, "progress", {"count": 2}, token="t")
            cursor = events[0].id
            assert client.session_id and cursor
            return client, cursor

        deleted, deleted_cursor = await open_session()
        assert (await http_a.delete("/mcp", headers=deleted._headers())).status_code == 200

        expired, expired_cursor = await open_session()
        row = await session_row(admin, expired.session_id)
        # Idle past its timeout, and its worker gone without ending it (as after a kill).
        await admin.execute(
            "UPDATE mcp_events_sessions SET last_active_at = now() - interval '1 hour', idle_timeout = 60 "
            "WHERE id = $1",
            row["id"],
        )
        assert await probe(b.url, expired.session_id or "", "alice") == unknown
        await until_ended(ended, row["id"])
        assert (await session_row(admin, expired.session_id))["ended_reason"] == "expired"

        foreign, foreign_cursor = await open_session()
        for worker in (a, b):
            assert await probe(worker.url, deleted.session_id or "", "alice") == unknown
            assert await probe(worker.url, foreign.session_id or "", "mallory") == unknown
            assert await probe(worker.url, foreign.session_id or "", None) == unknown
            for session, cursor, principal in (
                (deleted, deleted_cursor, "alice"),
                (expired, expired_cursor, "alice"),
                (foreign, foreign_cursor, "mallory"),
            ):
                status, body = await resume(worker.url, session.session_id or "", cursor, principal)
                assert (status, body) == unknown and "progress" not in body
        # The session's own principal still uses it, on either worker.
        for worker in (a, b):
            assert (await probe(worker.url, foreign.session_id or "", "alice"))[0] == 200
    assert (await session_row(admin, deleted.session_id))["ended_reason"] == "deleted"
    assert not (await session_row(admin, foreign.session_id))["ended"]


async def test_a_delete_on_one_worker_ends_the_session_on_the_worker_that_holds_it(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        in_process_worker(dsn) as a,
        in_process_worker(dsn) as b,
        a.client() as http_a,
        b.client() as http_b,
    ):
        unknown = await probe(a.url, UNKNOWN)
        client = McpClient(http_a)
        await client.initialize()
        events = await call(client, "progress", {"count": 2}, token="d")
        assert a.holds(client.session_id)
        assert (await http_b.delete("/mcp", headers=client._headers())).status_code == 200
        # The very next request on the worker that held it: the SDK's 404, no event.
        assert await probe(a.url, client.session_id or "") == unknown
        assert await resume(a.url, client.session_id or "", events[0].id or "") == unknown
        assert not a.holds(client.session_id) and not b.holds(client.session_id)
    assert (await session_row(admin, client.session_id))["ended_reason"] == "deleted"


@ends_idle_sessions
async def test_the_idle_timeout_ends_the_session_in_the_registry(dsn: str, admin: asyncpg.Connection) -> None:
    async with (
        in_process_worker(dsn, idle_timeout=0.5) as a,
        a.client() as http,
        ended_sessions(dsn) as ended,
    ):
        unknown = await probe(a.url, UNKNOWN)
        client = McpClient(http)
        await client.initialize()
        await call(client, "progress", {"count": 1}, token="i")
        row = await session_row(admin, client.session_id)
        # Nothing more: the SDK's timer ends it, and the registry hears of it.
        await until_ended(ended, row["id"])
        assert (await session_row(admin, client.session_id))["ended_reason"] == "idle"
        assert await probe(a.url, client.session_id or "") == unknown


@ends_idle_sessions
async def test_an_idle_timeout_on_one_worker_does_not_end_a_session_in_use_on_another(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        in_process_worker(dsn, idle_timeout=1.0) as a,
        in_process_worker(dsn, idle_timeout=1.0) as b,
        a.client() as http_a,
        b.client() as http_b,
    ):
        client = McpClient(http_a)
        await client.initialize()
        dropped = asyncio.Event()

        async def on_drop() -> None:
            dropped.set()

        compat.on_terminate(compat.held_sessions(a.manager)[client.session_id], on_drop)
        client.http = http_b
        # A standalone stream open on B: a request in flight there all along.
        async with client.get() as standalone:
            assert standalone.response.status_code == 200
            # A's timer fires; the session was used elsewhere since: A only lets go of it.
            await asyncio.wait_for(dropped.wait(), 60)
            assert not a.holds(client.session_id) and b.holds(client.session_id)
            assert not (await session_row(admin, client.session_id))["ended"]
            _, opened = client.call_tool("announce", {"text": "still"})
            async with opened as stream:
                await stream.rest()
            note = await standalone.next()
            assert note is not None and note.message is not None
            assert note.message["params"]["uri"] == "test://still"
        client.http = http_a
        assert json.loads(result_text(await call(client, "whoami", {})))["client"] == "mcp-pg-events-demo"


async def test_a_resumed_stream_on_another_worker_follows_the_request_live(dsn: str) -> None:
    async with (
        in_process_worker(dsn, poll_interval=600) as a,
        in_process_worker(dsn, poll_interval=600) as b,
        a.client() as http_a,
        b.client() as http_b,
    ):
        client = McpClient(http_a)
        await client.initialize()
        client.http = http_b
        request_id, opened = client.call_tool("progress", {"count": 6, "pause_after": 2}, progress_token="f")
        async with opened as stream:
            live = [await stream.next() for _ in range(3)]  # priming, 1, 2: then it waits for the gate
        cursor = live[-1]
        assert cursor is not None and cursor.id
        client.http = http_a
        async with client.get(last_event_id=cursor.id) as resumed:
            client.http = http_b
            await call(client, "release", {})  # B goes on while A follows from PostgreSQL
            rest = await resumed.until_response(request_id)
    received = [e for e in live if e is not None] + data_events(rest)
    assert progress_values(received, "f") == [1, 2, 3, 4, 5, 6]
    assert len({e.id for e in received}) == len(received)


async def test_a_registry_that_does_not_answer_gets_503_with_retry_after_not_404(
    dsn: str, proxy: FlakyProxy
) -> None:
    async with (
        in_process_worker(dsn) as a,
        in_process_worker(proxy.dsn) as b,
        a.client() as http_a,
    ):
        client = McpClient(http_a)
        await client.initialize()
        proxy.go_down()
        headers = {**client._headers(), "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as http_b:
            body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
            answer = await http_b.post("/mcp", content=body, headers=headers)
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["retry-after"]) > 0
            assert answer.json()["error"]["code"] == -32603
            proxy.go_up()
            again = await http_b.post("/mcp", content=body, headers=headers)
            assert again.status_code == 200, again.text


async def test_a_session_taken_over_by_another_worker_ends_by_its_idle_timeout_there_too(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        in_process_worker(dsn) as a,
        in_process_worker(dsn, idle_timeout=0.5) as b,
        a.client() as http_a,
        b.client() as http_b,
        ended_sessions(dsn) as ended,
    ):
        unknown = await probe(a.url, UNKNOWN)
        client = McpClient(http_a)
        await client.initialize()
        row = await session_row(admin, client.session_id)
        client.http = http_b
        await call(client, "whoami", {})
        assert b.holds(client.session_id)
        # Unused since, anywhere: B's timer ends it for every worker.
        await until_ended(ended, row["id"])
        assert (await session_row(admin, client.session_id))["ended_reason"] == "idle"
        assert await probe(a.url, client.session_id or "") == unknown
        assert not a.holds(client.session_id) and not b.holds(client.session_id)
