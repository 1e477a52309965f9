"""Schema compatibility: the oldest code revision this schema still serves, for rolling deploys.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A store checks the schema when it connects. Until now it wanted exactly its own
revision, so during a rolling deploy the pods of the previous release refused to
start as soon as the next release had migrated. From here on migrations are
expand/contract: a revision that only adds keeps serving older code, and says so
in ``mcp_events_compatible_since()``, which a store older than the database
reads; a revision that removes or changes what older code uses raises it.

Additive: one function, no lock on any table.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Code written for revision 0003 or later runs on this schema: nothing it uses is gone.
COMPATIBLE_SINCE = """
CREATE OR REPLACE FUNCTION mcp_events_compatible_since()
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$ SELECT '0003'::text $$
"""

# Pinned like every function of ours (see 0004): the tables' schema, pg_temp last.
PIN = """
DO $pin$
DECLARE
    v_schema name := (
        SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'mcp_events_events'::regclass
    );
BEGIN
    EXECUTE format(
        'ALTER FUNCTION %I.mcp_events_compatible_since() SET search_path = pg_catalog, %I, pg_temp',
        v_schema, v_schema
    );
END
$pin$
"""


def upgrade() -> None:
    op.execute(COMPATIBLE_SINCE)
    op.execute(PIN)
    # As every mcp_events_ routine: only the roles grants.sql names may call it.
    op.execute("REVOKE ALL ON FUNCTION mcp_events_compatible_since() FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP FUNCTION mcp_events_compatible_since()")
