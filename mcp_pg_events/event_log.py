"""The event log's operations, by session key and stream: append, resolve a cursor, replay, follow.

Every MCP-facing view (``SessionEventStore``) and every other user of the log
goes through these public methods; the log holds no session state of its own.
A caller that appends keeps a ``StreamState`` per stream it writes (the stream's
key, tag and newest seq, and the lock that orders its appends in-process) and
passes it to every ``append`` of that stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, StreamId

from . import metrics, sql
from .database import Database
from .errors import StoreUnavailableError, StreamIdTooLongError
from .event_ids import EventRef, event_id_affixes, format_event_id, new_tag, parse_event_id
from .group_commit import GroupCommitWriter, StreamGoneError
from .live import LiveTail, StreamFollower, Subscription, ends_stream
from .messages import answered_request, load_message, load_messages

logger = logging.getLogger(__name__)

# A btree entry must stay well under PostgreSQL's ~2.7 kB limit: a longer stream
# id is indexed by its hash (see stream_name).
INDEXED_STREAM_ID_BYTES = 2048
# A stream id is a client's JSON-RPC request id, read back on every resume: a
# longer one is refused (StreamIdTooLongError).
MAX_STREAM_ID_BYTES = 1024 * 1024
MAX_SESSION_KEY_LENGTH = 512


class StreamState:
    """What a writer knows of one of its streams. ``lock`` orders its appends in-process."""

    __slots__ = ("key", "last_seq", "lock", "tag", "users")

    def __init__(self) -> None:
        self.key: int | None = None
        self.tag = ""
        self.last_seq = 0
        self.lock = asyncio.Lock()
        # Appends holding or waiting for the lock: a stream in use is never evicted.
        self.users = 0


class StreamHead(NamedTuple):
    """Where a stream is now: its key, its tag and its newest seq (0 when empty)."""

    key: int
    tag: str
    last_seq: int


class Cursor(NamedTuple):
    """A replay or subscription cursor that exists in its session."""

    ref: EventRef
    stream_name: str
    # The newest message at or before the cursor: a response there means the stream is over.
    last_message: bytes | None
    # The worker that runs the stream's request (None: unknown).
    owner: int | None


def stream_name(stream_id: str) -> tuple[bytes, bytes | None]:
    """The name the streams table indexes a stream by, and its id in full when the name is its hash."""
    # surrogatepass: a JSON string may hold a lone surrogate, and so may a request id.
    encoded = stream_id.encode("utf-8", "surrogatepass")
    if len(encoded) <= INDEXED_STREAM_ID_BYTES:
        return encoded, None
    if len(encoded) > MAX_STREAM_ID_BYTES:
        raise StreamIdTooLongError(
            f"stream id is {len(encoded)} bytes long; the store keeps at most {MAX_STREAM_ID_BYTES}"
        )
    # 0xFF never occurs in UTF-8, lone surrogates included: no id's own name starts
    # with it, so a hashed name never equals one.
    return b"\xff" + hashlib.sha256(encoded).digest(), encoded


def short_key(session_key: str) -> str:
    """The first characters of a session key, for logs: enough to find the session, not to take it over."""
    return session_key[:8] + "..." if len(session_key) > 8 else session_key


def valid_session_key(key: object) -> bool:
    """True for a key a session can have: a non-empty text without NUL or lone surrogates."""
    if not isinstance(key, str) or not key or len(key) > MAX_SESSION_KEY_LENGTH or "\x00" in key:
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _forget(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class EventLog:
    """Appends, cursors, replays and live subscriptions over the gateway.

    Args:
        db: the gateway every query goes through.
        writer: the group-commit writer appends go through.
        tail: returns the live tail (started on first use).
        replay_batch_size: rows per replay query.
    """

    def __init__(
        self,
        db: Database,
        writer: GroupCommitWriter,
        tail: Callable[[], LiveTail],
        *,
        replay_batch_size: int,
        worker: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._db = db
        self._writer = writer
        self._tail = tail
        self._page = replay_batch_size
        self._worker = worker

    async def append(
        self, session_key: str, stream_id: str, stream: StreamState, data: bytes | None
    ) -> EventId:
        """Append one event (``data`` None: a priming event) and return its id once committed.

        The caller holds ``stream.lock``.
        """
        started = time.perf_counter()
        try:
            event_id = await self._append(session_key, stream_id, stream, data)
        except Exception as exc:
            metrics.appended(time.perf_counter() - started, exc)
            # The SDK ends a session whose store raises: say which, never with the message.
            logger.error(
                "store_event failed for session %s, stream %s: %r",
                short_key(session_key),
                stream.key if stream.key is not None else repr(stream_id[:40]),
                exc,
            )
            raise
        metrics.appended(time.perf_counter() - started)
        return event_id

    async def _append(
        self, session_key: str, stream_id: str, stream: StreamState, data: bytes | None
    ) -> EventId:
        for _ in range(3):
            if stream.key is None:
                name, full_name = stream_name(stream_id)
                row = await self._db.fetchrow(
                    sql.UPSERT_STREAM, session_key, name, new_tag(), full_name, self._worker()
                )
                assert row is not None
                stream.key, stream.tag, stream.last_seq = row["id"], row["tag"], row["last_seq"] or 0
            assert stream.key is not None
            try:
                seq = await self._writer.append(stream.key, data, stream.last_seq)
            except StreamGoneError:
                # Retention removed the stream row while it was empty: make it again.
                stream.key = None
                continue
            stream.last_seq = seq
            return format_event_id(stream.key, seq, stream.tag)
        raise StoreUnavailableError(f"event not stored: stream {stream_id!r} kept disappearing")

    async def open_cursor(self, session_key: str, last_event_id: EventId) -> Cursor | None:
        """The cursor, resolved, or None when it is not valid in this session."""
        ref = parse_event_id(last_event_id)
        if ref is None:
            logger.debug("replay: %r is not an event id of this store", last_event_id[:80])
            return None
        row = await self._db.fetchrow(sql.CURSOR_STREAM, ref.stream_key, ref.seq, ref.tag, session_key)
        if row is None:
            logger.debug("replay: cursor %s is unknown, expired or not this session's", last_event_id)
            return None
        name = bytes(row["name"]).decode("utf-8", "surrogatepass")
        return Cursor(ref, name, row["last_message"], row["worker_id"])

    async def replay(
        self, session_key: str, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        """Send the events after ``last_event_id`` of its stream; the stream id, or None for a bad cursor."""
        ref = parse_event_id(last_event_id)
        first = None
        if ref is not None:
            # The cursor's check and the first page: one round trip.
            first = await self._db.fetch(
                sql.REPLAY_FROM_CURSOR, ref.stream_key, ref.seq, ref.tag, session_key, self._page
            )
        if ref is None or not first:
            logger.debug("replay: cursor %r is not valid in this session", last_event_id[:80])
            metrics.replayed(None)
            return None
        stream_name = bytes(first[0][0]).decode("utf-8", "surrogatepass")
        page = self._page
        sent = 0
        prefix, suffix = event_id_affixes(ref.stream_key, ref.tag)

        def fetch(after: int) -> asyncio.Task[Any]:
            return asyncio.ensure_future(self._db.fetch(sql.REPLAY_PAGE, ref.stream_key, after, page))

        # Read until a short page (which also picks up what was appended while we
        # were sending), fetching the next page while this one is decoded and
        # sent: the database and the decoding then overlap, for two pages of memory.
        rows: list[Any] = [(row[1], row[2]) for row in first] if first[0][1] is not None else []
        following: asyncio.Task[Any] | None = None
        try:
            while True:
                following = fetch(rows[-1][0]) if len(rows) == page else None
                messages = load_messages([row[1] for row in rows])
                for row, message in zip(rows, messages, strict=True):
                    # format_event_id, its constant parts made once per replay.
                    await send_callback(EventMessage(message, f"{prefix}{row[0]}{suffix}"))
                    sent += 1
                if following is None:
                    break
                rows = await following
                following = None
        finally:
            if following is not None:
                following.cancel()
                # A page fetched in vain: its error, if it failed first, is nobody's to raise.
                following.add_done_callback(_forget)
            metrics.replayed(sent)
        return stream_name

    def subscribe(self, session_key: str, last_event_id: EventId) -> Subscription:
        """Follow the stream of ``last_event_id`` live, from just after it (see ``Subscription``)."""

        async def open_cursor() -> tuple[LiveTail, EventRef, str, bool, int | None] | None:
            cursor = await self.open_cursor(session_key, last_event_id)
            # Its events count as the live tail's, not as replayed ones.
            metrics.replayed(None if cursor is None else 0)
            if cursor is None:
                return None
            last = cursor.last_message
            complete = last is not None and ends_stream(
                answered_request(load_message(last)), cursor.stream_name
            )
            return self._tail(), cursor.ref, cursor.stream_name, complete, cursor.owner

        return Subscription(open_cursor)

    async def stream_head(
        self, session_key: str, stream_id: str, *, create: bool = False
    ) -> StreamHead | None:
        """Where the stream is now; None when it does not exist (unless ``create``: then it does)."""
        name, full_name = stream_name(stream_id)
        if create:
            row = await self._db.fetchrow(sql.UPSERT_STREAM, session_key, name, new_tag(), full_name, None)
        else:
            row = await self._db.fetchrow(sql.STREAM_HEAD, session_key, name)
        if row is None:
            return None
        return StreamHead(row["id"], row["tag"], row["last_seq"] or 0)

    def follow(
        self, head: StreamHead, on_rows: Callable[[list[tuple[int, bytes | None]]], None]
    ) -> StreamFollower:
        """Hand every row committed after ``head`` to ``on_rows``, from any process, until ``unfollow``."""
        follower = StreamFollower(head.key, head.last_seq, on_rows)
        self._tail().add(follower)
        return follower

    def unfollow(self, follower: StreamFollower) -> None:
        """Stop following; idempotent."""
        if follower._tail is not None:
            follower._tail.remove(follower)

    async def end_session(self, key: str, reason: str | None = None) -> int | None:
        """Mark the session ``key`` ended: retention deletes its events after its ended-session grace.

        Returns its row id when this call ended it.
        """
        if not valid_session_key(key):  # no session can have any other key
            return None
        ended: int | None = await self._db.fetchval(sql.END_SESSION, key, reason)
        return ended
