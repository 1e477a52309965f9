"""An embedded PostgreSQL (the ``pgserver`` package ships the binaries): no install, no service.

For the demo and for trying the library out; production uses a real server.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigurationError

DATA_ENV = "MCP_PG_EVENTS_EMBEDDED_DATA"


def default_data_dir() -> Path:
    """Where the embedded server keeps its data between runs (``$MCP_PG_EVENTS_EMBEDDED_DATA``)."""
    configured = os.environ.get(DATA_ENV)
    if configured:
        return Path(configured)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root, pgserver runs PostgreSQL as a separate user and opens every parent
        # folder of the data folder to it: keep it out of root's private home.
        return Path("/var/lib/mcp-pg-events/pgdata")
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mcp-pg-events" / "pgdata"


@contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start (or reuse) an embedded PostgreSQL in ``data_dir``; yield its DSN; stop it on exit.

    It listens on a Unix socket in its own folder only, so it never meets a
    PostgreSQL service that runs on the machine.
    """
    folder = data_dir or default_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            from pgserver.postgres_server import get_server
        except ImportError as exc:
            raise ConfigurationError(
                "no DSN given and no embedded PostgreSQL installed: pip install 'mcp-pg-events[demo]', "
                "or set MCP_PG_EVENTS_DSN"
            ) from exc
        server = get_server(folder, cleanup_mode="stop")
    with server:
        yield str(server.get_uri())
