"""Everything that differs between the MCP SDK's majors, and every assumption about its internals.

No other module of the package imports an SDK name that differs between 1.x and
2.x, or relies on an SDK detail that is not its documented API. Each assumption
below is named in a comment (``ASSUMES: ...``) and pinned by a test in
``tests/test_compat.py`` of the same name, which fails loudly when an SDK release
breaks it.
"""

from __future__ import annotations

from typing import Any

from mcp.server.streamable_http import GET_STREAM_KEY, MCP_SESSION_ID_HEADER, EventStore

try:  # mcp 2.x: plain message types in mcp_types, one TypeAdapter for the union
    from mcp.server.mcpserver import Context  # type: ignore[import-not-found, unused-ignore]
    from mcp.server.mcpserver import MCPServer as Server  # type: ignore[import-not-found, unused-ignore]
    from mcp_types import (  # type: ignore[import-not-found, unused-ignore]
        JSONRPCError,  # type: ignore[import-not-found, unused-ignore]
        JSONRPCMessage,  # type: ignore[import-not-found, unused-ignore]
        JSONRPCResponse,  # type: ignore[import-not-found, unused-ignore]
    )
    from mcp_types import jsonrpc_message_adapter as _adapter  # type: ignore[import-not-found, unused-ignore]

    MCP_MAJOR = 2
    # 1.x wraps every message in a RootModel; 2.x does not.
    ROOT_MODEL: type | None = None

    def validate_json(data: bytes) -> Any:
        """The message whose JSON is ``data``."""
        return _adapter.validate_json(data)

    def validate_python(value: Any) -> Any:
        """The message whose parsed JSON is ``value``."""
        return _adapter.validate_python(value)

except ImportError:  # mcp 1.x: pydantic models in mcp.types, the message a RootModel
    from mcp.server.fastmcp import Context  # type: ignore[attr-defined, no-redef, unused-ignore]
    from mcp.server.fastmcp import FastMCP as Server  # type: ignore[attr-defined, no-redef, assignment, unused-ignore]
    from mcp.types import (
        JSONRPCError,  # type: ignore[assignment, unused-ignore]
        JSONRPCMessage,  # type: ignore[assignment, unused-ignore]
        JSONRPCResponse,  # type: ignore[assignment, unused-ignore]
    )

    MCP_MAJOR = 1
    ROOT_MODEL = JSONRPCMessage  # type: ignore[assignment, unused-ignore]

    def validate_json(data: bytes) -> Any:
        """The message whose JSON is ``data``."""
        return JSONRPCMessage.model_validate_json(data)  # type: ignore[attr-defined, unused-ignore]

    def validate_python(value: Any) -> Any:
        """The message whose parsed JSON is ``value``."""
        return JSONRPCMessage.model_validate(value)  # type: ignore[attr-defined, unused-ignore]


# ASSUMES: standalone_stream_id. The SDK files every message that belongs to no
# request (server notifications, server-to-client requests) under this stream id;
# such a stream never completes.
STANDALONE_STREAM: str = GET_STREAM_KEY

# ASSUMES: session_header. The session id travels in this header, both ways.
SESSION_HEADER: bytes = MCP_SESSION_ID_HEADER.encode()


def new_server(name: str, store: EventStore | None) -> Any:
    """An ``MCPServer`` (mcp 2.x) or a ``FastMCP`` (mcp 1.x, which takes the store up front)."""
    if MCP_MAJOR == 2:
        return Server(name)
    return Server(name, event_store=store)  # type: ignore[call-arg, unused-ignore]


def streamable_http_app(server: Any, store: EventStore | None) -> Any:
    """``server``'s Streamable HTTP app with ``store`` as its event store (scoping is the caller's)."""
    if MCP_MAJOR == 2:
        return server.streamable_http_app(event_store=store)
    return server.streamable_http_app()


def manager_entry(manager: Any) -> str:
    """The attribute through which requests reach a session manager.

    ASSUMES: manager_entry. Where the manager has a public ``asgi_app`` instance
    attribute (set in ``__init__``: mcp 2.x, and 1.x from 1.30), requests go
    through it (2.x mounts it, ``handle_request`` calls it); else (older 1.x) the
    app calls ``handle_request``.
    """
    return "asgi_app" if "asgi_app" in vars(manager) else "handle_request"


__all__ = [
    "MCP_MAJOR",
    "ROOT_MODEL",
    "SESSION_HEADER",
    "STANDALONE_STREAM",
    "Context",
    "JSONRPCError",
    "JSONRPCMessage",
    "JSONRPCResponse",
    "Server",
    "manager_entry",
    "new_server",
    "streamable_http_app",
    "validate_json",
    "validate_python",
]
