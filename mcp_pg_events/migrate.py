"""Running the bundled alembic migrations from code and from the CLI."""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from .dsn import resolve_dsn


def migrations_dir() -> Path:
    """The alembic script directory: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the mcp-pg-events migrations are not installed next to the package")


def alembic_config(dsn: str | None = None, output_buffer: io.StringIO | None = None) -> Config:
    """An alembic config for the bundled migrations, on ``dsn`` (else the environment's, in env.py)."""
    config = Config(output_buffer=output_buffer)
    config.set_main_option("script_location", str(migrations_dir()))
    # env.py turns errors into one line and an exit only under alembic's own command line.
    config.attributes["from_code"] = True
    if dsn is not None:
        config.attributes["dsn"] = dsn
    return config


def revisions() -> list[str]:
    """The bundled revisions, oldest first; the last is head."""
    script = ScriptDirectory.from_config(alembic_config())
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def upgrade(dsn: str | None = None, revision: str = "head") -> None:
    """Migrate the database up to ``revision``."""
    command.upgrade(alembic_config(resolve_dsn(dsn)), revision)


def downgrade(dsn: str | None, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` removes everything)."""
    command.downgrade(alembic_config(resolve_dsn(dsn)), revision)


def print_sql(revision: str = "head") -> None:
    """Print the SQL of the migrations up to ``revision``, for teams that apply it themselves."""
    command.upgrade(alembic_config(), revision, sql=True)


def script(start: str | None, target: str | None) -> str:
    """The SQL that takes a database from revision ``start`` to ``target`` (None: no schema), up or down.

    Without ``BEGIN``/``COMMIT``: for a caller that runs it inside a transaction
    of its own (a Django migration).
    """
    buffer = io.StringIO()
    config = alembic_config(output_buffer=buffer)
    config.attributes["bare"] = True
    if target is not None and (start is None or int(start) < int(target)):
        command.upgrade(config, f"{start}:{target}" if start else target, sql=True)
    elif start is not None and (target is None or int(target) < int(start)):
        command.downgrade(config, f"{start}:{target or 'base'}", sql=True)
    return buffer.getvalue()
