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
from collections import deque
from collections.abc import Callable
from typing import Any

import asyncpg
from mcp.server.streamable_http import EventMessage

from . import sql, wakeups
from .compat import STANDALONE_STREAM
from .database import Database
from .event_ids import format_event_id
from .listener import Listener
from .messages import answered_request, load_message
from .settings import StoreSettings

logger = logging.getLogger(__name__)


def ends_stream(answered: str | None, stream_name: str) -> bool:
    """True when a message answering request ``answered`` (see ``answered_request``) ends ``stream_name``."""
    return answered is not None and answered == stream_name and stream_name != STANDALONE_STREAM


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
    """The fetch task and the registry of one store's subscriptions, woken by its listener.

    Args:
        db: the gateway the catch-up queries go through (a transient error is
            retried until its deadline, then fails the subscriptions concerned).
        listener: the store's LISTEN connection; None for poll only.
        settings: ``poll_interval`` (the safety net for lost notifications, and
            the only delivery without a listener), ``replay_batch_size`` (rows per
            subscription per query: a subscription whose reader lags holds at
            most about this many events) and ``tail_batch`` (subscriptions per query).
    """

    def __init__(self, db: Database, listener: Listener | None, settings: StoreSettings) -> None:
        self._db = db
        self._listener = listener
        self._poll_interval = settings.poll_interval
        self.page_size = settings.replay_batch_size
        self._fetch_batch = settings.tail_batch
        self._by_stream: dict[int, set[Subscription]] = {}
        self._due: dict[Subscription, None] = {}  # insertion-ordered set
        self._due_event = asyncio.Event()
        # Payloads received since the fetch loop last looked, each once.
        self._payloads: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def subscriptions(self) -> int:
        return sum(len(subs) for subs in self._by_stream.values())

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._fetch_loop(), name="mcp-pg-events fetch"))
        self._tasks.append(loop.create_task(self._poll_loop(), name="mcp-pg-events poll"))
        if self._listener is not None:
            self._tasks.append(loop.create_task(self._listen(self._listener)))

    async def _listen(self, listener: Listener) -> None:
        await listener.listen(wakeups.CHANNEL, self._on_notification, self.mark_all)

    async def close(self) -> None:
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

    def _on_notification(self, payload: str) -> None:
        # Runs in asyncpg's protocol callback, for every notification on the channel
        # (from every writer process, or a flood): keep it O(1); the fetch loop reads
        # the payloads once per round, however many repeat.
        self._payloads.add(payload)
        self._due_event.set()

    def _read_payloads(self) -> None:
        payloads, self._payloads = self._payloads, set()
        for payload in payloads:
            keys = wakeups.decode(payload)
            self.mark_streams(keys)
            if keys is None:
                return  # every subscription is due already

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
        try:
            rows = await self._db.fetch(
                sql.TAIL_PAGES,
                [sub.stream_key for sub in batch],
                [sub.after for sub in batch],
                self.page_size,
            )
        except Exception as exc:
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
