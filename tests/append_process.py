"""A writer in a process of its own: ``python -m tests.append_process DSN SESSION STREAM COUNT``.

Appends COUNT progress notifications to STREAM of SESSION, then the response to
request STREAM, which ends the stream. Prints ``ready`` once connected, and
waits for a line on stdin before writing, so the test can start it in advance.
"""

from __future__ import annotations

import asyncio
import sys

from mcp_pg_events import PostgresEventStore

from .messages import notification, response


async def main(dsn: str, session: str, stream: str, count: int) -> None:
    async with await PostgresEventStore.connect(dsn, listen=False) as store:
        view = store.session(session)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for i in range(count):
            await view.store_event(stream, notification("notifications/progress", {"progress": i}))
        await view.store_event(stream, response(int(stream), {"done": count}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
