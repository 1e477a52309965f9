"""Security: every function runs with a fixed search_path; arguments cannot widen a job; long stream ids.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

Until now every function was created with ``SET search_path FROM CURRENT``:
``"$user", public``, which leaves the caller's temporary schema (``pg_temp``)
implicitly searched FIRST for tables and types. A SECURITY DEFINER function
runs as the owner of the tables, so a caller with the TEMPORARY privilege could
make it use a temporary domain named ``text`` (whose CHECK runs any function,
as the owner) or a temporary table named ``mcp_events_seq`` or ``pg_class``
(fake sequence values, fake partitions). The helpers a definer function calls
(``mcp_events_next_seq``, ``mcp_events_partitions``, ...) run as the owner too,
so every function is pinned here, not only the definer ones:
``search_path = pg_catalog, <the tables' schema>, pg_temp``, the temporary
schema last, where it can only ever supply a name that exists nowhere else.
Functions are never looked up in ``pg_temp``.

With ``pg_catalog`` first, an unqualified ``CREATE TABLE`` would target
``pg_catalog``: the DDL the functions run names its schema, and acts on the
table it checked (its oid), not on a name looked up again.

No argument may make a definer function act outside its job:
- ``mcp_events_detach_oldest``: the cutoff is never later than ``now()`` and
  may not be NULL (NULL made every partition look expired); the partition the
  sequence writes into is never detached, as the sequence itself (no longer a
  caller's temporary table) says;
- ``mcp_events_ensure_partitions`` / ``mcp_events_create_partitions`` and
  ``mcp_events_roll_over``: NULL or negative counts and ages are refused;
- ``mcp_events_partitions`` lists as detached only tables of the owner of
  ``mcp_events_events``, so ``mcp_events_release_detached`` and
  ``mcp_events_drop_detached`` act on nothing else, whoever may create tables
  in the schema.

The procedure ``mcp_events_retention`` is left as it is: a procedure with a SET
clause may not COMMIT, and it is not SECURITY DEFINER, so it runs with its
caller's rights and search_path and can only do what the caller could do
anyway; everything it calls is pinned here.

Also adds ``mcp_events_streams.full_name``: a stream id longer than the store
indexes (a JSON-RPC request id is the client's choice) is kept there in full,
its ``name`` then holding ``0xFF`` and its SHA-256 (``0xFF`` never occurs in
UTF-8, so that cannot equal a real name). Nullable, no default: adding it is a
change of the catalog only, and the previous release keeps working beside it.

The upgrade takes milliseconds, but its ALTER TABLE needs a moment's exclusive
lock on ``mcp_events_streams``: it waits for transactions that use that table,
and new sessions' first appends wait behind it. Re-apply ``grants.sql`` after it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0001's body behind 0003's check. A NULL count is refused (it created nothing,
# silently); the new partitions are named with their schema.
CREATE_PARTITIONS = r"""
CREATE OR REPLACE FUNCTION mcp_events_create_partitions(
    p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    -- Named in the DDL below, quoted when it must be: pg_catalog comes first in the search_path.
    v_schema CONSTANT text := (
        SELECT c.relnamespace::regnamespace::text FROM pg_class c WHERE c.oid = 'mcp_events_events'::regclass
    );
    v_top bigint;
    v_width bigint;
    v_last bigint;
    v_lower bigint;
    v_name text;
    v_created integer := 0;
BEGIN
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One maintainer at a time; the others find the work done when they get the lock.
    PERFORM pg_advisory_xact_lock(hashtext('mcp_events_partitions'));

    SELECT b.upper, b.upper - b.lower INTO v_top, v_width
    FROM (
        SELECT m[1]::bigint AS lower, m[2]::bigint AS upper
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        CROSS JOIN LATERAL regexp_match(
            pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\) TO \(''?(-?\d+)''?\)'
        ) AS m
        WHERE i.inhparent = 'mcp_events_events'::regclass
    ) b
    ORDER BY b.upper DESC
    LIMIT 1;

    v_width := coalesce(p_width, v_width, 1000000);
    IF v_width < 1 THEN
        RAISE EXCEPTION 'partition width must be positive, got %', v_width
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO v_last FROM mcp_events_seq;
    v_top := coalesce(v_top, 1);
    v_lower := v_top;
    IF v_last + 1 > v_top + v_width THEN
        v_lower := v_last + 1;
    END IF;

    WHILE v_lower <= v_last + p_ahead::bigint * v_width LOOP
        v_name := 'mcp_events_events_p' || v_lower;
        EXECUTE format(
            'CREATE TABLE %s.%I (LIKE %s.mcp_events_events INCLUDING DEFAULTS)', v_schema, v_name, v_schema
        );
        EXECUTE format(
            'ALTER TABLE %s.mcp_events_events ATTACH PARTITION %s.%I FOR VALUES FROM (%s) TO (%s)',
            v_schema, v_schema, v_name, v_lower, v_lower + v_width
        );
        v_created := v_created + 1;
        v_lower := v_lower + v_width;
    END LOOP;
    RETURN v_created;
