"""Wake-up notifications: which streams have new events, sent after their commit.

One channel, versioned so that a future payload format can live beside this one.
A payload is the decimal keys of the streams that changed, comma-separated, at
most ``MAX_KEYS`` of them: a writer sends as many payloads as it needs. ``*``
means "look at every stream" (the previous release sends it when its list would
not fit in one notification, and lists of any length up to that).

Any role that may connect to the database may NOTIFY on the channel, and every
listener must read what it sends: a listener reads a bounded amount of each
payload, ignores one it cannot read, and takes a longer one than a writer sends
for ``*`` (see ``live.LiveTail``).

NOTIFY is never part of an append's transaction: at commit it takes a cluster-wide
lock held through the WAL flush, and when the notification queue is full (a
listener stuck somewhere) the transaction fails. So an append commits and is
acknowledged first, and the wake-up follows on its own, coalesced: while one is
in flight, the streams that change meanwhile wait for the next. A lost wake-up
only delays readers until their catch-up query, never loses an event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from . import sql
from .database import Database

logger = logging.getLogger(__name__)

CHANNEL = "mcp_events_v1"
# Sessions that ended, by row id (never the session id: any role that may connect
# may LISTEN), in the same payload format; see registry.py.
ENDED_CHANNEL = "mcp_events_ended_v1"
EVERY_STREAM = "*"
# PostgreSQL refuses payloads of 8000 bytes or more.
MAX_PAYLOAD = 7900
# Stream keys per payload. What a listener parses of one payload stays small (a
# flood of payloads costs the event loop little), and MAX_KEYS keys of 19 digits
# and their commas stay far under MAX_PAYLOAD.
MAX_KEYS = 64
# The longest payload a writer of this version sends: MAX_KEYS keys of 19 digits.
LONGEST_PAYLOAD = MAX_KEYS * 20 - 1
_DIGITS_AND_COMMAS = b"0123456789,"


def encode(stream_keys: Iterable[int]) -> list[str]:
    """The payloads naming ``stream_keys``: MAX_KEYS keys each at most, none longer than LONGEST_PAYLOAD."""
    keys = [str(key) for key in stream_keys]
    return [",".join(keys[i : i + MAX_KEYS]) for i in range(0, len(keys), MAX_KEYS)]


def decode(payload: str) -> list[int] | None:
    """The stream keys ``payload`` names; None for every stream.

    None also, without reading it, for a payload longer than LONGEST_PAYLOAD or
    naming more than MAX_KEYS streams: no writer of this version sends one (the
    previous release did), and reading it would cost a listener more than a
    payload may. Raises ``ValueError`` for a payload in no format of this
    channel, which no writer sent.
    """
    if payload == EVERY_STREAM or len(payload) > LONGEST_PAYLOAD:
        return None
    # In C over the bytes: str.replace or a regex take several times as long.
    if not payload.isascii() or payload.encode().translate(None, _DIGITS_AND_COMMAS):
        raise ValueError(f"not a wake-up payload: {payload[:40]!r}")
    if payload.count(",") >= MAX_KEYS:
        return None
    keys = payload.split(",")
    if not all(keys):
        raise ValueError(f"not a wake-up payload: {payload[:40]!r}")
    return [int(key) for key in keys]


class Notifier:
    """Sends coalesced wake-ups on a pool connection, best effort.

    Args:
        db: the gateway; a wake-up is tried once, never retried (the next one, or
            the readers' catch-up, makes up for it).
        min_interval: seconds between two wake-ups at least. A wake-up is a
            transaction of its own that competes with the appends for the
            server; a writer committing back to back sends one per interval
            (naming every stream that changed), not one per commit. After a
            quiet spell the first one goes at once.
        channel: where they go; another channel carries other keys the same
            way (the ended sessions' row ids, see ``registry.py``).
    """

    def __init__(self, db: Database, *, min_interval: float, channel: str = CHANNEL) -> None:
        self._db = db
        self._channel = channel
        self._min_interval = min_interval
        self._pending: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_sent = float("-inf")

    def wake(self, stream_keys: Iterable[int]) -> None:
        """Announce new events on ``stream_keys``; returns at once."""
        self._pending.update(stream_keys)
        if self._task is None and self._pending:
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                wait = self._last_sent + self._min_interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                keys, self._pending = self._pending, set()
                self._last_sent = loop.time()
                try:
                    await self._db.execute(sql.NOTIFY, self._channel, encode(sorted(keys)), retry=False)
                except Exception as exc:  # best effort: readers catch up by query
                    logger.debug("wake-up not sent, readers will catch up: %r", exc)
        finally:
            self._task = None

    async def close(self) -> None:
        """Wait for the wake-up in flight, if any."""
        if self._task is not None:
            await asyncio.shield(self._task)
