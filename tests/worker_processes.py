"""Workers serving ``tests.worker_app`` on one database: processes a test may kill and replace, or in-process.

Each is ``uvicorn`` in a process of its own (``--workers N`` for N children on
one socket), listening on a socket the test made and handed down, so that a
replacement may serve the same port. Their ``MCP_PG_EVENTS_*`` settings make
their workers quick to judge one another dead (a short grace period, frequent
heartbeats) without ever depending on the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from mcp_pg_events import PostgresEventStore
from mcp_pg_events.compat import held_sessions
from mcp_pg_events.testing import READ_TIMEOUT, serve

from .worker_app import build_app

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(rb"^worker (\d+) serving")

# Quick to find a dead worker: a heartbeat every 0.2 s, asked after 1 s of silence.
FAST_WORKER_SETTINGS = {
    "MCP_PG_EVENTS_HEARTBEAT_INTERVAL": "0.2",
    "MCP_PG_EVENTS_WORKER_GRACE": "1",
    "MCP_PG_EVENTS_ACTIVITY_INTERVAL": "0.5",
    "MCP_PG_EVENTS_RETRY_DEADLINE": "10",
}


def listening_socket() -> socket.socket:
    """A loopback socket listening on a free port, which worker processes inherit."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class WorkerProcess:
    """A uvicorn process (with ``workers`` children when more than one) serving the test app."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.pids: list[int] = []
        self.output: list[bytes] = []
        self._more = asyncio.Condition()
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, dsn: str, sock: socket.socket, *, workers: int = 1, app: str = "tests.worker_app:app", **env: str
    ) -> WorkerProcess:
        """Start serving ``app`` on ``sock``; returns once every worker serves."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MCP_PG_EVENTS_")}
        environment.update(FAST_WORKER_SETTINGS, MCP_PG_EVENTS_DSN=dsn, **env)
        args = ["--fd", str(sock.fileno()), "--log-level", "warning", "--timeout-graceful-shutdown", "5"]
        if workers > 1:
            args += ["--workers", str(workers)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uvicorn", app, *args,
            cwd=ROOT, env=environment, pass_fds=[sock.fileno()],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        worker = cls(process, url_of(sock))
        try:
            await asyncio.wait_for(worker.wait_serving(workers), 120)
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            async with self._more:
                self.output.append(line)
                if match := SERVING.match(line):
                    self.pids.append(int(match[1]))
                self._more.notify_all()
        async with self._more:
            self._more.notify_all()

    async def wait_serving(self, count: int) -> None:
        async with self._more:
            while len(self.pids) < count:
                if self.process.returncode is not None or self._reading.done():
                    raise RuntimeError(
                        "the worker exited:\n" + b"".join(self.output).decode(errors="replace")
                    )
                await self._more.wait()

    def log(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    async def kill(self, pid: int | None = None) -> None:
        """SIGKILL the process (or one of its workers), as an OOM killer or a crash would."""
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return
        for child in self.pids:
            if child != self.process.pid:
                with suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reading

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown, as a rolling deploy does it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        finally:
            await self.kill()


@asynccontextmanager
async def worker_process(
    dsn: str, sock: socket.socket | None = None, **options: object
) -> AsyncIterator[WorkerProcess]:
    """A worker process for the length of a block (on a socket of its own unless given one)."""
    own = sock is None
    sock = sock or listening_socket()
    worker = await WorkerProcess.start(dsn, sock, **options)  # type: ignore[arg-type]
    try:
        yield worker
    finally:
        await worker.kill()
        if own:
            sock.close()


class InProcessWorker:
    """The test app served in this process, with a store of its own: another worker, as far as the
    database can tell (its own pool, listener, lease and worker row)."""

    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.app = app

    @property
    def manager(self) -> Any:
        return self.app.state.manager

    @property
    def store(self) -> PostgresEventStore:
        store = self.manager._scoped_backing
        assert isinstance(store, PostgresEventStore)
        return store

    def holds(self, session_id: str | None) -> bool:
        return session_id in held_sessions(self.manager)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=READ_TIMEOUT)


# The same settings as FAST_WORKER_SETTINGS, as keyword arguments of the store.
FAST_STORE_OPTIONS: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "worker_grace": 1.0,
    "activity_interval": 0.5,
    "retry_deadline": 10.0,
}


@asynccontextmanager
async def in_process_worker(
    dsn: str, *, idle_timeout: float | None = None, authenticate: bool = False, **options: Any
) -> AsyncIterator[InProcessWorker]:
    """A worker in this process, serving on a port of its own for the length of a block."""

    async def connect() -> PostgresEventStore:
        return await PostgresEventStore.connect(dsn, **{**FAST_STORE_OPTIONS, **options})

    app = build_app(connect, idle_timeout=idle_timeout, authenticate=authenticate)
    async with serve(app) as url:
        await asyncio.wait_for(app.state.serving.wait(), 60)
        yield InProcessWorker(url, app)
