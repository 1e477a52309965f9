"""Write migrations/schema.sql from a database the migrations built.

    mcp-pg-events migrate --dsn postgresql://.../scratch
    python migrations/dump_schema.py postgresql://.../scratch > migrations/schema.sql

schema.sql is the schema at the newest revision in one file to read (retention,
partitions, the functions' exact text); the migrations stay what installs it.
tests/test_schema_sql.py builds one database from each and compares them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from mcp_pg_events.database import SCHEMA_REVISION

HEADER = """\
-- The mcp-pg-events schema at revision {revision}, as the migrations leave it.
--
-- For reading: how retention, partitions and the functions the roles may call
-- really work. Install with `mcp-pg-events migrate` (alembic), not from here;
-- a database built from this file is the same (tests/test_schema_sql.py) and is
-- marked as being at revision {revision}. Regenerate: migrations/dump_schema.py.
"""


def clean(dump: str, revision: str) -> str:
    lines = []
    for line in dump.splitlines():
        # psql meta-commands and the server versions are not schema.
        if line.startswith(("\\restrict", "\\unrestrict", "-- Dumped ", "-- PostgreSQL database dump")):
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"; Schema: public; Owner: -", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("-\n ")
    # The revision is the package's own constant, not input.
    marker = f"INSERT INTO public.mcp_events_alembic_version (version_num) VALUES ('{revision}');"  # noqa: S608
    return HEADER.format(revision=revision) + "\n" + text + "\n\n" + marker + "\n"


def main(dsn: str) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        sys.exit("pg_dump is not on PATH")
    dump = subprocess.run(  # noqa: S603  # an argument list, no shell; the DSN is the operator's own
        [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "--dbname", dsn],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    sys.stdout.write(clean(dump, SCHEMA_REVISION))


if __name__ == "__main__":
    main(sys.argv[1])
