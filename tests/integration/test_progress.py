"""Progress while it runs (B9, T1): a backup's task follows its backup; a ``restoring``
backup and its restore task show the progress of all its disks together; a ``deleting``
backup and its delete task show how many of its objects are gone. Each step runs as
the workflows run it, over the real object store, with every progress write recorded."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csbs.model import DeleteBackupsInput, RestoreServerInput
from csbs.services import Services
from csbs.services import backup as backup_module
from csbs.services import restore as restore_module
from csbs.services.base import _Throttle
from starter.stack import SeaweedS3
from tests.conftest import MIB, dev_servers, make_settings, service_backup

pytestmark = pytest.mark.slow


class _Always(_Throttle):
    """Every progress write goes through (the real one lets one through per second)."""

    def ready(self, force: bool = False) -> bool:
        return True


@pytest.fixture
def svc(tmp_path: Path, s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    monkeypatch.setattr(backup_module, "_Throttle", _Always)
    monkeypatch.setattr(restore_module, "_Throttle", _Always)
    services = Services(make_settings(tmp_path, s3, transfer_concurrency=1))
    yield services
    services.catalog.dispose()


def record(svc: Services, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Every progress the catalog is told: (table, status of the backup or task, value)."""
    seen: list[tuple[str, str, int]] = []
    catalog = svc.catalog
    update_backup, update_task = catalog.update_backup, catalog.update_task
    set_task_progress, disk_progress = catalog.set_task_progress, catalog.disk_progress

    def on_backup(backup_id: str, **fields: Any) -> Any:
        row = update_backup(backup_id, **fields)
        if "progress" in fields and "status" not in fields:
            seen.append(("backup", row.status, row.progress))
        return row

    def on_task(task_id: str, **fields: Any) -> Any:
        row = update_task(task_id, **fields)
        if "progress" in fields:
            seen.append(("task", row.status, row.progress))
        return row

    def on_set(backup_id: str, kind: Any, progress: int) -> None:
        set_task_progress(backup_id, kind, progress)
        (task,) = catalog.list_tasks(kind=kind, backup_id=backup_id, status="running")
        seen.append(("task", task.status, task.progress))

    def on_disk(task_id: str, disk_id: str, done: int, total: int) -> int:
        overall = disk_progress(task_id, disk_id, done, total)
        seen.append(("task", catalog.get_task(task_id).status, catalog.get_task(task_id).progress))
        return overall

    monkeypatch.setattr(catalog, "update_backup", on_backup)
    monkeypatch.setattr(catalog, "update_task", on_task)
    monkeypatch.setattr(catalog, "set_task_progress", on_set)
    monkeypatch.setattr(catalog, "disk_progress", on_disk)
    return seen


def values(seen: list[tuple[str, str, int]], table: str) -> list[int]:
    return [v for t, _, v in seen if t == table]


def test_backup_restore_and_delete_show_real_progress(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = dev_servers(svc.driver)
    server = drv.create_server("progress", [4 * MIB, 4 * MIB])  # 4 chunks each
    for disk in server.disks:
        drv.write(server.id, disk.id, 0, os.urandom(4 * MIB))
    seen = record(svc, monkeypatch)

    # Creating: the task moves with its backup, not 0 then 100.
    backup_id = service_backup(svc, server.id)
    assert backup_id is not None
    made = values(seen, "task")
    assert made[:-1] == values(seen, "backup") and made == sorted(made)
    assert [v for v in made if 0 < v < 99] and made[-2:] == [99, 100]
    (task,) = svc.catalog.list_tasks(kind="backup")
    assert (task.status, task.progress) == ("succeeded", 100)

    # Restoring: the backup shows ``restoring`` with the progress of both disks together.
    seen.clear()
    drv.stop(server.id)
    task_id = f"task-{uuid.uuid4().hex[:12]}"
    plan = svc.restore.prepare_restore(RestoreServerInput(backup_id=backup_id), task_id, "wf")
    for item in plan.items:
        svc.restore.restore_disk(backup_id, item)
    restoring = [(s, v) for t, s, v in seen if t == "backup"]
    assert {s for s, _ in restoring} == {"restoring"}
    progress = [v for _, v in restoring]
    assert progress == sorted(progress) and progress[-1] == 99
    # The first disk done is half of the restore: both disks count, each by its size.
    assert 50 in progress and progress[0] < 50
    assert values(seen, "task") == progress
    svc.restore.finish_restore(backup_id, task_id, ok=True, reason=None)
    assert (svc.catalog.get_backup(backup_id).status, svc.catalog.get_task(task_id).progress) == (
        "available",
        100,
    )

    # Deleting: two manifests and the descriptor, one by one.
    seen.clear()
    (target,) = svc.delete.prepare_delete(
        DeleteBackupsInput(backup_ids=[backup_id]), "task-del", "wf"
    )
    svc.delete.delete_backup(*target)
    assert [(s, v) for t, s, v in seen if t == "backup"] == [
        ("deleting", 0),
        ("deleting", 33),
        ("deleting", 66),
        ("deleting", 99),
    ]
    assert values(seen, "task")[:4] == [0, 33, 66, 99]
    assert svc.catalog.find_backup(backup_id) is None
    assert svc.catalog.get_task(target[1]).progress == 100
