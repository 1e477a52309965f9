"""An embedded PostgreSQL of our own, which a test or the soak may stop, crash and start again.

The shared test server cannot be restarted under other tests; this one lives in a
temporary folder (``pgserver`` ships the binaries), so it works on any machine.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class OwnServer:
    """A running embedded server and how to take it away and bring it back."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.uri: str = server.get_uri()

    async def restart(self, mode: str, outage: float) -> None:
        """Stop the server (``fast``: shut down; ``immediate``: crash); start it ``outage`` s later."""
        from pgserver._commands import pg_ctl

        stop = ["-w", "-m", mode, "stop"]
        await asyncio.to_thread(pg_ctl, stop, pgdata=self._server.pgdata, user=self._server.system_user)
        await asyncio.sleep(outage)  # how long the database stays away
        await asyncio.to_thread(self._server.ensure_postgres_running)
        assert self._server.get_uri() == self.uri


@contextmanager
def start_own_server() -> Iterator[OwnServer]:
    """Start a server in a temporary folder; stop it and remove the folder on the way out."""
    import pgserver

    with (
        tempfile.TemporaryDirectory(prefix="mcp-pg-events-own-") as folder,
        pgserver.get_server(folder, cleanup_mode="stop") as server,
    ):
        yield OwnServer(server)
