"""mcp-pg-events: a PostgreSQL event log that makes MCP Streamable HTTP streams resumable."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigurationError,
    McpPgEventsError,
    SchemaNotReadyError,
    StoreUnavailableError,
    StreamIdTooLongError,
    UnscopedEventStoreError,
)
from .settings import RetentionSettings, StoreSettings

if TYPE_CHECKING:
    from .bus import PostgresSubscriptionBus
    from .database import keep_session_state
    from .integration import PostgresSessionManager, SessionScopedStore, scope_sessions
    from .live import Subscription
    from .retention import RetentionReport, end_session, run_retention
    from .store import PostgresEventStore, SessionEventStore
    from .wiring import with_postgres

# Importing the MCP SDK takes seconds; the CLI and alembic need none of it, so the
# names that pull it in are imported on first use.
_LAZY = {
    "PostgresEventStore": "store",
    "SessionEventStore": "store",
    "keep_session_state": "database",
    "Subscription": "live",
    "PostgresSubscriptionBus": "bus",
    "with_postgres": "wiring",
    "PostgresSessionManager": "integration",
    "SessionScopedStore": "integration",
    "scope_sessions": "integration",
    "RetentionReport": "retention",
    "end_session": "retention",
    "run_retention": "retention",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "ConfigurationError",
    "McpPgEventsError",
    "PostgresEventStore",
    "PostgresSessionManager",
    "PostgresSubscriptionBus",
    "RetentionReport",
    "RetentionSettings",
    "SchemaNotReadyError",
    "SessionEventStore",
    "SessionScopedStore",
    "StoreSettings",
    "StoreUnavailableError",
    "StreamIdTooLongError",
    "Subscription",
    "UnscopedEventStoreError",
    "end_session",
    "keep_session_state",
    "run_retention",
    "scope_sessions",
    "with_postgres",
]
