"""The operator's commands, run as users run them: `status`, `sessions`, `tail`, as separate processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from typing import Any

import asyncpg
import httpx
import pytest

from mcp_pg_events import PostgresEventStore

from .deployments import Deployment, new_roles, quote_ident
from .mcp_http import McpClient, build_app, serve, wait_for_line
from .messages import progress_message, request, response
from .test_cli import run_cli, start_cli

# --- status ---------------------------------------------------------------------------------


def problems(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("problem: ")]


async def test_status_of_a_healthy_database_exits_0(store: PostgresEventStore, dsn: str) -> None:
    view = store.session("s")
    await view.store_event("1", None)
    await view.store_event("1", progress_message(1))
    store.live_tail.start()
    assert store.listener is not None
    await store.listener.wait_listening()

    code, out, err = await run_cli("status", "--dsn", dsn)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[-1] == "status: healthy"
    checks = {line.split()[0] for line in lines if line and not line.startswith((" ", "status:"))}
    assert checks == {"database", "schema", "partitions", "retention", "sessions", "listeners"}
    assert not problems(out)
    # The store above listens: status sees it.
    assert "1 store listening on this database" in out

    code, out, _ = await run_cli("status", "--json", MCP_PG_EVENTS_DSN=dsn)
    assert code == 0
    report = json.loads(out)
    assert report["status"] == "healthy"
    partitions = next(c for c in report["checks"] if c["name"] == "partitions")
    assert partitions["ok"] is True and partitions["facts"]["ahead"] >= 1
    assert partitions["facts"]["next_seq"] > 2


async def test_status_of_an_unmigrated_database_says_to_migrate_and_exits_1(empty_dsn: str) -> None:
    code, out, err = await run_cli("status", "--dsn", empty_dsn)
    assert code == 1, out + err
    assert problems(out) == [
        "problem: schema: the mcp-pg-events tables are missing or outdated in this database: "
        "run `mcp-pg-events migrate` (or `alembic upgrade head`) first"
    ]
    assert out.splitlines()[-1] == "status: degraded, 1 problem"
    assert "Traceback" not in err


async def test_status_when_partitions_have_run_out_exits_1(dsn: str, admin: asyncpg.Connection) -> None:
    await admin.execute("SELECT setval('mcp_events_seq', 50000000)")
    code, out, err = await run_cli("status", "--dsn", dsn)
    assert code == 1, out + err
    [problem] = problems(out)
    assert problem.startswith("problem: partitions: no partition for the next event (seq 50,000,001)")
    assert "mcp-pg-events retention" in problem


async def test_status_when_retention_does_not_run_exits_1(
    store: PostgresEventStore, dsn: str, admin: asyncpg.Connection
) -> None:
    view = store.session("old")
    await view.store_event("1", progress_message(1))
    await admin.execute("UPDATE mcp_events_events SET created_at = now() - interval '30 days'")

    code, out, err = await run_cli("status", "--dsn", dsn)
    assert code == 1, out + err
    [problem] = problems(out)
    assert problem.startswith("problem: retention: events older than retention keeps them (up to 30d")
    assert "schedule `mcp-pg-events retention`" in problem
    # A longer TTL, as retention may run with, keeps them.
    code, out, _ = await run_cli("status", "--dsn", dsn, MCP_PG_EVENTS_TTL="60d")
    assert code == 0, out

    # An ended session whose events are still there long after the grace.
    await admin.execute("UPDATE mcp_events_sessions SET ended_at = now() - interval '2 hours'")
    code, out, _ = await run_cli("status", "--dsn", dsn, "--ttl", "60d")
    assert code == 1, out
    [problem] = problems(out)
    assert problem.startswith("problem: sessions: sessions ended 2h")  # and the seconds since
    assert "ago still hold their events" in problem


async def test_status_of_an_unreachable_database_exits_2_in_one_line() -> None:
    dsn = "postgresql://me:hunter2@127.0.0.1:1/nowhere"
    code, out, err = await run_cli("status", "--dsn", dsn)
    assert code == 2
    assert err.strip().startswith("mcp-pg-events: error: cannot reach the database"), err
    assert len(err.strip().splitlines()) == 1 and "hunter2" not in err + out
    code, out, err = await run_cli("status", "--dsn", dsn, "--json")
    assert code == 2
    assert json.loads(out)["status"] == "unknown" and "hunter2" not in out


async def test_status_as_each_role(deployment: Deployment) -> None:
    async with deployment.store() as store:
        await store.session("s").store_event("1", progress_message(1))

    # The owner, the runtime and the retention role see everything status looks at.
    for role in (deployment.owner, deployment.runtime, deployment.retention):
        code, out, err = await run_cli("status", "--dsn", deployment.dsn(role))
        assert code == 0, f"{role}: {out}{err}"

    # A role that may connect but holds none of the grants cannot tell, and says
    # why, check by check. (grants.sql takes CONNECT away from PUBLIC: an operator
    # gives it to such a role on purpose.)
    async with new_roles(deployment.admin_dsn, "nogrants") as ((nobody,), password):
        async with deployment.connect(deployment.owner) as owner:
            database = await owner.fetchval("SELECT current_database()")
            await owner.execute(f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {quote_ident(nobody)}")
        stranger = dataclasses.replace(deployment, password=password).dsn(nobody)
        code, out, err = await run_cli("status", "--dsn", stranger)
    assert code == 2, out + err
    assert "Traceback" not in err
    unknown = [line for line in out.splitlines() if line.startswith("cannot tell: ")]
    assert unknown and all("this role may not read" in line for line in unknown)
    assert out.splitlines()[-1].startswith("status: cannot tell")


# --- sessions -------------------------------------------------------------------------------


async def test_sessions_list_show_and_end_over_real_http(
    store: PostgresEventStore, dsn: str, admin: asyncpg.Connection
) -> None:
    gate = asyncio.Event()
    gate.set()
    async with serve(build_app(store, gate)) as url, httpx.AsyncClient(base_url=url, timeout=15) as http:
        busy, idle = McpClient(http), McpClient(http)
        for client, count in ((busy, 5), (idle, 1)):
            await client.initialize()
            _, call = client.call_tool("progress", {"count": count}, progress_token="t")
            async with call as stream:
                await stream.rest()
    assert busy.session_id and idle.session_id

    code, out, err = await run_cli("sessions", "list", "--json", "--dsn", dsn)
    assert code == 0, err
    listed = {s["key"]: s for s in json.loads(out)}
    assert {busy.session_id, idle.session_id} <= set(listed)
    stored = await admin.fetchval(
        "SELECT count(*) FROM mcp_events_events e JOIN mcp_events_streams st ON st.id = e.stream_key "
        "JOIN mcp_events_sessions se ON se.id = st.session_id WHERE se.key = $1",
        busy.session_id,
    )
    # One row per session: the initialize request's stream (a priming event and
    # the response) and the tool call's (a priming event, 5 progress notifications,
    # the result).
    assert listed[busy.session_id]["events"] == stored == 9
    assert listed[busy.session_id]["streams"] == 2 and listed[busy.session_id]["bytes"] > 0

    code, out, _ = await run_cli("sessions", "list", "--dsn", dsn)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["SESSION", "CREATED", "LAST"]
    assert any(line.startswith(busy.session_id) for line in out.splitlines())

    code, out, _ = await run_cli("sessions", "show", busy.session_id, "--dsn", dsn)
    assert code == 0, out
    assert f"session          {busy.session_id}" in out
    assert "streams          2, 9 events" in out
    code, out, _ = await run_cli("sessions", "show", busy.session_id, "--json", "--dsn", dsn)
    streams = {stream["stream"]: stream["events"] for stream in json.loads(out)["streams"]}
    assert streams == {"1": 2, "2": 7}

    code, out, _ = await run_cli("sessions", "end", busy.session_id, "--dsn", dsn)
    assert code == 0 and "ended" in out
    assert await admin.fetchval(
        "SELECT ended_at IS NOT NULL FROM mcp_events_sessions WHERE key = $1", busy.session_id
    )
    code, out, _ = await run_cli("sessions", "end", busy.session_id, "--dsn", dsn)
    assert code == 0 and "had ended already" in out
    code, out, _ = await run_cli("sessions", "list", "--json", "--dsn", dsn)
    assert busy.session_id not in {s["key"] for s in json.loads(out)}
    code, out, _ = await run_cli("sessions", "list", "--all", "--json", "--dsn", dsn)
    assert {s["key"]: s for s in json.loads(out)}[busy.session_id]["ended_at"] is not None

    for action in ("show", "end"):
        code, out, err = await run_cli("sessions", action, "no-such-session", "--dsn", dsn)
        assert code == 2
        assert err.strip() == "mcp-pg-events: error: no session 'no-such-session' in this database"


# --- tail -----------------------------------------------------------------------------------


async def read_lines(process: asyncio.subprocess.Process, count: int) -> list[str]:
    assert process.stdout is not None
    lines = []
    for _ in range(count):
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line, "tail exited early"
        lines.append(line.decode().rstrip("\n"))
    return lines


async def stop(process: asyncio.subprocess.Process) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_tail_follows_a_session_live_and_ends_cleanly_on_sigint(
    store: PostgresEventStore, dsn: str
) -> None:
    view = store.session("watched")
    await view.store_event("1", progress_message(0))  # before the tail: not shown
    process = await start_cli("tail", "watched", "--dsn", dsn)
    await wait_for_line(process.stderr, b"following session watched from now")

    ids = [await view.store_event("1", progress_message(i)) for i in (1, 2)]
    # A stream the session opens after the tail started is found and followed from its start.
    ids.append(await view.store_event("7", None))
    ids.append(await view.store_event("7", request(3, "sampling/createMessage", {"maxTokens": 5})))
    ids.append(await view.store_event("7", response(7, {"content": []})))
    await store.session("another").store_event("1", progress_message(99))  # never shown

    lines = await read_lines(process, 5)
    by_id = {line.split()[-1]: line for line in lines}
    assert set(by_id) == set(ids)
    assert " notifications/progress 1 " in by_id[ids[0]] and by_id[ids[0]].split()[2] == "1"
    assert "(priming event" in by_id[ids[2]] and by_id[ids[2]].split()[2] == "7"
    assert "request sampling/createMessage (id 3)" in by_id[ids[3]]
    assert "result (id 7)" in by_id[ids[4]]

    code, err = await stop(process)
    assert code == 0, err
    assert "followed 5 events on 2 streams" in err and "Traceback" not in err


async def test_tail_from_a_cursor_as_json_gives_the_raw_messages(store: PostgresEventStore, dsn: str) -> None:
    view = store.session("s")
    cursor = await view.store_event("1", None)
    sent = [progress_message(i) for i in range(3)]
    ids = [await view.store_event("1", message) for message in sent]
    await view.store_event("other", progress_message(50))  # not the stream asked for

    process = await start_cli("tail", "s", "1", "--after", cursor, "--json", "--dsn", dsn)
    lines = [json.loads(line) for line in await read_lines(process, 3)]
    code, err = await stop(process)
    assert code == 0, err
    assert [line["event_id"] for line in lines] == ids
    assert all(line["stream"] == "1" and line["time"] for line in lines)
    assert [line["message"]["params"]["progress"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody",), "no session 'nobody' in this database"),
        (("s", "--after", "garbage"), "--after 'garbage' is not an event id of this store"),
        (("s", "--after", "1-1-000000000000"), "--after 1-1-000000000000: no such event in session 's'"),
    ],
)
async def test_tail_of_what_does_not_exist_is_one_line(
    store: PostgresEventStore, dsn: str, args: tuple[str, ...], message: str
) -> None:
    await store.session("s").store_event("1", None)
    code, _, err = await run_cli("tail", *args, "--dsn", dsn)
    assert code == 2
    assert err.strip().startswith(f"mcp-pg-events: error: {message}"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("status",), ("sessions", "list"), ("tail",)])
async def test_help_has_examples_and_the_environment(command: Any) -> None:
    code, out, _ = await run_cli(*command, "--help")
    assert code == 0
    assert "examples:" in out
    assert "MCP_PG_EVENTS_DSN" in out
