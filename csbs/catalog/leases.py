"""The project's sweep lease (D1, docs/format.md "Locks and leases"): one sweep at a time,
renewed as it goes, never beside a backup."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from csbs.catalog.base import CatalogBase
from csbs.catalog.rows import (
    BackupRow,
    ServerLockRow,
    TaskRow,
    _aware,
    utcnow,
)
from csbs.errors import (
    GarbageCollectionDeferred,
    GarbageCollectionRunning,
)
from csbs.model import BackupStatus

Site = str  # "primary" or "replica"


class SweepLease(CatalogBase):
    """Claim, renew and release the ``gc:<project>`` lease (``gc-replica:<project>`` for
    the replica's sweep); see which backups (replications) hold locks."""

    def _gc_key(self, site: Site) -> str:
        return f"gc:{self.project}" if site == "primary" else f"gc-replica:{self.project}"

    # -- the project's sweep lease (D1) -----------------------------------------------------
    def claim_gc(
        self, owner: str | None = None, lease: float = 60.0, site: Site = "primary"
    ) -> str:
        """Take the project's sweep lease and return its token, or raise.

        One sweep at a time: a lease held by another owner is refused
        (GarbageCollectionRunning) until it has gone unrenewed for two lease periods; the
        same owner (a retry of the same activity, which Temporal started because the old
        attempt went silent) takes it over at once, and the old attempt's next renewal
        fails, so it stops before deleting. Then, as before, running backups defer the
        sweep (GarbageCollectionDeferred): the lease is written before server locks are
        read, and backups write their lock before reading the lease, so of a backup and a
        sweep that race at least one sees the other. The replica's sweep is deferred by
        running replications instead, the same way.
        """
        key = self._gc_key(site)
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
        busy = self.running_backup_slots() if site == "primary" else self.running_replications()
        if busy:
            self.release_gc(token, site)
            what = "backups" if site == "primary" else "replications"
            raise GarbageCollectionDeferred(
                f"garbage collection waits: {what} are running ({', '.join(busy)}); "
                f"it will run again after them"
            )
        return token

    def renew_gc(self, token: str, lease: float = 60.0, site: Site = "primary") -> bool:
        """Renew the lease ``token`` holds, if it still holds it and it has not run out."""
        now = utcnow()
        with self.session() as s:
            result = s.execute(
                sa.update(ServerLockRow)
                .where(
                    col(ServerLockRow.server_id) == self._gc_key(site),
                    col(ServerLockRow.backup_id) == token,
                    col(ServerLockRow.claimed_at) > now - timedelta(seconds=lease),
                )
                .values(claimed_at=now)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def gc_running(self, lease: float = 60.0, site: Site = "primary") -> bool:
        """Whether a sweep may be running: a lease renewed within two lease periods (the
        second one covers clock skew between workers and a renewal in flight)."""
        with self.session() as s:
            row = s.get(ServerLockRow, self._gc_key(site))
            if row is None:
                return False
            renewed = _aware(row.claimed_at) or utcnow()
            return renewed > utcnow() - timedelta(seconds=2 * lease)

    def release_gc(self, token: str, site: Site = "primary") -> None:
        """Give the lease back, if ``token`` still holds it."""
        self.release_server(self._gc_key(site), token)

    def running_replications(self) -> list[str]:
        """Backup ids of this project being replicated (their task runs)."""
        busy = []
        with self.session() as s:
            for lock in s.exec(select(ServerLockRow)).all():
                if lock.operation != "replicate":
                    continue
                task = s.get(TaskRow, lock.backup_id)
                if task is None:
                    claimed = _aware(lock.claimed_at) or utcnow()
                    if claimed > utcnow() - timedelta(minutes=10):
                        busy.append(lock.server_id.removeprefix("replicate:"))
                elif task.project == self.project and task.status == "running":
                    busy.append(task.backup_id or lock.server_id)
        return busy

    def running_backup_slots(self) -> list[str]:
        """Backup ids holding a live server lock (of this project, or not yet recorded)."""
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
