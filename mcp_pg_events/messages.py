"""JSON-RPC messages to bytes and back, on mcp 1.x and 2.x alike (their types: ``compat.py``).

Both majors dump with ``exclude_unset`` so that what comes back compares equal
to what was stored, explicit ``None`` values and extra fields included.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from mcp.server.streamable_http import EventMessage
from pydantic import ValidationError

from .compat import ROOT_MODEL, JSONRPCError, JSONRPCResponse, validate_json, validate_page, validate_python

if TYPE_CHECKING:
    from mcp.server.streamable_http import EventId


def _too_deep(exc: ValidationError) -> bool:
    # pydantic's JSON parser gives up at 200 levels of nesting, its serializer only
    # at about 255: a message in between is stored, and must not be lost on replay.
    # Python's own parser reads it (its limit is far deeper); it runs only then.
    return all(error["type"] == "json_invalid" for error in exc.errors())


def load_message(data: bytes) -> Any:
    """The message stored as ``data``."""
    try:
        return validate_json(data)
    except ValidationError as exc:
        if not _too_deep(exc):
            raise
        return validate_python(json.loads(data))


def load_messages(datas: list[bytes]) -> list[Any]:
    """The messages stored as ``datas``, in order: each validated, as ``load_message`` does."""
    if len(datas) < 2:
        return [load_message(data) for data in datas]
    try:
        return validate_page(datas)
    except ValidationError:
        # One message too deep for the page (the array is a level more): each on its own.
        return [load_message(data) for data in datas]


def answered_request(message: Any) -> str | None:
    """The id (as text, as the SDK names a request's stream) of the request a response or error answers.

    None for any other message. Checked on every event a live subscription
    delivers, so by type: ``hasattr`` on a pydantic model costs an exception.
    """
    model: Any = message
    if ROOT_MODEL is not None and isinstance(message, ROOT_MODEL):
        model = cast(Any, message).root  # mcp 1.x wraps every message
    if isinstance(model, (JSONRPCResponse, JSONRPCError)):
        return str(model.id)
    return None


def dump_message(message: Any) -> bytes:
    """``message`` as UTF-8 JSON bytes, exactly as it was set."""
    data: str = message.model_dump_json(by_alias=True, exclude_unset=True)
    return data.encode()


def event_message(data: bytes, event_id: EventId) -> EventMessage:
    """The ``EventMessage`` the SDK's replay callback takes."""
    return EventMessage(load_message(data), event_id)
