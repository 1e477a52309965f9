# mcp 2.x
import asyncio
import os

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from mcp_pg_events import PostgresEventStore, scope_sessions

server = MCPServer("counter")


@server.tool()
async def count(to: int, ctx: Context) -> str:
    """Count to `to`, one progress notification per number."""
    for i in range(1, to + 1):
        await ctx.report_progress(i, to)
    return f"counted to {to}"


async def main() -> None:
    async with await PostgresEventStore.connect() as store:  # DSN from MCP_PG_EVENTS_DSN
        app = server.streamable_http_app(event_store=store)
        scope_sessions(server.session_manager)  # each MCP session gets its own view of the store
        config = uvicorn.Config(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
        await uvicorn.Server(config).serve()


asyncio.run(main())
