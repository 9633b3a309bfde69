"""The catalog on SQLite and PostgreSQL: backups, per-disk backups, tasks, filters."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from csbs.catalog import (
    BackupFilter,
    BackupRow,
    Catalog,
    DiskBackupRow,
    ServerLockRow,
    TaskRow,
    backup_json,
)
from csbs.errors import (
    Conflict,
    GarbageCollectionDeferred,
    GarbageCollectionRunning,
    InvalidInput,
    InvalidState,
    NotFound,
)
from csbs.locks import as_utc


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
    add(catalog, 9, project="p2")  # another project's backup is never listed
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
    with pytest.raises(GarbageCollectionDeferred, match="backups are running"):
        catalog.claim_gc()
    assert not catalog.gc_running()  # the refused sweep left nothing behind
    catalog.release_server("srv-x", "bk-1")
    token = catalog.claim_gc()
    assert catalog.gc_running()
    catalog.release_gc(token)
    assert not catalog.gc_running()


def test_the_sweep_lease_has_one_owner_and_runs_out(catalog: Catalog) -> None:
    """Issue 14, defect 1 (on both databases): one sweep at a time; a second owner waits;
    the same owner (a retry) takes over at once; a lapsed lease is taken over and can no
    longer be renewed; release only frees one's own token."""
    first = catalog.claim_gc("owner-a", lease=60)
    with pytest.raises(GarbageCollectionRunning):
        catalog.claim_gc("owner-b", lease=60)
    assert catalog.renew_gc(first, lease=60)
    retry = catalog.claim_gc("owner-a", lease=60)  # Temporal's retry of the same activity
    assert retry != first and not catalog.renew_gc(first, lease=60)
    catalog.release_gc(first)  # not the holder any more: no effect
    assert catalog.gc_running(lease=60) and catalog.renew_gc(retry, lease=60)
    # Lapsed for over two lease periods: another owner takes it; the old one cannot renew.
    with catalog.session() as s:
        row = s.get(ServerLockRow, "gc:p1")
        assert row is not None
        row.claimed_at = datetime.now(UTC) - timedelta(seconds=130)
        s.add(row)
    assert not catalog.gc_running(lease=60)
    taken = catalog.claim_gc("owner-b", lease=60)
    assert not catalog.renew_gc(retry, lease=60) and catalog.renew_gc(taken, lease=60)
    catalog.release_gc(taken)
    assert not catalog.gc_running(lease=60)


def test_state_changes_are_compare_and_swap(catalog: Catalog) -> None:
    """Issue 14, defect 4 (on both databases): a restore and a delete of one backup, and a
    backup and a restore of one server, can never both start."""
    add(catalog, 1)
    add(catalog, 3)
    restore = TaskRow(
        id="t-r", project="p1", kind="restore", status="running", backup_id="bk-1",
        server_id="srv-1", started_at=T0,
    )  # fmt: skip
    catalog.begin_restore("srv-1", "bk-1", restore)
    assert catalog.get_backup("bk-1").status == "restoring"
    with pytest.raises(InvalidState, match="restoring"):
        catalog.begin_delete(["bk-3", "bk-1"], [])
    assert catalog.get_backup("bk-3").status == "available"  # all or nothing
    with pytest.raises(Conflict, match="being restored"):
        catalog.claim_server("srv-1", "bk-9")
    other = TaskRow(
        id="t-r2", project="p1", kind="restore", status="running", backup_id="bk-3",
        server_id="srv-1", started_at=T0,
    )  # fmt: skip
    with pytest.raises(Conflict):
        catalog.begin_restore("srv-1", "bk-3", other)
    assert catalog.get_backup("bk-3").status == "available"
    with pytest.raises(NotFound):
        catalog.get_task("t-r2")
    catalog.end_restore("srv-1", "bk-1", "t-r")
    assert catalog.get_backup("bk-1").status == "available"
    assert catalog.server_lock("srv-1") is None
    catalog.begin_delete(["bk-1", "bk-3"], [])
    with pytest.raises(InvalidState, match="deleting"):
        catalog.begin_restore("srv-1", "bk-1", restore)
    assert catalog.server_lock("srv-1") is None  # the refused restore took no lock


def test_suspect_chunks_are_kept_per_project(catalog: Catalog) -> None:
    a, b = bytes(range(32)), bytes(32 * [7])
    catalog.add_suspect_chunks([(a.hex(), "missing", "bk-1"), (b.hex(), "corrupt", "bk-1")])
    catalog.add_suspect_chunks([(a.hex(), "corrupt", "bk-2")])  # found again: one row
    assert catalog.suspect_chunks() == {a, b}
    other = Catalog(catalog.url, project="p2")
    assert other.suspect_chunks() == set()
    other.dispose()
    catalog.clear_suspect_chunks([a])
    assert catalog.suspect_chunks() == {b}


def test_reading_a_row_never_writes_it(catalog: Catalog) -> None:
    """A read of a row that another process deletes meanwhile must not fail (it used to
    write the row back, turning SQLite's naive times aware, and fail on commit)."""
    add(catalog, 1)
    with catalog.session() as s:
        row = s.get(BackupRow, "bk-1")
        assert row is not None
        from csbs.catalog import _fix_backup

        _fix_backup(row)
        assert not s.dirty


