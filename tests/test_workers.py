"""Sessions across worker processes: killed, restarted, load-balanced, with no affinity at all.

Every worker is a real process (uvicorn) on one database; requests go over real
HTTP. A request lands on the worker the test picks, or wherever the kernel sends
it (``uvicorn --workers N``, several processes on one socket).
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx

from mcp_pg_events.compat import WORKER_LOST_CODE
from mcp_pg_events.testing import SSE, McpClient

from .mcp_http import data_events, progress_values
from .test_sessions import call, result_text
from .worker_processes import WorkerProcess, listening_socket, url_of, worker_process


def is_progress(event: SSE) -> bool:
    return event.message is not None and event.message.get("method") == "notifications/progress"


async def test_a_worker_killed_mid_tool_the_client_resumes_on_another_and_goes_on_there(
    dsn: str, admin: asyncpg.Connection
) -> None:
    async with (
        worker_process(dsn) as a,
        worker_process(dsn) as b,
        httpx.AsyncClient(base_url=a.url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=15) as http_b,
    ):
        client = McpClient(http_a)
        await client.initialize()
        request_id, opened = client.call_tool("progress", {"count": 5, "hang_after": 3}, progress_token="k")
        async with opened as stream:
            live = [await stream.next() for _ in range(4)]  # priming, 1, 2, 3: then the tool hangs
        assert progress_values([e for e in live if e], "k") == [1, 2, 3]
        await a.kill()  # SIGKILL, mid-tool

        cursor = live[2]
        assert cursor is not None and cursor.id
        client.http = http_b
        resumes = []
        for _ in range(2):  # the ending is stored: a later resume sees the same
            async with client.get(last_event_id=cursor.id) as resumed:
                assert resumed.response.status_code == 200
                resumes.append(await resumed.rest())  # ends by itself: no hang
        first, again = resumes
        assert [e.id for e in first] == [e.id for e in again]
        after = data_events(first)
        # Every stored event after the cursor, once, then the request's ending.
        assert progress_values(after, "k") == [3]
        ending = after[-1].message
        assert ending is not None and ending["id"] == request_id
        assert ending["error"]["code"] == WORKER_LOST_CODE
        assert ending["error"]["data"] == {"reason": "worker-lost"}
        assert len(after) == 2

        # The same session calls another tool, on the worker that is left.
        seen = json.loads(result_text(await call(client, "whoami", {})))
        assert seen["pid"] in b.pids and seen["client"] == "mcp-pg-events-demo"
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE ended_at IS NULL") == 1


async def test_two_workers_and_no_affinity_at_all(dsn: str) -> None:
    # Initialize on A, call on B, resume on A while B still runs the tool.
    async with (
        worker_process(dsn) as a,
        worker_process(dsn) as b,
        httpx.AsyncClient(base_url=a.url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=15) as http_b,
    ):
        client = McpClient(http_a)
        await client.initialize()
        client.http = http_b
        request_id, opened = client.call_tool("progress", {"count": 6, "pause_after": 2}, progress_token="n")
        async with opened as stream:
            live = [await stream.next() for _ in range(3)]  # priming, 1, 2: then it waits on B
        cursor = live[-1]
        assert cursor is not None and cursor.id
        client.http = http_a
        async with client.get(last_event_id=cursor.id) as resumed:
            client.http = http_b
            await call(client, "release", {})
            rest = await resumed.until_response(request_id)
        received = [e for e in live if e] + data_events(rest)
        assert progress_values(received, "n") == [1, 2, 3, 4, 5, 6]
        assert len({e.id for e in received}) == len(received)
        response = received[-1].message
        assert response is not None and response["result"]["content"][0]["text"].endswith(str(b.pids[0]))


async def test_uvicorn_workers_on_one_port_lose_double_and_mix_nothing(
    dsn: str, admin: asyncpg.Connection
) -> None:
    sessions, calls, resumes = 50, 5, 3
    sock = listening_socket()
    # No keep-alive: every request is a new connection, which the kernel hands to any worker.
    limits = httpx.Limits(max_keepalive_connections=0)
    statuses: list[int] = []
    problems: list[str] = []

    async def one_session(n: int) -> None:
        async with httpx.AsyncClient(base_url=url_of(sock), timeout=60, limits=limits) as http:
            http.event_hooks["response"] = [lambda r: _record(r, statuses)]
            client = McpClient(http)
            await client.initialize()
            for i in range(calls):
                token = f"s{n}c{i}"
                events = await call(client, "progress", {"count": 3}, token=token)
                checked = _check(events, token)
                if i < resumes:
                    async with client.get(last_event_id=events[0].id) as resumed:
                        replayed = await resumed.rest()
                    checked += _check([events[0], *replayed], token)
                problems.extend(f"session {n} call {i}: {p}" for p in checked)

    async with worker_process(dsn, sock, workers=3) as workers:
        await asyncio.gather(*(one_session(n) for n in range(sessions)))
        assert len(workers.pids) == 3
    sock.close()
    assert problems == []
    assert statuses and set(statuses) <= {200, 202}, sorted(set(statuses))
    # Requests of one session did land on several workers.
    spread = await admin.fetchval(
        "SELECT count(*) FROM (SELECT session_id FROM mcp_events_streams GROUP BY session_id "
        "HAVING count(DISTINCT worker_id) > 1) AS s"
    )
    assert spread > 0
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions") == sessions


async def _record(response: httpx.Response, statuses: list[int]) -> None:
    statuses.append(response.status_code)


def _check(events: list[SSE], token: str) -> list[str]:
    """What is wrong with one call's stream: lost, doubled or foreign events, or no response."""
    problems = []
    progress = [e for e in events if is_progress(e)]
    values = progress_values(progress, token)
    if values != [1, 2, 3]:
        problems.append(f"progress {values} (all: {[e.data for e in progress]})")
    ids = [e.id for e in events]
    if len(set(ids)) != len(ids):
        problems.append(f"doubled ids {ids}")
    last = events[-1].message
    if last is None or "result" not in last:
        problems.append(f"no response but {last}")
    return problems