END
$$
"""

# 0003's check, which also refuses a NULL count (the check let it through).
ENSURE_PARTITIONS = """
CREATE OR REPLACE FUNCTION mcp_events_ensure_partitions(
    p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL
)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- session_user: the role that logged in, whatever this function runs as.
    IF (p_width IS NOT NULL OR p_ahead > 100) AND NOT pg_has_role(
        session_user, (SELECT relowner FROM pg_class WHERE oid = 'mcp_events_events'::regclass), 'MEMBER'
    ) THEN
        RAISE EXCEPTION 'only the owner of mcp_events_events may set the partition width '
            'or create more than 100 partitions ahead'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN mcp_events_create_partitions(p_ahead, p_width);
END
$$
"""

# 0002's, but a table counts as a detached partition only when the owner of the
# events table owns it: a role allowed to create tables in the schema (PUBLIC
# may in schema public before PostgreSQL 15) cannot have retention act on its own.
PARTITIONS = r"""
CREATE OR REPLACE FUNCTION mcp_events_partitions()
RETURNS TABLE (relid regclass, name text, lower bigint, upper bigint, attached boolean)
LANGUAGE sql
STABLE
AS $$
    SELECT c.oid::regclass, c.relname::text, b[1]::bigint, b[2]::bigint, true
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(
        pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\) TO \(''?(-?\d+)''?\)'
    ) AS b
    WHERE i.inhparent = 'mcp_events_events'::regclass
    UNION ALL
    SELECT c.oid::regclass, c.relname::text, substr(c.relname, 20)::bigint, NULL, false
    FROM pg_class c
    JOIN pg_class parent ON parent.oid = 'mcp_events_events'::regclass
    WHERE c.relnamespace = parent.relnamespace
      AND c.relowner = parent.relowner
      AND c.relkind = 'r'
      AND NOT c.relispartition
      AND c.relname ~ '^mcp_events_events_p\d+$'
    ORDER BY 3
$$
"""

# 0002's, with the cutoff checked: NULL refused, never later than now(). The
# partition the sequence writes into is never detached: partition_expired wants
# the partition wholly below the sequence's next value.
DETACH_OLDEST = """
CREATE OR REPLACE FUNCTION mcp_events_detach_oldest(p_cutoff timestamptz, p_lock_timeout interval)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    -- Named in the DDL below, quoted when it must be: pg_catalog comes first in the search_path.
    v_schema CONSTANT text := (
        SELECT c.relnamespace::regnamespace::text FROM pg_class c WHERE c.oid = 'mcp_events_events'::regclass
    );
    v_cutoff timestamptz;
    v_relid regclass;
    v_name text;
    v_lower bigint;
    v_upper bigint;
BEGIN
    IF p_cutoff IS NULL THEN
        RAISE EXCEPTION 'p_cutoff must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := least(p_cutoff, now());
    SELECT p.relid, p.name, p.lower, p.upper INTO v_relid, v_name, v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached ORDER BY p.lower LIMIT 1;
    IF v_name IS NULL
        OR NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), v_cutoff) THEN
        RETURN NULL;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    LOCK TABLE mcp_events_streams IN SHARE ROW EXCLUSIVE MODE;
    LOCK TABLE ONLY mcp_events_events IN ACCESS EXCLUSIVE MODE;
    IF NOT mcp_events_partition_expired(v_lower, v_upper, mcp_events_next_seq(), v_cutoff) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('ALTER TABLE %s.mcp_events_events DETACH PARTITION %s', v_schema, v_relid);
    RETURN v_name;
END
$$
"""

# 0002's, acting on the table it found (by oid), not on the name looked up again.
RELEASE_DETACHED = """
CREATE OR REPLACE FUNCTION mcp_events_release_detached(p_name text, p_lock_timeout interval)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_relid regclass;
    v_constraint text;
BEGIN
    SELECT p.relid INTO v_relid FROM mcp_events_partitions() p WHERE NOT p.attached AND p.name = p_name;
    IF v_relid IS NULL THEN
        RETURN;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    FOR v_constraint IN SELECT conname FROM pg_constraint WHERE conrelid = v_relid AND contype = 'f' LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_relid, v_constraint);
    END LOOP;
END
$$
"""

# Likewise.
DROP_DETACHED = """
CREATE OR REPLACE FUNCTION mcp_events_drop_detached(p_name text, p_lock_timeout interval)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_relid regclass;
    v_bytes bigint;
BEGIN
    SELECT p.relid INTO v_relid FROM mcp_events_partitions() p WHERE NOT p.attached AND p.name = p_name;
    IF v_relid IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    v_bytes := pg_total_relation_size(v_relid);
    EXECUTE format('DROP TABLE %s', v_relid);
    RETURN v_bytes;
