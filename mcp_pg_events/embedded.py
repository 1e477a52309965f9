"""An embedded PostgreSQL (the ``pgserver`` package ships the binaries): no install, no service.

For the demo and for trying the library out; production uses a real server.

pgserver lists the processes using a data folder in ``.handle_pids.json`` there
and stops the server when the last of them leaves. A process killed outright
(SIGKILL, a crash) never leaves the list: the server then outlives it, and every
later run too, since none of them is ever the last. So before starting, the
processes that no longer exist are struck off the list.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

DATA_ENV = "MCP_PG_EVENTS_EMBEDDED_DATA"
# pgserver's list of the processes that use a data folder.
HANDLES_FILE = ".handle_pids.json"
# pg_ctl waits 10 s for the server to start (pgserver's own limit); a loaded machine
# may need longer, and the server usually comes up anyway.
START_WAIT = 60.0
STOP_WAIT = 30.0


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


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            from pgserver import postgres_server
        except ImportError as exc:
            raise ConfigurationError(
                "no DSN given and no embedded PostgreSQL installed: pip install 'mcp-pg-events[demo]', "
                "or set MCP_PG_EVENTS_DSN"
            ) from exc
    return postgres_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def forget_dead_users(folder: Path) -> list[int]:
    """Strike the processes that no longer exist off pgserver's list of ``folder``; return the living."""
    path = folder / HANDLES_FILE
    with _pgserver().PostgresServer._lock:  # pgserver's own lock on the list
        try:
            listed = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        living = [pid for pid in listed if isinstance(pid, int) and _alive(pid)]
        if living != listed:
            path.write_text(json.dumps(living))
    return living


def _postmaster_pid(folder: Path) -> int | None:
    try:
        first = (folder / "postmaster.pid").read_text().split("\n", 1)[0]
        pid = int(first)
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _wait_until_ready(folder: Path) -> None:
    """After pg_ctl gave up waiting: wait for the server it started to say it is ready."""
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        try:
            lines = (folder / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return
        if lines and lines[0].strip().isdigit() and not _alive(int(lines[0])):
            break  # it died: the log says why
        time.sleep(0.2)
    raise ConfigurationError(
        f"the embedded PostgreSQL in {folder} did not start within {START_WAIT:g}s: see {folder / 'log'}"
    )


@contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start (or reuse) an embedded PostgreSQL in ``data_dir``; yield its DSN; stop it on exit.

    It listens on a Unix socket in its own folder only, so it never meets a
    PostgreSQL service that runs on the machine. A server left running by a
    process that was killed is taken over, and stopped on exit.
    """
    folder = (data_dir or default_data_dir()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    forget_dead_users(folder)
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except subprocess.TimeoutExpired:
        # pgserver keeps the handle that failed; the next one finds the server running.
        pgserver.PostgresServer._instances.pop(folder, None)
        _wait_until_ready(folder)
        server = pgserver.get_server(folder, cleanup_mode="stop")
    with server:
        yield str(server.get_uri())


def reset_embedded(folder: Path) -> bool:
    """Stop the embedded server of ``folder`` and delete the folder; False when there was none.

    Refuses a folder that is not an embedded PostgreSQL's, and one that a running
    process still uses.
    """
    folder = folder.expanduser().resolve()
    if not folder.exists():
        return False
    if not (folder / "PG_VERSION").exists() and any(folder.iterdir()):
        raise ConfigurationError(f"{folder} holds no PostgreSQL data (no PG_VERSION): not deleting it")
    users = [pid for pid in forget_dead_users(folder) if pid != os.getpid()]
    if users:
        raise ConfigurationError(
            f"{folder} is in use by process {', '.join(map(str, users))}: stop it first (Ctrl-C)"
        )
    postmaster = _postmaster_pid(folder)
    if postmaster is not None:
        os.kill(postmaster, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + STOP_WAIT
        while _alive(postmaster):
            if time.monotonic() > deadline:
                raise ConfigurationError(f"the PostgreSQL server of {folder} (pid {postmaster}) did not stop")
            time.sleep(0.1)
    shutil.rmtree(folder)
    return True
