"""Which server processes live, as PostgreSQL itself tells it, and the requests of those that died.

Each store that serves MCP sessions keeps a row in ``mcp_events_workers`` and,
on a connection of its own, a session-level advisory lock keyed by the row's
id: its lease (``WorkerLease``). PostgreSQL releases the lock the moment that
connection ends: the process exited, was killed, or its host vanished (TCP
keepalives notice that in about 25 s). A heartbeat every
``heartbeat_interval`` says the worker lives even while its lease connection
reconnects, so that a blip is not a death: others ask the lock only after
``worker_grace`` without a heartbeat.

Every stream names the worker that created it, the one that runs its request.
A request whose worker died will never be answered, and a client following its
stream (from any worker) would wait forever. So a live subscription that
follows another worker's request asks, every ``heartbeat_interval``, whether
that worker lives (``OrphanWatch``); when it does not, it ends the request with
a JSON-RPC error stored like any event, under the stream's append lock and only
if nobody answered meanwhile. Every client that follows or resumes the stream
then sees the same ending. The first response in a stream is final: should a
worker wrongly found dead answer after all, readers never get that far.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import asyncpg

from . import sql
from .compat import STANDALONE_STREAM, worker_lost_error
from .database import Database, no_partition
from .errors import ConfigurationError, SchemaNotReadyError
from .messages import answered_request, load_message
from .waiting import wait_set

if TYPE_CHECKING:
    from .live import Subscription
    from .wakeups import Notifier

logger = logging.getLogger(__name__)

# How the lease connection shows in pg_stat_activity.
LEASE_NAME = "mcp-pg-events lease"
# So that PostgreSQL notices a vanished host in about 25 s rather than 2 h, and
# releases its lease. Settings any role may set.
LEASE_SETTINGS = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


class WorkerLease:
    """This process's worker row, its lease and its heartbeat.

    Args:
        db: the gateway; the lease has a connection of its own, outside the pool
            (and outside PgBouncer in transaction mode: ``dsn``).
        dsn: where the lease connection goes (None: the pool's DSN).
        heartbeat_interval: seconds between two heartbeats.
        grace: seconds without a heartbeat after which others ask the lease.
    """

    def __init__(self, db: Database, *, dsn: str | None, heartbeat_interval: float, grace: float) -> None:
        self._db = db
        self._dsn = dsn
        self._interval = heartbeat_interval
        self.grace = grace
        self.id: int | None = None
        # Loop time since when the lease has been held without a break; None while not held.
        self._held_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._users = 0

    @property
    def started(self) -> bool:
        return self._task is not None

    def may_judge(self) -> bool:
        """Whether this worker may declare others dead.

        Only after holding its own lease for a whole grace period: after a
        PostgreSQL restart (which frees every lock) each live worker has that
        long to take its lease again before anyone judges it.
        """
        if self._held_since is None:
            return not self.started  # a store that keeps no lease judges by heartbeats and leases alone
        return asyncio.get_running_loop().time() - self._held_since >= self.grace

    async def start(self, wait: float) -> None:
        """Take the lease (again, for each user), waiting at most ``wait`` seconds for it."""
        self._users += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=LEASE_NAME)
        if not await wait_set(self._settled, wait):
            logger.warning("no worker lease yet after %.0fs; serving meanwhile", wait)

    async def close(self, *, every_user: bool = False) -> None:
        """Give the lease up when its last user is done: a clean end, unanswered requests included."""
        self._users = 0 if every_user else self._users - 1
        if self._users > 0 or self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._held_since = None
        self._settled.clear()
        worker, self.id = self.id, None  # a later start is another worker
        if worker is not None:
            try:
                await self._db.execute(sql.END_WORKER, worker, retry=False)
            except Exception as exc:  # others find it dead by its lease then
                logger.warning("could not record the end of worker %s: %r", worker, exc)

    async def _run(self) -> None:
        backoff = None
        while True:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await self._db.connect_outside_pool(
                    self._dsn, LEASE_NAME, timeout=max(10.0, self._interval), server_settings=LEASE_SETTINGS
                )
                await self._take(conn)
                self._held_since = asyncio.get_running_loop().time()
                self._settled.set()
                backoff = None
                while True:
                    await asyncio.sleep(self._interval)
                    if await conn.fetchval(sql.HEARTBEAT, self.id, timeout=self.grace) is None:
                        # Ended or forgotten while we were away: its requests were
                        # closed as a dead worker's. New requests go under a new id.
                        logger.error("worker %s was taken for dead; taking a new lease", self.id)
                        self.id = None
                        await self._take(conn)
            except asyncio.CancelledError:
                raise
            except (
                asyncpg.InsufficientPrivilegeError,
                asyncpg.UndefinedTableError,
                SchemaNotReadyError,
                ConfigurationError,
            ) as exc:
                # A deployment that has not run this revision's grants.sql, or a
                # borrowed pool without a DSN to open a connection of its own with.
                logger.error("no worker lease, its requests cannot be ended should it die: %s", exc)
                self._held_since = None
                self._settled.set()
                return
            except Exception as exc:
                self._held_since = None
                logger.warning("worker lease lost, reconnecting: %r", exc)
                backoff = backoff or self._db.backoff(float("inf"), cap=5.0)
                await backoff.wait()
            finally:
                if conn is not None:
                    conn.terminate()

    async def _take(self, conn: asyncpg.Connection[Any]) -> None:
        if self.id is not None and await conn.fetchval(sql.LOCK_WORKER, self.id):
            return
        if self.id is not None:
            # Our old connection may linger on the server, its lock with it.
            logger.warning("the lease of worker %s is still held elsewhere; taking a new one", self.id)
        worker = await conn.fetchval(sql.REGISTER_WORKER, os.getpid(), socket.gethostname())
        if not await conn.fetchval(sql.LOCK_WORKER, worker):
            raise RuntimeError(f"the lease of the new worker {worker} is held by someone else")
        self.id = worker


class OrphanWatch:
    """Ends the requests of dead workers that this process's live subscriptions follow.

    Args:
        db: the gateway.
        lease: this process's lease: whose requests are its own, and whether it may judge.
        notifier: wakes every reader of a stream that got its ending.
        interval: seconds between two checks while anything is watched.
    """

    def __init__(self, db: Database, lease: WorkerLease, notifier: Notifier | None, interval: float) -> None:
        self._db = db
        self._lease = lease
        self._notifier = notifier
        self._interval = interval
        self._watched: dict[Subscription, None] = {}
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed_requests = 0

    def watch(self, sub: Subscription) -> None:
        """Check ``sub``'s worker now and then, if it is another worker's request."""
        if sub.owner is None or sub.owner == self._lease.id or sub.stream_name == STANDALONE_STREAM:
            return
        self._watched[sub] = None
        self._due.set()  # a client resuming long after the death learns at once
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="mcp-pg-events orphans")

    def unwatch(self, sub: Subscription) -> None:
        self._watched.pop(sub, None)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await wait_set(self._due, self._interval)
            self._due.clear()
            if not self._watched or not self._lease.may_judge():
                continue
            try:
                await self.check()
            except Exception as exc:  # the next round tries again
                logger.warning("checking for dead workers failed: %r", exc)

    async def check(self) -> None:
        """End the watched requests whose worker is dead."""
        owners = sorted({sub.owner for sub in self._watched if sub.owner is not None})
        if not owners:
            return
        silent = {row["id"] for row in await self._db.fetch(sql.SILENT_WORKERS, owners, self._lease.grace)}
        if not silent:
            return
        for sub in [sub for sub in self._watched if sub.owner in silent]:
            assert sub.owner is not None
            if await self.close_request(sub.stream_key, sub.owner):
                self.closed_requests += 1
            self.unwatch(sub)
            if sub._tail is not None:
                sub._tail.mark(sub)

    async def close_request(self, stream_key: int, worker: int) -> bool:
        """Store the error that ends ``stream_key``'s request if ``worker`` is dead and it is unanswered.

        One transaction under the stream's append lock (an append of the dead
        worker still in flight finishes first); a second closer finds the
        stream naming no worker and does nothing. True when this call ended it.
        """
        for attempt in range(3):
            try:
                async with self._db.connection() as conn, conn.transaction():
                    await conn.execute(sql.LOCK_STREAM, stream_key)
                    if not await conn.fetchval(sql.WORKER_DEAD, worker, self._lease.grace):
                        return False
                    row = await conn.fetchrow(sql.ORPHAN_STREAM, stream_key)
                    if row is None or row["worker_id"] != worker:
                        return False
                    name = bytes(row["name"]).decode("utf-8", "surrogatepass")
                    last = row["last_message"]
                    if last is not None and answered_request(load_message(last)) == name:
                        return False
                    await conn.fetchval(sql.CLOSE_ORPHAN, stream_key, worker_lost_error(name))
            except asyncpg.PostgresError as exc:
                if attempt < 2 and no_partition(exc):
                    await self._db.fetchval(sql.ENSURE_PARTITIONS)
                    continue
                raise
            logger.warning(
                "request %r of dead worker %s ended with an error (stream %s)", name, worker, stream_key
            )
            if self._notifier is not None:
                self._notifier.wake([stream_key])
            return True
        return False
