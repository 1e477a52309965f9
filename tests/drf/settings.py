"""Settings: the database comes from ``MCP_PG_EVENTS_DRF_TEST_DSN``, as Django's DATABASES entry."""

from __future__ import annotations

import os

from .database import django_database

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "mcp_pg_events.django",
    "tests.drf",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tests.drf.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        **django_database(os.environ.get("MCP_PG_EVENTS_DRF_TEST_DSN", "postgresql://localhost/unset")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
REST_FRAMEWORK_MCP = {"ALLOWED_ORIGINS": ["*"]}
# Short enough for a test to see the poll and the watcher act.
MCP_PG_EVENTS = {"RETRY_DEADLINE": 10.0}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"mcp_pg_events": {"handlers": ["stderr"], "level": "INFO"}},
}
