"""The app's configuration: label ``mcp_pg_events``."""

from __future__ import annotations

from django.apps import AppConfig


class McpPgEventsConfig(AppConfig):  # type: ignore[misc]  # Django has no types
    name = "mcp_pg_events.django"
    label = "mcp_pg_events"
    verbose_name = "mcp-pg-events"
