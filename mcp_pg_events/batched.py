"""One reserved stream that a process's publishers share, a JSON array of their payloads per row.

The subscription bus and the rest_framework topic router publish this way:
what is published while a row is being written goes in the next row, so under
load many publishes share one commit, and each publisher's payloads keep the
order it published them in. Readers split a row with ``json.loads``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .event_log import StreamState

if TYPE_CHECKING:
    from .store import PostgresEventStore


class BatchedStream:
    """Appends payloads to ``stream`` of the reserved session ``session_key``, batched into rows.

    Args:
        session_key: the reserved session the stream belongs to (no MCP session can have it).
        stream: the stream's name.
    """

    __slots__ = ("_flushing", "_pending", "_state", "session_key", "stream")

    def __init__(self, session_key: str, stream: str) -> None:
        self.session_key = session_key
        self.stream = stream
        self._state = StreamState()
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def publish(self, store: PostgresEventStore, payload: bytes) -> None:
        """Return once ``payload`` (one JSON value) is committed; raise what the append raised."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((payload, done))
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush(store))
        await done

    async def drain(self) -> None:
        """Wait for the rows being written, then forget the stream (a new store starts it afresh)."""
        if self._flushing is not None:
            await asyncio.gather(asyncio.shield(self._flushing), return_exceptions=True)
        self._state = StreamState()

    async def _flush(self, store: PostgresEventStore) -> None:
        limit = store.settings.max_batch_bytes
        try:
            while self._pending:
                batch: list[tuple[bytes, asyncio.Future[None]]] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0][0]) <= limit):
                    item = self._pending.pop(0)
                    batch.append(item)
                    size += len(item[0])
                row = b"[" + b",".join(payload for payload, _ in batch) + b"]"
                try:
                    async with self._state.lock:
                        await store.log.append(self.session_key, self.stream, self._state, row)
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._flushing = None
