"""DSNs: which one to use (an argument, else the environment), and how to show one without its password."""

from __future__ import annotations

import os

from .errors import ConfigurationError

DSN_ENV = "MCP_PG_EVENTS_DSN"
FALLBACK_DSN_ENV = "DATABASE_URL"


def resolve_dsn(dsn: str | None = None) -> str:
    """Return ``dsn``, else ``$MCP_PG_EVENTS_DSN``, else ``$DATABASE_URL``; raise if none is set."""
    for candidate in (dsn, os.environ.get(DSN_ENV), os.environ.get(FALLBACK_DSN_ENV)):
        if candidate:
            return candidate
    raise ConfigurationError(
        f"no database given: pass a DSN or set {DSN_ENV} (or {FALLBACK_DSN_ENV}), "
        "e.g. postgresql://user@localhost:5432/app"
    )


def sqlalchemy_url(dsn: str) -> str:
    """The same database as a SQLAlchemy URL on the asyncpg driver (alembic's only use of it)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise ConfigurationError(f"not a PostgreSQL DSN (expected postgresql://...): {redact(dsn)}")
    return f"postgresql+asyncpg://{rest}"


def redact(dsn: str) -> str:
    """The DSN with its password hidden, for error messages and logs."""
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return dsn
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
