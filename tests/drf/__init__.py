"""A Django project serving rest_framework_mcp with mcp_pg_events.rest_framework, for the tests.

Run by the tests as uvicorn workers (``tests.drf.asgi:application``), a WSGI
worker (``tests.drf.wsgi:application``) and ``manage.py`` commands, on the
database of ``MCP_PG_EVENTS_DRF_TEST_DSN``.
"""
