"""One event store per process, on an event loop of its own, for callers on any loop or thread.

A Django process calls its collaborators from many places: the ASGI server's
loop; a fresh loop per call where ``async_to_sync`` runs a coroutine from a plain
thread (a WSGI worker, a task worker, a management command, ``runserver``);
``asyncio.run`` in a worker's thread. asyncpg connections, the group-commit
writer and the live tail all belong to the loop they were made on, and a loop
that closes after one call takes them with it. So the store lives on a loop of
its own, in a daemon thread started on first use, and every caller hands it
work: a coroutine awaits the result (``call``), a synchronous thread blocks on
it (``run``). One pool and one LISTEN connection per process, whatever the
callers' loops; the caller's loop never runs a query, so it is never blocked.

A fork (a pre-forking server that imported the project first) leaves the child
without the thread: the first call in the child starts its own, and the
parent's connections are never touched there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .store import PostgresEventStore

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

THREAD_NAME = "mcp-pg-events"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Engine:
    """A ``PostgresEventStore`` on a private event loop, opened by ``connect`` on first use.

    Args:
        connect: opens the store, on the engine's loop. Called again after a
            failure (the database was down, or not migrated yet), so that a
            later call may succeed.
    """

    def __init__(self, connect: Callable[[], Awaitable[PostgresEventStore]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._opening: asyncio.Future[PostgresEventStore] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The engine's loop, started on first use (again in a forked child)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name=THREAD_NAME, daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._opening = None
            return self._loop

    def on_loop(self) -> bool:
        """True when the caller runs on the engine's loop."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def store(self) -> PostgresEventStore:
        """The store, opened on first use; on the engine's loop only."""
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.ensure_future(self._connect())
            opening.add_done_callback(self._forget_failure)
        return await asyncio.shield(opening)

    def _forget_failure(self, opening: asyncio.Future[PostgresEventStore]) -> None:
        if self._opening is opening and (opening.cancelled() or opening.exception() is not None):
            self._opening = None

    async def call(self, work: Callable[[PostgresEventStore], Awaitable[_T]]) -> _T:
        """Run ``work(store)`` on the engine's loop and return its result, from any loop.

        Cancelling the caller cancels the work.
        """
        loop = self.loop
        if self.on_loop():
            return await work(await self.store())
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._work(work), loop))

    def run(self, work: Callable[[PostgresEventStore], Awaitable[_T]]) -> _T:
        """Run ``work(store)`` on the engine's loop and wait for it, from a thread without a running loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "a synchronous mcp-pg-events call on an event loop would block it: "
                "call it from a thread (asgiref's sync_to_async does)"
            )
        return asyncio.run_coroutine_threadsafe(self._work(work), self.loop).result()

    def submit(self, work: Callable[[PostgresEventStore], Awaitable[_T]]) -> concurrent.futures.Future[_T]:
        """Start ``work(store)`` on the engine's loop; its future, which any thread may wait on."""
        return asyncio.run_coroutine_threadsafe(self._work(work), self.loop)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the engine's loop, soon; from any thread."""
        loop = self.loop
        if self.on_loop():
            loop.call_soon(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    async def _work(self, work: Callable[[PostgresEventStore], Awaitable[_T]]) -> _T:
        return await work(await self.store())

    def close(self, timeout: float = 30) -> None:
        """Close the store and stop the loop; the next call starts afresh. From a thread, not the loop."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            opening, self._opening = self._opening, None
            mine = self._pid == os.getpid()
        if loop is None or thread is None or not mine:
            return

        async def shut() -> None:
            # What the engine's users left running (followers, watchers) first,
            # then the store, which waits for the writes in flight. Only our
            # tasks: asyncpg's own (a connection's release under way after a
            # caller cancelled its query, shielded so that it completes) would
            # never give the connection back, and the pool's close would wait
            # for it for ever.
            others = [
                task for task in asyncio.all_tasks() if task is not asyncio.current_task() and _ours(task)
            ]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if opening is not None:
                try:
                    store = await opening
                except Exception:  # never opened: nothing to close
                    return
                await store.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)


def _ours(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` runs a coroutine of this package."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(_PACKAGE)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
