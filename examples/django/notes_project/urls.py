from django.urls import path
from notes.mcp import server

urlpatterns = [path("mcp/", server.async_urls)]
