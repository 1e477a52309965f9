"""Least privilege: the migrations run as the owner, the server and retention as roles with only the grants.

Every test here deploys as docs/operations.md says: an ordinary (non-superuser)
role owns the database and runs the migrations, then applies
migrations/grants.sql with psql; the MCP server and retention then run as roles
that have exactly those grants, and nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import statistics
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from mcp_pg_events import McpPgEventsError, PostgresEventStore, wakeups
from mcp_pg_events.dsn import redact
from mcp_pg_events.retention import run_retention

from .deployments import Deployment, apply_grants, new_roles, quote_ident
from .mcp_http import McpClient, build_app, progress_values, serve
from .messages import model_of, progress_message, response
from .test_faults import percentiles
from .test_hostile import answered_on_a_stream_that_resumes, call_with_id, post_raw, still_answers
from .test_live import collect
from .test_retention import HOUR, age, message, partition_names, replay, seq, seqs, tables, tiny_partitions

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
        # A session id, its principal and its handshake would let it use any session.
        "SELECT key FROM mcp_events_sessions",
        "SELECT owner FROM mcp_events_sessions",
        "SELECT handshake FROM mcp_events_sessions",
        "SELECT * FROM mcp_events_sessions",
        "UPDATE mcp_events_sessions SET owner = NULL",
        "UPDATE mcp_events_sessions SET key = 'mine'",
        "INSERT INTO mcp_events_workers (pid) VALUES (1)",
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

# Every privilege on an mcp_events_ object and on the database itself (as "database"),
# by grantee (PUBLIC as ''), defaults included.
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
UNION ALL
SELECT coalesce(g.rolname, ''), 'database', a.privilege_type
FROM pg_database d
CROSS JOIN LATERAL aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
LEFT JOIN pg_roles g ON g.oid = a.grantee
WHERE d.datname = current_database() AND a.grantee <> d.datdba
UNION ALL
SELECT coalesce(g.rolname, ''), c.relname || '.' || t.attname, a.privilege_type
FROM pg_attribute t
JOIN pg_class c ON c.oid = t.attrelid
CROSS JOIN LATERAL aclexplode(t.attacl) a
LEFT JOIN pg_roles g ON g.oid = a.grantee
WHERE c.relname LIKE 'mcp\\_events\\_%' AND t.attacl IS NOT NULL AND a.grantee <> c.relowner
"""


async def privileges(conn: asyncpg.Connection) -> set[tuple[str, str, str]]:
    return {(r["grantee"], r["object"], r["privilege"]) for r in await conn.fetch(PRIVILEGES)}


# One privilege as the docs write it: ``SELECT``, or ``SELECT (a, b)`` for some columns only.
_PRIVILEGE = re.compile(r"([A-Z]+)(?: \(([^)]*)\))?")


def documented_privileges(runtime: str, retention: str) -> set[tuple[str, str, str]]:
    """The table of docs/operations.md's "Roles and grants", as (role, object or table.column, privilege)."""
    section = OPERATIONS.read_text().split("## Roles and grants", 1)[1].split("\n## ", 1)[0]
    role_names = {"runtime": runtime, "retention": retention}
    documented = set()
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in role_names:
            continue
        granted, _, objects = cells[1].partition(" on ")
        privileges = [m for quoted in re.findall(r"`([^`]+)`", granted) for m in _PRIVILEGE.findall(quoted)]
        names = ["database"] if objects == "the database" else re.findall(r"`([^`]+)`", objects)
        assert privileges and names, line
        for privilege, columns in privileges:
            targets = (
                [f"{name}.{column}" for name in names for column in columns.split(", ")] if columns else names
            )
            documented |= {(role_names[cells[0]], target, privilege) for target in targets}
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


# --- the database: who may connect, who may create temporary objects -----------------------------


async def grant_temporary(deployment: Deployment, role: str) -> None:
    """Give ``role`` TEMPORARY on the database, as an operator may for other reasons."""
    async with deployment.connect(deployment.owner) as owner:
        database = await owner.fetchval("SELECT current_database()")
        await owner.execute(f"GRANT TEMPORARY ON DATABASE {quote_ident(database)} TO {quote_ident(role)}")


