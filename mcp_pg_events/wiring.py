"""One call from an MCP server to a runnable ASGI app on PostgreSQL: ``with_postgres(server)``.

It takes the three servers Python users write:

- ``mcp.server.mcpserver.MCPServer`` (mcp 2.x),
- ``mcp.server.fastmcp.FastMCP`` (mcp 1.x),
- ``fastmcp.FastMCP`` (the standalone package),

builds the server's own Streamable HTTP app, and returns a Starlette app whose
lifespan opens the store (and on mcp 2.x the subscription bus), scopes every
session to its own view of the store, registers sessions so that any worker
serves them, and closes everything on shutdown. ``uvicorn module:app --workers N``
runs it as it is.

The standalone FastMCP builds its session manager inside its app's lifespan and
scopes sessions itself, with a wrapper that prefixes stream ids and keeps a
uuid per transport, unknown to other workers. The manager it builds is scoped
here instead, as it is made and before it runs: sessions are then isolated,
durable, resumable and adopted across workers exactly as with the SDK's servers.

Mounting inside another Starlette or FastAPI app: Starlette does not run the
lifespan of a mounted app, so hand it to the outer app::

    mcp_app = with_postgres(server)
    app = FastAPI(lifespan=mcp_app.router.lifespan_context)
    app.mount("/", mcp_app)            # the MCP endpoint stays at /mcp

An outer app with a lifespan of its own enters ``mcp_app.router.lifespan_context(app)``
inside it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import Mount

from . import compat
from .dsn import resolve_dsn
from .errors import McpPgEventsError
from .integration import scope_sessions
from .settings import StoreSettings

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .settings import StoreOptions
    from .store import PostgresEventStore

__all__ = ["with_postgres"]

logger = logging.getLogger(__name__)


def _is_standalone_fastmcp(server: Any) -> bool:
    return type(server).__module__.split(".")[0] == "fastmcp" and hasattr(server, "http_app")


def with_postgres(
    server: Any,
    dsn: str | None = None,
    *,
    path: str = "/mcp",
    subscriptions: bool = True,
    **options: Unpack[StoreOptions],
) -> Starlette:
    """A runnable ASGI app serving ``server`` with its sessions, streams and server events on PostgreSQL.

    Args:
        server: an ``MCPServer`` (mcp 2.x), an SDK ``FastMCP`` (mcp 1.x) or a
            standalone ``fastmcp.FastMCP``.
        dsn: the database (None: ``MCP_PG_EVENTS_DSN``, else ``DATABASE_URL``,
            read when the app starts, so the app can be built at import time).
        path: where the MCP endpoint is served.
        subscriptions: on mcp 2.x, serve ``subscriptions/listen`` (the 2026-07-28
            revision) from a ``PostgresSubscriptionBus`` on the same store. A
            server made with ``subscriptions=PostgresSubscriptionBus()`` has its
            bus started and closed with the app; one made with the SDK's
            in-memory default gets one instead; a bus of another kind, or a
            server made with ``subscriptions=False``, is left alone.
        options: ``StoreSettings`` fields (``adopt_sessions=False``: serve only the
            sessions this process opened); what they do not give comes from
            ``MCP_PG_EVENTS_<NAME>``, else the default.

    The store is checked to be migrated when the app starts (``mcp-pg-events
    migrate`` first): a database that is not fails the startup with
    ``SchemaNotReadyError``, naming the command.
    """
    # Bad settings fail here, at import time, rather than at the first start.
    settings = StoreSettings.from_env(**options)
    holder: dict[str, PostgresEventStore] = {}
    bus = _bus_for(server) if subscriptions else None

    def scope(manager: Any) -> Any:
        scoped = scope_sessions(manager)
        scoped.event_store = holder.get("store")
        return scoped

    if _is_standalone_fastmcp(server):
        inner = server.http_app(path=path, transport="http")
        entry = compat.fastmcp_entry(inner)
        if entry is None:
            raise TypeError(
                f"this fastmcp release ({type(server).__module__}) builds its HTTP app in a way "
                "mcp-pg-events does not know: its sessions could not be scoped"
            )
        compat.on_fastmcp_manager(entry, scope)
    elif hasattr(server, "streamable_http_app"):
        inner = _sdk_app(server, path)
        manager = scope(server.session_manager)
    else:
        raise TypeError(
            f"with_postgres takes an MCPServer (mcp 2.x), a FastMCP (mcp 1.x) or a fastmcp.FastMCP, "
            f"not {type(server).__name__}"
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        from .store import PostgresEventStore

        async with AsyncExitStack() as stack:
            try:
                store = await PostgresEventStore.connect(resolve_dsn(dsn), settings=settings)
            except McpPgEventsError as exc:
                # Said in one line by the ASGI server (see _StartupErrorInOneLine).
                app.state.startup_error = f"mcp-pg-events: {exc}"
                raise
            stack.push_async_callback(store.close)
            holder["store"] = store
            stack.callback(holder.pop, "store", None)
            if not _is_standalone_fastmcp(server):
                manager.event_store = store
            if bus is not None:
                await bus.start(store)
                stack.push_async_callback(bus.close)
            # On this app, not the one the lifespan runs for (an outer app that mounts it).
            app.state.store = store
            await stack.enter_async_context(inner.router.lifespan_context(inner))
            yield

    app = Starlette(routes=[Mount("/", app=inner)], lifespan=lifespan)
    app.add_middleware(_StartupErrorInOneLine, state=app.state)
    app.state.server = server
    app.state.subscriptions = bus
    return app


def _sdk_app(server: Any, path: str) -> Any:
    if compat.MCP_MAJOR == 2:
        return server.streamable_http_app(streamable_http_path=path)
    server.settings.streamable_http_path = path
    return server.streamable_http_app()


def _bus_for(server: Any) -> Any | None:
    """The PostgreSQL bus ``server`` publishes to once the app runs; None where there is none to serve."""
    current = compat.subscription_bus(server)
    if current is None:
        return None
    from .bus import PostgresSubscriptionBus

    if isinstance(current, PostgresSubscriptionBus):
        return current
    name = getattr(server, "name", None) or "default"
    try:
        bus = PostgresSubscriptionBus(namespace=str(name))
    except RuntimeError:  # an SDK without subscriptions/listen
        return None
    if compat.replace_in_memory_bus(server, bus):
        return bus
    logger.info("with_postgres: %s keeps its own subscription bus", type(current).__name__)
    return None


class _StartupErrorInOneLine:
    """Reports a startup that failed on our error (no DSN, no database, not migrated) in one line.

    Starlette tells the ASGI server of a failed lifespan with the whole traceback
    as the message, which uvicorn prints; for an error of ours the line that says
    what to do is the message instead.
    """

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def tell(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                error = getattr(self.state, "startup_error", None)
                if error is not None:
                    message = {**message, "message": error}
            await send(message)

        await self.app(scope, receive, tell)
