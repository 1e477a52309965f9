"""mcp-pg-events: a PostgreSQL event log that makes MCP Streamable HTTP streams resumable."""

from .errors import (
    ConfigurationError,
    McpPgEventsError,
    SchemaNotReadyError,
    StoreUnavailableError,
    StreamIdTooLongError,
    UnscopedEventStoreError,
)
from .integration import PostgresSessionManager, SessionScopedStore, scope_sessions
from .store import PostgresEventStore, SessionEventStore

__all__ = [
    "ConfigurationError",
    "McpPgEventsError",
    "PostgresEventStore",
    "PostgresSessionManager",
    "SchemaNotReadyError",
    "SessionEventStore",
    "SessionScopedStore",
    "StoreUnavailableError",
    "StreamIdTooLongError",
    "UnscopedEventStoreError",
    "scope_sessions",
]
