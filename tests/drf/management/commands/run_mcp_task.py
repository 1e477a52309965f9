"""``manage.py run_mcp_task ID...``: the worker, which runs each task in this one process."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from tests.drf.mcp import server


class Command(BaseCommand):  # type: ignore[misc]
    help = "Run the given tasks, one after the other, in this process."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("task_ids", nargs="+")

    def handle(self, *args: Any, task_ids: list[str], **options: Any) -> None:
        for task_id in task_ids:
            server.run_task(task_id)
            record = server.task_store.get(task_id)
            self.stdout.write(f"{task_id} {record.status.value if record else 'gone'}")
