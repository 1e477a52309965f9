"""Event ids: ``{stream_key}-{seq}-{tag}``.

Short visible ASCII (they travel in SSE ``id:`` lines and the ``Last-Event-ID``
header); ``(stream_key, seq)`` is the primary key, so an id is found with one index
lookup; ``tag`` is random per stream, so nobody can forge an id of a stream they
have not seen. The session check in the replay query is what keeps sessions apart;
the tag makes guessing useless on top of it.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

# 18 digits keep both numbers inside a PostgreSQL bigint: a longer run of digits is
# rejected here instead of overflowing in the query.
_EVENT_ID = re.compile(r"\A([0-9]{1,18})-([0-9]{1,18})-([0-9a-f]{12})\Z")
MAX_LENGTH = 18 + 1 + 18 + 1 + 12


class EventRef(NamedTuple):
    """The parts of a parsed event id."""

    stream_key: int
    seq: int
    tag: str


def new_tag() -> str:
    """A fresh random stream tag (48 bits)."""
    return secrets.token_hex(6)


def format_event_id(stream_key: int, seq: int, tag: str) -> str:
    """The event id of row ``(stream_key, seq)`` of a stream tagged ``tag``."""
    return f"{stream_key}-{seq}-{tag}"


def event_id_affixes(stream_key: int, tag: str) -> tuple[str, str]:
    """What comes before and after the seq in every event id of a stream: for ids made in a loop."""
    return f"{stream_key}-", f"-{tag}"


def parse_event_id(event_id: str) -> EventRef | None:
    """The parts of ``event_id``, or None when it is not an id this store made."""
    if not isinstance(event_id, str) or len(event_id) > MAX_LENGTH:
        return None
    match = _EVENT_ID.match(event_id)
    if match is None:
        return None
    return EventRef(int(match[1]), int(match[2]), match[3])
