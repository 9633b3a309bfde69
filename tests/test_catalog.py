"""The catalog on SQLite and PostgreSQL: backups, per-disk backups, tasks, filters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from csbs.catalog import BackupFilter, BackupRow, Catalog, DiskBackupRow, TaskRow, backup_json
from csbs.errors import Conflict, NotFound


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    cat = Catalog(url, project="p1")
    yield cat
    cat.dispose()


T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def add(cat: Catalog, i: int, **kw: object) -> BackupRow:
    values: dict[str, object] = dict(
        id=f"bk-{i}",
        project="p1",
        name=f"manualbk_{i:04d}",
        server_id=f"srv-{i % 2}",
        server_name=f"web-{i % 2}",
        server_type="local",
        status="available",
        created_at=T0 + timedelta(hours=i),
        snapshot_at=T0 + timedelta(hours=i),
    )
    values.update(kw)
    return cat.add_backup(BackupRow(**values))  # type: ignore[arg-type]


def test_backups_roundtrip_filters_and_parent(catalog: Catalog) -> None:
    for i in range(6):
        add(catalog, i, status="error" if i == 5 else "available")
    add(catalog, 9, project="p2")  # another tenant's backup is never listed
    assert add(catalog, 0).name == "manualbk_0000"  # idempotent insert
    row = catalog.get_backup("bk-3")
    assert row.created_at == T0 + timedelta(hours=3) and row.created_at.tzinfo is not None
    assert [r.id for r in catalog.list_backups()] == [f"bk-{i}" for i in range(5, -1, -1)]
    assert [r.id for r in catalog.list_backups(BackupFilter(status="error"))] == ["bk-5"]
    assert {r.id for r in catalog.list_backups(BackupFilter(server_id="srv-1"))} == {
        "bk-1",
        "bk-3",
        "bk-5",
    }
    assert len(catalog.list_backups(BackupFilter(server_name="web-0"))) == 3
    assert len(catalog.list_backups(BackupFilter(name="_0002"))) == 1
    window = BackupFilter(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=2))
    assert [r.id for r in catalog.list_backups(window)] == ["bk-2", "bk-1"]
    assert catalog.last_available_backup("srv-1").id == "bk-3"  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        catalog.get_backup("bk-9")


def test_disk_rows_tasks_and_delete(catalog: Catalog) -> None:
    add(catalog, 1)
    catalog.upsert_disk_backup(
        DiskBackupRow(backup_id="bk-1", disk_id="d0", role="system", size_bytes=10 << 40)
    )
    catalog.upsert_disk_backup(DiskBackupRow(backup_id="bk-1", disk_id="d1", size_bytes=5))
    catalog.update_disk_backup("bk-1", "d0", stored_bytes=5 << 40, done=True)
    view = backup_json(catalog.get_backup("bk-1"), catalog.disk_backups("bk-1"))
    assert [d["disk_id"] for d in view["disks"]] == ["d0", "d1"]
    assert view["disks"][0]["stored_bytes"] == 5 << 40  # 64-bit sizes
    catalog.add_task(
        TaskRow(
            id="t1", project="p1", kind="backup", status="running", backup_id="bk-1", started_at=T0
        )
    )
    catalog.add_task(
        TaskRow(
            id="t2",
            project="p1",
            kind="restore",
            status="running",
            backup_id="bk-1",
            started_at=T0 + timedelta(minutes=1),
        )
    )
    catalog.finish_task("t1", ok=False, reason="upload of disk d1: bucket missing")
    catalog.finish_task("t2", ok=True)
    assert catalog.get_task("t1").reason == "upload of disk d1: bucket missing"
    assert [t.id for t in catalog.list_tasks(kind="restore")] == ["t2"]
    assert [t.id for t in catalog.list_tasks(status="failed")] == ["t1"]
    assert catalog.get_task("t2").progress == 100
    catalog.delete_backup("bk-1")
    assert catalog.find_backup("bk-1") is None and catalog.disk_backups("bk-1") == []
    assert catalog.delete_tasks(["t1", "t2", "nope"]) == 2


def test_one_backup_slot_per_server(catalog: Catalog) -> None:
    """B14: the slot is held while the holder is creating, and freed or taken over after."""
    add(catalog, 1, status="creating", server_id="srv-x")
    catalog.claim_server("srv-x", "bk-1")
    catalog.claim_server("srv-x", "bk-1")  # idempotent for the holder
    with pytest.raises(Conflict, match="already has a backup running"):
        catalog.claim_server("srv-x", "bk-2")
    catalog.release_server("srv-x", "bk-2")  # not the holder: no effect
    with pytest.raises(Conflict):
        catalog.claim_server("srv-x", "bk-2")
    catalog.update_backup("bk-1", status="error")  # holder ended without releasing
    catalog.claim_server("srv-x", "bk-2")
    catalog.release_server("srv-x", "bk-2")
    catalog.claim_server("srv-x", "bk-3")


def test_gc_and_backups_never_overlap(catalog: Catalog) -> None:
    """D1: a sweep waits for running backups; a backup sees a running sweep."""
    add(catalog, 1, status="creating", server_id="srv-x")
    catalog.claim_server("srv-x", "bk-1")
    with pytest.raises(Conflict, match="backups are running"):
        catalog.claim_gc()
    assert not catalog.gc_running()  # the refused sweep left nothing behind
    catalog.release_server("srv-x", "bk-1")
    catalog.claim_gc()
    assert catalog.gc_running()
    catalog.release_gc()
    assert not catalog.gc_running()
