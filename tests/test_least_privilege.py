"""Least privilege: the migrations run as the owner, the server and retention as roles with only the grants.

Every test here deploys as docs/operations.md says: an ordinary (non-superuser)
role owns the database and runs the migrations, then applies
migrations/grants.sql with psql; the MCP server and retention then run as roles
that have exactly those grants, and nothing else.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import asyncpg
import httpx
import pytest

from mcp_pg_events.retention import run_retention

from .deployments import Deployment, apply_grants, new_roles, quote_ident
from .mcp_http import McpClient, build_app, progress_values, serve
from .test_retention import HOUR, age, message, replay, seq, seqs, tables, tiny_partitions

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

# The retention steps that the runtime role must not be able to run.
RETENTION_ROUTINES = [
    "CALL mcp_events_retention(interval '0')",
    "SELECT mcp_events_summarize()",
    "SELECT mcp_events_detach_oldest(now(), interval '1 second')",
    "SELECT mcp_events_release_detached('mcp_events_events_p1', interval '1 second')",
    "SELECT mcp_events_drop_detached('mcp_events_events_p1', interval '1 second')",
    "SELECT mcp_events_roll_over(interval '0', 1, interval '1 second')",
    "SELECT * FROM mcp_events_retention_plan(now(), now(), interval '0')",
    "SELECT * FROM mcp_events_partitions()",
    "SELECT mcp_events_next_seq()",
]


async def denied(conn: asyncpg.Connection, statements: list[str]) -> list[str]:
    """The statements that did NOT fail for lack of privilege."""
    allowed = []
    for statement in statements:
        try:
            await conn.execute(statement)
        except asyncpg.InsufficientPrivilegeError:
            continue
        allowed.append(statement)
    return allowed


async def ddl_statements(conn: asyncpg.Connection, role: str) -> list[str]:
    """Every kind of DDL on every mcp_events_ table (partitions too), the sequence and the routines."""
    names = [
        r["relname"]
        for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname LIKE 'mcp\\_events\\_%' AND relkind IN ('r', 'p')"
        )
    ]
    assert "mcp_events_events" in names and any(name.startswith("mcp_events_events_p") for name in names)
    statements = [
        "CREATE TABLE mcp_events_mine (id int)",
        "CREATE TABLE mcp_events_events_p999999999 (LIKE mcp_events_events)",
        "CREATE INDEX ON mcp_events_events (created_at)",
        "ALTER SEQUENCE mcp_events_seq RESTART",
        "SELECT setval('mcp_events_seq', 1)",
        "DROP SEQUENCE mcp_events_seq",
        "TRUNCATE mcp_events_events",
        "DROP FUNCTION mcp_events_ensure_partitions(integer, bigint)",
        "DROP PROCEDURE mcp_events_retention",
        "CREATE OR REPLACE FUNCTION mcp_events_next_seq() RETURNS bigint LANGUAGE sql AS 'SELECT 1::bigint'",
    ]
    for name in names:
        table = quote_ident(name)
        statements += [
            f"ALTER TABLE {table} ADD COLUMN mine int",
            f"ALTER TABLE {table} OWNER TO {quote_ident(role)}",
            f"DROP TABLE {table}",
        ]
        if name.startswith("mcp_events_events_p"):
            statements.append(f"ALTER TABLE mcp_events_events DETACH PARTITION {table}")
    return statements


# --- the server, as the runtime role -----------------------------------------------------------


async def test_the_runtime_role_appends_replays_follows_live_and_ends_sessions(
    deployment: Deployment,
) -> None:
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
        partitions_before = await tables(owner)
    # A poll far slower than the test's deadline: live delivery must come from LISTEN.
    async with deployment.store(poll_interval=600) as store:
        view = store.session("s")
        ids = [await view.store_event("1", message(i)) for i in range(25)]  # past the partitions made ahead
        assert await replay(view, ids[0]) == ("1", [message(i) for i in range(1, 25)])

        async with view.subscribe(ids[-1]) as following:
            assert await following.open()
            await asyncio.wait_for(store.listener.wait_listening(), 10)
            events = aiter(following)
            async with deployment.store() as writer:
                writing = writer.session("s")
                # The first batch may be picked up by the catch-up that follows the
                # listener's connect; once it is in, only a notification can bring the second.
                for batch in ([25, 26], [27, 28]):
                    for i in batch:
                        await writing.store_event("1", message(i))
                    got = [await asyncio.wait_for(anext(events), 10) for _ in batch]
                    assert [e.message for e in got] == [message(i) for i in batch]

        await store.end_session("s")

    async with deployment.connect(deployment.owner) as owner:
        created = await tables(owner) - partitions_before
        assert created, "the appends created no partition"
        owners = await owner.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename = ANY($1::text[])", list(created)
        )
        assert [r["tableowner"] for r in owners] == [deployment.owner]
        assert await owner.fetchval("SELECT ended_at IS NOT NULL FROM mcp_events_sessions WHERE key = 's'")


async def test_an_mcp_session_over_http_resumes_and_ends_as_the_runtime_role(deployment: Deployment) -> None:
    gate = asyncio.Event()
    async with (
        deployment.store() as store,
        serve(build_app(store, gate)) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as http,
    ):
        client = McpClient(http)
        await client.initialize()
        request_id, call = client.call_tool("progress", {"count": 4, "pause_after": 2}, progress_token="rt")
        async with call as stream:
            live = [await stream.next() for _ in range(3)]  # priming, 1, 2
        cursor = live[-1]
        assert cursor is not None and cursor.id
        async with client.get(last_event_id=cursor.id) as resumed:
            gate.set()  # the rest is sent while the resumed stream follows
            rest = await asyncio.wait_for(resumed.until_response(request_id), 15)
        assert progress_values([e for e in live if e] + rest, "rt") == [1, 2, 3, 4]
        deleted = await http.delete("/mcp", headers=client._headers())
        assert deleted.status_code < 300

    async with deployment.connect(deployment.owner) as owner:
        ended = await owner.fetchval(
            "SELECT ended_at IS NOT NULL FROM mcp_events_sessions WHERE key = $1", client.session_id
        )
    assert ended is True


# Beyond the schema (ddl_statements), what each role's job does not need.
DENIED_BESIDES_DDL = {
    "runtime": [
        "DELETE FROM mcp_events_events",
        "DELETE FROM mcp_events_streams",
        "DELETE FROM mcp_events_sessions",
        "UPDATE mcp_events_events SET message = NULL",
        *RETENTION_ROUTINES,
    ],
    "retention": [
        "INSERT INTO mcp_events_sessions (key) VALUES ('mine')",
        "INSERT INTO mcp_events_events (stream_key, seq) SELECT id, 1 FROM mcp_events_streams",
        "UPDATE mcp_events_events SET message = NULL",
    ],
}


@pytest.mark.parametrize("kind", ["runtime", "retention"])
async def test_neither_role_can_change_the_schema_or_do_the_others_job(
    deployment: Deployment, kind: str
) -> None:
    async with deployment.store() as store:
        await store.session("s").store_event("1", message(0))
    role = deployment.runtime if kind == "runtime" else deployment.retention
    async with deployment.connect(role) as conn:
        statements = await ddl_statements(conn, role) + DENIED_BESIDES_DDL[kind]
        assert await denied(conn, statements) == []
        # Still all there.
        assert await conn.fetchval("SELECT count(*) FROM mcp_events_events") == 1


# --- retention, as the retention role ----------------------------------------------------------


async def test_the_retention_role_deletes_expired_rows_drops_partitions_and_clears_ended_sessions(
    deployment: Deployment,
) -> None:
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
        async with deployment.store() as store:
            view = store.session("s")
            ids = [await view.store_event("1", message(i)) for i in range(25)]
            for i in range(3):
                await store.session("gone").store_event("1", message(i))
            await store.end_session("gone")
        await age(owner, ids[:22])
        before = await tables(owner)

        report = await run_retention(deployment.dsn(deployment.retention), ttl=HOUR)

        # Seqs 1-20 went with their two partitions; 21 and 22 row by row, as did
        # the ended session's three events.
        assert report.complete
        assert (report.partitions_dropped, report.rows_deleted) == (2, 2 + 3)
        assert (report.streams_removed, report.sessions_removed) == (1, 1)
        # The partition in use held expired events: the sequence moved on (ALTER SEQUENCE, as the owner).
        assert report.rolled_over_to == 31
        assert before - await tables(owner) == {"mcp_events_events_p1", "mcp_events_events_p11"}
        assert await seqs(owner) == [seq(e) for e in ids[22:]]
        assert await owner.fetchval("SELECT count(*) FROM mcp_events_sessions WHERE key = 'gone'") == 0

    # The pg_cron way, as the same role: nothing left to do.
    async with deployment.connect(deployment.retention) as retention:
        row = await retention.fetchrow("CALL mcp_events_retention(interval '1 hour')")
        assert row is not None and row["complete"] and not row["locked_out"]
        assert (row["partitions_dropped"], row["rows_deleted"]) == (0, 0)
    async with deployment.store() as store:
        assert await replay(store.session("s"), ids[21]) is None
        assert await replay(store.session("s"), ids[22]) == ("1", [message(23), message(24)])


# --- what grants.sql grants, and what the docs say it grants ------------------------------------

# Every privilege on an mcp_events_ object, by grantee (PUBLIC as ''), defaults included.
PRIVILEGES = """
SELECT coalesce(g.rolname, '') AS grantee, c.relname AS object, a.privilege_type AS privilege
FROM pg_class c
CROSS JOIN LATERAL aclexplode(
    coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))
) a
LEFT JOIN pg_roles g ON g.oid = a.grantee
WHERE c.relname LIKE 'mcp\\_events\\_%' AND c.relkind IN ('r', 'p', 'S', 'v')
  AND a.grantee <> c.relowner
