"""Waiting with a timeout in the store's background loops, without losing a cancellation.

On Python 3.11 and older, ``asyncio.wait_for`` returns the result when the task
is cancelled in the same moment as what it waits for completes: the
cancellation is lost, and a ``while True`` loop then runs on after ``close()``
cancelled it, which waits for it forever. ``asyncio.wait`` never swallows one.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_done(future: asyncio.Future[Any], timeout: float) -> bool:
    """Wait until ``future`` is done or ``timeout`` seconds passed; True when done. Never cancels it."""
    if future.done():
        return True
    done, _ = await asyncio.wait({future}, timeout=max(0.0, timeout))
    return bool(done)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds passed; True when set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        return await wait_done(waiter, timeout)
    finally:
        waiter.cancel()
