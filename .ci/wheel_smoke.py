"""Against an installed wheel: the migrations ship inside it, and a stored event replays."""

import asyncio
from pathlib import Path

import mcp_pg_events
from mcp_pg_events import PostgresEventStore
from mcp_pg_events.migrate import migrations_dir


async def main() -> None:
    package = Path(mcp_pg_events.__file__).parent
    assert "site-packages" in str(package), package
    assert migrations_dir() == package / "migrations", migrations_dir()
    async with await PostgresEventStore.connect() as store:
        view = store.session("wheel-smoke")
        cursor = await view.store_event("1", None)
        await view.store_event("1", None)
        seen: list[object] = []

        async def collect(event: object) -> None:
            seen.append(event)

        assert await view.replay_events_after(cursor, collect) == "1"
        assert seen == []
    print("wheel smoke: ok")


asyncio.run(main())