UNION ALL
SELECT coalesce(g.rolname, ''), p.proname, a.privilege_type
FROM pg_proc p
CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
LEFT JOIN pg_roles g ON g.oid = a.grantee
WHERE p.proname LIKE 'mcp\\_events\\_%' AND a.grantee <> p.proowner
"""


async def privileges(conn: asyncpg.Connection) -> set[tuple[str, str, str]]:
    return {(r["grantee"], r["object"], r["privilege"]) for r in await conn.fetch(PRIVILEGES)}


def documented_privileges(runtime: str, retention: str) -> set[tuple[str, str, str]]:
    """The table of docs/operations.md's "Roles and grants", as (role, object, privilege)."""
    section = OPERATIONS.read_text().split("## Roles and grants", 1)[1].split("\n## ", 1)[0]
    role_names = {"runtime": runtime, "retention": retention}
    documented = set()
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in role_names:
            continue
        granted, _, objects = cells[1].partition(" on ")
        privileges = [p for quoted in re.findall(r"`([^`]+)`", granted) for p in quoted.split(", ")]
        names = re.findall(r"`([^`]+)`", objects)
        assert privileges and names, line
        documented |= {(role_names[cells[0]], name, p) for name in names for p in privileges}
    return documented


async def test_the_docs_list_exactly_what_grants_sql_grants_and_public_has_nothing(
    deployment: Deployment,
) -> None:
    async with deployment.connect(deployment.owner) as owner:
        granted = await privileges(owner)
    documented = documented_privileges(deployment.runtime, deployment.retention)
    assert len(documented) > 20
    assert granted == documented


