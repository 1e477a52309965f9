# mcp 1.x
import asyncio
import os

import uvicorn
from mcp.server.fastmcp import Context, FastMCP

from mcp_pg_events import PostgresEventStore, scope_sessions


async def count(to: int, ctx: Context) -> str:
    """Count to `to`, one progress notification per number."""
    for i in range(1, to + 1):
        await ctx.report_progress(i, to)
    return f"counted to {to}"


async def main() -> None:
    async with await PostgresEventStore.connect() as store:
        server = FastMCP("counter", event_store=store)
        server.add_tool(count)
        app = server.streamable_http_app()
        scope_sessions(server.session_manager)
        config = uvicorn.Config(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
        await uvicorn.Server(config).serve()


asyncio.run(main())
