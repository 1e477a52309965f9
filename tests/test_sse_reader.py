"""The test client's SSE reader: lines end at CR, LF or CRLF only, and a huge event costs linear time."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mcp_pg_events import testing
from mcp_pg_events.testing import SSEStream

# What the issue measured: a 21 MB line in 16 KiB chunks took 57 s with a reader that
# split all it held at every chunk. Read linearly it takes a fraction of a second.
CHUNK = 16 * 1024
# A line end in the wrong place would cut the JSON; line separators that SSE does not
# know (U+2028, U+2029, NEL, VT, FF, FS) must stay inside it.
TEXT = 'tick "quoted" \\ é 漢字 \u2028 \u2029 \x85 \x0b \x0c \x1c '


def response(body: bytes, chunk: int) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())


class CountingLineBreak:
    """The reader's line-end pattern, counting the characters it is asked to scan.

    Past ``limit`` it fails at once: a quadratic reader would otherwise take minutes
    to get there.
    """

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.scanned = 0
        self.limit = 0

    def split(self, text: str) -> list[str]:
        self.scanned += len(text)
        if self.scanned > self.limit:
            raise AssertionError(f"scanned {self.scanned:,} characters, more than {self.limit:,}")
        return self.pattern.split(text)


@pytest.fixture
def line_break(monkeypatch: pytest.MonkeyPatch) -> CountingLineBreak:
    counting = CountingLineBreak(testing._LINE_BREAK)
    monkeypatch.setattr(testing, "_LINE_BREAK", counting)
    return counting


async def test_a_multi_megabyte_event_in_16_kib_chunks_is_read_whole_scanning_each_character_once(
    line_break: CountingLineBreak,
) -> None:
    text = TEXT * (20_000_000 // len(TEXT))
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "result": {"text": text}}
    data = json.dumps(message, ensure_ascii=False)
    assert "\u2028" in data and len(data) > 20_000_000
    # The big event between two small ones, with each of the three line ends.
    body = f": hello\r\nid: a\r\ndata: {data}\r\n\r\nid: b\rdata: 1\r\rid: c\ndata: 2\n\n".encode()
    # Linear: each character is scanned a bounded number of times (here twice at most).
    # Re-scanning what is held at every chunk would scan the big line once per chunk,
    # about 1,300 times.
    line_break.limit = 2 * len(body.decode())
    stream = SSEStream(response(body, CHUNK))

    async def read() -> list[testing.SSE | None]:
        return [await stream.next() for _ in range(4)]

    # A generous bound, far above a linear read on a loaded machine and far below a quadratic one.
    first, second, third, end = await asyncio.wait_for(read(), 30)
    assert first is not None and first.id == "a" and first.message == message
    assert second is not None and (second.id, second.data) == ("b", "1")
    assert third is not None and (third.id, third.data) == ("c", "2")
    assert end is None
    assert line_break.scanned <= len(body.decode())


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
async def test_lines_end_at_cr_lf_and_crlf_only_wherever_the_chunks_split(chunk: int) -> None:
    body = (
        f": comment\r\nid: 1\r\ndata: {TEXT}\r\ndata: second\r\n\r\n"
        f"id: 2\rdata: {TEXT}\r\r"
        f"id: 3\ndata: {TEXT}\n\n"
        "data: last, the stream ends without a blank line"
    ).encode()
    stream = SSEStream(response(body, chunk))
    events = [await stream.next() for _ in range(5)]
    assert [(e.id, e.data) if e else None for e in events] == [
        ("1", f"{TEXT}\nsecond"),
        ("2", TEXT),
        ("3", TEXT),
        (None, "last, the stream ends without a blank line"),
        None,
    ]
