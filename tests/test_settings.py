"""Settings: one definition of every knob, read from arguments, then the environment, then defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import timedelta
from typing import Any, get_type_hints

import pytest

from mcp_pg_events import ConfigurationError, PostgresEventStore, RetentionSettings, StoreSettings
from mcp_pg_events.settings import (
    RestFrameworkOptions,
    RestFrameworkSettings,
    RetentionOptions,
    StoreOptions,
    env_name,
)


@pytest.mark.parametrize(
    ("settings", "options"),
    [
        (StoreSettings, StoreOptions),
        (RetentionSettings, RetentionOptions),
        (RestFrameworkSettings, RestFrameworkOptions),
    ],
)
def test_the_typed_options_are_exactly_the_settings_fields(settings: Any, options: Any) -> None:
    fields = {f.name: f.type for f in dataclasses.fields(settings)}
    assert set(get_type_hints(options)) == set(fields)


def test_arguments_win_over_the_environment_which_wins_over_defaults() -> None:
    environ = {env_name("retry_deadline"): "7.5", env_name("max_batch"): "64", env_name("notify"): "off"}
    settings = StoreSettings.from_env(environ, max_batch=8)
    assert (settings.retry_deadline, settings.max_batch, settings.notify) == (7.5, 8, False)
    assert settings.poll_interval == StoreSettings().poll_interval


def test_retention_durations_come_from_the_environment() -> None:
    settings = RetentionSettings.from_env({env_name("ttl"): "2h", env_name("partition_max_age"): "15m"})
    assert settings.ttl == timedelta(hours=2)
    assert settings.partition_max_age == timedelta(minutes=15)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("retry_deadline", "soon", "MCP_PG_EVENTS_RETRY_DEADLINE"),
        ("notify", "maybe", "MCP_PG_EVENTS_NOTIFY: not on or off"),
        ("max_pool_size", "0", "max_pool_size must be at least 1"),
    ],
)
def test_a_bad_value_in_the_environment_is_one_clear_error(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        StoreSettings.from_env({env_name(variable): value})


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"max_inflight": 4, "max_pool_size": 2}, "max_inflight .4. must not exceed max_pool_size"),
        ({"min_pool_size": 5, "max_pool_size": 2}, "min_pool_size .5. must not exceed"),
        ({"poll_interval": 0}, "poll_interval must be more than 0"),
        ({"replay_batch_size": 0}, "replay_batch_size must be at least 1"),
    ],
)
def test_store_settings_refuse_what_cannot_work(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        StoreSettings(**options)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"partitions_ahead": 100}, "partitions_ahead must be between 1 and 99"),
        ({"ttl": timedelta(seconds=-1)}, "ttl must not be negative"),
        ({"lock_timeout": timedelta(0)}, "lock_timeout must be more than 0"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_retention_settings_refuse_what_cannot_work(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        RetentionSettings(**options)


async def test_a_store_reads_its_settings_from_the_environment(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_name("replay_batch_size"), "7")
    monkeypatch.setenv(env_name("listen"), "0")
    async with await PostgresEventStore.connect(dsn, retry_deadline=3) as store:
        assert store.settings.replay_batch_size == 7
        assert store.settings.retry_deadline == 3
        assert store.listener is None


def test_importing_the_store_imports_neither_sqlalchemy_nor_alembic() -> None:
    # Only migrating needs them; a server that only stores events should not pay for them.
    code = (
        "import sys, mcp_pg_events; "
        "from mcp_pg_events import PostgresEventStore, scope_sessions, run_retention; "
        "print(sorted(m for m in ('sqlalchemy', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
