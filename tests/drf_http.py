"""Worker processes of the test Django project (``tests/drf``), and clients of rest_framework_mcp's transport.

A worker is a real server process (uvicorn for ASGI, wsgiref for WSGI) on a port
of its own, started by the test and stopped after it; the clients speak the
framework's wire format over HTTP: the legacy era (sessions, GET streams,
``Last-Event-ID``) and the 2026-07-28 era (``subscriptions/listen``, tasks).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from mcp_pg_events.testing import SSE, SSEStream

ROOT = Path(__file__).resolve().parent.parent
DSN_ENV = "MCP_PG_EVENTS_DRF_TEST_DSN"
SETTINGS = "tests.drf.settings"
LEGACY = "2025-11-25"
MODERN = "2026-07-28"
TASKS = {"extensions": {"io.modelcontextprotocol/tasks": {}}}
# Long enough for a loaded machine to import Django, DRF and the framework.
START_TIMEOUT = 120

_ids = itertools.count(1)


def project_env(dsn: str, **extra: str) -> dict[str, str]:
    """The environment of a project process: the test's database, nothing of the caller's MCP_PG_EVENTS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_PG_EVENTS_", "DATABASE_URL"))}
    env.update({DSN_ENV: dsn, "DJANGO_SETTINGS_MODULE": SETTINGS, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Worker:
    """A server process; ``url`` once it listens. Its output is kept in ``log`` (read, so it never blocks)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        ready: re.Pattern[str],
        cwd: Path = ROOT,
        processes: int = 1,
    ) -> None:
        self.log: list[str] = []
        self._ready = ready
        # uvicorn --workers says where it listens before its workers have started.
        self._starting = processes if processes > 1 else 0
        self._listening = threading.Event()
        self.url = ""
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            match = self._ready.search(line)
            if match:
                self.url = f"http://127.0.0.1:{match[1]}"
            elif "Application startup complete" in line:
                self._starting -= 1
            if self.url and self._starting <= 0:
                self._listening.set()
        self._listening.set()  # exited: wait() says so

    def wait(self) -> Worker:
        if not self._listening.wait(START_TIMEOUT) or not self.url:
            self.stop()
            raise RuntimeError("the worker did not start:\n" + "".join(self.log))
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(30)
        if self.process.stdout is not None:
            self.process.stdout.close()


def uvicorn_worker(
    dsn: str, *, app: str = "tests.drf.asgi:application", workers: int = 1, cwd: Path = ROOT, **env: str
) -> Worker:
    """``uvicorn app`` on a free port (started; ``wait()`` for it to listen)."""
    args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0", "--no-access-log"]
    if workers > 1:
        args += ["--workers", str(workers)]
    ready = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
    return Worker(args, project_env(dsn, **env), ready, cwd, processes=workers)


_WSGI = """
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server
from tests.drf.wsgi import application

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = make_server("127.0.0.1", 0, application, handler_class=Quiet)
print("WSGI listening on port", server.server_port, flush=True)
server.serve_forever()
"""


def wsgi_worker(dsn: str) -> Worker:
    """The project under a WSGI server (one thread): Django's sync world."""
    return Worker(
        [sys.executable, "-c", _WSGI], project_env(dsn), re.compile(r"WSGI listening on port (\d+)")
    )


@contextmanager
def running(*workers: Worker) -> Iterator[tuple[Worker, ...]]:
    try:
        for worker in workers:
            worker.wait()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


async def django_command(dsn: str, *args: str, cwd: Path = ROOT, settings: str = SETTINGS, **env: str) -> str:
    """``django-admin`` of a project (the test project unless told); its output. Fails if it fails.

    ``args[0]`` is the command; the options of ours come before its own arguments,
    so that a ``--`` among them ends its options (a task id may begin with "-").
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "django", args[0], "--settings", settings, *args[1:],
        cwd=cwd, env=project_env(dsn, DJANGO_SETTINGS_MODULE=settings, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    text = out.decode()
    assert process.returncode == 0, text
    return text


class Stream:
    """An open SSE response of the transport: its events, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._events = SSEStream(response)

    async def next(self) -> SSE:
        event = await self._events.next()
        if event is None:
            raise ConnectionError("the server ended the stream")
        return event

    async def take(self, count: int) -> list[SSE]:
        return [await self.next() for _ in range(count)]


def texts(events: list[SSE]) -> list[str]:
    """What each ``push`` said, in order."""
    return [e.message["params"]["data"] for e in events if e.message]


class LegacyClient:
    """One session of the legacy era, on any worker: its id travels in ``Mcp-Session-Id``."""

    def __init__(self, http: httpx.AsyncClient, principal: str | None = "alice") -> None:
        self.http = http
        self.principal = principal
        self.session_id: str | None = None

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "Mcp-Protocol-Version": LEGACY}
        if self.principal is not None:
            headers["Authorization"] = f"Bearer {self.principal}"
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        headers.update(extra)
        return headers

    async def initialize(self, worker: Worker, path: str = "/mcp/") -> str:
        params = {
            "protocolVersion": LEGACY,
            "capabilities": {},
            "clientInfo": {"name": "tests", "version": "1"},
        }
        response = await self.post(worker, "initialize", params, path=path)
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        return self.session_id

    async def post(
        self, worker: Worker, method: str, params: dict[str, Any] | None = None, path: str = "/mcp/"
    ) -> httpx.Response:
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": next(_ids), "method": method}
        if params is not None:
            payload["params"] = params
        return await self.http.post(worker.url + path, json=payload, headers=self.headers())

    async def call(self, worker: Worker, tool: str, path: str = "/mcp/", **arguments: Any) -> Any:
        response = await self.post(worker, "tools/call", {"name": tool, "arguments": arguments}, path=path)
        assert response.status_code == 200, response.text
        assert "result" in response.json(), response.json()
        result = response.json()["result"]
        assert not result.get("isError"), result
        return result["structuredContent"]

    async def push(self, worker: Worker, *texts: str) -> None:
        for text in texts:
            assert (await self.call(worker, "push", text=text))["delivered"] is True

    @asynccontextmanager
    async def get(self, worker: Worker, last_event_id: str | None = None) -> AsyncIterator[Stream]:
        """The session's GET stream, once the server said it is open."""
        extra = {}
        if last_event_id is not None:
            extra["Last-Event-ID"] = last_event_id
        request = self.http.build_request("GET", worker.url + "/mcp/", headers=self.headers(**extra))
        response = await self.http.send(request, stream=True)
        try:
            assert response.status_code == 200, (response.status_code, await response.aread())
            stream = Stream(response)
            await stream._events.until_comment("stream open")
            yield stream
        finally:
            await response.aclose()

    async def delete(self, worker: Worker) -> int:
        response = await self.http.delete(worker.url + "/mcp/", headers=self.headers())
        return response.status_code


class ModernClient:
    """Requests of the 2026-07-28 era: no session, everything said in each request's ``_meta``.

    Anonymous: a task worker rebuilds the caller's user from the database, where
    the test backend's named users do not exist.
    """

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    def _request(
        self, method: str, params: dict[str, Any], name: str | None, tasks: bool
    ) -> tuple[dict[str, Any], dict[str, str]]:
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "tests", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": TASKS if tasks else {},
        }
        body = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": {**params, "_meta": meta}}
        headers = {
            "Accept": "application/json, text/event-stream",
            "Mcp-Protocol-Version": MODERN,
            "Mcp-Method": method,
        }
        if name is not None:
            headers["Mcp-Name"] = name
        return body, headers

    async def request(
        self,
        worker: Worker,
        method: str,
        params: dict[str, Any],
        name: str | None = None,
        tasks: bool = False,
    ) -> dict[str, Any]:
        body, headers = self._request(method, params, name, tasks)
        response = await self.http.post(worker.url + "/mcp/", json=body, headers=headers)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def call(self, worker: Worker, tool: str, tasks: bool = False, **arguments: Any) -> dict[str, Any]:
        answer = await self.request(worker, "tools/call", {"name": tool, "arguments": arguments}, tool, tasks)
        assert "result" in answer, answer
        result: dict[str, Any] = answer["result"]
        return result

    async def task(self, worker: Worker, method: str, task_id: str) -> dict[str, Any]:
        return await self.request(worker, method, {"taskId": task_id}, name=task_id, tasks=True)

    @asynccontextmanager
    async def listen(self, worker: Worker, notifications: dict[str, Any]) -> AsyncIterator[Stream]:
        """A subscription, once acknowledged (the framework subscribes before it acknowledges)."""
        body, headers = self._request("subscriptions/listen", {"notifications": notifications}, None, True)
        request = self.http.build_request("POST", worker.url + "/mcp/", json=body, headers=headers)
        response = await self.http.send(request, stream=True)
        try:
            assert response.status_code == 200, (response.status_code, await response.aread())
            stream = Stream(response)
            first = await stream.next()
            assert first.message and first.message["method"] == "notifications/subscriptions/acknowledged", (
                first
            )
            yield stream
        finally:
            await response.aclose()
