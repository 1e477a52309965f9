"""migrations/schema.sql, the schema to read, is the schema the migrations build."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from mcp_pg_events import migrate
from mcp_pg_events.database import SCHEMA_REVISION

from .conftest import _database

SCHEMA_SQL = Path(__file__).resolve().parent.parent / "migrations" / "schema.sql"

# Everything of ours the catalog can tell apart, in a form that does not depend on
# object ids or on the order objects were created in.
CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind, c.relpersistence, c.reloptions,
               pg_get_expr(c.relpartbound, c.oid) AS bound,
               CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
               obj_description(c.oid, 'pg_class') AS comment
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE 'mcp\\_events\\_%'
        ORDER BY c.relname
    """,
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid) AS default,
               a.attcollation::regcollation::text AS collation,
               col_description(c.oid, a.attnum) AS comment
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE 'mcp\\_events\\_%'
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
    """,
    "constraints": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) AS definition
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE 'mcp\\_events\\_%'
        ORDER BY c.relname, k.conname
    """,
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename LIKE 'mcp\\_events\\_%'
        ORDER BY indexname
    """,
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by, min_value, max_value,
               cycle, cache_size
        FROM pg_sequences WHERE schemaname = 'public' AND sequencename LIKE 'mcp\\_events\\_%'
        ORDER BY sequencename
    """,
    "routines": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
               pg_get_functiondef(p.oid) AS definition, obj_description(p.oid, 'pg_proc') AS comment
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'mcp\\_events\\_%'
        ORDER BY p.proname, arguments
    """,
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) AS definition
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace
        ORDER BY c.relname, t.tgname
    """,
    "revision": "SELECT version_num FROM mcp_events_alembic_version",
}


async def catalog(dsn: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {name: [dict(row) for row in await conn.fetch(query)] for name, query in CATALOG.items()}
    finally:
        await conn.close()


def differences(migrated: list[dict[str, Any]], from_file: list[dict[str, Any]]) -> list[str]:
    only_migrated = [row for row in migrated if row not in from_file]
    only_file = [row for row in from_file if row not in migrated]
    return [f"migrations only: {row}" for row in only_migrated] + [
        f"schema.sql only: {row}" for row in only_file
    ]


async def test_a_database_built_from_schema_sql_is_the_one_the_migrations_build(server_dsn: str) -> None:
    async with _database(server_dsn, None) as migrated_dsn, _database(server_dsn, None) as file_dsn:
        await asyncio.to_thread(migrate.upgrade, migrated_dsn)
        conn = await asyncpg.connect(file_dsn)
        try:
            await conn.execute(SCHEMA_SQL.read_text())
        finally:
            await conn.close()

        migrated, from_file = await catalog(migrated_dsn), await catalog(file_dsn)

    assert migrated["revision"] == [{"version_num": SCHEMA_REVISION}], "the migrations' head moved"
    assert migrated["routines"], "the catalog queries found nothing: the comparison would prove nothing"
    for part in CATALOG:
        assert migrated[part] == from_file[part], (
            f"migrations/schema.sql is out of date ({part}); regenerate it with migrations/dump_schema.py:\n"
            + "\n".join(differences(migrated[part], from_file[part]))
        )
