"""The MCP server of the multi-worker tests, as a module-level ASGI app: ``uvicorn tests.worker_app:app``.

Any number of processes serve it on one database: the store connects in the
app's lifespan, from ``MCP_PG_EVENTS_DSN`` and the other ``MCP_PG_EVENTS_*``
settings. ``build_app(connect)`` makes the same app in-process, for tests that
run two workers in one process with separate stores.

Tools:
- ``progress(count, pause_after, hang_after)``: ``count`` progress notifications;
  after ``pause_after`` of them it waits until ``release(gate)`` is called on the
  same process; after ``hang_after`` it waits until the process dies.
- ``release(gate)``: lets a paused ``progress`` go on.
- ``whoami()``: this process, and what it knows of the session's client.
- ``announce(text)``: a notification tied to no request (the standalone stream).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.applications import Starlette
from starlette.routing import Mount

from mcp_pg_events import PostgresEventStore, scope_sessions
from mcp_pg_events.compat import Context, new_server, streamable_http_app

# The test asks for the idle timeout it needs (None: the SDK's default).
IDLE_TIMEOUT_ENV = "TEST_SESSION_IDLE_TIMEOUT"


def build_app(
    connect: Callable[[], Awaitable[PostgresEventStore]],
    *,
    idle_timeout: float | None = None,
    announce_ready: bool = False,
    authenticate: bool = False,
) -> Starlette:
    """The app; ``connect()`` gives its store when it starts, which it closes when it stops.

    ``authenticate``: requests carry their principal in ``x-test-principal``.
    """
    gates: dict[str, asyncio.Event] = {}
    server = new_server("mcp-pg-events-worker", None)

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def progress(
        count: int, ctx: Context, pause_after: int = 0, hang_after: int = 0, gate: str = "g"
    ) -> str:
        """Report progress ``count`` times, pausing or hanging on the way."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count)
            if i == pause_after:
                await gates.setdefault(gate, asyncio.Event()).wait()
            if i == hang_after:
                await asyncio.Event().wait()
        return f"sent {count} from {os.getpid()}"

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def release(gate: str = "g") -> str:
        """Let the progress waiting at ``gate`` in this process go on."""
        gates.setdefault(gate, asyncio.Event()).set()
        return "released"

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def whoami(ctx: Context) -> str:
        """This process, and what it knows of the session's client."""
        params = ctx.session.client_params
        info = getattr(params, "client_info", None) or getattr(params, "clientInfo", None)
        return json.dumps(
            {
                "pid": os.getpid(),
                "client": None if info is None else info.name,
                "protocol_version": getattr(ctx, "protocol_version", None),
                "capabilities": None if params is None else _capabilities(params),
            }
        )

    @server.tool()  # type: ignore[untyped-decorator, unused-ignore]
    async def announce(text: str, ctx: Context) -> str:
        """Send a notification tied to no request: it goes to the standalone GET stream."""
        await ctx.session.send_resource_updated(f"test://{text}")
        return "announced"

    inner = streamable_http_app(server, None)
    manager = scope_sessions(server.session_manager)
    if idle_timeout is not None:
        manager.session_idle_timeout = idle_timeout

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        async with await connect() as store:
            manager.event_store = store
            async with inner.router.lifespan_context(inner):
                app.state.serving.set()
                if announce_ready:
                    print(f"worker {os.getpid()} serving", flush=True)
                yield

    app = Starlette(
        routes=[Mount("/", app=_authenticated(inner) if authenticate else inner)], lifespan=lifespan
    )
    app.state.manager = manager
    app.state.serving = asyncio.Event()
    return app


# The principal of a request, for tests of sessions bound to one: the SDK's auth
# middleware would set the same ``scope["user"]`` from a verified bearer token.
PRINCIPAL_HEADER = b"x-test-principal"


def _authenticated(app: Any) -> Any:
    async def with_user(scope: Any, receive: Any, send: Any) -> None:
        for name, value in scope.get("headers", ()):
            if name == PRINCIPAL_HEADER:
                token = AccessToken(token=value.decode(), client_id=value.decode(), scopes=[])
                scope = {**scope, "user": AuthenticatedUser(token)}
        await app(scope, receive, send)

    return with_user


def _capabilities(params: Any) -> list[str]:
    return sorted(params.capabilities.model_dump(exclude_none=True))


def _idle_timeout() -> float | None:
    value = os.environ.get(IDLE_TIMEOUT_ENV)
    return float(value) if value else None


async def _connect() -> PostgresEventStore:
    return await PostgresEventStore.connect()


app = build_app(_connect, idle_timeout=_idle_timeout(), announce_ready=True)
