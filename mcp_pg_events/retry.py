"""Which database errors are worth retrying, and how long to wait between tries.

The SDK kills a session for good when ``store_event`` raises, so a failover, a
restart or a dropped connection must be ridden out inside the store, up to a
deadline, instead of surfacing at the first failure.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

from .errors import StoreUnavailableError

_TRANSIENT_SERVER_ERRORS = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, restart, cancel
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization, deadlock
)
_TRANSIENT_CLIENT_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)


def is_transient(exc: BaseException) -> bool:
    """True when the same operation may succeed if tried again a little later."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, _TRANSIENT_SERVER_ERRORS)
    if isinstance(exc, asyncpg.InterfaceError) and str(exc).startswith("pool is clos"):
        # The application closed the pool (shutting down): nothing comes back.
        # asyncpg has no class of its own for it; its message is not translated.
        return False
    if isinstance(exc, asyncpg.exceptions.InternalClientError) and "another operation" in str(exc):
        # A server process ended under an idle connection (pg_terminate_backend, a
        # restart): its error has arrived but not yet its end of stream, and asyncpg
        # refuses the next query before sending anything. The connection closes next.
        return True
    return isinstance(exc, _TRANSIENT_CLIENT_ERRORS)


class Backoff:
    """Exponential backoff with full jitter, bounded by a deadline."""

    def __init__(self, deadline: float, *, first: float = 0.02, cap: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._seconds = deadline
        self._deadline = loop.time() + deadline
        self._delay = first
        self._cap = cap
        self.attempts = 0

    async def wait(self) -> bool:
        """Sleep before the next try; False when the deadline leaves no room for one."""
        self.attempts += 1
        remaining = self._deadline - self._loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, random.uniform(0, self._delay)))  # noqa: S311 - jitter, not crypto
        self._delay = min(self._cap, self._delay * 2)
        return True

    def gave_up(self, exc: BaseException, what: str = "") -> StoreUnavailableError:
        """The error once ``wait()`` said no: for how long, how many tries, the last error."""
        error = StoreUnavailableError(
            f"{what}database unavailable for {self._seconds:.1f}s ({self.attempts} attempts): {exc}"
        )
        error.__cause__ = exc
        return error
