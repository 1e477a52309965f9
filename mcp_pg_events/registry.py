"""The session registry: the MCP sessions that exist, so that any worker can serve any of them.

A session's row in ``mcp_events_sessions`` (the same row its streams hang from)
is registered as the session id first goes out, before the response header
that carries it: from then on a worker that does not hold the session can look
it up and serve it (``lookup``), provided it is live and the principal matches.

Activity costs no write per request: each worker counts, in memory, the requests
in flight of the sessions it holds and when each was last active, and writes
them all in one statement every ``activity_interval`` (``TOUCH_SESSIONS``).
Sessions the write finds ended are dropped by their holders.

An end (a DELETE, an idle timeout, an expiry) is committed first, then
announced on ``mcp_events_ended_v1`` with the session's row id (never its id,
a credential: any role that can connect can LISTEN). Every worker that holds
the session drops it. The listener being down loses announcements: after each
reconnect, the holders ask which of their sessions ended meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import sql, wakeups
from .database import Database
from .event_log import valid_session_key
from .settings import StoreSettings
from .waiting import wait_done, wait_set

if TYPE_CHECKING:
    from .listener import Listener
    from .workers import WorkerLease

logger = logging.getLogger(__name__)

ENDED_CHANNEL = wakeups.ENDED_CHANNEL
# Announcements kept between two reads at most (see live.MAX_PAYLOADS_PER_ROUND).
MAX_PAYLOADS_PER_ROUND = 128
# Seconds a lookup for a request retries a transient error before the client is
# told to come back later (503): the request is waiting.
LOOKUP_DEADLINE = 5.0
# The most of an opening request's body kept to find its initialize params.
MAX_HANDSHAKE_BYTES = 64 * 1024
# Seconds a worker waits for its lease before it serves without one.
LEASE_WAIT = 5.0
# Seconds an end waits to hear its own announcement back.
ECHO_WAIT = 1.0


@dataclass(frozen=True)
class KnownSession:
    """A live session as the registry knows it: what a worker needs to serve it, and who may."""

    row_id: int
    handshake: dict[str, Any] | None
    protocol_version: str | None
    owner: dict[str, Any] | None


class _Held:
    __slots__ = ("active_at", "dirty", "in_flight", "row_id")

    def __init__(self, row_id: int, now: float) -> None:
        self.row_id = row_id
        self.in_flight = 0
        self.active_at = now
        # Active since the last write.
        self.dirty = True


class SessionRegistry:
    """Registration, lookup, activity and end of the sessions; one per store.

    Args:
        db: the gateway.
        listener: the store's LISTEN connection, for ended sessions; None: the
            activity writes alone find them.
        lease: this process's worker lease, started and ended with the registry.
        settings: ``activity_interval``, ``notify_interval``.
    """

    def __init__(
        self, db: Database, listener: Listener | None, lease: WorkerLease, settings: StoreSettings
    ) -> None:
        self._db = db
        self._listener = listener
        self._lease = lease
        self._interval = settings.activity_interval
        self._ended_notifier = wakeups.Notifier(
            db, min_interval=settings.notify_interval, channel=ENDED_CHANNEL
        )
        self._held: dict[str, _Held] = {}
        self._by_row: dict[int, str] = {}
        self._on_ended: list[Callable[[list[str]], None]] = []
        # Announcements received and not yet read (the listener's callback only appends).
        self._payloads: list[str] = []
        # Our own announcements, awaited until our listener hears them back.
        self._echoes: dict[str, asyncio.Future[None]] = {}
        self._recheck = False
        self._write_soon = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._users = 0
        self._listening = False

    # --- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Take this worker's lease, write activity, hear of ended sessions; once per user."""
        self._users += 1
        if self._users > 1:
            return
        await self._lease.start(LEASE_WAIT)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="mcp-pg-events sessions")
        if self._listener is not None and not self._listening:
            # Once per store: the listener keeps the channel for good.
            self._listening = True
            await self._listener.listen(ENDED_CHANNEL, self._on_notify, self._on_reconnect)

    async def stop(self, *, every_user: bool = False) -> None:
        """Once the last user (or ``every_user``) stops: write the last activity, end the lease."""
        self._users = 0 if every_user else self._users - 1
        if self._users > 0 or self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        await asyncio.gather(task, *self._tasks, return_exceptions=True)
        try:
            await self._flush()
        except Exception as exc:
            logger.warning("sessions: last activity not written: %r", exc)
        await self._ended_notifier.close()
        await self._lease.close(every_user=True)

    def on_ended(self, callback: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call ``callback(session ids)`` when sessions this process holds end elsewhere; returns the undo."""
        self._on_ended.append(callback)
        return lambda: self._on_ended.remove(callback)

    # --- the registry ----------------------------------------------------------------------

    async def register(
        self,
        key: str,
        handshake: dict[str, Any] | None,
        protocol_version: str,
        owner: dict[str, Any] | None,
        idle_timeout: float | None,
    ) -> int | None:
        """Register a new session; its row id, or None when it was registered already."""
        row_id: int | None = await self._db.fetchval(
            sql.REGISTER_SESSION,
            key,
            None if handshake is None else json.dumps(handshake),
            protocol_version,
            None if owner is None else json.dumps(owner),
            idle_timeout,
            self._lease.id,
        )
        return row_id

    async def lookup(self, key: str) -> KnownSession | None:
        """The session ``key`` if it is live, else None (unknown, ended, expired).

        Raises ``StoreUnavailableError`` when the database does not answer within
        ``LOOKUP_DEADLINE``: the session may well be live. A session found
        expired is ended on the way.
        """
        if not valid_session_key(key):
            return None
        row = await self._db.fetchrow(sql.ADOPTABLE_SESSION, key, self._interval, deadline=LOOKUP_DEADLINE)
        if row is None or row["ended"]:
            return None
        if row["expired"]:
            self._spawn(self.end(key, "expired"))
            return None
        return KnownSession(
            row["id"],
            None if row["handshake"] is None else json.loads(row["handshake"]),
            row["protocol_version"],
            None if row["owner"] is None else json.loads(row["owner"]),
        )

    async def end(self, key: str, reason: str | None) -> None:
        """End the session ``key`` for every worker.

        Returns once the end is announced, not only committed: a client told its
        DELETE succeeded goes to another worker next, whose listener should have
        the announcement before the request.
        """
        if not valid_session_key(key):
            return
        row_id = await self._db.fetchval(sql.END_SESSION, key, reason)
        if row_id is None:
            return
        payload = str(row_id)
        listening = self._listener is not None and self._listener.listening
        echo = asyncio.get_running_loop().create_future() if listening else None
        if echo is not None:
            self._echoes[payload] = echo
        try:
            await self._db.execute(sql.NOTIFY, ENDED_CHANNEL, [payload], retry=False)
            # PostgreSQL signals every listener at once: once ours has it, the
            # others' have it on its way too. (Holders that miss it find the end
            # at their next activity write.)
            if echo is not None and not await wait_done(echo, ECHO_WAIT):
                raise TimeoutError(f"no echo of the announcement within {ECHO_WAIT}s")
        except Exception as exc:  # the holders' activity writes find it
            logger.warning("sessions: the end of row %s not announced: %r", row_id, exc)
        finally:
            if echo is not None:
                self._echoes.pop(payload, None)
        self._forget_row(row_id)

    async def end_if_idle(self, key: str, idle_timeout: float) -> bool:
        """This worker found ``key`` idle past its timeout: end it, unless another worker used it since.

        True when it ended.
        """
        row_id = await self._db.fetchval(sql.END_SESSION_IF_IDLE, key, self._lease.id, idle_timeout)
        if row_id is None:
            return False
        self._announce(row_id)
        return True

    def _announce(self, row_id: int) -> None:
        self._ended_notifier.wake([row_id])
        self._forget_row(row_id)

    def _forget_row(self, row_id: int) -> None:
        key = self._by_row.get(row_id)
        if key is not None:
            self._ended([key])

    # --- sessions held, and their activity ---------------------------------------------------

    def hold(self, key: str, row_id: int, *, write_soon: bool = False) -> None:
        """This process serves the registered session ``key`` (row ``row_id``) from now on.

        ``write_soon``: write its activity now rather than at the next interval
        (a session taken over from another worker, which may be judging its idleness).
        """
        self._held[key] = _Held(row_id, asyncio.get_running_loop().time())
        self._by_row[row_id] = key
        if write_soon:
            self._write_soon = True
            self._wake.set()

    def release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._by_row.pop(held.row_id, None)

    def begin(self, key: str) -> None:
        """A request of ``key`` started (in memory only)."""
        held = self._held.get(key)
        if held is not None:
            held.in_flight += 1
            held.dirty = True

    def done(self, key: str) -> None:
        """A request of ``key`` ended (in memory only)."""
        held = self._held.get(key)
        if held is not None:
            held.in_flight -= 1
            held.active_at = asyncio.get_running_loop().time()

    def read_announcements(self) -> None:
        """Act on the ended sessions announced so far, at once (before a request is routed)."""
        if self._payloads:
            payloads, self._payloads = self._payloads, []
            keys = []
            for payload in payloads:
                try:
                    rows = wakeups.decode(payload)
                except ValueError:  # no writer sent it
                    continue
                if rows is None:
                    self._recheck = True
                    self._wake.set()
                    continue
                keys += [key for row in rows if (key := self._by_row.get(row)) is not None]
            if keys:
                self._ended(keys)

    def _ended(self, keys: list[str]) -> None:
        for key in keys:
            self.release(key)
        for callback in list(self._on_ended):
            try:
                callback(keys)
            except Exception:
                logger.exception("sessions: a holder failed to drop ended sessions")

    def _on_notify(self, payload: str) -> None:
        # The listener's callback: O(1), the work is done by whoever reads next. Any
        # role that may connect may NOTIFY here: past a round's worth of payloads,
        # or one longer than a writer sends, check every held session instead.
        if len(payload) <= wakeups.LONGEST_PAYLOAD and len(self._payloads) < MAX_PAYLOADS_PER_ROUND:
            self._payloads.append(payload)
        else:
            self._recheck = True
        self._wake.set()
        echo = self._echoes.get(payload)
        if echo is not None and not echo.done():
            echo.set_result(None)

    def _on_reconnect(self) -> None:
        self._recheck = True
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_write = loop.time() + self._interval
        while True:
            await wait_set(self._wake, next_write - loop.time())
            self._wake.clear()
            try:
                self.read_announcements()
                if self._recheck:
                    self._recheck = False
                    await self._find_ended()
                if self._write_soon or loop.time() >= next_write:
                    self._write_soon = False
                    next_write = loop.time() + self._interval
                    await self._flush()
            except Exception as exc:  # the next round tries again
                logger.warning("sessions: %r", exc)

    async def _find_ended(self) -> None:
        rows = list(self._by_row)
        if rows:
            ended = await self._db.fetch(sql.ENDED_SESSIONS, rows)
            self._ended([key for row in ended if (key := self._by_row.get(row["id"])) is not None])

    async def _flush(self) -> None:
        now = asyncio.get_running_loop().time()
        active = [(key, held) for key, held in self._held.items() if held.dirty or held.in_flight]
        if not active:
            return
        keys = [key for key, _ in active]
        ages = [0.0 if held.in_flight else max(0.0, now - held.active_at) for _, held in active]
        for _, held in active:
            held.dirty = False
        try:
            rows = await self._db.fetch(sql.TOUCH_SESSIONS, keys, ages, self._lease.id)
        except BaseException:
            for _, held in active:
                held.dirty = True
            raise
        live = {row["key"] for row in rows}
        self._ended([key for key in keys if key not in live and key in self._held])

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("sessions: %r", exc)
