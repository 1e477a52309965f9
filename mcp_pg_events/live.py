"""Live tail: subscriptions that yield a stream's events as they commit, in any process.

One ``LiveTail`` per store (so, usually, per process) follows the store's one
LISTEN connection (``listener.py``), shared by every subscription. Its
notification handler only marks subscriptions as due; one fetch task then reads, in a single query, the
events after the cursor of every due subscription, and hands each its rows.
Delivery therefore never depends on a notification arriving: a notification only
says when to look. What is looked at is always "after my cursor", so nothing is
skipped (a stream never has two appends in flight, see ``group_commit``) and
nothing comes twice (a cursor only moves forward, and only the fetch task moves it).

Notifications are lost when the listener is down, so every (re)connect is followed
by a catch-up of every subscription, and a slow poll catches up everything
periodically as a safety net. Without a listener (``listen=False``, e.g. behind
PgBouncer in transaction mode) the poll alone delivers everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from mcp.server.streamable_http import EventMessage

from . import metrics, sql, wakeups
from .compat import STANDALONE_STREAM
from .database import Database
from .event_ids import format_event_id
from .listener import Listener
from .messages import answered_request, load_message
from .settings import StoreSettings

if TYPE_CHECKING:
    from .workers import OrphanWatch

logger = logging.getLogger(__name__)

# Distinct payloads kept between two fetch rounds at most. Writers coalesce their
# wake-ups (a statement per writer process per notify_interval, one payload per 64
# streams), so a round rarely has more; past it, every subscription is caught up
# instead of reading them.
MAX_PAYLOADS_PER_ROUND = 128
# Catch-ups of every subscription asked for by notifications (``*``, or more
# payloads in one round than MAX_PAYLOADS_PER_ROUND) are this many seconds apart at
# least: a flood of them costs one per interval, and delays the wake-ups it
# drowned by as much.
CATCH_UP_ALL_INTERVAL = 0.1
# Rows read for a follower's first catch-up, in a query of the new followers only:
# a crowd of resumed streams then gets its first events after a query of this many
# rows each, not of a full page each; its next pages come while it sends these.
FIRST_PAGE = 20
# Rows one catch-up query is planned for, counting a page for each follower whose
# last query filled its page (it is behind), FIRST_PAGE for a new one and a row for
# any other: it bounds the memory a crowd of lagging followers takes at once, and
# the wait of the followers after them. An estimate, not a limit: a follower that
# was not behind can have a page waiting (after a reconnect, say).
ROWS_PER_FETCH = 10_000
# Ignored and dropped payloads are logged once per this many seconds at most.
FLOOD_LOG_INTERVAL = 60.0


def ends_stream(answered: str | None, stream_name: str) -> bool:
    """True when a message answering request ``answered`` (see ``answered_request``) ends ``stream_name``."""
    return answered is not None and answered == stream_name and stream_name != STANDALONE_STREAM


class Follower:
    """One stream that the tail follows after a cursor: what the tail asks of anything it follows.

    The tail's fetch task is the only one that moves ``after`` on, and calls
    ``_take`` with the rows that follow it, in order, a page at a time.
    """

    __slots__ = ("_behind", "_new", "_tail", "after", "stream_key")

    def __init__(self, stream_key: int = 0, after: int = 0) -> None:
        self._tail: LiveTail | None = None
        self.stream_key = stream_key
        # Seq of the newest row handed to this follower (by replay or the tail).
        self.after = after
        # Not caught up yet: its first query reads FIRST_PAGE rows.
        self._new = True
        # Its last query filled a page: more rows are waiting.
        self._behind = False

    def _ready(self) -> bool:
        """False while the follower holds as much as it may: the tail skips it until it marks itself again."""
        return True

    def _take(self, rows: list[asyncpg.Record], shared: dict[int, Any] | None) -> None:
        """Take the rows (``(index, seq, message)``) after the cursor, and move the cursor on.

        ``shared`` (None when this follower is its stream's only one in the fetch)
        caches decoded messages by seq for the stream's other followers.
        """
        raise NotImplementedError

    def _fail(self, error: BaseException) -> None:
        """A catch-up for this follower failed (after the gateway's retries)."""
        raise NotImplementedError


class StreamFollower(Follower):
    """Hands every row of a stream after a cursor to ``on_rows``, in order, until removed.

    For consumers that read raw rows, not SDK messages (the subscription bus,
    the brokers). ``on_rows`` gets ``[(seq, message bytes or None), ...]`` on the
    event loop and must not block; what it raises is logged. A failed catch-up
    keeps the follower and its cursor: the next wake-up or poll tries again, so
    nothing is skipped.

    A consumer that cannot keep up calls ``pause()`` (from ``on_rows`` or
    anywhere on the tail's loop): the tail then reads nothing more for it, its
    cursor stays where it is, and ``resume()`` has it caught up from there. The
    rows wait in the table, not in memory.
    """

    __slots__ = ("_on_rows", "_paused")

    def __init__(
        self, stream_key: int, after: int, on_rows: Callable[[list[tuple[int, bytes | None]]], None]
    ) -> None:
        super().__init__(stream_key, after)
        self._on_rows = on_rows
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Read nothing more for this follower until ``resume()``; on the tail's loop."""
        self._paused = True

    def resume(self) -> None:
        """Read on from the cursor; on the tail's loop. Idempotent."""
        if self._paused:
            self._paused = False
            if self._tail is not None:
                self._tail.mark(self)

    def _ready(self) -> bool:
        return not self._paused

    def _take(self, rows: list[asyncpg.Record], shared: dict[int, Any] | None) -> None:
        self.after = rows[-1][1]
        self._on_rows([(seq, data) for _, seq, data in rows])

    def _fail(self, error: BaseException) -> None:
        logger.warning(
            "live tail: catch-up of stream %s failed, trying again later: %r", self.stream_key, error
        )


class Subscription(Follower):
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
        "_waiter",
        "owner",
        "stream_name",
        "tag",
    )

    def __init__(self, opener: Callable[[], Any]) -> None:
        super().__init__()
        self._open = opener
        self._opened = False
        self.stream_name = ""
        self.tag = ""
        # The worker that runs the stream's request (None: unknown).
        self.owner: int | None = None
        # Rows taken and not yet read: (seq, message bytes, the fetch's shared decodes or None).
        self._buffer: deque[tuple[int, bytes, dict[int, Any] | None]] | None = None
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
                tail, ref, self.stream_name, complete, self.owner = found
                self.stream_key, self.after, self.tag = ref.stream_key, ref.seq, ref.tag
                self._complete = complete
                if not complete and not self._closed:
                    tail.add(self)
        return not (self._complete and self._buffer is None and self._tail is None)

    async def __anext__(self) -> EventMessage:
        if not self._opened:
            await self.open()
        while True:
            buffer = self._buffer
            if buffer:
                seq, data, shared = buffer.popleft()
                if self._starved and self._tail is not None and len(buffer) <= self._tail.page_size // 2:
                    self._starved = False
                    self._tail.mark(self)
                return await self._event(seq, data, shared)
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
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ready(self) -> bool:
        if self._buffer is not None and len(self._buffer) >= self._tail_page():
            self._starved = True  # its reader marks it again once it drains
            return False
        return True

    def _tail_page(self) -> int:
        return self._tail.page_size if self._tail is not None else 0

    def _take(self, rows: list[asyncpg.Record], shared: dict[int, Any] | None) -> None:
        # Rows only: the reader decodes them in its own task (``_event``), so that the
        # fetch task's round costs no decoding, and a crowd of resumed streams each gets
        # its first event as soon as the query returns, not after all were decoded.
        # The reader also ends the following, at the stream's end (a closed one is
        # no longer followed, so never gets here).
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        for _, seq, data in rows:
            if data is not None:  # a priming row: a cursor, never delivered
                buffer.append((seq, data, shared))
        self.after = rows[-1][1]
        self._wake()

    async def _event(self, seq: int, data: bytes, shared: dict[int, Any] | None) -> EventMessage:
        """The event of row ``seq``; after the response that ends the stream, stop following."""
        known = None if shared is None else shared.get(seq)
        if known is None:
            try:
                message = load_message(data)
            except ValueError:  # a row that will not decode: this stream only
                logger.error("live tail: event %s of stream %s does not decode", seq, self.stream_key)
                await self.aclose()
                raise
            known = (message, answered_request(message))
            if shared is not None:
                shared[seq] = known
        message, answers = known
        if ends_stream(answers, self.stream_name):
            self._complete = True
            self._buffer = None  # rows after the response belong to no request
            self._error = None  # a query that failed after this was read: the stream is whole
            if self._tail is not None:
                self._tail.remove(self)
        return EventMessage(message, format_event_id(self.stream_key, seq, self.tag))

    def _fail(self, error: BaseException) -> None:
        """The reader gets ``error``; the tail forgets this subscription."""
        self._error = error
        if self._tail is not None:
            self._tail.remove(self)
        self._wake()


class LiveTail:
    """The fetch task and the registry of one store's subscriptions, woken by its listener.

    Args:
        db: the gateway the catch-up queries go through (a transient error is
            retried until its deadline, then fails the subscriptions concerned).
        listener: the store's LISTEN connection; None for poll only.
        settings: ``poll_interval`` (the safety net for lost notifications, and
            the only delivery without a listener), ``replay_batch_size`` (rows per
            subscription per query: a subscription whose reader lags holds at
            most about this many events) and ``tail_batch`` (subscriptions per query).

    ``unreadable_payloads`` counts the payloads ignored because no writer sends
    them, ``dropped_payloads`` those not read (past MAX_PAYLOADS_PER_ROUND, or
    longer than a writer sends) and replaced by a catch-up of every subscription.
    """

    def __init__(
        self,
        db: Database,
        listener: Listener | None,
        settings: StoreSettings,
        orphans: OrphanWatch | None = None,
    ) -> None:
        self._db = db
        self._listener = listener
        # Told of the subscriptions that follow another worker's request.
        self._orphans = orphans
        self._poll_interval = settings.poll_interval
        self.page_size = settings.replay_batch_size
        self._first_page = min(FIRST_PAGE, self.page_size)
        self._fetch_batch = settings.tail_batch
        self._by_stream: dict[int, set[Follower]] = {}
        self._due: dict[Follower, None] = {}  # insertion-ordered set
        self._due_event = asyncio.Event()
        # Payloads received since the fetch loop last looked, each once, and
        # whether more came than were kept.
        self._payloads: set[str] = set()
        self._overflow = False
        self._last_catch_up_all = float("-inf")
        self._catch_up_all_timer: asyncio.TimerHandle | None = None
        self._next_flood_log = float("-inf")
        self._tasks: list[asyncio.Task[None]] = []
        self.unreadable_payloads = 0
        self.dropped_payloads = 0
        # Kept by add and remove, so that a metric reader's thread can read it.
        self._followers = 0
        metrics.follow_tail(self)

    @property
    def subscriptions(self) -> int:
        """How many streams are followed, by subscriptions and other followers."""
        return self._followers

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._fetch_loop(), name="mcp-pg-events fetch"))
        self._tasks.append(loop.create_task(self._poll_loop(), name="mcp-pg-events poll"))
        if self._listener is not None:
            self._tasks.append(loop.create_task(self._listen(self._listener)))

    async def _listen(self, listener: Listener) -> None:
        await listener.listen(wakeups.CHANNEL, self._on_notification, self._on_connect)

    def _on_connect(self) -> None:
        metrics.caught_up("listener_connect")
        self.mark_all()

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
                if isinstance(sub, Subscription):
                    await sub.aclose()
                else:
                    self.remove(sub)

    def add(self, follower: Follower) -> None:
        """Follow ``follower``'s stream after its cursor, from now on (a catch-up first)."""
        self.start()
        follower._tail = self
        subs = self._by_stream.setdefault(follower.stream_key, set())
        if follower not in subs:
            subs.add(follower)
            self._followers += 1
        if self._orphans is not None and isinstance(follower, Subscription):
            self._orphans.watch(follower)
        self.mark(follower)

    def remove(self, follower: Follower) -> None:
        if self._orphans is not None and isinstance(follower, Subscription):
            self._orphans.unwatch(follower)
        subs = self._by_stream.get(follower.stream_key)
        if subs is not None and follower in subs:
            subs.remove(follower)
            self._followers -= 1
            if not subs:
                del self._by_stream[follower.stream_key]
        self._due.pop(follower, None)
        follower._tail = None

    def mark(self, sub: Follower) -> None:
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

    def _on_notification(self, payload: str) -> None:
        # Runs for every notification on the channel, from every writer process or
        # from a flood: O(1). A payload longer than a writer sends is not even kept
        # (it means "every stream", see wakeups.decode); the fetch loop reads the
        # others once per round, however many repeat.
        if len(payload) <= wakeups.LONGEST_PAYLOAD and len(self._payloads) < MAX_PAYLOADS_PER_ROUND:
            self._payloads.add(payload)
        else:
            self._overflow = True
            self.dropped_payloads += 1
        self._due_event.set()

    def _read_payloads(self) -> None:
        payloads, self._payloads = self._payloads, set()
        every_stream, self._overflow = self._overflow, False
        unreadable = self.unreadable_payloads
        if payloads:
            metrics.woken(len(payloads))
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
        """Mark every follower due, now or, if that was done less than CATCH_UP_ALL_INTERVAL ago, then."""
        if self._catch_up_all_timer is not None:
            return  # one is coming
        loop = asyncio.get_running_loop()
        wait = self._last_catch_up_all + CATCH_UP_ALL_INTERVAL - loop.time()
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
                batch: list[Follower] = []
                rows = 0
                while self._due and len(batch) < self._fetch_batch and rows < ROWS_PER_FETCH:
                    sub = next(iter(self._due))
                    del self._due[sub]
                    if sub._tail is self and sub._ready():
                        batch.append(sub)
                        rows += self._first_page if sub._new else self.page_size if sub._behind else 1
                new = [sub for sub in batch if sub._new]
                if new:
                    batch = [sub for sub in batch if not sub._new]
                    await self._fetch_or_fail(new, self._first_page)
                if batch:
                    await self._fetch_or_fail(batch, self.page_size)

    async def _fetch_or_fail(self, batch: list[Follower], limit: int) -> None:
        try:
            await self._fetch(batch, limit)
        except Exception as exc:  # fail these followers, never the tail itself
            logger.exception("live tail: delivery failed")
            self._fail_followed(batch, exc)

    def _fail_followed(self, batch: list[Follower], error: BaseException) -> None:
        # Only those still followed: one whose reader read its stream's end, or left,
        # while the query ran has nothing more to learn from it.
        for sub in batch:
            if sub._tail is self:
                sub._fail(error)

    async def _fetch(self, batch: list[Follower], limit: int) -> None:
        keys = [sub.stream_key for sub in batch]
        try:
            rows = await self._db.fetch(sql.TAIL_PAGES, keys, [sub.after for sub in batch], limit)
        except Exception as exc:
            logger.warning("live tail: catch-up query failed: %r", exc)
            self._fail_followed(batch, exc)
            return
        metrics.fetched(len(rows))
        by_index: dict[int, list[asyncpg.Record]] = {}
        for row in rows:
            by_index.setdefault(row[0], []).append(row)
        # One decode per row, however many readers: the followers of a stream followed
        # more than once in this fetch share their decodes, by seq.
        shared: dict[int, dict[int, Any]] = {}
        if len(set(keys)) < len(keys):
            shared = {key: {} for key, count in Counter(keys).items() if count > 1}
        for index, sub in enumerate(batch, start=1):
            sub._new = False
            sub_rows = by_index.get(index)
            sub._behind = more = sub_rows is not None and len(sub_rows) == limit
            if not sub_rows or sub._tail is not self:
                continue
            try:
                sub._take(sub_rows, shared.get(sub.stream_key))
            except Exception as exc:  # one follower's failure is its own
                logger.exception("live tail: a follower of stream %s failed", sub.stream_key)
                sub._fail(exc)
                continue
            if more and sub._tail is self:
                self.mark(sub)  # more to read

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            metrics.caught_up("poll")
            self.mark_all()
