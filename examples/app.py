try:  # mcp 2.x
    from mcp.server.mcpserver import Context, MCPServer
except ImportError:  # mcp 1.x, where the same server is called FastMCP
    from mcp.server.fastmcp import Context
    from mcp.server.fastmcp import FastMCP as MCPServer

from mcp_pg_events import with_postgres

server = MCPServer("counter")


@server.tool()
async def count(to: int, ctx: Context) -> str:
    """Count to `to`, one progress notification per number."""
    for i in range(1, to + 1):
        await ctx.report_progress(i, to)
    return f"counted to {to}"


app = with_postgres(server)  # the database: MCP_PG_EVENTS_DSN; served at /mcp
