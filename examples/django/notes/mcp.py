"""The notes server: tools, a resource and tasks, with every collaborator in PostgreSQL.

Run it on as many workers as you like: a client's GET stream, its
subscriptions and its tasks work whichever worker each request reaches.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from asgiref.sync import async_to_sync
from django.db import connections
from django_service_specs import SelectorKind
from rest_framework import serializers
from rest_framework_mcp import MCPServer
from rest_framework_mcp.auth.backends.allow_any_backend import AllowAnyBackend
from rest_framework_mcp.constants import TaskPolicy

from mcp_pg_events.rest_framework import postgres_collaborators

from .models import Note


class Anyone:
    """Lets every caller in. Put your real permissions here."""

    def has_permission(self, request: Any, token: Any) -> bool:
        return True

    def required_scopes(self) -> list[str]:
        return []


class ThreadExecutor:
    """Runs each task in a thread of the worker that took it; use your queue (Celery, ...) in production.

    The task is in the database before this runs, so any worker answers
    tasks/get, and a subscriber on any worker hears when it finishes.

    The framework marks a task enqueued only after ``enqueue`` returns, and
    ``run_task`` silently skips a task not marked yet (its guard against running
    one twice). A thread can start sooner than that mark is written, so it waits
    for the mark first. A queue whose worker may pick the task up at once needs
    the same wait.
    """

    wait_for_mark = 10.0  # seconds; the request writes it right after enqueue returns

    def enqueue(self, task_id: str) -> None:
        threading.Thread(target=self._run, args=(task_id,), daemon=True).start()

    def _run(self, task_id: str) -> None:
        try:
            if self._marked_enqueued(task_id):
                server.run_task(task_id)
        finally:
            connections.close_all()

    def _marked_enqueued(self, task_id: str) -> bool:
        deadline = time.monotonic() + self.wait_for_mark
        pause = 0.002
        while True:
            record = collaborators["task_store"].get(task_id)
            if record is None or record.status.is_terminal:
                return False  # expired, deleted or cancelled meanwhile
            if record.enqueued:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


collaborators = postgres_collaborators("notes")
server = MCPServer(
    name="notes",
    auth_backend=AllowAnyBackend(),  # development only: swap for your real backend
    task_executor=ThreadExecutor(),
    **collaborators,
)
EVERYONE = [Anyone()]


class NoteIn(serializers.Serializer):
    key = serializers.CharField(max_length=100)
    text = serializers.CharField(allow_blank=True)


class KeyIn(serializers.Serializer):
    key = serializers.CharField(max_length=100)


class RemindIn(serializers.Serializer):
    text = serializers.CharField()


class NoteOut(serializers.Serializer):
    key = serializers.CharField()
    text = serializers.CharField()


@server.service_tool(
    name="write_note",
    input_serializer=NoteIn,
    invalidates=["notes://{key}"],
    permissions=EVERYONE,
    description="Write a note; subscribers of notes://<key> hear of it.",
)
def write_note(*, data: dict[str, Any]) -> dict[str, Any]:
    note, _ = Note.objects.update_or_create(key=data["key"], defaults={"text": data["text"]})
    return {"key": note.key, "text": note.text}


@server.resource(
    uri_template="notes://{key}",
    name="note",
    kind=SelectorKind.RETRIEVE,
    output_serializer=NoteOut,
    permissions=EVERYONE,
    description="A note.",
)
def note(*, key: str) -> Note:
    return Note.objects.get(key=key)


@server.service_tool(
    name="count_words",
    input_serializer=KeyIn,
    task_policy=TaskPolicy.OPTIONAL,
    permissions=EVERYONE,
    description="Count the words of a note (as a task, if the client asks).",
)
def count_words(*, data: dict[str, Any]) -> dict[str, Any]:
    return {"key": data["key"], "words": len(Note.objects.get(key=data["key"]).text.split())}


@server.service_tool(
    name="remind",
    input_serializer=RemindIn,
    atomic=False,
    permissions=EVERYONE,
    description="Send a reminder to the caller's GET stream, whichever worker holds it.",
)
def remind(*, data: dict[str, Any], request: Any) -> dict[str, Any]:
    session = request.headers["Mcp-Session-Id"]
    message = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": data["text"]},
    }
    return {"delivered": async_to_sync(server.notify)(session, message)}
