"""JSON-RPC messages built the way the installed SDK major builds them."""

from __future__ import annotations

from typing import Any

try:
    import mcp_types

    MCP_MAJOR = 2
except ImportError:
    MCP_MAJOR = 1


def _wrap(model: Any) -> Any:
    if MCP_MAJOR == 1:
        from mcp.types import JSONRPCMessage

        return JSONRPCMessage(model)
    return model


def notification(method: str, params: dict[str, Any] | None = None) -> Any:
    if MCP_MAJOR == 2:
        return mcp_types.JSONRPCNotification(jsonrpc="2.0", method=method, params=params)
    from mcp.types import JSONRPCNotification

    return _wrap(JSONRPCNotification(jsonrpc="2.0", method=method, params=params))


def response(request_id: int | str, result: dict[str, Any]) -> Any:
    if MCP_MAJOR == 2:
        return mcp_types.JSONRPCResponse(jsonrpc="2.0", id=request_id, result=result)
    from mcp.types import JSONRPCResponse

    return _wrap(JSONRPCResponse(jsonrpc="2.0", id=request_id, result=result))


def request(request_id: int | str, method: str, params: dict[str, Any] | None = None) -> Any:
    if MCP_MAJOR == 2:
        return mcp_types.JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=params)
    from mcp.types import JSONRPCRequest

    return _wrap(JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=params))


def error(request_id: int | str, code: int, message: str) -> Any:
    if MCP_MAJOR == 2:
        return mcp_types.JSONRPCError(
            jsonrpc="2.0", id=request_id, error=mcp_types.ErrorData(code=code, message=message)
        )
    from mcp.types import ErrorData, JSONRPCError

    return _wrap(JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=code, message=message)))


def model_of(message: Any) -> Any:
    """The JSON-RPC model of ``message`` (None stays None): mcp 1.x wraps it in a root model."""
    return message.root if MCP_MAJOR == 1 and message is not None else message


def params_of(event: Any) -> Any:
    """The params of a stored event's message; None for a priming event or a response."""
    return getattr(model_of(event.message), "params", None)


def progress_message(progress: int, **extra: Any) -> Any:
    """A ``notifications/progress`` notification, with ``extra`` params besides ``progress``."""
    return notification("notifications/progress", {"progress": progress, **extra})
