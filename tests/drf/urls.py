from django.urls import path

from .mcp import server

# The sync view under its own namespace: both mounts name themselves "mcp".
sync_patterns, sync_app, _ = server.urls
urlpatterns = [path("mcp/", server.async_urls), path("sync/mcp/", (sync_patterns, sync_app, "mcp-sync"))]
