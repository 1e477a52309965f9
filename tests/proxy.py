"""A TCP proxy in front of the test server that can fail on command.

Lets a test take the database away (and give it back) or cut a connection right
after the server answered, without stopping a server other tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class FlakyProxy:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        socket_dir = query.pop("host", None)
        port = parts.port or 5432
        self._unix_path = f"{socket_dir}/.s.PGSQL.{port}" if socket_dir else None
        self._upstream = (parts.hostname or "127.0.0.1", port)
        self._parts = parts._replace(query=urlencode(query))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._down = False
        self._cut_next_response = False
        self._down_after_cut = False
        self.cuts = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        self._close_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def dsn(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        userinfo = self._parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def go_down(self) -> None:
        """Drop every connection and refuse new ones, as a restarting server would."""
        self._down = True
        self._close_all()

    def go_up(self) -> None:
        self._down = False

    def refuse_new_connections(self) -> None:
        """Keep the open connections, refuse new ones (the server at its connection limit, say)."""
        self._down = True

    def cut_next_response(self, *, then_go_down: bool = False) -> None:
        """Let the server's next answer be lost with its connection (an ambiguous commit)."""
        self._cut_next_response = True
        self._down_after_cut = then_go_down

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.close()
            return
        try:
            if self._unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, writer, from_server=False),
            self._pipe(up_reader, writer, up_writer, from_server=True),
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        *,
        from_server: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if from_server and self._cut_next_response:
                    self._cut_next_response = False
                    self.cuts += 1
                    if self._down_after_cut:
                        self.go_down()
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
        other.close()