async def test_grants_sql_grants_the_same_with_psql_and_without(deployment: Deployment) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not on PATH: the deployment fixture applied grants.sql without it")
    # The fixture applied it with psql; here the same file goes through asyncpg, for other roles.
    async with new_roles(deployment.admin_dsn, "rt", "rn") as ((runtime, retention), _):
        await apply_grants(deployment.dsn(deployment.owner), runtime, retention, psql=None)
        async with deployment.connect(deployment.owner) as owner:
            granted = await privileges(owner)
    renamed = {deployment.runtime: runtime, deployment.retention: retention}
    with_psql = {(renamed[g], o, p) for g, o, p in granted if g in renamed}
    without_psql = {(g, o, p) for g, o, p in granted if g in (runtime, retention)}
    assert with_psql and with_psql == without_psql


async def test_only_the_owner_may_choose_the_partition_width_or_create_many_partitions_ahead(
    deployment: Deployment,
) -> None:
    for ahead, role in enumerate((deployment.runtime, deployment.retention), start=3):
        async with deployment.connect(role) as conn:
            assert await conn.fetchval("SELECT mcp_events_ensure_partitions($1)", ahead) == 1
            for call in (
                "SELECT mcp_events_ensure_partitions(2, 1)",  # a million partitions of one row each
                "SELECT mcp_events_ensure_partitions(101)",
                "SELECT mcp_events_create_partitions(2, NULL)",  # the body behind the check
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(call)
    async with deployment.connect(deployment.owner) as owner:
        assert await owner.fetchval("SELECT mcp_events_ensure_partitions(2, 5)") == 0  # enough ahead
        assert await owner.fetchval("SELECT mcp_events_ensure_partitions(150)") == 150 - 4