async def refused_connect(dsn: str) -> str | None:
    """Why the server refused to let ``dsn`` connect, None if it let it."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InsufficientPrivilegeError as exc:
        return str(exc).split(' "')[0]
    await conn.close()
    return None


async def test_only_the_owner_and_the_two_roles_may_connect_and_neither_role_may_create_temporary_objects(
    deployment: Deployment,
) -> None:
    async with new_roles(deployment.admin_dsn, "nobody") as ((nobody,), password):
        stranger = dataclasses.replace(deployment, password=password)
        assert await refused_connect(stranger.dsn(nobody)) == "permission denied for database"
    for role in (deployment.runtime, deployment.retention):
        async with deployment.connect(role) as conn:
            for statement in (
                "CREATE TEMPORARY TABLE mcp_events_seq (last_value bigint, is_called boolean)",
                "CREATE DOMAIN pg_temp.text AS pg_catalog.text",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="temporary"):
                    await conn.execute(statement)


# --- SECURITY DEFINER functions, attacked by the roles that may call them ------------------------

# Every routine each role may execute, with ordinary arguments.
ROUTINE_CALLS = {
    "runtime": [
        "SELECT mcp_events_ensure_partitions()",
        "SELECT mcp_events_ensure_partitions(3)",
    ],
    "retention": [
        "SELECT mcp_events_ensure_partitions(3)",
        "SELECT * FROM mcp_events_partitions()",
        "SELECT mcp_events_next_seq()",
        "SELECT mcp_events_partition_expired(1, 2, 3, now())",
        "SELECT mcp_events_summarize()",
        "SELECT mcp_events_detach_oldest(now() - interval '1 day', interval '1 second')",
        "SELECT mcp_events_release_detached('mcp_events_events_p1', interval '1 second')",
        "SELECT mcp_events_drop_detached('mcp_events_events_p1', interval '1 second')",
        "SELECT mcp_events_roll_over(interval '1 day', 1, interval '1 second')",
        "SELECT mcp_events_roll_over(interval '0', 1, interval '1 second', true)",
        "SELECT * FROM mcp_events_retention_plan(now(), now(), interval '1 day')",
        "CALL mcp_events_retention(interval '1 day')",
    ],
}

# Every type the functions declare (parameters, results, variables, casts), under
# each of its names: a keyword (bigint) resolves to pg_catalog by itself, its
# catalog name (int8) through the search_path. Name -> the domain's base type.
TYPE_NAMES = {
    "text": "text",
    "regclass": "regclass",
    "bigint": "int8",
    "int8": "int8",
    "integer": "int4",
    "int4": "int4",
    "interval": "interval",
    "timestamptz": "timestamptz",
    "boolean": "bool",
    "bool": "bool",
    "name": "name",
    "oid": "oid",
    "record": "int4",
    "void": "int4",
}

# Runs wherever a value of one of the domains is made. As anyone but the role that
# logged in, it says so and grants that role TRUNCATE on the events table.
ATTACK = """
CREATE FUNCTION pg_temp.mcp_events_attack() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    IF current_user <> session_user THEN
        RAISE NOTICE 'hijacked: ran as %', current_user;
        EXECUTE 'GRANT TRUNCATE ON ' || $t${events}$t$ || ' TO ' || pg_catalog.quote_ident(session_user);
    END IF;
    RETURN true;
