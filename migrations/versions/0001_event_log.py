"""Event log: sessions, streams, and events partitioned by sequence.

Revision ID: 0001
Revises:
Create Date: 2026-11-20
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Creates the partitions the sequence will need next. SECURITY DEFINER so that the
# runtime role (which has no DDL rights) can call it when an insert finds no
# partition; the tables it creates belong to the role that ran the migration.
#
# A partition is created as a plain table and then attached: CREATE TABLE ...
# PARTITION OF would lock out inserts into the parent while it runs, ATTACH only
# takes SHARE UPDATE EXCLUSIVE. Partitions are laid on a grid of the newest
# partition's width; when the sequence has jumped past the grid (setval), the next
# partition starts where the sequence is and the gap simply has no partition.
ENSURE_PARTITIONS = r"""
CREATE FUNCTION mcp_events_ensure_partitions(p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_top bigint;
    v_width bigint;
    v_last bigint;
    v_lower bigint;
    v_name text;
    v_created integer := 0;
BEGIN
    IF p_ahead < 1 THEN
        RAISE EXCEPTION 'p_ahead must be at least 1, got %', p_ahead;
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
        RAISE EXCEPTION 'partition width must be positive, got %', v_width;
    END IF;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO v_last FROM mcp_events_seq;
    v_top := coalesce(v_top, 1);
    v_lower := v_top;
    IF v_last + 1 > v_top + v_width THEN
        v_lower := v_last + 1;
    END IF;

    WHILE v_lower <= v_last + p_ahead::bigint * v_width LOOP
        v_name := 'mcp_events_events_p' || v_lower;
        EXECUTE format('CREATE TABLE %I (LIKE mcp_events_events INCLUDING DEFAULTS)', v_name);
        EXECUTE format(
            'ALTER TABLE mcp_events_events ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
            v_name, v_lower, v_lower + v_width
        );
        v_created := v_created + 1;
        v_lower := v_lower + v_width;
    END LOOP;
    RETURN v_created;
END
$$
"""


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("mcp_events_seq")))
    op.create_table(
        "mcp_events_sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="mcp_events_sessions_pkey"),
        sa.UniqueConstraint("key", name="mcp_events_sessions_key_key"),
    )
    op.create_table(
        "mcp_events_streams",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.LargeBinary(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["mcp_events_sessions.id"],
            name="mcp_events_streams_session_id_fkey",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="mcp_events_streams_pkey"),
        sa.UniqueConstraint("session_id", "name", name="mcp_events_streams_session_id_name_key"),
    )
    op.create_table(
        "mcp_events_events",
        sa.Column("stream_key", sa.BigInteger(), nullable=False),
        sa.Column(
            "seq",
            sa.BigInteger(),
            server_default=sa.text("nextval('mcp_events_seq'::regclass)"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("message", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["stream_key"],
            ["mcp_events_streams.id"],
            name="mcp_events_events_stream_key_fkey",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("stream_key", "seq", name="mcp_events_events_pkey"),
        postgresql_partition_by="RANGE (seq)",
    )
    op.execute("ALTER SEQUENCE mcp_events_seq OWNED BY mcp_events_events.seq")
    op.execute(ENSURE_PARTITIONS)
    op.execute("SELECT mcp_events_ensure_partitions()")


def downgrade() -> None:
    op.execute("DROP FUNCTION mcp_events_ensure_partitions(integer, bigint)")
    # Dropping the parent drops every partition and the sequence it owns.
    op.drop_table("mcp_events_events")
    op.drop_table("mcp_events_streams")
    op.drop_table("mcp_events_sessions")
