"""The README's quickstart and the examples, run as written, for the installed SDK major."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import asyncpg
import httpx

from .mcp_http import McpClient, progress_values, wait_for_line
from .messages import MCP_MAJOR

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_quickstart_is_the_example_app() -> None:
    quickstart = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)[0]
    assert quickstart == (ROOT / "examples" / "app.py").read_text()
    assert "uvicorn examples.app:app --workers 2" in (ROOT / "README.md").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_quickstart_app_serves_resumable_streams_on_two_uvicorn_workers(dsn: str) -> None:
    # As the README runs it, under this SDK major's name for it too.
    port = free_port()
    env = {**os.environ, "MCP_PG_EVENTS_DSN": dsn}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", f"examples.server_mcp{MCP_MAJOR}:app", "--workers", "2",
        "--port", str(port), cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(2):
            await wait_for_line(process.stderr, b"Application startup complete")

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            client = McpClient(http)
            await client.initialize()
            _, call = client.call_tool("count", {"to": 3}, progress_token="t")
            async with call as stream:
                events = await stream.rest()
            assert progress_values(events, "t") == [1, 2, 3]
            async with client.get(last_event_id=events[0].id) as resumed:
                replayed = [await resumed.next() for _ in range(4)]
        assert progress_values([e for e in replayed if e], "t") == [1, 2, 3]

        conn = await asyncpg.connect(dsn)
        try:
            keys = await conn.fetch("SELECT key FROM mcp_events_sessions")
        finally:
            await conn.close()
        assert client.session_id in {r["key"] for r in keys}
    finally:
        process.terminate()
        await process.wait()


def test_the_readmes_first_command_installs_into_a_venv_and_ci_runs_it_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)[0]
    first = first_block.splitlines()[0].split("#")[0].strip()
    # pip outside a venv stops with externally-managed-environment on Debian and Ubuntu (PEP 668).
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    assert first.endswith("mcp-pg-events demo")
    ci = (ROOT / ".ci" / "run").read_text()
    # CI takes the command from the README, so the two cannot drift apart.
    assert "first_command=$(sed -n '/^```sh$/{n;p;q}' README.md" in ci
    assert 'bash -c "$first_command"' in ci


def test_the_readme_says_which_protocol_versions_resume_before_the_quickstart() -> None:
    top = (ROOT / "README.md").read_text().split("## Quickstart")[0]
    assert "2025-03-26, 2025-06-18 and 2025-11-25" in top and "Last-Event-ID" in top
    assert "2026-07-28" in top and "subscriptions/listen" in top