async def test_every_worker_restarts_and_the_sessions_go_on(dsn: str, admin: asyncpg.Connection) -> None:
    # A rolling deploy on one port: a new worker starts, then the old one stops cleanly.
    sock = listening_socket()
    clients: list[McpClient] = []
    cursors: dict[str, list[tuple[str, str]]] = {}

    async def use_every_session(round_: int) -> None:
        for n, client in enumerate(clients):
            token = f"r{round_}s{n}"
            events = await call(client, "progress", {"count": 2}, token=token)
            assert progress_values(events, token) == [1, 2]
            # What the workers before stored resumes on this one.
            for earlier, cursor in cursors[client.session_id or ""]:
                async with client.get(last_event_id=cursor) as resumed:
                    assert progress_values(data_events(await resumed.rest()), earlier) == [1, 2]
            cursors[client.session_id or ""].append((token, events[0].id or ""))

    limits = httpx.Limits(max_keepalive_connections=0)
    worker = await WorkerProcess.start(dsn, sock)
    try:
        async with httpx.AsyncClient(base_url=url_of(sock), timeout=30, limits=limits) as http:
            for _ in range(3):
                client = McpClient(http)
                await client.initialize()
                clients.append(client)
                cursors[client.session_id or ""] = []
            await use_every_session(0)
            for round_ in (1, 2):
                successor = await WorkerProcess.start(dsn, sock)
                await worker.stop()
                worker = successor
                await use_every_session(round_)
    finally:
        await worker.stop()
        sock.close()
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE ended_at IS NULL") == 3
    assert await admin.fetchval("SELECT count(*) FROM mcp_events_workers WHERE ended_at IS NOT NULL") == 3
