"""Live tail: subscriptions that yield a stream's events as they commit, in any process.

One ``LiveTail`` per store (so, usually, per process) holds one LISTEN connection
outside the pool, shared by every subscription. Its notification callback only
marks subscriptions as due; one fetch task then reads, in a single query, the
events after the cursor of every due subscription, and hands each its rows.
Delivery therefore never depends on a notification arriving: a notification only
says when to look. What is looked at is always "after my cursor", so nothing is
skipped (a stream never has two appends in flight, see ``group_commit``) and
nothing comes twice (a cursor only moves forward, and only the fetch task moves it).

Notifications are lost when the listener is down, so every (re)connect is followed
by a catch-up of every subscription, and a slow poll catches up everything
periodically as a safety net. Without a listener (``listen=False``, e.g. behind
PgBouncer in transaction mode) the poll alone delivers everything.

Any role that may connect to the database may NOTIFY on the channel, so a flood
must cost little: the callback does O(1) work, at most ``MAX_PAYLOADS_PER_ROUND``
distinct payloads are kept between two fetch rounds (past that, and for a payload
longer than a writer sends, every subscription is caught up instead), a payload
is read only so far (``wakeups.MAX_KEYS``), one that cannot be read is ignored,
and catch-ups of every subscription that notifications ask for come at most once
per ``catch_up_all_interval``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import asyncpg
from mcp.server.streamable_http import EventMessage

from . import sql, wakeups
from .event_ids import format_event_id
from .messages import answered_request, load_message
from .retry import Backoff, is_transient

logger = logging.getLogger("mcp_pg_events")

# How the listener shows in pg_stat_activity.
LISTENER_NAME = "mcp-pg-events listener"
# Distinct payloads kept between two fetch rounds at most. Writers coalesce their
# wake-ups (a statement per writer process per notify_interval, one payload per 64
# streams), so a round rarely has more; past it, every subscription is caught up
# instead of reading them.
MAX_PAYLOADS_PER_ROUND = 128
# Ignored and dropped payloads are logged once per this many seconds at most.
FLOOD_LOG_INTERVAL = 60.0
# The stream id the SDK uses for messages that belong to no request; it never completes.
STANDALONE_STREAM = "_GET_stream"


def ends_stream(answered: str | None, stream_name: str) -> bool:
    """True when a message answering request ``answered`` (see ``answered_request``) ends ``stream_name``."""
    return answered is not None and answered == stream_name and stream_name != STANDALONE_STREAM


def _settle(future: asyncio.Future[None], *_: object) -> None:
    if not future.done():
        future.set_result(None)


class Subscription:
    """An async iterator of the ``EventMessage`` s of one stream after a cursor.

    Made by ``SessionEventStore.subscribe``. It yields what follows the cursor,
    then each new event as it commits, and stops after the response that ends a
    request's stream, or when closed. A cursor that is malformed, unknown,
    expired or another session's gives an empty iterator.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_complete",
        "_error",
        "_open",
        "_opened",
        "_starved",
        "_tail",
        "_waiter",
        "after",
        "stream_key",
        "stream_name",
        "tag",
    )

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._open = opener
        self._opened = False
        self._tail: LiveTail | None = None
        self.stream_key = 0
        self.stream_name = ""
        self.tag = ""
        # Seq of the newest row handed to this subscription (by replay or the tail).
        self.after = 0
        self._buffer: deque[EventMessage] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._closed = False
        self._starved = False
        self._error: BaseException | None = None

    def __aiter__(self) -> Subscription:
        return self

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> bool:
        """Resolve the cursor and start following; False (and empty) when the cursor is not valid here."""
        if not self._opened:
            self._opened = True
            found = await self._open()
            if found is None:
                self._complete = True
            else:
                tail, ref, self.stream_name, complete = found
                self.stream_key, self.after, self.tag = ref.stream_key, ref.seq, ref.tag
                self._complete = complete
                if not complete and not self._closed:
                    self._tail = tail
                    tail.add(self)
        return not (self._complete and self._buffer is None and self._tail is None)

    async def __anext__(self) -> EventMessage:
        if not self._opened:
            await self.open()
        while True:
            buffer = self._buffer
            if buffer:
                event = buffer.popleft()
                if self._starved and self._tail is not None and len(buffer) < self._tail.page_size // 2:
                    self._starved = False
                    self._tail.mark(self)
                return event
            if self._error is not None:
                error, self._error = self._error, None
                await self.aclose()
                raise error
            if self._complete or self._closed:
                await self.aclose()
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                await self.aclose()  # a cancelled reader is gone: stop following for it
                raise
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Stop following the stream; the iterator ends."""
        self._closed = True
        self._buffer = None
        if self._tail is not None:
            self._tail.remove(self)
            self._tail = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, events: list[EventMessage], last_seq: int, complete: bool) -> None:
        """Called by the tail's fetch task only."""
        if self._closed:
            return
        if events:
            if self._buffer is None:
                self._buffer = deque()
            self._buffer.extend(events)
        self.after = last_seq
        if complete:
            self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        """Called by the tail's fetch task only: the reader gets ``error``; the tail forgets it."""
        self._error = error
        if self._tail is not None:
            self._tail.remove(self)
            self._tail = None
        self._wake()