END
$$
"""

# 0002's, refusing what no run passes: a NULL or negative age (every partition
# in use would roll over at each call) and a NULL or negative count ahead.
ROLL_OVER = """
CREATE OR REPLACE FUNCTION mcp_events_roll_over(
    p_max_age interval, p_ahead integer, p_lock_timeout interval, p_dry_run boolean DEFAULT false
)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    v_next bigint := mcp_events_next_seq();
    v_lower bigint;
    v_upper bigint;
BEGIN
    IF p_max_age IS NULL OR p_max_age < interval '0' THEN
        RAISE EXCEPTION 'p_max_age must be 0 or more, got %', p_max_age
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ahead IS NULL OR p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.lower, p.upper INTO v_lower, v_upper
    FROM mcp_events_partitions() p WHERE p.attached AND p.lower <= v_next AND v_next < p.upper;
    IF v_upper IS NULL OR NOT EXISTS (
        SELECT FROM mcp_events_events
        WHERE seq >= v_lower AND seq < v_upper AND created_at < now() - p_max_age
    ) THEN
        RETURN NULL;
    END IF;
    IF p_dry_run THEN
        RETURN v_upper;
    END IF;
    PERFORM mcp_events_ensure_partitions(p_ahead + 1);
    PERFORM mcp_events_set_lock_timeout(p_lock_timeout);
    ALTER SEQUENCE mcp_events_seq OWNED BY mcp_events_events.seq;
    IF mcp_events_next_seq() >= v_upper THEN
        RETURN NULL;
    END IF;
    PERFORM setval('mcp_events_seq', v_upper, false);
    RETURN v_upper;
END
$$
"""

# Bodies replaced above, each with the 0002/0003 definition a downgrade restores.
_REPLACED = [
    ("mcp_events_create_partitions", CREATE_PARTITIONS),
    ("mcp_events_ensure_partitions", ENSURE_PARTITIONS),
    ("mcp_events_partitions", PARTITIONS),
    ("mcp_events_detach_oldest", DETACH_OLDEST),
    ("mcp_events_release_detached", RELEASE_DETACHED),
    ("mcp_events_drop_detached", DROP_DETACHED),
    ("mcp_events_roll_over", ROLL_OVER),
]

# Every function of 0001-0003, by signature: all are pinned.
FUNCTIONS = [
    "mcp_events_create_partitions(integer, bigint)",
    "mcp_events_ensure_partitions(integer, bigint)",
    "mcp_events_partitions()",
    "mcp_events_next_seq()",
    "mcp_events_partition_expired(bigint, bigint, bigint, timestamptz)",
    "mcp_events_set_lock_timeout(interval)",
    "mcp_events_summarize()",
    "mcp_events_detach_oldest(timestamptz, interval)",
    "mcp_events_release_detached(text, interval)",
    "mcp_events_drop_detached(text, interval)",
    "mcp_events_roll_over(interval, integer, interval, boolean)",
    "mcp_events_retention_plan(timestamptz, timestamptz, interval)",
]

# The schema is the one the events table lives in, read at migration time and
# quoted by format(): the migration works in any schema, named anyhow.
PIN = """
DO $pin$
DECLARE
    v_schema name := (
        SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'mcp_events_events'::regclass
    );
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[{functions}] LOOP
        EXECUTE format(
            'ALTER FUNCTION %I.%s SET search_path = pg_catalog, %I, pg_temp', v_schema, v_function, v_schema
        );
    END LOOP;
END
$pin$
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _released(filename: str) -> ModuleType:
    """A released migration of this folder, for the definitions a downgrade restores (never edited)."""
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"mcp_pg_events_migration_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.add_column("mcp_events_streams", sa.Column("full_name", sa.LargeBinary(), nullable=True))
    for _, ddl in _REPLACED:
        op.execute(ddl)
    op.execute(PIN.format(functions=", ".join(map(_quote, FUNCTIONS))))


def downgrade() -> None:
    # Streams whose id is too long for 0003's index: the previous release could
    # neither have stored them nor read them back.
    op.execute("DELETE FROM mcp_events_streams WHERE full_name IS NOT NULL")
    op.drop_column("mcp_events_streams", "full_name")
    retention = _released("0002_retention.py")
    partition_limits = _released("0003_partition_limits.py")
    event_log = _released("0001_event_log.py")
    definitions = [
        # 0001's function, renamed by 0003.
        event_log.ENSURE_PARTITIONS.replace(
            "CREATE FUNCTION mcp_events_ensure_partitions", "CREATE FUNCTION mcp_events_create_partitions"
        ),
        partition_limits.GUARD,
        *(ddl for _, ddl in retention._ROUTINES),
    ]
    for ddl in definitions:
        # Each with its SET search_path FROM CURRENT, as then.
        op.execute(ddl.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
