"""The exceptions this library raises on purpose, each with a message a user can act on."""


class McpPgEventsError(Exception):
    """Base class of every error raised by mcp-pg-events."""


class ConfigurationError(McpPgEventsError):
    """A setting is missing or invalid (no DSN, a bad option value)."""


class SchemaNotReadyError(McpPgEventsError):
    """The database has not been migrated to the schema this version of the code needs."""


_UNSCOPED = (
    "this store is shared by every session of a server and is not itself an EventStore: the SDK "
    "reuses stream ids across sessions, so one store for all of them would replay one session's "
    "events to another. Let the session manager give each MCP session its own view: "
    "serve the app with_postgres(server) returns, which does it all, or call "
    "scope_sessions(server.session_manager) after server.streamable_http_app(event_store=store), or use "
    "PostgresSessionManager(app, event_store=store). A view, store.session(key), is ONE MCP session's "
    "(key: its mcp-session-id): never hand one view to a whole server, every session would share it."
)


class UnscopedEventStoreError(McpPgEventsError):
    """The root store was used as an EventStore without being scoped to one session.

    Its default message says why that is refused and which wiring scopes each session.
    """

    def __init__(self, message: str = _UNSCOPED) -> None:
        super().__init__(message)


class StoreUnavailableError(McpPgEventsError):
    """The database stayed unreachable for longer than the store's retry deadline."""


class StreamIdTooLongError(McpPgEventsError, ValueError):
    """A stream id is longer than the store indexes."""
