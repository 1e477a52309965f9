"""The MCP server of the test project: everything in PostgreSQL, tasks run by ``manage.py run_mcp_task``."""

from __future__ import annotations

import os
from typing import Any

from asgiref.sync import async_to_sync
from django_service_specs import SelectorKind
from rest_framework import serializers
from rest_framework_mcp import MCPServer
from rest_framework_mcp.constants import TaskPolicy

from mcp_pg_events.rest_framework import postgres_collaborators, under_asgi_request

from .auth import BearerNameBackend


class Anyone:
    """An MCP permission that lets every caller in (the tests' auth backend tells them apart)."""

    def has_permission(self, request: Any, token: Any) -> bool:
        return True

    def required_scopes(self) -> list[str]:
        return []


class ManualExecutor:
    """Queues nothing: the tests run ``manage.py run_mcp_task <id>`` when they choose."""

    def enqueue(self, task_id: str) -> None:
        pass


server = MCPServer(
    name="tests",
    auth_backend=BearerNameBackend(),
    task_executor=ManualExecutor(),
    **postgres_collaborators("tests"),
)
ANYONE = [Anyone()]


class TextIn(serializers.Serializer):  # type: ignore[misc]
    text = serializers.CharField()


class NothingIn(serializers.Serializer):  # type: ignore[misc]
    pass


class KeyIn(serializers.Serializer):  # type: ignore[misc]
    key = serializers.CharField()


class TaskIdIn(serializers.Serializer):  # type: ignore[misc]
    task_id = serializers.CharField()


class NoteOut(serializers.Serializer):  # type: ignore[misc]
    key = serializers.CharField()


@server.service_tool(
    name="push", input_serializer=TextIn, atomic=False, permissions=ANYONE,
    description="Push a notification with this text to the caller's GET stream.",
)  # fmt: skip
def push(*, data: dict[str, Any], request: Any) -> dict[str, Any]:
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": data["text"]},
    }
    delivered = async_to_sync(server.notify)(request.headers["Mcp-Session-Id"], message)
    return {"delivered": delivered, "pid": os.getpid()}


@server.service_tool(
    name="where", input_serializer=NothingIn, atomic=False, permissions=ANYONE,
    description="Which worker answers, and whether it knows it serves an ASGI request.",
)  # fmt: skip
def where(*, data: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid(), "asgi": under_asgi_request()}


@server.resource(
    uri_template="notes://{key}", name="note", kind=SelectorKind.RETRIEVE, output_serializer=NoteOut,
    permissions=ANYONE, description="A note.",
)  # fmt: skip
def note(*, key: str) -> dict[str, Any]:
    return {"key": key}


@server.service_tool(
    name="touch", input_serializer=KeyIn, invalidates=["notes://{key}"], permissions=ANYONE,
    description="Announce that a note changed.",
)  # fmt: skip
def touch(*, data: dict[str, Any]) -> dict[str, Any]:
    return {"key": data["key"]}


@server.service_tool(
    name="work", input_serializer=TextIn, atomic=True, task_policy=TaskPolicy.OPTIONAL, permissions=ANYONE,
    description="Echo the text, as a task if asked.",
)  # fmt: skip
def work(*, data: dict[str, Any]) -> dict[str, Any]:
    return {"echo": data["text"], "pid": os.getpid()}


@server.service_tool(
    name="discard_task", input_serializer=TaskIdIn, atomic=False, permissions=ANYONE,
    description="Delete a task from the task store.",
)  # fmt: skip
def discard_task(*, data: dict[str, Any]) -> dict[str, Any]:
    server.task_store.delete(data["task_id"])
    return {"deleted": data["task_id"]}