class LiveTail:
    """The listener, the fetch task and the registry of one store's subscriptions.

    Args:
        pool: connections for the catch-up queries.
        listen_dsn: where the LISTEN connection goes; None for poll only.
        poll_interval: seconds between two catch-ups of every subscription, the
            safety net for lost notifications (and the only delivery without a listener).
        ping_interval: seconds between liveness probes of an idle listener.
        page_size: rows per subscription per query; a subscription whose reader
            lags holds at most about this many events.
        retry_deadline: seconds a catch-up query retries transient errors
            before its subscriptions fail.
        catch_up_all_interval: seconds between two catch-ups of every
            subscription that notifications ask for (``*``, or more payloads in
            one round than MAX_PAYLOADS_PER_ROUND) at least: a flood of them
            costs one per interval, and delays the wake-ups it drowned by as much.

    ``unreadable_payloads`` counts the payloads ignored because no writer sends
    them, ``dropped_payloads`` those not read (past MAX_PAYLOADS_PER_ROUND, or
    longer than a writer sends) and replaced by a catch-up of every subscription.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        listen_dsn: str | None,
        poll_interval: float,
        ping_interval: float = 5.0,
        page_size: int = 500,
        retry_deadline: float = 30.0,
        fetch_batch: int = 1000,
        catch_up_all_interval: float = 0.1,
    ) -> None:
        self._pool = pool
        self._listen_dsn = listen_dsn
        self._poll_interval = poll_interval
        self._ping_interval = ping_interval
        self.page_size = page_size
        self._retry_deadline = retry_deadline
        self._fetch_batch = fetch_batch
        self._by_stream: dict[int, set[Subscription]] = {}
        self._due: dict[Subscription, None] = {}  # insertion-ordered set
        self._due_event = asyncio.Event()
        # Payloads received since the fetch loop last looked, each once, and
        # whether more came than were kept.
        self._payloads: set[str] = set()
        self._overflow = False
        self._catch_up_all_interval = catch_up_all_interval
        self._last_catch_up_all = float("-inf")
        self._catch_up_all_timer: asyncio.TimerHandle | None = None
        self._next_flood_log = float("-inf")
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self.reconnects = 0
        self.unreadable_payloads = 0
        self.dropped_payloads = 0

    @property
    def subscriptions(self) -> int:
        return sum(len(subs) for subs in self._by_stream.values())

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._fetch_loop(), name="mcp-pg-events fetch"))
        self._tasks.append(loop.create_task(self._poll_loop(), name="mcp-pg-events poll"))
        if self._listen_dsn is not None:
            self._tasks.append(loop.create_task(self._listen_loop(), name="mcp-pg-events listener"))

    async def wait_listening(self) -> None:
        """Return once the listener is connected (for tests and benchmarks)."""
        await self._listening.wait()

    async def close(self) -> None:
        if self._catch_up_all_timer is not None:
            self._catch_up_all_timer.cancel()
            self._catch_up_all_timer = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subs in list(self._by_stream.values()):
            for sub in list(subs):
                await sub.aclose()

    def add(self, sub: Subscription) -> None:
        self.start()
        self._by_stream.setdefault(sub.stream_key, set()).add(sub)
        self.mark(sub)

    def remove(self, sub: Subscription) -> None:
        subs = self._by_stream.get(sub.stream_key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_stream[sub.stream_key]
        self._due.pop(sub, None)

    def mark(self, sub: Subscription) -> None:
        self._due[sub] = None
        self._due_event.set()

    def mark_streams(self, stream_keys: list[int] | None) -> None:
        if stream_keys is None:
            self.mark_all()
            return
        for key in stream_keys:
            for sub in self._by_stream.get(key, ()):
                self._due[sub] = None
        if self._due:
            self._due_event.set()

    def mark_all(self) -> None:
        for subs in self._by_stream.values():
            for sub in subs:
                self._due[sub] = None
        if self._due:
            self._due_event.set()

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        # Runs for every notification on the channel, from every writer process or
        # from a flood: O(1). A payload longer than a writer sends is not even kept
        # (it means "every stream", see wakeups.decode); the fetch loop reads the
        # others once per round, however many repeat.
        text = str(payload)
        if len(text) <= wakeups.LONGEST_PAYLOAD and len(self._payloads) < MAX_PAYLOADS_PER_ROUND:
            self._payloads.add(text)
        else:
            self._overflow = True
            self.dropped_payloads += 1
        self._due_event.set()

    def _read_payloads(self) -> None:
        payloads, self._payloads = self._payloads, set()
        every_stream, self._overflow = self._overflow, False
        unreadable = self.unreadable_payloads
        for payload in payloads:
            try:
                keys = wakeups.decode(payload)
            except ValueError:
                self.unreadable_payloads += 1
                continue
            if keys is None:
                every_stream = True
            else:
                self.mark_streams(keys)
        if every_stream:
            self._catch_up_all()
        if every_stream or self.unreadable_payloads != unreadable:
            self._log_flood()

    def _catch_up_all(self) -> None:
        """Mark every subscription due, now or, if one was done less than catch_up_all_interval ago, then."""
        if self._catch_up_all_timer is not None:
            return  # one is coming
        loop = asyncio.get_running_loop()
        wait = self._last_catch_up_all + self._catch_up_all_interval - loop.time()
        if wait > 0:
            self._catch_up_all_timer = loop.call_later(wait, self._catch_up_all_now)
        else:
            self._catch_up_all_now()

    def _catch_up_all_now(self) -> None:
        self._catch_up_all_timer = None
        self._last_catch_up_all = asyncio.get_running_loop().time()
        self.mark_all()

    def _log_flood(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_flood_log or not (self.unreadable_payloads or self.dropped_payloads):
            return
        self._next_flood_log = now + FLOOD_LOG_INTERVAL
        logger.warning(
            "live tail: %d notifications on %s ignored (no writer sends them) and %d not read "
            "(over %d in one round, or longer than a writer sends) so far; "
            "a role that may connect to the database may be flooding it",
            self.unreadable_payloads,
            wakeups.CHANNEL,
            self.dropped_payloads,
            MAX_PAYLOADS_PER_ROUND,
        )

    async def _fetch_loop(self) -> None:
        while True:
            await self._due_event.wait()
            # Before the clear: marking from the payloads sets the event again.
            self._read_payloads()
            self._due_event.clear()
            while self._due:
                batch: list[Subscription] = []
                while self._due and len(batch) < self._fetch_batch:
                    sub = next(iter(self._due))
                    del self._due[sub]
                    buffered = len(sub._buffer) if sub._buffer else 0
                    if buffered >= self.page_size:
                        sub._starved = True  # its reader marks it again once it drains
                    elif sub._tail is self:
                        batch.append(sub)
                if batch:
                    try:
                        await self._fetch(batch)
                    except Exception as exc:  # fail these subscriptions, never the tail itself
                        logger.exception("live tail: delivery failed")
                        for sub in batch:
                            sub._fail(exc)

    async def _fetch(self, batch: list[Subscription]) -> None:
        backoff: Backoff | None = None
        while True:
            try:
                rows = await self._pool.fetch(
                    sql.TAIL_PAGES,
                    [sub.stream_key for sub in batch],
                    [sub.after for sub in batch],
                    self.page_size,
                )
                break
            except Exception as exc:
                if is_transient(exc):
                    backoff = backoff or Backoff(self._retry_deadline)
                    if await backoff.wait():
                        continue
                logger.warning("live tail: catch-up query failed: %r", exc)
                for sub in batch:
                    sub._fail(exc)
                return
        by_index: dict[int, list[asyncpg.Record]] = {}
        for row in rows:
            by_index.setdefault(row[0], []).append(row)
        # One decode per row, however many readers. A seq is unique across streams.
        decoded: dict[int, tuple[Any, str | None]] = {}
        for index, sub in enumerate(batch, start=1):
            sub_rows = by_index.get(index)
            if not sub_rows:
                continue
            events = []
            complete = False
            for _, seq, data in sub_rows:
                if data is None:  # a priming row: a cursor, never delivered
                    continue
                known = decoded.get(seq)
                if known is None:
                    try:
                        message = load_message(data)
                    except ValueError as exc:  # a row that will not decode: this stream only
                        logger.error("live tail: event %s of stream %s does not decode", seq, sub.stream_key)
                        sub._fail(exc)
                        break
                    known = decoded[seq] = (message, answered_request(message))
                message, answers = known
                events.append(EventMessage(message, format_event_id(sub.stream_key, seq, sub.tag)))
                if ends_stream(answers, sub.stream_name):
                    complete = True
                    break
            if sub._tail is not self:
                continue  # failed above
            sub._deliver(events, sub_rows[-1][1], complete)
            if complete:
                self.remove(sub)
            elif len(sub_rows) == self.page_size:
                self.mark(sub)  # more to read

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            self.mark_all()

    async def _listen_loop(self) -> None:
        assert self._listen_dsn is not None
        backoff: Backoff | None = None
        while True:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await asyncpg.connect(
                    self._listen_dsn, timeout=10, server_settings={"application_name": LISTENER_NAME}
                )
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(functools.partial(_settle, lost))
                await conn.add_listener(wakeups.CHANNEL, self._on_notification)
                # Whatever committed while we were not listening was announced to nobody.
                self.mark_all()
                self._listening.set()
                backoff = None
                while True:
                    try:
                        await asyncio.wait_for(asyncio.shield(lost), self._ping_interval)
                        raise ConnectionError("the listener connection closed")
                    except asyncio.TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=self._ping_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                self.reconnects += 1
                logger.warning("live tail: listener lost, reconnecting: %r", exc)
                backoff = backoff if backoff is not None else Backoff(float("inf"), cap=5.0)
                await backoff.wait()
            finally:
                if conn is not None:
                    conn.terminate()
