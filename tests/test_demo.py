"""``mcp-pg-events demo``, run as a newcomer runs it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def postmaster(data: Path) -> int:
    return int((data / "postmaster.pid").read_text().split("\n", 1)[0])


async def gone(pid: int, timeout: float = 30) -> bool:
    """Whether ``pid`` (not a child of ours: nothing to await) exits within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive(pid):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def start_demo(*args: str, **env: str) -> asyncio.subprocess.Process:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(DEMO_ENV_PREFIXES)}
    environment.update(env)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcp_pg_events.cli", "demo", *args,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def serving(data: Path) -> tuple[asyncio.subprocess.Process, int]:
    """``demo --serve`` on its embedded PostgreSQL, up; the process and the postmaster's pid."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = await start_demo("--serve", "--port", str(port), "--data-dir", str(data))
    await wait_for_line(process.stdout, f"127.0.0.1:{port}/mcp".encode(), timeout=120)
    return process, postmaster(data)


async def test_the_demo_leaves_database_url_alone(tmp_path: Path, empty_dsn: str) -> None:
    data = tmp_path / "pgdata"
    code, out, err = await run_demo(
        "--events", "2", "--drop-after", "1", DATABASE_URL=empty_dsn, MCP_PG_EVENTS_EMBEDDED_DATA=str(data)
    )
    assert code == 0, out + err
    assert f"embedded PostgreSQL in {data} (new)" in out
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetch("SELECT relname FROM pg_class WHERE relname LIKE 'mcp_events%'") == []
    finally:
        await conn.close()


async def test_the_demo_says_which_protocol_it_pins_and_why(dsn: str) -> None:
    code, out, err = await run_demo("--events", "2", "--drop-after", "1", MCP_PG_EVENTS_DSN=dsn)
    assert code == 0, out + err
    assert "client   speaks protocol 2025-11-25: streams resume only on 2025-03-26 to 2025-11-25" in out
    assert "2026-07-28 has neither" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
async def test_sigterm_and_sighup_stop_the_demo_and_its_postgresql(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "pgdata"
    process, server = await serving(data)
    try:
        process.send_signal(signum)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 128 + signum, err
        assert err.decode().strip().endswith(f"stopped by {signal.Signals(signum).name}"), err
        assert "Traceback" not in err.decode()
        assert await gone(server)
        assert not (data / "postmaster.pid").exists()
    finally:
        if alive(server):
            os.kill(server, signal.SIGQUIT)


async def test_a_sighup_half_way_through_stops_the_workers_and_postgresql(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    process = await start_demo(
        "--events", "1000", "--drop-after", "999", "--pace", "0.05", "--data-dir", str(data)
    )
    assert process.stdout is not None
    workers = []
    while len(workers) < 2:
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        if not line:
            _, err = await process.communicate()
            raise AssertionError(f"the demo ended before its workers started: {err.decode()}")
        if found := re.match(rb"worker [AB] pid (\d+)", line):
            workers.append(int(found[1]))
    await wait_for_line(process.stdout, b"  live ")
    server = postmaster(data)
    try:
        process.send_signal(signal.SIGHUP)
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 128 + signal.SIGHUP, err
        for pid in (*workers, server):
            assert await gone(pid), pid
    finally:
        for pid in (*workers, server):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_postgresql_left_by_a_killed_demo_is_stopped_by_the_next_run_and_reset(
    tmp_path: Path,
) -> None:
    data = tmp_path / "pgdata"
    process, server = await serving(data)
    try:
        process.kill()
        await process.wait()
        # What SIGKILL leaves: the server, and the dead demo on pgserver's list of its users.
        assert alive(server)
        assert process.pid in json.loads((data / ".handle_pids.json").read_text())

        code, out, err = await run_demo("--events", "2", "--drop-after", "1", "--data-dir", str(data))
        assert code == 0, out + err
        assert await gone(server)
        assert not (data / "postmaster.pid").exists()
        assert json.loads((data / ".handle_pids.json").read_text()) == []
    finally:
        if alive(server):
            os.kill(server, signal.SIGQUIT)

    code, out, err = await run_demo("--reset", "--data-dir", str(data))
    assert code == 0, err
    assert out.strip() == f"deleted {data}" and not data.exists()
    code, out, err = await run_demo("--reset", "--data-dir", str(data))
    assert code == 0 and out.strip() == f"nothing to delete: no {data}"


async def test_reset_deletes_only_an_embedded_postgresqls_folder(tmp_path: Path, dsn: str) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = await run_demo("--reset", "--data-dir", str(tmp_path))
    assert code == 2
    assert (
        err.strip()
        == f"mcp-pg-events: error: {tmp_path} holds no PostgreSQL data (no PG_VERSION): not deleting it"
    )
    assert (tmp_path / "notes.txt").exists()
    code, _, err = await run_demo("--reset", MCP_PG_EVENTS_DSN=dsn)
    assert code == 2 and "--reset deletes the embedded PostgreSQL's folder" in err


async def test_a_busy_port_is_one_line_naming_it(dsn: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = await run_demo("--serve", "--port", str(port), MCP_PG_EVENTS_DSN=dsn)
    assert code == 2, out + err
    assert err.strip().splitlines()[-1] == (
        f"mcp-pg-events: error: [Errno {errno.EADDRINUSE}] cannot listen on 127.0.0.1:{port}: "
        f"{os.strerror(errno.EADDRINUSE)}"
    )
