"""DSNs: which one to use (an argument, else the environment), and how to show one without its password."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlencode

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


_MASK = "***"
# A URI as libpq reads it: postgresql:// or postgres://, and alembic's +driver forms.
_URI = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
# key = value pairs: a value is single-quoted (backslash escapes inside) or runs to
# the next blank. Any key naming a password (password, sslpassword).
_KEY_VALUE_PASSWORD = re.compile(r"(?i)(\b[a-z_]*password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)*)")


def redact(dsn: str) -> str:
    """The DSN with every password hidden, for error messages and logs.

    Every form libpq accepts: ``user:password@`` in a URI (also one password
    that is not percent-encoded and holds ``@``, ``/``, ``?`` or ``#``, and
    multi-host URIs), ``password=`` / ``sslpassword=`` query parameters in any
    case or percent-encoding, and the key/value form ``host=... password=...``,
    quoted values included.
    """
    match = _URI.match(dsn)
    if match is None:
        return _KEY_VALUE_PASSWORD.sub(lambda m: m.group(1) + _MASK, dsn)
    head, rest = dsn[: match.end()], dsn[match.end() :]
    # Where the user info ends, read the ways a client may: libpq takes the first
    # "@" met before any "/", a URL parser (asyncpg's) the last "@" before the
    # path. A password that is not percent-encoded may hold "@", "/", "?" or "#":
    # mask up to the later of libpq's "@" and the last "@" that is not inside a
    # query parameter's value, so that no reading shows any of it.
    slash = rest.find("/")
    end = rest.find("@")
    if slash != -1 and end > slash:
        end = -1
    at = len(rest)
    while (at := rest.rfind("@", 0, at)) > end:
        parameter = max(rest.rfind("?", 0, at), rest.rfind("&", 0, at))
        if parameter == -1 or "=" not in rest[parameter:at]:
            end = at
            break
    if end != -1:
        user, colon, _ = rest[:end].partition(":")
        if colon:
            rest = f"{user}:{_MASK}{rest[end:]}"
            end = len(user) + 1 + len(_MASK)
    query_at = rest.find("?", max(end, 0))
    if query_at == -1:
        return head + rest
    fragment_at = rest.find("#", query_at)
    query_end = fragment_at if fragment_at != -1 else len(rest)
    pairs = []
    masked = False
    for pair in rest[query_at + 1 : query_end].split("&"):
        key, equals, _ = pair.partition("=")
        if equals and "password" in unquote(key).lower():
            pair, masked = f"{key}={_MASK}", True
        elif not equals and masked:
            pair = _MASK  # the rest of a password holding a raw "&"
        else:
            masked = False
        pairs.append(pair)
    return head + rest[: query_at + 1] + "&".join(pairs) + rest[query_end:]


# Django's PostgreSQL engines; anything else has no events tables to offer.
DJANGO_POSTGRESQL_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")
# Connection options that mean the same to asyncpg as to psycopg.
_PASSED_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "passfile", "target_session_attrs")


def dsn_from_django(alias: str, entry: Mapping[str, Any]) -> str:
    """The ``postgresql://`` DSN of a Django ``DATABASES`` entry.

    Carries the name, user, password, host (a directory is a Unix socket) and
    port; the SSL options; and ``-c name=value`` pairs of ``OPTIONS["options"]``
    (a ``search_path``, say) as server settings. Options only Django knows (its
    pool, server-side binding, isolation level, a role to assume) stay behind.
    """
    engine = entry.get("ENGINE")
    if engine not in DJANGO_POSTGRESQL_ENGINES:
        raise ConfigurationError(
            f"DATABASES[{alias!r}] is not PostgreSQL (ENGINE {engine!r}): name a PostgreSQL alias in "
            "MCP_PG_EVENTS['DATABASE'], or give MCP_PG_EVENTS['DSN']"
        )
    options: Mapping[str, Any] = entry.get("OPTIONS") or {}
    user = str(entry.get("USER") or "")
    password = str(entry.get("PASSWORD") or "")
    host = str(entry.get("HOST") or "")
    port = str(entry.get("PORT") or "")
    name = str(entry.get("NAME") or "")
    if not name:
        raise ConfigurationError(f"DATABASES[{alias!r}] has no NAME")
    query: dict[str, str] = {key: str(options[key]) for key in _PASSED_OPTIONS if options.get(key)}
    for setting, value in _server_settings(alias, str(options.get("options") or "")):
        query[setting] = value
    userinfo = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    netloc = f"{userinfo}@" if userinfo else ""
    if host.startswith("/"):
        query["host"] = host
        if port:
            query["port"] = port
    else:
        netloc += f"[{host}]" if ":" in host else host
        netloc += f":{port}" if port else ""
    dsn = f"postgresql://{netloc}/{quote(name, safe='')}"
    return f"{dsn}?{urlencode(query)}" if query else dsn


def _server_settings(alias: str, options: str) -> list[tuple[str, str]]:
    # libpq's "options" are command-line switches for the server; asyncpg takes
    # unknown DSN parameters as server settings instead.
    words = shlex.split(options)
    pairs = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 1
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ConfigurationError(f"DATABASES[{alias!r}]['OPTIONS']['options']: cannot read {word!r}")
        setting, sep, value = word.partition("=")
        if not sep:
            raise ConfigurationError(
                f"DATABASES[{alias!r}]['OPTIONS']['options']: {word!r} is not name=value"
            )
        pairs.append((setting.replace("-", "_"), value))
        i += 1
    return pairs
