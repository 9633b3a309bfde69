"""The catalog repository over SQLite or PostgreSQL: backups, per-disk backups, tasks, server
locks, the sweep lease and suspect chunks. Every method is its own transaction; what
others may race is a conditional update (docs/format.md, "Locks and leases")."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from csbs.catalog.inventory import Inventory
from csbs.catalog.leases import SweepLease
from csbs.catalog.quotas import Quotas
from csbs.catalog.rows import (
    BackupFilter,
    BackupRow,
    DiskBackupRow,
    ReplicaTombstoneRow,
    ServerLockRow,
    SuspectChunkRow,
    TaskRow,
    _aware,
    _fix_backup,
    _fix_task,
    utcnow,
)
from csbs.errors import (
    Conflict,
    InvalidState,
    NotFound,
)
from csbs.model import BackupStatus, TaskKind, TaskStatus
from csbs.paging import Cursor, Page, after_key, cut, time_key


class Catalog(SweepLease, Inventory, Quotas):
    """Repository over the catalog tables; every method is its own transaction."""

    # -- backups ---------------------------------------------------------------------------
    def add_backup(self, row: BackupRow) -> BackupRow:
        """Insert a backup unless one with this id exists (activities are retried)."""
        with self.session() as s:
            existing = s.get(BackupRow, row.id)
            if existing is not None:
                if existing.project != self.project:
                    raise Conflict(f"backup id {row.id} is taken: choose another")
                return _fix_backup(existing)
            s.add(row)
        return row

    def get_backup(self, backup_id: str) -> BackupRow:
        with self.session() as s:
            row = s.get(BackupRow, backup_id)
            if row is None or row.project != self.project:
                raise NotFound(f"backup {backup_id} does not exist")
            return _fix_backup(row)

    def find_backup(self, backup_id: str) -> BackupRow | None:
        try:
            return self.get_backup(backup_id)
        except NotFound:
            return None

    def update_backup(self, backup_id: str, **fields: Any) -> BackupRow:
        return _fix_backup(self.update_row(BackupRow, backup_id, f"backup {backup_id}", fields))

    def list_backups(self, flt: BackupFilter | None = None) -> list[BackupRow]:
        """Every backup the filter selects, newest first."""
        return self.backups_page(flt, None, None).items

    def backups_page(
        self,
        flt: BackupFilter | None,
        limit: int | None,
        cursor: str | None,
        inclusive: bool = False,
    ) -> Page[BackupRow]:
        """A page of the backups the filter selects, newest first (by creation time, then
        id): at most ``limit`` (None: all), after ``cursor`` (``csbs.paging``; or from
        the cursor's own backup on, ``inclusive``)."""
        flt = flt or BackupFilter()
        q = select(BackupRow).where(BackupRow.project == self.project)
        if flt.status:
            q = q.where(BackupRow.status == flt.status)
        if flt.server_id:
            q = q.where(BackupRow.server_id == flt.server_id)
        if flt.server_name:
            q = q.where(col(BackupRow.server_name).contains(flt.server_name))
        if flt.server_type:
            q = q.where(BackupRow.server_type == flt.server_type)
        if flt.name:
            q = q.where(col(BackupRow.name).contains(flt.name))
        if flt.id:
            q = q.where(BackupRow.id == flt.id)
        if flt.policy_id:
            q = q.where(BackupRow.policy_id == flt.policy_id)
        if flt.since:
            q = q.where(col(BackupRow.created_at) >= flt.since)
        if flt.until:
            q = q.where(col(BackupRow.created_at) <= flt.until)
        start = Cursor.decode(cursor, "backups", 2)
        columns = (col(BackupRow.created_at), col(BackupRow.id))
        if start is not None:
            q = q.where(after_key(columns, [start.time(0), start.key[1]], inclusive))
        q = q.order_by(*(c.desc() for c in columns))
        if limit is not None:
            q = q.limit(limit + 1)
        with self.session() as s:
            rows = [_fix_backup(r) for r in s.exec(q).all()]
        return cut(rows, limit, "backups", lambda r: [time_key(r.created_at), r.id])

    def last_available_backup(self, server_id: str, exclude: str | None = None) -> BackupRow | None:
        """The newest available backup of a server that did not fail verification: the
        parent of its next incremental."""
        q = (
            select(BackupRow)
            .where(BackupRow.project == self.project)
            .where(BackupRow.server_id == server_id)
            .where(
                BackupRow.status.in_(  # type: ignore[attr-defined]
                    [BackupStatus.AVAILABLE.value, BackupStatus.RESTORING.value]
                )
            )
            .order_by(col(BackupRow.snapshot_at).desc(), col(BackupRow.created_at).desc())
        )
        q = q.where(BackupRow.verify_status != "failed")  # never the parent of another
        if exclude:
            q = q.where(BackupRow.id != exclude)
        with self.session() as s:
            row = s.exec(q).first()
            return _fix_backup(row) if row else None

    def delete_backup(self, backup_id: str) -> None:
        with self.session() as s:
            row = s.get(BackupRow, backup_id)
            if row is not None and row.project != self.project:
                return  # another project's: as if it did not exist
            for disk in s.exec(select(DiskBackupRow).where(DiskBackupRow.backup_id == backup_id)):
                s.delete(disk)
            s.flush()
            row = s.get(BackupRow, backup_id)
            if row is not None:
                if row.replica_status:  # the replica may hold a copy: its retention decides
                    s.merge(
                        ReplicaTombstoneRow(
                            project=self.project,
                            backup_id=backup_id,
                            created_at=_aware(row.created_at) or utcnow(),
                            deleted_at=utcnow(),
                        )
                    )
                s.delete(row)

    def ids_beginning(self, kind: str, prefix: str) -> list[str]:
        """Ids of the project's backups, tasks or policies that begin with ``prefix``."""
        from csbs.catalog.rows import PolicyRow

        row = {"backup": BackupRow, "task": TaskRow, "policy": PolicyRow}[kind]
        column = col(row.id)  # type: ignore[attr-defined]
        q = select(column).where(col(row.project) == self.project)  # type: ignore[attr-defined]
        if prefix:
            q = q.where(column.startswith(prefix, autoescape=True))
        with self.session() as s:
            return [str(i) for i in s.exec(q).all()]

    def replica_tombstones(self) -> list[ReplicaTombstoneRow]:
        """Backups deleted from the primary whose replica copies may remain."""
        q = select(ReplicaTombstoneRow).where(ReplicaTombstoneRow.project == self.project)
        with self.session() as s:
            rows = list(s.exec(q.order_by(col(ReplicaTombstoneRow.created_at))).all())
        for r in rows:
            r.created_at = _aware(r.created_at) or r.created_at
        return rows

    def drop_tombstone(self, backup_id: str) -> None:
        with self.session() as s:
            row = s.get(ReplicaTombstoneRow, (self.project, backup_id))
            if row is not None:
                s.delete(row)

    # -- state changes as compare-and-swap ----------------------------------------------
    def transition_backup(
        self, backup_id: str, allowed: set[BackupStatus], to: BackupStatus, **fields: Any
    ) -> BackupRow:
        """Set the backup's status to ``to`` only if it is in ``allowed`` now, in one
        conditional UPDATE: of two operations that race, one wins and the other is told."""
        with self.session() as s:
            self._transition(s, backup_id, allowed, to, fields)
        return self.get_backup(backup_id)

    def _transition(
        self,
        s: Session,
        backup_id: str,
        allowed: set[BackupStatus],
        to: BackupStatus,
        fields: dict[str, Any],
    ) -> None:
        result = s.execute(
            sa.update(BackupRow)
            .where(col(BackupRow.id) == backup_id, col(BackupRow.project) == self.project)
            .where(col(BackupRow.status).in_([a.value for a in allowed]))
            .values(status=to.value, **fields)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            row = s.get(BackupRow, backup_id)
            if row is None or row.project != self.project:
                raise NotFound(f"backup {backup_id} does not exist")
            wanted = " or ".join(sorted(a.value for a in allowed))
            raise InvalidState(
                f"backup {backup_id} is {row.status}, not {wanted}: another operation "
                f"changed it first"
            )

    # -- server locks: one backup or restore per server (B14) ------------------------------
    def _lock_holder(self, s: Session, lock: ServerLockRow) -> str | None:
        """What holds a server's lock, as a person reads it; None when the holder is over
        (it ended without releasing it) and the lock may be taken over."""
        fresh = (_aware(lock.claimed_at) or utcnow()) > utcnow() - timedelta(minutes=10)
        if lock.operation == "replicate":
            task = s.get(TaskRow, lock.backup_id)
            if task is None:
                return f"being replicated (task {lock.backup_id})" if fresh else None
            if task.status == TaskStatus.RUNNING.value:
                return f"being replicated (task {task.id})"
            return None
        if lock.operation == "restore":
            task = s.get(TaskRow, lock.backup_id)
            if task is None:
                return f"being restored (task {lock.backup_id})" if fresh else None
            if task.status == TaskStatus.RUNNING.value:
                return f"being restored from backup {task.backup_name} ({task.backup_id})"
            return None
        holder = s.get(BackupRow, lock.backup_id)
        if holder is None:
            return f"being backed up ({lock.backup_id})" if fresh else None
        if holder.status == BackupStatus.CREATING.value:
            return f"being backed up ({holder.name}, {holder.id})"
        return None

    def server_busy(self, server_id: str) -> str | None:
        """What holds the server now (a running backup or restore), or None."""
        with self.session() as s:
            lock = s.get(ServerLockRow, server_id)
            return None if lock is None else self._lock_holder(s, lock)

    def claim_server(self, server_id: str, holder: str, operation: str = "backup") -> None:
        """Take the server's lock for ``holder`` (a backup id, or a restore's task id) or
        raise Conflict naming what holds it. A lock whose holder is over is taken over."""
        with self.session() as s:
            self._claim(s, server_id, holder, operation)

    def _claim(self, s: Session, server_id: str, holder: str, operation: str) -> None:
        lock = s.get(ServerLockRow, server_id)
        if lock is not None and lock.backup_id == holder:
            return
        if lock is not None:
            busy = self._lock_holder(s, lock)
            if busy is not None:
                if operation == "backup" and lock.operation == "backup":
                    raise Conflict(
                        f"server {server_id} already has a backup running "
                        f"({busy.removeprefix('being backed up (').rstrip(')')}); only one "
                        f"backup per server can run at a time"
                    )
                if operation == "replicate":
                    raise Conflict(
                        f"backup {server_id.removeprefix('replicate:')} is {busy}; replicate "
                        f"it again when that has finished"
                    )
                what = "back it up" if operation == "backup" else "restore it"
                raise Conflict(f"server {server_id} is {busy}; {what} when that has finished")
            s.delete(lock)
            s.flush()
        s.add(
            ServerLockRow(
                server_id=server_id, backup_id=holder, claimed_at=utcnow(), operation=operation
            )
        )
        try:
            s.flush()
        except IntegrityError:
            raise Conflict(
                f"server {server_id} was just claimed by another operation; try again"
            ) from None

    def server_lock(self, server_id: str) -> tuple[str, str] | None:
        """(operation, holder) of the server's lock, if any."""
        with self.session() as s:
            lock = s.get(ServerLockRow, server_id)
            return None if lock is None else (lock.operation, lock.backup_id)

    def begin_restore(self, server_id: str, backup_id: str, task: TaskRow) -> None:
        """In one transaction: take the server's lock for the restore's task, move the
        backup from ``available`` to ``restoring`` and record the task; all or nothing."""
        with self.session() as s:
            self._claim(s, server_id, task.id, "restore")
            self._transition(
                s, backup_id, {BackupStatus.AVAILABLE}, BackupStatus.RESTORING, {"progress": 0}
            )
            s.add(task)

    def end_restore(self, server_id: str, backup_id: str, task_id: str) -> None:
        """The backup is ``available`` again and the server's lock is free."""
        with self.session() as s:
            s.execute(
                sa.update(BackupRow)
                .where(col(BackupRow.id) == backup_id, col(BackupRow.project) == self.project)
                .where(col(BackupRow.status) == BackupStatus.RESTORING.value)
                .values(status=BackupStatus.AVAILABLE.value, progress=100)
            )
            lock = s.get(ServerLockRow, server_id)
            if lock is not None and lock.backup_id == task_id:
                s.delete(lock)

    def begin_delete(self, backup_ids: Sequence[str], tasks: Sequence[TaskRow]) -> None:
        """In one transaction: every backup from a deletable state to ``deleting`` with its
        task; if any is refused, nothing changes."""
        deletable = {BackupStatus.AVAILABLE, BackupStatus.ERROR, BackupStatus.DELETE_FAILED}
        with self.session() as s:
            for backup_id in backup_ids:
                self._transition(s, backup_id, deletable, BackupStatus.DELETING, {"progress": 0})
            for task in tasks:
                s.add(task)

    # -- suspect chunks (verify findings feed the next backup) -------------------------------
    def add_suspect_chunks(self, problems: Sequence[tuple[str, str, str | None]]) -> None:
        """Record (chunk id hex, problem, backup id) findings; a known one is updated."""
        with self.session() as s:
            for chunk_id, problem, backup_id in problems:
                s.merge(
                    SuspectChunkRow(
                        project=self.project,
                        chunk_id=chunk_id,
                        problem=problem,
                        backup_id=backup_id,
                        found_at=utcnow(),
                    )
                )

    def suspect_chunks(self) -> set[bytes]:
        q = select(SuspectChunkRow.chunk_id).where(SuspectChunkRow.project == self.project)
        with self.session() as s:
            return {bytes.fromhex(c) for c in s.exec(q).all()}

    def clear_suspect_chunks(self, chunk_ids: Sequence[bytes]) -> None:
        if not chunk_ids:
            return
        with self.session() as s:
            s.execute(
                sa.delete(SuspectChunkRow).where(
                    col(SuspectChunkRow.project) == self.project,
                    col(SuspectChunkRow.chunk_id).in_([c.hex() for c in chunk_ids]),
                )
            )

    # -- per-disk backups ---------------------------------------------------------------
    def upsert_disk_backup(self, row: DiskBackupRow) -> None:
        with self.session() as s:
            s.merge(row)

    def update_disk_backup(self, backup_id: str, disk_id: str, **fields: Any) -> None:
        what = f"disk {disk_id} of backup {backup_id}"
        self.update_row(DiskBackupRow, (backup_id, disk_id), what, fields)

    def disk_backups(self, backup_id: str) -> list[DiskBackupRow]:
        return self.disk_backups_of([backup_id]).get(backup_id, [])

    def disk_backups_of(self, backup_ids: Sequence[str]) -> dict[str, list[DiskBackupRow]]:
        """The disks of several backups in one query (a page of a list), system disk first."""
        found: dict[str, list[DiskBackupRow]] = {b: [] for b in backup_ids}
        if not backup_ids:
            return found
        q = select(DiskBackupRow).where(col(DiskBackupRow.backup_id).in_(list(backup_ids)))
        q = q.order_by(col(DiskBackupRow.role).desc(), col(DiskBackupRow.disk_name))
        with self.session() as s:
            for row in s.exec(q):
                found[row.backup_id].append(row)
        return found

    # -- tasks -----------------------------------------------------------------------------
    def add_task(self, row: TaskRow) -> TaskRow:
        with self.session() as s:
            existing = s.get(TaskRow, row.id)
            if existing is not None:
                if existing.project != self.project:
                    raise Conflict(f"task id {row.id} is taken: choose another")
                return _fix_task(existing)
            s.add(row)
        return row

    def get_task(self, task_id: str) -> TaskRow:
        with self.session() as s:
            row = s.get(TaskRow, task_id)
            if row is None or row.project != self.project:
                raise NotFound(f"task {task_id} does not exist")
            return _fix_task(row)

    def update_task(self, task_id: str, **fields: Any) -> TaskRow:
        return _fix_task(self.update_row(TaskRow, task_id, f"task {task_id}", fields))

    def set_task_progress(self, backup_id: str, kind: TaskKind, progress: int) -> None:
        """The progress of the running task(s) of ``kind`` on a backup (T1)."""
        with self.session() as s:
            s.exec(
                sa.update(TaskRow)
                .where(
                    col(TaskRow.project) == self.project,
                    col(TaskRow.backup_id) == backup_id,
                    col(TaskRow.kind) == kind.value,
                    col(TaskRow.status) == TaskStatus.RUNNING.value,
                )
                .values(progress=progress)
            )

    def add_task_note(self, task_id: str, note: str) -> None:
        """Append a line to a task's detail, in one statement (disks note concurrently)."""
        with self.session() as s:
            s.exec(
                sa.update(TaskRow)
                .where(col(TaskRow.id) == task_id)
                .values(detail=sa.func.coalesce(col(TaskRow.detail) + "; ", "") + note)
            )

    def disk_progress(self, task_id: str, disk_id: str, done: int, total: int) -> int:
        """Record how far one disk of a running task is (chunks) and return the task's
        progress over all its disks, in percent; the task row holds both (T1)."""
        with self.session() as s:
            query = select(TaskRow).where(col(TaskRow.id) == task_id)
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update()
            task = s.exec(query).one_or_none()
            if task is None or task.status != TaskStatus.RUNNING.value:
                return 100 if task is not None else 0
            disks = json.loads(task.disks_progress or "{}")
            disks[disk_id] = [done, total]
            all_done = sum(d for d, _ in disks.values())
            all_total = sum(t for _, t in disks.values()) or 1
            task.progress = min(99, all_done * 100 // all_total)
            task.disks_progress = json.dumps(disks, sort_keys=True)
            s.add(task)
            return task.progress

    def finish_task(self, task_id: str, ok: bool, reason: str | None = None) -> TaskRow:
        fields: dict[str, Any] = {
            "status": (TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED).value,
            "finished_at": utcnow(),
            "reason": reason,
        }
        if ok:
            fields["progress"] = 100
        return self.update_task(task_id, **fields)

    def list_tasks(
        self,
        kind: TaskKind | str | None = None,
        status: TaskStatus | str | None = None,
        backup_id: str | None = None,
        server_id: str | None = None,
    ) -> list[TaskRow]:
        """Every task record the filters select, newest first."""
        return self.tasks_page(kind, status, backup_id, server_id).items

    def tasks_page(
        self,
        kind: TaskKind | str | None = None,
        status: TaskStatus | str | None = None,
        backup_id: str | None = None,
        server_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[TaskRow]:
        """A page of task records, newest first (by start, then id)."""
        q = select(TaskRow).where(TaskRow.project == self.project)
        if kind:
            q = q.where(TaskRow.kind == str(kind))
        if status:
            q = q.where(TaskRow.status == str(status))
        if backup_id:
            q = q.where(TaskRow.backup_id == backup_id)
        if server_id:
            q = q.where(TaskRow.server_id == server_id)
        start = Cursor.decode(cursor, "tasks", 2)
        columns = (col(TaskRow.started_at), col(TaskRow.id))
        if start is not None:
            q = q.where(after_key(columns, [start.time(0), start.key[1]]))
        q = q.order_by(*(c.desc() for c in columns))
        if limit is not None:
            q = q.limit(limit + 1)
        with self.session() as s:
            rows = [_fix_task(r) for r in s.exec(q).all()]
        return cut(rows, limit, "tasks", lambda r: [time_key(r.started_at), r.id])

    def tasks_of(self, backup_ids: Sequence[str]) -> dict[str, list[TaskRow]]:
        """The task records of several backups in one query (a page of a list)."""
        found: dict[str, list[TaskRow]] = {b: [] for b in backup_ids}
        if not backup_ids:
            return found
        q = select(TaskRow).where(
            TaskRow.project == self.project, col(TaskRow.backup_id).in_(list(backup_ids))
        )
        with self.session() as s:
            for row in s.exec(q.order_by(col(TaskRow.started_at).desc(), col(TaskRow.id).desc())):
                found[str(row.backup_id)].append(_fix_task(row))
        return found

    def delete_tasks(self, task_ids: Sequence[str]) -> int:
        with self.session() as s:
            rows = s.exec(
                select(TaskRow).where(
                    col(TaskRow.id).in_(list(task_ids)), TaskRow.project == self.project
                )
            ).all()
            for row in rows:
                s.delete(row)
            return len(rows)
