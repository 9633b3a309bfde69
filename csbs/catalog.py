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
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from csbs.errors import Conflict, NotFound
from csbs.model import BackupKind, BackupStatus, TaskKind, TaskStatus
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


class ServerLockRow(SQLModel, table=True):
    """The one-backup-per-server slot (B14): the primary key makes a second claim fail."""

    __tablename__ = "server_locks"

    server_id: str = Field(primary_key=True, max_length=80)
    backup_id: str = Field(max_length=64)
    claimed_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True)))


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
        """The newest available backup of a server: the parent of its next incremental."""
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

    # -- one backup per server (B14) ----------------------------------------------------
    def claim_server(self, server_id: str, backup_id: str) -> None:
        """Take the server's backup slot for ``backup_id`` or raise Conflict.

        A slot whose holder is no longer ``creating`` (its workflow was terminated before it
        could release it) is taken over.
        """
        for _ in range(3):
            with self.session() as s:
                lock = s.get(ServerLockRow, server_id)
                if lock is not None and lock.backup_id == backup_id:
                    return
                if lock is not None:
                    holder = s.get(BackupRow, lock.backup_id)
                    fresh = (_aware(lock.claimed_at) or utcnow()) > utcnow() - timedelta(minutes=10)
                    if (holder is None and fresh) or (
                        holder is not None and holder.status == BackupStatus.CREATING.value
                    ):
                        name = f"{holder.name}, {holder.id}" if holder else lock.backup_id
                        raise Conflict(
                            f"server {server_id} already has a backup running "
                            f"({name}); only one backup per server "
                            f"can run at a time"
                        )
                    s.delete(lock)
                    s.flush()
                s.add(ServerLockRow(server_id=server_id, backup_id=backup_id, claimed_at=utcnow()))
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue  # someone claimed it between our read and insert: look again
                return
        raise Conflict(f"server {server_id} already has a backup running")

    def claim_gc(self) -> None:
        """Take the tenant's garbage-collection slot, or raise Conflict while backups run.

        Backups take their server slot, then look for this one; GC takes this one, then
        looks for server slots. Each writes before it reads, so at least one of two that
        race sees the other: a backup and a sweep never overlap.
        """
        key = f"gc:{self.project}"
        with self.session() as s:
            if s.get(ServerLockRow, key) is None:
                s.add(ServerLockRow(server_id=key, backup_id="gc", claimed_at=utcnow()))
        busy = self.running_backup_slots()
        if busy:
            self.release_server(key, "gc")
            raise Conflict(
                f"garbage collection waits: backups are running ({', '.join(busy)}); "
                f"it will run again after them"
            )

    def running_backup_slots(self) -> list[str]:
        """Backup ids holding a live server slot (of this tenant, or not yet recorded)."""
        busy = []
        with self.session() as s:
            for lock in s.exec(select(ServerLockRow)).all():
                if lock.server_id.startswith("gc:"):
                    continue
                holder = s.get(BackupRow, lock.backup_id)
                if holder is None:
                    claimed = _aware(lock.claimed_at) or utcnow()
                    if claimed > utcnow() - timedelta(minutes=10):
                        busy.append(lock.backup_id)
                elif holder.project == self.project and holder.status == BackupStatus.CREATING:
                    busy.append(holder.id)
        return busy

    def gc_running(self) -> bool:
        with self.session() as s:
            return s.get(ServerLockRow, f"gc:{self.project}") is not None

    def release_gc(self) -> None:
        self.release_server(f"gc:{self.project}", "gc")

    def release_server(self, server_id: str, backup_id: str) -> None:
        with self.session() as s:
            lock = s.get(ServerLockRow, server_id)
            if lock is not None and lock.backup_id == backup_id:
                s.delete(lock)

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


def _fix_backup(row: BackupRow) -> BackupRow:
    row.created_at = _aware(row.created_at) or row.created_at
    row.snapshot_at = _aware(row.snapshot_at)
    row.finished_at = _aware(row.finished_at)
    row.verified_at = _aware(row.verified_at)
    return row


def _fix_task(row: TaskRow) -> TaskRow:
    row.started_at = _aware(row.started_at) or row.started_at
    row.finished_at = _aware(row.finished_at)
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
