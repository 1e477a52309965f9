"""The event log at alembic revision 0007: events, sessions, retention, tasks.

A later release that adds an alembic revision adds a Django migration here that
applies it (a test checks that the last one reaches the code's revision).
"""

from typing import Any, ClassVar

from django.db import migrations

from mcp_pg_events.django.operations import apply_schema


class Migration(migrations.Migration):  # type: ignore[misc]  # Django has no types
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[Any]] = [apply_schema("0007", None)]
