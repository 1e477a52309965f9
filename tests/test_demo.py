"""``mcp-pg-events demo``, run as a newcomer runs it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx

from mcp_pg_events.testing import McpClient

from .mcp_http import wait_for_line

DEMO_ENV_PREFIXES = ("MCP_PG_EVENTS_", "DATABASE_URL")


async def run_demo(*args: str, **env: str) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(DEMO_ENV_PREFIXES)}
    environment.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.cli", "demo", "--pace", "0", *args,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_demo_resumes_a_dropped_stream_on_another_worker_on_a_given_database(dsn: str) -> None:
    code, out, err = await run_demo("--events", "8", "--drop-after", "3", MCP_PG_EVENTS_DSN=dsn)
    assert code == 0, out + err
    pids = re.findall(r"^worker [AB] pid (\d+) on http", out, re.MULTILINE)
    assert len(set(pids)) == 2, out
    assert out.count("  live ") == 3
    assert out.count("  resumed   progress") == 5
    # The tool ran on worker A; the client read the rest on worker B.
    assert f"resumed   result: 'counted down from 8 on worker {pids[0]}'" in out
    assert "3 live from worker A and 5 resumed on worker B; lost 0, doubled 0: OK" in out
    # The session outlives worker A.
    assert f"goes on without worker A: 'counted down from 2 on worker {pids[1]}'" in out
    assert err == ""


async def test_the_demo_runs_an_embedded_postgresql_and_reuses_it(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    code, out, err = await run_demo(
        "--events", "4", "--drop-after", "2", MCP_PG_EVENTS_EMBEDDED_DATA=str(data)
    )  # fmt: skip
    assert code == 0, out + err
    assert f"embedded PostgreSQL in {data} (new)" in out
    assert "lost 0, doubled 0: OK" in out

    code, out, err = await run_demo("--events", "4", "--drop-after", "2", "--data-dir", str(data))
    assert code == 0, out + err
    assert f"embedded PostgreSQL in {data} (reused)" in out
    # Stopped on exit: no server holds the data folder any more.
    assert not (data / "postmaster.pid").exists()


async def test_bad_demo_flags_are_one_line() -> None:
    code, _, err = await run_demo("--events", "3", "--drop-after", "3")
    assert code == 2
    assert err.strip() == "mcp-pg-events: error: --drop-after must be from 1 to --events - 1 (2)"


async def test_serve_answers_a_client_and_ctrl_c_stops_it_and_its_database(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(DEMO_ENV_PREFIXES)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.cli", "demo", "--serve", "--port", str(port),
        "--data-dir", str(data), env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_line(process.stdout, f"127.0.0.1:{port}/mcp".encode())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            client = McpClient(http)
            await client.initialize()
            _, call = client.call_tool("countdown", {"n": 2}, progress_token="p")
            async with call as stream:
                events = await stream.rest()
        assert any(e.message and e.message.get("method") == "notifications/progress" for e in events)
        assert (data / "postmaster.pid").exists()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 130, err
    assert b"interrupted" in err
    assert not (data / "postmaster.pid").exists()
