"""Settings of the notes example: a Django project whose MCP server keeps everything in PostgreSQL.

The database is Django's own ``DATABASES["default"]`` (the libpq variables
PGDATABASE, PGHOST, PGPORT, PGUSER, PGPASSWORD set it here); mcp-pg-events
reads its DSN from there. Nothing else to configure: no Redis, no cache.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "notes-example-only")
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    # `manage.py migrate` applies the event log's schema too.
    "mcp_pg_events.django",
    "notes",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "notes_project.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "notes"),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
REST_FRAMEWORK_MCP = {"ALLOWED_ORIGINS": ["*"]}
# Optional: any setting of mcp_pg_events' RestFrameworkSettings or StoreSettings, e.g.
# MCP_PG_EVENTS = {"DATABASE": "default", "MAX_POOL_SIZE": 4}
