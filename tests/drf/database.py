"""A DSN as the parts of a Django ``DATABASES`` entry (a socket directory in ``?host=`` included)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit


def django_database(dsn: str) -> dict[str, str]:
    parts = urlsplit(dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return {
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": query.get("host") or parts.hostname or "",
        "PORT": query.get("port") or str(parts.port or ""),
    }