END
$f$
"""


async def events_table(conn: asyncpg.Connection) -> str:
    """The events table, schema-qualified."""
    name: str = await conn.fetchval(
        "SELECT c.relnamespace::regnamespace || '.' || c.relname FROM pg_class c "
        "WHERE c.oid = 'mcp_events_events'::regclass"
    )
    return name


async def attempt(conn: asyncpg.Connection, statements: list[str]) -> tuple[list[str], dict[str, str]]:
    """Run each statement; the notices of a hijack, and the statements that failed, with why."""
    hijacks: list[str] = []
    conn.add_log_listener(lambda _, message: hijacks.append(message.message))
    failed = {}
    for statement in statements:
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            failed[statement] = repr(exc)
    return [notice for notice in hijacks if notice.startswith("hijacked")], failed


@pytest.mark.parametrize("kind", ["runtime", "retention"])
async def test_temporary_types_named_like_the_functions_types_run_nothing_as_the_owner(
    deployment: Deployment, kind: str
) -> None:
    role = deployment.runtime if kind == "runtime" else deployment.retention
    await grant_temporary(deployment, role)
    async with deployment.store() as store:
        await store.session("s").store_event("1", message(0))
    hijacked, failed = {}, {}
    for type_name, base in TYPE_NAMES.items():
        async with deployment.connect(role) as conn:  # a session of its own: plpgsql compiles per session
            await conn.execute(ATTACK.format(events=await events_table(conn)))
            await conn.execute(
                f"CREATE DOMAIN pg_temp.{quote_ident(type_name)} AS pg_catalog.{base} "
                "CHECK (pg_temp.mcp_events_attack())"
            )
            notices, errors = await attempt(conn, ROUTINE_CALLS[kind])
            if notices:
                hijacked[type_name] = notices
            failed.update({f"{type_name}: {call}": why for call, why in errors.items()})
    async with deployment.connect(deployment.owner) as owner:
        gained = await owner.fetchval("SELECT has_table_privilege($1, 'mcp_events_events', 'TRUNCATE')", role)
    assert hijacked == {}
    assert not gained
    # Nor did the functions stop working for the role that tried.
    assert failed == {}


# A sequence far ahead of the real one, readable by anyone, as the real one is.
FAKE_SEQUENCE = [
    "CREATE TEMPORARY TABLE mcp_events_seq (last_value bigint, is_called boolean)",
    "INSERT INTO mcp_events_seq VALUES ($1, true)",
    "GRANT SELECT ON pg_temp.mcp_events_seq TO PUBLIC",
]
# Every other table, and the catalogs the functions read partitions and keys from: empty.
FAKE_TABLES = {
    "mcp_events_events": "stream_key bigint, seq bigint, created_at timestamptz, message bytea",
    "mcp_events_streams": "id bigint, session_id bigint, name bytea, tag text, created_at timestamptz",
    "mcp_events_sessions": "id bigint, key text, created_at timestamptz, ended_at timestamptz, "
    "registered_at timestamptz, idle_timeout float8, last_active_at timestamptz, ended_reason text",
    "mcp_events_workers": "id int, seen_at timestamptz, ended_at timestamptz",
    "mcp_events_tasks": "namespace text, task_id text, expires_at timestamptz",
    "mcp_events_alembic_version": "version_num text",
    "pg_inherits": "inhrelid oid, inhparent oid, inhseqno int, inhdetachpending bool",
    "pg_class": "oid oid, relname name, relnamespace oid, relowner oid, relkind char, relispartition bool",
    "pg_constraint": "conrelid oid, conname name, contype char",
    "pg_index": "indexrelid oid, indrelid oid",
}


async def fake_sequence(conn: asyncpg.Connection, fake_seq: int) -> None:
    for statement in FAKE_SEQUENCE:
        await conn.execute(statement, *((fake_seq,) if "$1" in statement else ()))


async def fake_tables(conn: asyncpg.Connection) -> None:
    for name, columns in FAKE_TABLES.items():
        await conn.execute(f"CREATE TEMPORARY TABLE {name} ({columns})")
        await conn.execute(f"GRANT SELECT ON pg_temp.{name} TO PUBLIC")


async def test_a_temporary_table_named_like_the_sequence_moves_no_partition(deployment: Deployment) -> None:
    await grant_temporary(deployment, deployment.runtime)
    async with deployment.connect(deployment.owner) as owner:
        next_seq = await owner.fetchval("SELECT mcp_events_next_seq()")
        width = await owner.fetchval("SELECT upper - lower FROM mcp_events_partitions() LIMIT 1")
    for fake_seq in (10**9, 10**12, 10**15):
        async with deployment.connect(deployment.runtime) as conn:
            await fake_sequence(conn, fake_seq)
            await conn.fetchval("SELECT mcp_events_ensure_partitions(100)")
    async with deployment.connect(deployment.owner) as owner:
        partitions = await owner.fetch("SELECT lower, upper FROM mcp_events_partitions()")
    # 0003's cap, counted from the real sequence: 100 partitions ahead of it, and no more.
    assert max(p["lower"] for p in partitions) <= next_seq + 100 * width
    assert len(partitions) <= 101


@pytest.mark.parametrize("kind", ["runtime", "retention"])
async def test_temporary_tables_named_like_ours_or_the_catalogs_change_nothing_the_functions_see(
    deployment: Deployment, kind: str
) -> None:
    role = deployment.runtime if kind == "runtime" else deployment.retention
    await grant_temporary(deployment, role)
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
    async with deployment.store() as store:
        for i in range(15):
            await store.session("s").store_event("1", message(i))
    # As text: the fake pg_class would break the client's own look-up of a row type.
    seen = (
        "SELECT (mcp_events_next_seq(), array_agg(p ORDER BY p.lower))::text FROM mcp_events_partitions() p"
    )
    async with deployment.connect(deployment.owner) as owner:
        await owner.fetchval("SELECT mcp_events_ensure_partitions(3)")  # as many ahead as the calls ask for
        before = await owner.fetchval(seen)
        events = await owner.fetchval("SELECT count(*) FROM mcp_events_events")
    async with deployment.connect(role) as conn:
        await fake_sequence(conn, 10**9)
        await fake_tables(conn)
        _, failed = await attempt(conn, ROUTINE_CALLS[kind])
        if kind == "retention":
            assert await conn.fetchval(seen) == before
    assert failed == {}
    async with deployment.connect(deployment.owner) as owner:
        assert await owner.fetchval(seen) == before
        assert await owner.fetchval("SELECT count(*) FROM mcp_events_events") == events


async def test_the_retention_role_cannot_detach_the_partition_in_use_whatever_it_shadows_or_passes(
    deployment: Deployment,
) -> None:
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
    async with deployment.store() as store:
        view = store.session("s")
        ids = [await view.store_event("1", message(i)) for i in range(6)]  # seqs 1-6: the partition in use
    await grant_temporary(deployment, deployment.retention)
    async with deployment.connect(deployment.retention) as conn:
        await fake_sequence(conn, 10**9)
        for cutoff in ("'infinity'", "now()", "now() + interval '1 year'"):
            assert (
                await conn.fetchval(f"SELECT mcp_events_detach_oldest({cutoff}, interval '1 second')") is None
            )
        assert await conn.fetchval("SELECT mcp_events_next_seq()") == seq(ids[-1]) + 1
        for name in await partition_names(conn):
            await conn.execute("SELECT mcp_events_release_detached($1, interval '1 second')", name)
            assert (
                await conn.fetchval("SELECT mcp_events_drop_detached($1, interval '1 second')", name) is None
            )
        await conn.execute("CALL mcp_events_retention(interval '1 hour')")
    async with deployment.store() as store:
        view = store.session("s")
        ids.append(await view.store_event("1", message(6)))
        assert await replay(view, ids[0]) == ("1", [message(i) for i in range(1, 7)])


async def test_a_future_cutoff_is_now(deployment: Deployment) -> None:
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
        async with deployment.store() as store:
            view = store.session("s")
            ids = [await view.store_event("1", message(i)) for i in range(12)]  # the first partition is full
        # An event stamped later than the call's now() (a clock that moved) has not expired.
        await owner.execute(
            "UPDATE mcp_events_events SET created_at = now() + interval '1 hour' WHERE seq = 5"
        )
    async with deployment.connect(deployment.retention) as conn:
        assert await conn.fetchval("SELECT mcp_events_detach_oldest('infinity', interval '1 second')") is None
    async with deployment.store() as store:
        assert await replay(store.session("s"), ids[0]) == ("1", [message(i) for i in range(1, 12)])


# Arguments no run passes, which made a function act outside its job or not at all.
REFUSED_ARGUMENTS = [
    ("retention", "SELECT mcp_events_detach_oldest(NULL, interval '1 second')"),
    ("retention", "SELECT mcp_events_roll_over(NULL, 1, interval '1 second')"),
    ("retention", "SELECT mcp_events_roll_over(interval '-1 day', 1, interval '1 second')"),
    ("retention", "SELECT mcp_events_roll_over(interval '1 day', NULL, interval '1 second')"),
    ("retention", "SELECT mcp_events_roll_over(interval '1 day', 0, interval '1 second')"),
    ("retention", "SELECT mcp_events_ensure_partitions(NULL)"),
    ("runtime", "SELECT mcp_events_ensure_partitions(NULL)"),
    ("runtime", "SELECT mcp_events_ensure_partitions(-1)"),
]


async def test_null_and_negative_arguments_are_refused(deployment: Deployment) -> None:
    async with deployment.connect(deployment.owner) as owner:
        await tiny_partitions(owner)
    async with deployment.store() as store:
        view = store.session("s")
        ids = [await view.store_event("1", message(i)) for i in range(12)]  # the first partition is full
    not_refused = {}
    for kind, call in REFUSED_ARGUMENTS:
        async with deployment.connect(
            deployment.runtime if kind == "runtime" else deployment.retention
        ) as conn:
            try:
                not_refused[call] = await conn.fetchval(call)
            except asyncpg.InvalidParameterValueError:
                continue
            except asyncpg.PostgresError as exc:
                not_refused[call] = repr(exc)
    assert not_refused == {}
    async with deployment.store() as store:
        assert await replay(store.session("s"), ids[0]) == ("1", [message(i) for i in range(1, 12)])


async def test_retention_drops_no_table_the_owner_does_not_own(deployment: Deployment) -> None:
    # On PostgreSQL 14 any role may create tables in schema public unless revoked;
    # here the runtime role stands for such a role.
    admin = await asyncpg.connect(deployment.admin_dsn)
    try:
        await admin.execute("CREATE TABLE mcp_events_events_p999999 (id int)")
        await admin.execute(
            f"ALTER TABLE mcp_events_events_p999999 OWNER TO {quote_ident(deployment.runtime)}"
        )
    finally:
        await admin.close()
    async with deployment.connect(deployment.retention) as conn:
        for call in ("mcp_events_release_detached", "mcp_events_drop_detached"):
            assert (
                await conn.fetchval(f"SELECT {call}('mcp_events_events_p999999', interval '1 second')")
                is None
            )
        assert "mcp_events_events_p999999" not in [
            r["name"] for r in await conn.fetch("SELECT name FROM mcp_events_partitions()")
        ]
    report = await run_retention(deployment.dsn(deployment.retention), ttl=HOUR)
    assert report.complete
    async with deployment.connect(deployment.owner) as owner:
        assert await owner.fetchval("SELECT to_regclass('mcp_events_events_p999999') IS NOT NULL")


# --- the wake-up channel, flooded by another role of the deployment ------------------------------


def test_a_writer_sends_only_payloads_a_listener_reads_whole() -> None:
    keys = [2**63 - 1 - i for i in range(1000)]  # the longest keys there are
    payloads = wakeups.encode(keys)
    assert all(len(payload) <= wakeups.MAX_PAYLOAD for payload in payloads)
    assert [key for payload in payloads for key in wakeups.decode(payload) or []] == keys
    assert wakeups.decode(wakeups.EVERY_STREAM) is None
    # An older writer's longer list: every stream, without reading it.
    assert wakeups.decode(",".join(["9"] * (wakeups.MAX_KEYS + 1))) is None
    for unreadable in ["", "x", "1,,2", ",1", "1,", "1 ,2", "-1", "١٢", "1;2", "*,1"]:
        with pytest.raises(ValueError, match="not a wake-up payload"):
            wakeups.decode(unreadable)


# Hostile payloads, 200 per statement, each distinct, one kind at a time: lists
# longer than a writer sends (3,940 keys, 7.9 kB), lists naming the streams the
# subscriptions follow, payloads in no format, and "*".
FLOOD = """
SELECT pg_notify($1, CASE $5
    WHEN 'long lists' THEN $3 || g
    WHEN 'lists of our streams' THEN $4 || g
    WHEN 'unreadable' THEN 'not a payload ' || g
    ELSE '*' END)