def test_a_unit_of_work_commits_every_row_together_or_none(catalog: Catalog) -> None:
    """Issue 19: a step that writes several rows (a backup committed, its task finished,
    its server freed) is one transaction: a failure half-way changes nothing."""
    add(catalog, 1, status="creating")
    catalog.add_task(
        TaskRow(
            id="task-1",
            project="p1",
            kind="backup",
            status="running",
            backup_id="bk-1",
            started_at=T0,
        )
    )
    catalog.claim_server("srv-1", "bk-1")
    with pytest.raises(RuntimeError, match="worker died"), catalog.unit_of_work():
        catalog.update_backup("bk-1", status="available", progress=100)
        catalog.finish_task("task-1", ok=True)
        catalog.release_server("srv-1", "bk-1")
        raise RuntimeError("worker died before the step finished")
    assert catalog.get_backup("bk-1").status == "creating"
    assert catalog.get_task("task-1").status == "running"
    assert catalog.server_lock("srv-1") is not None
    with catalog.unit_of_work():
        catalog.update_backup("bk-1", status="available", progress=100)
        catalog.finish_task("task-1", ok=True)
        catalog.release_server("srv-1", "bk-1")
    assert catalog.get_backup("bk-1").status == "available"
    assert catalog.get_task("task-1").status == "succeeded"
    assert catalog.server_lock("srv-1") is None


def test_pages_of_backups_and_tasks_by_key(catalog: Catalog) -> None:
    """Issue 16: lists come a page at a time; a page follows its cursor, rows added
    before the cursor (newer) never show up later, ties in time are ordered by id, and a
    cursor of another list or an altered one is refused by name."""
    from csbs.paging import Cursor

    for i in range(7):
        add(catalog, i)
    # Two backups at the same instant: the id decides their order.
    add(catalog, 20, id="bk-tie-a", created_at=T0 + timedelta(hours=3))
    add(catalog, 21, id="bk-tie-b", created_at=T0 + timedelta(hours=3))
    everything = [r.id for r in catalog.list_backups()]
    assert everything[:3] == ["bk-6", "bk-5", "bk-4"]
    assert everything[3:6] == ["bk-tie-b", "bk-tie-a", "bk-3"]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = catalog.backups_page(None, 3, cursor)
        seen += [r.id for r in page.items]
        pages += 1
        if pages == 1:
            add(catalog, 30)  # newer than the cursor: not in the pages still to come
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == everything and pages == 3
    filtered = catalog.backups_page(BackupFilter(server_id="srv-1"), 2, None)
    assert [r.id for r in filtered.items] == ["bk-5", "bk-tie-b"]
    rest = catalog.backups_page(BackupFilter(server_id="srv-1"), 3, filtered.next_cursor)
    assert [r.id for r in rest.items] == ["bk-3", "bk-1"] and rest.next_cursor is None

    for i in range(5):
        catalog.add_task(
            TaskRow(
                id=f"task-{i}",
                project="p1",
                kind="backup",
                status="failed" if i % 2 else "succeeded",
                started_at=T0 + timedelta(minutes=i),
            )
        )
    first = catalog.tasks_page(limit=2)
    assert [t.id for t in first.items] == ["task-4", "task-3"]
    second = catalog.tasks_page(limit=2, cursor=first.next_cursor)
    assert [t.id for t in second.items] == ["task-2", "task-1"]
    failed = catalog.tasks_page(status="failed", limit=5)
    assert [t.id for t in failed.items] == ["task-3", "task-1"] and failed.next_cursor is None

    with pytest.raises(InvalidInput, match="cursor: it belongs to another list"):
        catalog.tasks_page(limit=2, cursor=page_cursor_of_backups(catalog))
    with pytest.raises(InvalidInput, match="cursor: not a cursor"):
        catalog.backups_page(None, 2, "not-a-cursor!")
    with pytest.raises(InvalidInput, match="cursor: not a cursor"):
        catalog.backups_page(None, 2, Cursor("backups", ["yesterday", "bk-1"]).encode())


def page_cursor_of_backups(catalog: Catalog) -> str:
    cursor = catalog.backups_page(None, 1, None).next_cursor
    assert cursor is not None
    return cursor


def test_console_sessions_end_with_their_token(catalog: Catalog) -> None:
    """Issue 16: a console session is found by its cookie's secret (only its hash is kept),
    ends when it expires, when it is closed, and when its token is revoked or expires."""
    from csbs.auth import Role, Sessions, Tokens
    from csbs.catalog.rows import ConsoleSessionRow

    tokens, sessions = Tokens(catalog), Sessions(catalog, hours=1)
    row, _ = tokens.create("p1", Role.operator, "t", None)
    secret, csrf = sessions.open(row)
    found = sessions.find(secret)
    assert found is not None and found[1].id == row.id and found[0].csrf == csrf
    with catalog.session() as s:
        stored = s.get(ConsoleSessionRow, found[0].id)
        assert stored is not None and secret not in str(stored.model_dump())
    assert sessions.find(secret, now=T0 + timedelta(days=3650)) is None  # expired
    assert sessions.find("nope") is None and sessions.find(None) is None
    sessions.close(secret)
    assert sessions.find(secret) is None
    again, _ = sessions.open(row)
    tokens.revoke(row.id)
    assert sessions.find(again) is None
    short, _ = tokens.create("p1", Role.viewer, "short", T0 + timedelta(days=3650))
    secret, _ = sessions.open(short, now=T0 + timedelta(days=3650) - timedelta(minutes=5))
    with catalog.session() as s:  # a session never outlives its token
        ends = max(r.expires_at for r in s.exec(select(ConsoleSessionRow)).all())
    assert as_utc(ends) <= T0 + timedelta(days=3650)
