"""The server of the one-call wiring and bus tests: ``with_postgres(server)``, as a user writes it.

``TEST_FRAMEWORK`` picks the server: ``sdk`` (``MCPServer`` on mcp 2.x, the SDK's
``FastMCP`` on 1.x) or ``fastmcp`` (the standalone package). Any number of
processes serve ``uvicorn tests.wiring_app:app`` on one database, from
``MCP_PG_EVENTS_DSN``. The app is mounted in an outer Starlette app that enters
its lifespan, as the README tells users to, and says when it serves.

Tools:
- ``progress(count, pause_after)``: ``count`` progress notifications, pausing
  after ``pause_after`` until ``release()`` is called on the same process.
- ``release()``: lets a paused ``progress`` go on.
- ``touch(uri)``: publishes ``resources/updated`` for ``uri`` (mcp 2.x, the bus).
- ``tools_changed()``: publishes a tool-list change (mcp 2.x, the bus).
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from mcp_pg_events import with_postgres
from mcp_pg_events.compat import Context, new_server

FRAMEWORK_ENV = "TEST_FRAMEWORK"


def build_server(framework: str) -> Any:
    gates: dict[str, asyncio.Event] = {}
    if framework == "fastmcp":
        import fastmcp

        server: Any = fastmcp.FastMCP("wiring")
        context: Any = fastmcp.Context
    else:
        server = new_server("wiring", None)
        context = Context

    async def progress(count: int, ctx: context, pause_after: int = 0) -> str:
        """Report progress ``count`` times, pausing after ``pause_after``."""
        for i in range(1, count + 1):
            await ctx.report_progress(i, count)
            if i == pause_after:
                await gates.setdefault("g", asyncio.Event()).wait()
        return f"sent {count} from {os.getpid()}"

    async def release() -> str:
        """Let the paused progress of this process go on."""
        gates.setdefault("g", asyncio.Event()).set()
        return "released"

    async def touch(uri: str, ctx: context) -> str:
        """Publish resources/updated for ``uri`` to every listen stream that asked for it."""
        await ctx.notify_resource_updated(uri)
        return f"touched from {os.getpid()}"

    async def tools_changed(ctx: context) -> str:
        """Publish a tool-list change."""
        await ctx.notify_tools_changed()
        return "changed"

    for tool in (progress, release, touch, tools_changed):
        server.tool()(tool)
    return server


def build_app(framework: str, dsn: str | None = None, **options: Any) -> Starlette:
    mcp_app = with_postgres(build_server(framework), dsn, **options)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mcp_app.router.lifespan_context(app):
            print(f"worker {os.getpid()} serving", flush=True)
            yield

    app = Starlette(routes=[Mount("/", app=mcp_app)], lifespan=lifespan)
    app.state.mcp_app = mcp_app
    return app


app = build_app(os.environ.get(FRAMEWORK_ENV, "sdk"))
