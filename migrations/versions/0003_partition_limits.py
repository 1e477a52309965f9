"""Partition maintenance: the width and large counts ahead become the owner's alone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

``mcp_events_ensure_partitions(p_ahead, p_width)`` runs as the owner (SECURITY
DEFINER) so that roles without DDL rights can keep partitions ready. Until now any
role allowed to call it could also pass any width or any count: a million
partitions of width 1, say. The function keeps its name and signature, so
callers and grants need no change, but it is now a check in front of the old
body (renamed ``mcp_events_create_partitions``, which only the owner may call):
others may create at most 100 partitions ahead, at the current width.

Whoever could execute the old function may execute the new one; the renamed body
keeps no grants. grants.sql then takes EXECUTE away from PUBLIC.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GUARD = """
CREATE FUNCTION mcp_events_ensure_partitions(p_ahead integer DEFAULT 2, p_width bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
BEGIN
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

# Moves every EXECUTE grant (PUBLIC's too) from one function to the other.
MOVE_GRANTS = """
DO $$
DECLARE
    v_grantee text;
BEGIN
    FOR v_grantee IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
        FROM pg_proc p
        CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE p.oid = '{source}(integer, bigint)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {target}(integer, bigint) TO %s', v_grantee);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION {source}(integer, bigint) FROM %s', v_grantee);
    END LOOP;
END
$$
"""


RENAME = "ALTER FUNCTION {source}(integer, bigint) RENAME TO {target}"


OLD, NEW = "mcp_events_ensure_partitions", "mcp_events_create_partitions"


def upgrade() -> None:
    op.execute(RENAME.format(source=OLD, target=NEW))
    op.execute(GUARD)
    op.execute(f"REVOKE EXECUTE ON FUNCTION {OLD}(integer, bigint) FROM PUBLIC")
    op.execute(MOVE_GRANTS.format(source=NEW, target=OLD))


def downgrade() -> None:
    op.execute(MOVE_GRANTS.format(source=OLD, target=NEW))
    op.execute(f"DROP FUNCTION {OLD}(integer, bigint)")
    op.execute(RENAME.format(source=NEW, target=OLD))
