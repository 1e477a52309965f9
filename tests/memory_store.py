"""An in-memory store with the same contract as PostgresEventStore: the test double.

The contract suite runs against both, so the double cannot drift from the real thing.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any

from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId

from mcp_pg_events import StreamIdTooLongError, UnscopedEventStoreError
from mcp_pg_events.event_log import MAX_STREAM_ID_BYTES
from mcp_pg_events.messages import dump_message, event_message


class MemoryEventStore(EventStore):
    def __init__(self) -> None:
        self._seq = itertools.count(1)
        # event id -> (session key, stream id, seq); stream -> [(seq, event id, data)]
        self._index: dict[str, tuple[str, str, int]] = {}
        self._streams: dict[tuple[str, str], list[tuple[int, str, bytes | None]]] = {}

    def session(self, key: str) -> MemorySessionStore:
        return MemorySessionStore(self, key)

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        raise UnscopedEventStoreError("scope it with session(key)")

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        raise UnscopedEventStoreError("scope it with session(key)")


class MemorySessionStore(EventStore):
    def __init__(self, root: MemoryEventStore, key: str) -> None:
        self._root = root
        self.key = key

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        if len(stream_id.encode("utf-8", "surrogatepass")) > MAX_STREAM_ID_BYTES:
            raise StreamIdTooLongError("stream id too long")
        seq = next(self._root._seq)
        event_id = f"m{seq}-{secrets.token_hex(6)}"
        data = None if message is None else dump_message(message)
        self._root._streams.setdefault((self.key, stream_id), []).append((seq, event_id, data))
        self._root._index[event_id] = (self.key, stream_id, seq)
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        found = self._root._index.get(last_event_id)
        if found is None or found[0] != self.key:
            return None
        _, stream_id, after = found
        for seq, event_id, data in list(self._root._streams[(self.key, stream_id)]):
            if seq > after and data is not None:
                await send_callback(event_message(data, event_id))
        return stream_id
