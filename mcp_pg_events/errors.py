"""The exceptions this library raises on purpose, each with a message a user can act on."""


class McpPgEventsError(Exception):
    """Base class of every error raised by mcp-pg-events."""


class ConfigurationError(McpPgEventsError):
    """A setting is missing or invalid (no DSN, a bad option value)."""


class SchemaNotReadyError(McpPgEventsError):
    """The database has not been migrated to the schema this version of the code needs."""


class UnscopedEventStoreError(McpPgEventsError):
    """The root store was used as an EventStore without being scoped to one session."""


class StoreUnavailableError(McpPgEventsError):
    """The database stayed unreachable for longer than the store's retry deadline."""


class StreamIdTooLongError(McpPgEventsError, ValueError):
    """A stream id is longer than the store indexes."""
