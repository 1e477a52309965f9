"""The background loops' waits keep a cancellation that lands as what they wait for completes."""

from __future__ import annotations

import asyncio

import pytest

from mcp_pg_events.waiting import wait_done, wait_set


async def test_a_cancellation_in_the_moment_the_event_is_set_is_not_lost() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_set(event, 60))
    await asyncio.sleep(0)  # one turn of the loop: the task now waits on the event
    # Both in one step, as a close() meeting a wake-up: on Python 3.11
    # asyncio.wait_for(event.wait(), 60) returns True here and the loop around it runs on.
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_in_the_moment_the_future_completes_is_not_lost_nor_cancels_it() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_done(future, 60))
    await asyncio.sleep(0)
    future.set_result(None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert future.done() and not future.cancelled()


async def test_a_timeout_is_false_and_leaves_the_future_pending() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await wait_done(future, 0.01) is False
    assert not future.done()
    assert await wait_set(asyncio.Event(), 0.01) is False
    event = asyncio.Event()
    event.set()
    assert await wait_set(event, 0) is True
