"""The one LISTEN connection of a store, shared by everything in the process that wants wake-ups.

PostgreSQL signals every listening backend on every NOTIFY (before version 19),
so a process keeps one listener, outside the pool (asyncpg's pool runs
``UNLISTEN *`` on release), and fans out in-process: each channel has one
handler, called with the payload, which must be cheap (it runs in asyncpg's
protocol callback) and must not raise.

Nothing is kept for a listener that was not connected at commit, and a dropped
connection is silent. So the connection is probed every ``ping_interval``, is
reopened with backoff when lost, and after every (re)connect each channel's
``on_connect`` runs, so that its users catch up by query on whatever was
announced to nobody meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from . import metrics, sql
from .database import Database
from .waiting import wait_done

logger = logging.getLogger(__name__)

# How the listener shows in pg_stat_activity.
LISTENER_NAME = "mcp-pg-events listener"


def _settle(future: asyncio.Future[None], *_: object) -> None:
    if not future.done():
        future.set_result(None)


class _Channel:
    __slots__ = ("on_connect", "on_notify")

    def __init__(self, on_notify: Callable[[str], None], on_connect: Callable[[], None]) -> None:
        self.on_notify = on_notify
        self.on_connect = on_connect


class Listener:
    """One LISTEN connection, its channels and its reconnects.

    Args:
        db: the gateway; the connection is opened outside its pool.
        dsn: where that connection goes (None: the pool's DSN).
        ping_interval: seconds between liveness probes of an idle connection.
    """

    def __init__(self, db: Database, *, dsn: str | None, ping_interval: float) -> None:
        self._db = db
        self._dsn = dsn
        self._ping_interval = ping_interval
        self._channels: dict[str, _Channel] = {}
        self._conn: asyncpg.Connection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.reconnects = 0

    async def listen(
        self, channel: str, on_notify: Callable[[str], None], on_connect: Callable[[], None]
    ) -> None:
        """Call ``on_notify(payload)`` for each notification on ``channel``.

        ``on_connect()`` runs after each (re)connect, and at once when the
        connection is up already: the caller then catches up from now. Starts
        the connection on first use.
        """
        if channel in self._channels:
            raise ValueError(f"channel {channel!r} has a handler already")
        handler = self._channels[channel] = _Channel(on_notify, on_connect)
        conn = self._conn
        if conn is not None and not conn.is_closed():
            await conn.add_listener(channel, self._dispatch)
            handler.on_connect()
        self.start()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=LISTENER_NAME)

    async def wait_listening(self) -> None:
        """Return once the connection listens on every channel."""
        await self._listening.wait()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _dispatch(self, conn: object, pid: int, channel: str, payload: object) -> None:
        handler = self._channels.get(channel)
        if handler is not None:
            handler.on_notify(str(payload))

    async def _run(self) -> None:
        backoff = None
        lost_at: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await self._db.connect_outside_pool(
                    self._dsn, LISTENER_NAME, timeout=max(10.0, self._ping_interval)
                )
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(functools.partial(_settle, lost))
                # ``listen()`` may add a channel while we await: loop until none is missing,
                # then publish the connection with no await in between.
                listening: set[str] = set()
                while missing := self._channels.keys() - listening:
                    for channel in missing:
                        await conn.add_listener(channel, self._dispatch)
                        listening.add(channel)
                self._conn = conn
                # Whatever committed while we were not listening was announced to nobody.
                for handler in list(self._channels.values()):
                    handler.on_connect()
                self._listening.set()
                if lost_at is not None:
                    logger.info(
                        "listener back after %.1fs (%d attempts); live readers catch up",
                        loop.time() - lost_at,
                        backoff.attempts if backoff is not None else 0,
                    )
                    lost_at = None
                backoff = None
                while not await wait_done(lost, self._ping_interval):
                    await conn.fetchval(sql.PING, timeout=self._ping_interval)
                raise ConnectionError("the listener connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                self.reconnects += 1
                metrics.listener_reconnecting(exc)
                if lost_at is None:
                    lost_at = loop.time()
                    logger.warning("listener lost, reconnecting: %r", exc)
                else:
                    logger.debug("listener still down, retrying: %r", exc)
                backoff = backoff if backoff is not None else self._db.backoff(float("inf"), cap=5.0)
                await backoff.wait()
            finally:
                self._conn = None
                if conn is not None:
                    conn.terminate()
