"""A writer in a process of its own, for tests that need a second process or one to kill.

``python -m tests.writer_process DSN SESSION TAG START END STREAM [STREAM ...]``

One task per STREAM appends progress notifications ``{"progress": n, "writer": TAG}``
for n from START up to END (END 0: until killed), all streams at once, so that
their appends share commits. After each ``store_event`` returns it prints
``ack STREAM n EVENT_ID``: a line printed is an event acknowledged. With
``--respond`` each stream then gets the response to request STREAM, which ends it;
``--pace S`` waits S seconds after each append.
Prints ``ready`` once connected, and waits for a line on stdin before writing, so
that the test can start it in advance. ``WriterProcess`` is the test's side of it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from pathlib import Path
from typing import NamedTuple

from mcp_pg_events import PostgresEventStore

from .messages import progress_message, response

ROOT = Path(__file__).resolve().parent.parent


class Ack(NamedTuple):
    stream: str
    n: int
    event_id: str


class WriterProcess:
    """A running writer process and the acknowledgements it has printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.acks: list[Ack] = []
        self._more = asyncio.Condition()
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, dsn: str, session: str, tag: str, streams: list[str], *, start: int = 0, end: int = 0,
        respond: bool = False, pace: float = 0.0,
    ) -> WriterProcess:  # fmt: skip
        """Start a writer and wait until it is connected; ``go()`` lets it write."""
        args = [dsn, session, tag, str(start), str(end), *streams, "--pace", str(pace)]
        args += ["--respond"] if respond else []
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.writer_process", *args,
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
        return cls(process)

    async def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            if not line.endswith(b"\n"):
                break  # killed while printing it: a line cut short acknowledges nothing
            _, stream, n, event_id = line.decode().split()
            async with self._more:
                self.acks.append(Ack(stream, int(n), event_id))
                self._more.notify_all()

    async def wait_for_acks(self, count: int, timeout: float = 60) -> None:
        async with self._more:
            await asyncio.wait_for(self._more.wait_for(lambda: len(self.acks) >= count), timeout)

    async def kill(self) -> None:
        """SIGKILL it; what it printed before it died stays acknowledged."""
        self.process.kill()
        await self.wait()

    async def wait(self, timeout: float = 60) -> int:
        returncode = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reading is not None:
            await asyncio.wait_for(self._reading, timeout)
        return returncode


async def main(args: argparse.Namespace) -> None:
    async with await PostgresEventStore.connect(args.dsn, listen=False) as store:
        view = store.session(args.session)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def write(stream: str) -> None:
            numbers = itertools.count(args.start) if args.end == 0 else range(args.start, args.end)
            for n in numbers:
                event_id = await view.store_event(stream, progress_message(n, writer=args.tag))
                print("ack", stream, n, event_id, flush=True)
                if args.pace:
                    await asyncio.sleep(args.pace)
            if args.respond:
                await view.store_event(stream, response(int(stream), {"done": args.end}))

        await asyncio.gather(*(write(stream) for stream in args.streams))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("session")
    parser.add_argument("tag")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int, help="0: until killed")
    parser.add_argument("streams", nargs="+")
    parser.add_argument("--respond", action="store_true")
    parser.add_argument("--pace", type=float, default=0.0)
    asyncio.run(main(parser.parse_args()))
