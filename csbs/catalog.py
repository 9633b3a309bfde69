"""The catalog (SQLModel over SQLite or PostgreSQL): backups, per-disk backups and tasks.

The catalog is an index for listing and state; everything needed to restore also lives
in the object store (backup descriptors and manifests).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from csbs.errors import (
    Conflict,
    GarbageCollectionDeferred,
    GarbageCollectionRunning,
    InvalidState,
    NotFound,
)
from csbs.model import BackedUpDisk, BackupKind, BackupStatus, DiskRole, TaskKind, TaskStatus
from csbs.schema import upgrade_catalog


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _ts() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=True)


class BackupRow(SQLModel, table=True):
    __tablename__ = "backups"

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    name: str = Field(index=True, max_length=300)
    description: str = Field(default="", max_length=255)
    server_id: str = Field(index=True, max_length=64)
    server_name: str = Field(default="", max_length=255)
    server_type: str = Field(default="", max_length=64)
    status: str = Field(index=True, max_length=32)
    kind: str = Field(default=BackupKind.MANUAL.value, max_length=32)
    policy_id: str | None = Field(default=None, max_length=64)
    parent_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), index=True))
    snapshot_at: datetime | None = Field(default=None, sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    progress: int = 0
    size_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    data_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    error: str | None = Field(default=None, sa_type=sa.Text)
    workflow_id: str | None = Field(default=None, max_length=255)
    #: The last verification (every chunk read and its digest checked): when, ok or
    #: failed, and what it found. A backup that failed verification is never restored.
    verified_at: datetime | None = Field(default=None, sa_column=_ts())
    verify_status: str = Field(default="", max_length=16)
    verify_error: str | None = Field(default=None, sa_type=sa.Text)
    #: The Temporal run that creates the backup: a step of any other run is refused.
    run_id: str | None = Field(default=None, max_length=64)


class DiskBackupRow(SQLModel, table=True):
    __tablename__ = "disk_backups"

    backup_id: str = Field(primary_key=True, max_length=64, foreign_key="backups.id")
    disk_id: str = Field(primary_key=True, max_length=64)
    disk_name: str = Field(default="", max_length=255)
    role: str = Field(default="data", max_length=16)
    size_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    data_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    stored_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    bytes_read: int = Field(default=0, sa_type=sa.BigInteger)
    chunks_total: int = 0
    chunks_uploaded: int = 0
    chunks_reused: int = 0
    chunks_zero: int = 0
    read_mode: str = Field(default="", max_length=32)
    #: Why the disk was read in full instead of by changed blocks (empty when it was not).
    read_note: str = Field(default="", max_length=500)
    progress: int = 0
    done: bool = False

    def view(self) -> BackedUpDisk:
        """The disk as the domain rules see it."""
        return BackedUpDisk(
            disk_id=self.disk_id,
            name=self.disk_name,
            role=DiskRole(self.role),
            size_bytes=self.size_bytes,
        )


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    kind: str = Field(index=True, max_length=16)
    status: str = Field(index=True, max_length=16)
    backup_id: str | None = Field(default=None, index=True, max_length=64)
    backup_name: str = Field(default="", max_length=300)
    server_id: str | None = Field(default=None, index=True, max_length=64)
    server_name: str = Field(default="", max_length=255)
    workflow_id: str | None = Field(default=None, max_length=255)
    started_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), index=True))
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    progress: int = 0
    reason: str | None = Field(default=None, sa_type=sa.Text)
    detail: str | None = Field(default=None, sa_type=sa.Text)
    #: The Temporal run of the task (reconciliation asks Temporal whether it still runs).
    run_id: str | None = Field(default=None, max_length=64)


class ServerLockRow(SQLModel, table=True):
    """A server's operation lock (B14): one backup or one restore at a time, the primary
    key makes a second claim fail. The row ``gc:<project>`` is the tenant's sweep lease.

    ``backup_id`` holds the owner: the backup id (backup), the restore task id (restore)
    or the sweep's token (gc); ``claimed_at`` is when it was taken, or for the sweep lease
    when it was last renewed (docs/format.md, "Locks and leases").
    """

    __tablename__ = "server_locks"

    server_id: str = Field(primary_key=True, max_length=80)
    backup_id: str = Field(max_length=64)
    claimed_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    operation: str = Field(
        default="backup",
        sa_column=sa.Column(sa.String(16), nullable=False, server_default="backup"),
    )


class SuspectChunkRow(SQLModel, table=True):
    """A chunk that a verify (or a restore's check) found missing or corrupt. Backups never
    reuse it: the next one that reads its data uploads it again, and the row goes."""

    __tablename__ = "suspect_chunks"

    project: str = Field(primary_key=True, max_length=64)
    chunk_id: str = Field(primary_key=True, max_length=64)
    problem: str = Field(max_length=16)
    backup_id: str | None = Field(default=None, max_length=64)
    found_at: datetime | None = Field(default=None, sa_column=_ts())


class PolicyRow(SQLModel, table=True):
    """A backup policy; ``spec`` is the JSON of :class:`csbs.policy.PolicySpec`."""

    __tablename__ = "policies"

    id: str = Field(primary_key=True, max_length=64)
    project: str = Field(index=True, max_length=64)
    name: str = Field(max_length=255)
    enabled: bool = True
    spec: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))
    updated_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


class BindingRow(SQLModel, table=True):
    """A server bound to a policy; the key makes it one policy per server (P6)."""

    __tablename__ = "policy_bindings"

    server_id: str = Field(primary_key=True, max_length=64)
    policy_id: str = Field(index=True, max_length=64, foreign_key="policies.id")
    project: str = Field(index=True, max_length=64)
    bound_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


_Row = TypeVar("_Row", bound=SQLModel)


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, waits on locks) or PostgreSQL (pre-ping)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class BackupFilter(SQLModel):
    """Every filter of ``backup list``."""

    status: str | None = None
    server_id: str | None = None
    server_name: str | None = None
    server_type: str | None = None
    name: str | None = None
    id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    policy_id: str | None = None


class Catalog:
    """Repository over the catalog tables; every method is its own transaction."""

    def __init__(self, url: str, project: str = "default") -> None:
        self.url = url
        self.project = project
        self.engine = make_engine(url)
        upgrade_catalog(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    def dispose(self) -> None:
        self.engine.dispose()

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

    def update_row(self, model: type[_Row], key: Any, what: str, fields: dict[str, Any]) -> _Row:
        """Set ``fields`` on the row of ``model`` with primary key ``key`` in one transaction."""
        with self.session() as s:
            row = s.get(model, key)
            if row is None or getattr(row, "project", self.project) != self.project:
                raise NotFound(f"{what} does not exist")
            for name, value in fields.items():
                setattr(row, name, value)
            s.add(row)
            return row

    def update_backup(self, backup_id: str, **fields: Any) -> BackupRow:
        return _fix_backup(self.update_row(BackupRow, backup_id, f"backup {backup_id}", fields))

    def list_backups(self, flt: BackupFilter | None = None) -> list[BackupRow]:
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
        q = q.order_by(col(BackupRow.created_at).desc(), col(BackupRow.id))
        with self.session() as s:
            return [_fix_backup(r) for r in s.exec(q).all()]

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
                return  # another tenant's: as if it did not exist
            for disk in s.exec(select(DiskBackupRow).where(DiskBackupRow.backup_id == backup_id)):
                s.delete(disk)
            s.flush()
            row = s.get(BackupRow, backup_id)
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

    # -- the tenant's sweep lease (D1) -----------------------------------------------------
    def claim_gc(self, owner: str | None = None, lease: float = 60.0) -> str:
        """Take the tenant's sweep lease and return its token, or raise.

        One sweep at a time: a lease held by another owner is refused
        (GarbageCollectionRunning) until it has gone unrenewed for two lease periods; the
        same owner (a retry of the same activity, which Temporal started because the old
        attempt went silent) takes it over at once, and the old attempt's next renewal
        fails, so it stops before deleting. Then, as before, running backups defer the
        sweep (GarbageCollectionDeferred): the lease is written before server locks are
        read, and backups write their lock before reading the lease, so of a backup and a
        sweep that race at least one sees the other.
        """
        key = f"gc:{self.project}"
        owner = owner or uuid.uuid4().hex[:16]
        token = f"{owner}:{uuid.uuid4().hex[:12]}"
        now = utcnow()
        with self.session() as s:
            row = s.get(ServerLockRow, key)
            if row is None:
                s.add(ServerLockRow(server_id=key, backup_id=token, claimed_at=now, operation="gc"))
                try:
                    s.flush()
                except IntegrityError:
                    raise GarbageCollectionRunning(
                        f"another sweep of project {self.project} just started"
                    ) from None
            else:
                renewed = _aware(row.claimed_at) or now
                if row.backup_id.split(":")[0] != owner and renewed > now - timedelta(
                    seconds=2 * lease
                ):
                    raise GarbageCollectionRunning(
                        f"another sweep of project {self.project} holds the lease (renewed "
                        f"{(now - renewed).total_seconds():.0f} s ago); this one waits"
                    )
                taken = s.execute(
                    sa.update(ServerLockRow)
                    .where(
                        col(ServerLockRow.server_id) == key,
                        col(ServerLockRow.backup_id) == row.backup_id,
                    )
                    .values(backup_id=token, claimed_at=now, operation="gc")
                )
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    raise GarbageCollectionRunning(
                        f"another sweep of project {self.project} took the lease first"
                    )
        busy = self.running_backup_slots()
        if busy:
            self.release_gc(token)
            raise GarbageCollectionDeferred(
                f"garbage collection waits: backups are running ({', '.join(busy)}); "
                f"it will run again after them"
            )
        return token

    def renew_gc(self, token: str, lease: float = 60.0) -> bool:
        """Renew the lease ``token`` holds, if it still holds it and it has not run out."""
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                sa.update(ServerLockRow)
                .where(
                    col(ServerLockRow.server_id) == f"gc:{self.project}",
                    col(ServerLockRow.backup_id) == token,
                    col(ServerLockRow.claimed_at) > now - timedelta(seconds=lease),
                )
                .values(claimed_at=now)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def gc_running(self, lease: float = 60.0) -> bool:
        """Whether a sweep may be running: a lease renewed within two lease periods (the
        second one covers clock skew between workers and a renewal in flight)."""
        with self.session() as s:
            row = s.get(ServerLockRow, f"gc:{self.project}")
            if row is None:
                return False
            renewed = _aware(row.claimed_at) or utcnow()
            return renewed > utcnow() - timedelta(seconds=2 * lease)

    def release_gc(self, token: str) -> None:
        """Give the lease back, if ``token`` still holds it."""
        self.release_server(f"gc:{self.project}", token)

    def running_backup_slots(self) -> list[str]:
        """Backup ids holding a live server lock (of this tenant, or not yet recorded)."""
        busy = []
        with self.session() as s:
            for lock in s.exec(select(ServerLockRow)).all():
                if lock.server_id.startswith("gc:") or lock.operation != "backup":
                    continue
                holder = s.get(BackupRow, lock.backup_id)
                if holder is None:
                    claimed = _aware(lock.claimed_at) or utcnow()
                    if claimed > utcnow() - timedelta(minutes=10):
                        busy.append(lock.backup_id)
                elif holder.project == self.project and holder.status == BackupStatus.CREATING:
                    busy.append(holder.id)
        return busy

    def release_server(self, server_id: str, holder: str) -> None:
        with self.session() as s:
            s.execute(
                sa.delete(ServerLockRow).where(
                    col(ServerLockRow.server_id) == server_id,
                    col(ServerLockRow.backup_id) == holder,
                )
            )

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
        q = select(DiskBackupRow).where(DiskBackupRow.backup_id == backup_id)
        with self.session() as s:
            return list(
                s.exec(q.order_by(col(DiskBackupRow.role).desc(), col(DiskBackupRow.disk_name)))
            )

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
        q = select(TaskRow).where(TaskRow.project == self.project)
        if kind:
            q = q.where(TaskRow.kind == str(kind))
        if status:
            q = q.where(TaskRow.status == str(status))
        if backup_id:
            q = q.where(TaskRow.backup_id == backup_id)
        if server_id:
            q = q.where(TaskRow.server_id == server_id)
        q = q.order_by(col(TaskRow.started_at).desc(), col(TaskRow.id))
        with self.session() as s:
            return [_fix_task(r) for r in s.exec(q).all()]

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


class PolicyCatalog:
    """Policies and bindings of one tenant, over the same engine as :class:`Catalog`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.project = catalog.project

    def add(self, row: PolicyRow) -> PolicyRow:
        with self.catalog.session() as s:
            s.add(row)
        return row

    def get(self, policy_id: str) -> PolicyRow:
        with self.catalog.session() as s:
            row = s.get(PolicyRow, policy_id)
            if row is None or row.project != self.project:
                raise NotFound(f"policy {policy_id} does not exist")
            return row

    def all(self) -> list[PolicyRow]:
        q = select(PolicyRow).where(PolicyRow.project == self.project)
        with self.catalog.session() as s:
            return list(s.exec(q.order_by(col(PolicyRow.created_at), col(PolicyRow.id))).all())

    def update(self, policy_id: str, **fields: Any) -> PolicyRow:
        fields["updated_at"] = utcnow()
        return self.catalog.update_row(PolicyRow, policy_id, f"policy {policy_id}", fields)

    def delete(self, policy_id: str) -> None:
        with self.catalog.session() as s:
            for binding in s.exec(select(BindingRow).where(BindingRow.policy_id == policy_id)):
                s.delete(binding)
            s.flush()
            row = s.get(PolicyRow, policy_id)
            if row is not None:
                s.delete(row)

    def exists_in_any_project(self, policy_id: str) -> bool:
        """Whether any tenant has this policy (reconcile never drops another's schedule)."""
        with self.catalog.session() as s:
            return s.get(PolicyRow, policy_id) is not None

    def bindings(self, policy_id: str | None = None) -> list[BindingRow]:
        q = select(BindingRow).where(BindingRow.project == self.project)
        if policy_id is not None:
            q = q.where(BindingRow.policy_id == policy_id)
        with self.catalog.session() as s:
            return list(s.exec(q.order_by(col(BindingRow.bound_at), col(BindingRow.server_id))))

    def bind(self, policy_id: str, server_ids: Sequence[str]) -> None:
        """Bind servers in one transaction; a server bound elsewhere moves here (P6)."""
        with self.catalog.session() as s:
            for server_id in server_ids:
                row = s.get(BindingRow, server_id)
                if row is None:
                    row = BindingRow(
                        server_id=server_id,
                        policy_id=policy_id,
                        project=self.project,
                        bound_at=utcnow(),
                    )
                elif row.policy_id != policy_id:
                    row.policy_id, row.bound_at = policy_id, utcnow()
                s.add(row)

    def unbind(self, policy_id: str, server_ids: Sequence[str]) -> int:
        with self.catalog.session() as s:
            rows = s.exec(
                select(BindingRow)
                .where(BindingRow.policy_id == policy_id)
                .where(col(BindingRow.server_id).in_(list(server_ids)))
            ).all()
            for row in rows:
                s.delete(row)
            return len(rows)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _fix_times(row: SQLModel, *names: str) -> None:
    """Make the row's stored times aware (SQLite hands them back naive) without marking the
    row changed: a read must never write (an UPDATE of a row deleted meanwhile fails)."""
    for name in names:
        value = getattr(row, name)
        if value is not None and value.tzinfo is None:
            set_committed_value(row, name, value.replace(tzinfo=UTC))


def _fix_backup(row: BackupRow) -> BackupRow:
    _fix_times(row, "created_at", "snapshot_at", "finished_at", "verified_at")
    return row


def _fix_task(row: TaskRow) -> TaskRow:
    _fix_times(row, "started_at", "finished_at")
    return row


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def backup_json(row: BackupRow, disks: list[DiskBackupRow]) -> dict[str, Any]:
    """A backup as the CLI's ``--json`` prints it (the contract's fields, then extras)."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "server_id": row.server_id,
        "server_name": row.server_name,
        "server_type": row.server_type,
        "status": row.status,
        "kind": row.kind,
        "policy_id": row.policy_id,
        "parent_id": row.parent_id,
        "created_at": _iso(row.created_at),
        "finished_at": _iso(row.finished_at),
        "progress": row.progress,
        "size_bytes": row.size_bytes,
        "stored_bytes": row.stored_bytes,
        "disks": [
            {
                "disk_id": d.disk_id,
                "name": d.disk_name,
                "role": d.role,
                "size_bytes": d.size_bytes,
                "data_bytes": d.data_bytes,
                "stored_bytes": d.stored_bytes,
                "chunks_total": d.chunks_total,
                "chunks_uploaded": d.chunks_uploaded,
                "chunks_reused": d.chunks_reused,
                "chunks_zero": d.chunks_zero,
                "bytes_read": d.bytes_read,
                "read_mode": d.read_mode,
                "read_note": d.read_note,
            }
            for d in disks
        ],
        "snapshot_at": _iso(row.snapshot_at),
        "data_bytes": row.data_bytes,
        "error": row.error,
        "project": row.project,
        "verified_at": _iso(row.verified_at),
        "verify_status": row.verify_status or None,
        "verify_error": row.verify_error,
    }


def task_json(row: TaskRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "status": row.status,
        "backup_id": row.backup_id,
        "backup_name": row.backup_name,
        "server_id": row.server_id,
        "server_name": row.server_name,
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "progress": row.progress,
        "reason": row.reason,
        "detail": row.detail,
        "workflow_id": row.workflow_id,
        "project": row.project,
    }
