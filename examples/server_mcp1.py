# mcp 1.x: the server of examples/app.py, which runs on either SDK major.
#   uvicorn examples.server_mcp1:app --workers 2
from examples.app import app, server

__all__ = ["app", "server"]
