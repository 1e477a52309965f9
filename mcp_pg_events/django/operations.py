"""The migration operation that applies the bundled alembic revisions with Django's connection."""

from __future__ import annotations

from typing import Any

from django.db import migrations

from .. import migrate, sql


def _revision(cursor: Any) -> str | None:
    cursor.execute(sql.HAS_SCHEMA_VERSION)
    if not cursor.fetchone()[0]:
        return None
    cursor.execute(sql.SCHEMA_VERSION)
    row = cursor.fetchone()
    return None if row is None else str(row[0])


def _bring(schema_editor: Any, target: str | None, *, up: bool) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return  # a database of the project that is not PostgreSQL holds no event log
    with connection.cursor() as cursor:
        current = _revision(cursor)
        # Forwards never go down (the CLI may have gone further); backwards never up.
        if up and current is not None and (target is None or int(current) >= int(target)):
            return
        if not up and (current is None or (target is not None and int(current) <= int(target))):
            return
        text = migrate.script(current, target)
        if text.strip():
            # One script, no parameters: the driver sends it as it is.
            cursor.execute(text)


def apply_schema(target: str, previous: str | None) -> migrations.RunPython:
    """Bring the schema to alembic revision ``target``; reversed, to ``previous`` (None: remove it)."""

    def forwards(apps: Any, schema_editor: Any) -> None:
        _bring(schema_editor, target, up=True)

    def backwards(apps: Any, schema_editor: Any) -> None:
        _bring(schema_editor, previous, up=False)

    return migrations.RunPython(forwards, backwards)