FROM generate_series($2::bigint, $2::bigint + 199) AS g
"""


class Flood:
    """Another role flooding the channel from a connection of its own, one kind of payload at a time."""

    def __init__(self, dsn: str, stream_keys: list[int]) -> None:
        self.dsn = dsn
        self.long_list = "9," * 3939
        self.ours = ",".join(map(str, stream_keys[:50])) + ","
        self.sent = 0
        self.kind = ""
        self._flooding: asyncio.Event | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                await conn.execute(FLOOD, wakeups.CHANNEL, self.sent, self.long_list, self.ours, self.kind)
                self.sent += 200
                if self._flooding is not None:
                    self._flooding.set()
        finally:
            await conn.close()

    async def switch(self, kind: str) -> None:
        """Flood with ``kind`` from now on; returns once a statement of it went out."""
        self.kind, self._flooding = kind, asyncio.Event()
        await asyncio.wait_for(self._flooding.wait(), 30)

    def stop(self) -> None:
        self._stop.set()


async def test_appends_keep_their_latency_and_subscribers_every_event_while_another_role_floods(
    deployment: Deployment,
) -> None:
    async with deployment.store(poll_interval=3600) as store:
        targets = [(store.session(f"s{i}"), str(stream)) for i in range(20) for stream in range(10)]
        cursors, readers = [], []
        for view, stream in targets:
            cursor = await view.store_event(stream, None)
            subscription = view.subscribe(cursor)
            assert await subscription.open()
            cursors.append(cursor)
            readers.append(asyncio.create_task(collect(subscription, timeout=120)))
        await store.listener.wait_listening()
        async with deployment.connect(deployment.owner) as owner:
            stream_keys = [r["id"] for r in await owner.fetch("SELECT id FROM mcp_events_streams")]

        flood = Flood(deployment.dsn(deployment.retention), stream_keys)
        flooding = asyncio.create_task(flood.run())
        loop = asyncio.get_running_loop()
        acked: dict[int, list[str]] = {i: [] for i in range(len(targets))}
        latencies: dict[str, list[float]] = {}
        n = 0
        try:
            for kind in ("long lists", "lists of our streams", "unreadable", "every stream"):
                await flood.switch(kind)
                for _ in range(100):
                    view, stream = targets[n % len(targets)]
                    begun = loop.time()
                    acked[n % len(targets)].append(await view.store_event(stream, progress_message(n)))
                    latencies.setdefault(kind, []).append(loop.time() - begun)
                    n += 1
                    await asyncio.sleep(0.01)  # the load's pace, not a wait for anything
        finally:
            flood.stop()
            await flooding
        for view, stream in targets:
            await view.store_event(stream, response(int(stream), {}))
        delivered = await asyncio.gather(*readers)
        tail = store.live_tail
        listener = store.listener

    for i, events in enumerate(delivered):
        assert [e.event_id for e in events[:-1]] == acked[i]
        assert model_of(events[-1].message).id == int(targets[i][1])
    every = [seconds for kind in latencies.values() for seconds in kind]
    p99 = statistics.quantiles(every, n=100)[98]
    print(
        f"\n{flood.sent} notifications flooded, {tail.unreadable_payloads} ignored, "
        f"{tail.dropped_payloads} dropped, {listener.reconnects} reconnects; "
        f"appends p99 {p99 * 1000:.1f} ms; "
        + "; ".join(f"{kind}: {percentiles(seconds)}" for kind, seconds in latencies.items())
    )
    # Generous: about 8 ms unflooded on a busy 2-core machine; 135-433 ms before the listener was bounded.
    assert p99 < 0.060
    assert listener.reconnects == 0
    assert tail.unreadable_payloads > 0  # the flood reached the listener


# --- a client's request id too long to index, over HTTP as the runtime role -----------------------


async def test_a_request_id_of_3000_characters_is_answered_resumed_and_its_session_lives_on(
    deployment: Deployment,
) -> None:
    request_id = "é-" * 1500  # 4,500 bytes of UTF-8: past the indexed 2 KB
    async with (
        deployment.store() as store,
        serve(build_app(store, asyncio.Event())) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as http,
    ):
        client = McpClient(http)
        await client.initialize()
        answer = await post_raw(client, call_with_id(request_id))
        # Resumed from its first event: the store gives the SDK the stream's id in full.
        await answered_on_a_stream_that_resumes(client, answer, request_id)
        await still_answers(client)


# --- what error messages show of a DSN ---------------------------------------------------------

SECRET = "s3cr3t"

# Every form libpq accepts, with the password in it, and what redact() shows of it.
REDACTED = [
    ("postgresql://app:s3cr3t@db:5432/app", "postgresql://app:***@db:5432/app"),
    ("postgres://app:s3cr3t@db/app", "postgres://app:***@db/app"),
    ("postgresql+asyncpg://app:s3cr3t@db/app", "postgresql+asyncpg://app:***@db/app"),
    ("postgresql://:s3cr3t@db/app", "postgresql://:***@db/app"),
    ("postgresql://app:s3%40cr3t%2F@db/app", "postgresql://app:***@db/app"),  # percent-encoded
    ("postgresql://app:s3@cr/3t?x@db/app", "postgresql://app:***@db/app"),  # not percent-encoded
    (
        "postgresql://app:s3cr3t@db1:5432,db2:5433,[::1]:5434/app",
        "postgresql://app:***@db1:5432,db2:5433,[::1]:5434/app",
    ),
    ("postgresql://app@db/app?password=s3cr3t", "postgresql://app@db/app?password=***"),
    (
        "postgresql://db/app?sslmode=require&PassWord=s3cr3t&connect_timeout=5",
        "postgresql://db/app?sslmode=require&PassWord=***&connect_timeout=5",
    ),
    ("postgresql://db/app?pass%77ord=s3cr3t", "postgresql://db/app?pass%77ord=***"),
    ("postgresql://db/app?password=s3&cr3t", "postgresql://db/app?password=***&***"),
    ("postgresql://db/app?sslpassword=s3cr3t", "postgresql://db/app?sslpassword=***"),
    (
        "postgresql:///app?host=/var/run/postgresql&password=s3cr3t",
        "postgresql:///app?host=/var/run/postgresql&password=***",
    ),
    ("postgresql://app:s3cr3t@db/app#s", "postgresql://app:***@db/app#s"),
    ("host=db user=app password=s3cr3t dbname=app", "host=db user=app password=*** dbname=app"),
    ("host=db password = s3cr3t", "host=db password = ***"),
    ("host=db PASSWORD=s3cr3t", "host=db PASSWORD=***"),
    ("host=db password='s3 cr3t \\' x' dbname=app", "host=db password=*** dbname=app"),
    ("host=db password=s3\\ cr3t dbname=app", "host=db password=*** dbname=app"),
    ("host=db password='s3cr3t", "host=db password=***"),
    ("host=db sslpassword=s3cr3t", "host=db sslpassword=***"),
    # Nothing to hide: shown as they are.
    ("postgresql://app@db/app?sslmode=require", "postgresql://app@db/app?sslmode=require"),
    ("postgresql://db/app?options=-c%20a@b", "postgresql://db/app?options=-c%20a@b"),
    ("postgresql://app@db/app?password=s3@cr3t", "postgresql://app@db/app?password=***"),
    ("postgresql://app:s3?a=b@db/app", "postgresql://app:***@db/app"),
    ("host=db user=app", "host=db user=app"),
]


@pytest.mark.parametrize(("dsn", "shown"), REDACTED)
def test_redact_hides_the_password_of_every_dsn_form(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown


def with_password_and_no_database(server_dsn: str, form: str) -> str:
    """The test server's DSN, to a database that does not exist, with SECRET in it the ``form`` way."""
    parts = urlsplit(server_dsn)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or "postgres"
    missing = parts._replace(path="/mcp_events_no_such_database")
    if form == "userinfo":
        return urlunsplit(missing._replace(netloc=f"{user}:{SECRET}@{host}"))
    if form == "query":
        query = "&".join(filter(None, [parts.query, f"password={SECRET}"]))
        return urlunsplit(missing._replace(netloc=f"{user}@{host}", query=query))
    host = parts.hostname or "localhost"
    return f"host={host} user={user} password={SECRET} dbname=mcp_events_no_such_database"


@pytest.mark.parametrize("form", ["userinfo", "query", "key/value"])
async def test_a_failed_connect_never_shows_the_password(server_dsn: str, form: str) -> None:
    with pytest.raises(McpPgEventsError) as failed:
        await PostgresEventStore.connect(with_password_and_no_database(server_dsn, form))
    assert "mcp_events_no_such_database" in str(failed.value)
    assert SECRET not in str(failed.value)
