"""``with_postgres(server)`` for each server framework, over real HTTP: resume and isolation.

The SDK's server (``MCPServer`` on mcp 2.x, ``FastMCP`` on 1.x) runs everywhere;
the standalone ``fastmcp`` package (4.x needs mcp >= 2.3) only where it is
installed, else its tests skip saying so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mcp_pg_events import ConfigurationError, PostgresEventStore, with_postgres
from mcp_pg_events.compat import new_server
from mcp_pg_events.testing import SSE, McpClient, serve

from .conftest import with_database
from .mcp_http import data_events, progress_values
from .test_sessions import call
from .wiring_app import build_app

ROOT = Path(__file__).resolve().parent.parent
HAS_FASTMCP = importlib.util.find_spec("fastmcp") is not None
FRAMEWORKS = [
    "sdk",
    pytest.param(
        "fastmcp",
        marks=pytest.mark.skipif(
            not HAS_FASTMCP,
            reason="the standalone fastmcp package is not installed (fastmcp 4.x needs mcp >= 2.3; "
            "pip install 'mcp-pg-events[fastmcp]')",
        ),
    ),
]


async def _paused_call(client: McpClient, count: int) -> tuple[int, list[SSE]]:
    """Start ``progress`` and read its stream until it pauses (priming, 1, 2), then drop the stream."""
    request_id, opened = client.call_tool("progress", {"count": count, "pause_after": 2}, progress_token="p")
    async with opened as stream:
        live = [await stream.next() for _ in range(3)]
    assert all(e is not None for e in live)
    return request_id, [e for e in live if e is not None]


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_the_one_call_app_resumes_a_dropped_stream_and_keeps_sessions_apart(
    dsn: str, framework: str
) -> None:
    app = build_app(framework, dsn)
    async with (
        serve(app) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=url, timeout=15) as http_b,
    ):
        a, b = McpClient(http_a), McpClient(http_b)
        await a.initialize()
        await b.initialize()
        # Both sessions' calls get request id 2: the same stream id, "2", in each session.
        request_a, live_a = await _paused_call(a, 4)
        cursor_a = live_a[-1].id
        assert progress_values(live_a, "p") == [1, 2]

        await call(a, "release", {})
        async with a.get(last_event_id=cursor_a) as resumed:
            assert resumed.response.status_code == 200
            rest = data_events(await resumed.until_response(request_a))
        assert progress_values(rest, "p") == [3, 4]
        assert rest[-1].message is not None and rest[-1].message["id"] == request_a

        # Session B, stream "2" too: its own events only, and A's cursor is nothing to it.
        request_b, opened = b.call_tool("progress", {"count": 2}, progress_token="q")
        assert request_b == request_a
        async with opened as stream:
            events_b = await stream.until_response(request_b)
        assert progress_values(events_b, "q") == [1, 2] and progress_values(events_b, "p") == []
        async with b.get(last_event_id=cursor_a) as foreign:
            assert foreign.response.status_code == 200
            assert data_events(await foreign.rest()) == []
        cursor_b = events_b[0].id
        async with b.get(last_event_id=cursor_b) as own:
            replayed = data_events(await own.rest())
        assert progress_values(replayed, "q") == [1, 2] and progress_values(replayed, "p") == []


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_the_one_call_app_files_sessions_under_their_ids(dsn: str, framework: str) -> None:
    app = build_app(framework, dsn)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=15) as http:
        client = McpClient(http)
        await client.initialize()
        await call(client, "progress", {"count": 1}, "p")
        store: PostgresEventStore = app.state.mcp_app.state.store
        found = await store.registry.lookup(client.session_id or "")
    # Registered under the id the client holds: what another worker adopts it by.
    assert found is not None


async def test_a_missing_dsn_fails_the_startup_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCP_PG_EVENTS_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    app = with_postgres(new_server("no-dsn", None))
    with pytest.raises(ConfigurationError, match="MCP_PG_EVENTS_DSN"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize("case", ["unmigrated", "no database", "no dsn"])
async def test_the_example_under_uvicorn_says_why_it_cannot_start_in_one_line(
    empty_dsn: str, case: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ("MCP_PG_EVENTS_DSN", "DATABASE_URL")}
    if case == "unmigrated":
        environment["MCP_PG_EVENTS_DSN"] = empty_dsn
    elif case == "no database":
        environment["MCP_PG_EVENTS_DSN"] = with_database(empty_dsn, "mcp_events_no_such_database")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "examples.app:app", "--port", "0",
        cwd=ROOT, env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode != 0, out
    assert "Traceback" not in out, out
    expected = {
        "unmigrated": "run `mcp-pg-events migrate`",
        "no database": 'database "mcp_events_no_such_database" does not exist',
        "no dsn": "set MCP_PG_EVENTS_DSN",
    }[case]
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2 and expected in errors[0] and "startup failed" in errors[1], out


def test_something_else_than_a_server_is_refused_up_front() -> None:
    with pytest.raises(TypeError, match="MCPServer"):
        with_postgres(object())


@pytest.mark.skipif(not HAS_FASTMCP, reason="the standalone fastmcp package is not installed")
async def test_fastmcp_given_the_store_through_its_own_http_app(store: PostgresEventStore) -> None:
    # FastMCP's http_app(event_store=...) scopes sessions itself, prefixing stream
    # ids with a uuid per transport; the store files each prefix as a session of
    # its own, so resume works on the process and sessions stay apart.
    import fastmcp

    from .wiring_app import build_server

    server: Any = build_server("fastmcp")
    assert isinstance(server, fastmcp.FastMCP)
    app = server.http_app(event_store=store)
    async with (
        serve(app) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as http_a,
        httpx.AsyncClient(base_url=url, timeout=15) as http_b,
    ):
        a, b = McpClient(http_a), McpClient(http_b)
        await a.initialize()
        await b.initialize()
        # The whole call first: on this path the SDK's replay-to-live gap is open (the
        # store replays, FastMCP's manager then registers the live stream), so a
        # resume while the tool still runs may miss what comes in between.
        request_a, opened = a.call_tool("progress", {"count": 3}, progress_token="p")
        async with opened as stream:
            live_a = await stream.until_response(request_a)
        cursor_a = live_a[1].id  # after progress 1
        async with a.get(last_event_id=cursor_a) as resumed:
            rest = data_events(await resumed.until_response(request_a))
        assert progress_values(rest, "p") == [2, 3]
        assert rest[-1].message is not None and rest[-1].message["id"] == request_a
        async with b.get(last_event_id=cursor_a) as foreign:
            assert data_events(await foreign.rest()) == []
