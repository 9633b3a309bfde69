"""Deletes (D1) and garbage collection: mark backups ``deleting`` in one transaction,
remove their manifests and rows, sweep unreferenced chunks under the lease."""

from __future__ import annotations

from csbs import gc, replicate
from csbs.catalog.rows import utcnow
from csbs.errors import (
    InvalidState,
)
from csbs.locks import ObjectLocked, as_utc
from csbs.model import (
    BackupStatus,
    DeleteBackupsInput,
    TaskKind,
)
from csbs.rules import (
    DELETABLE,
)

#: Called by long steps with resumable details; activities turn it into a heartbeat.
from csbs.services.base import Heartbeat, Service
from csbs.steps import DeleteTarget, SweepResult


class DeleteService(Service):
    """Every step of a delete, and the sweep that reclaims chunks."""

    def prepare_delete(
        self, inp: DeleteBackupsInput, task_id: str, workflow_id: str, run_id: str = ""
    ) -> list[DeleteTarget]:
        """Mark every backup ``deleting`` with one task each, in one transaction: each must
        be available, error or delete_failed at that moment (a restore that got there
        first keeps it). Returns a (backup_id, task_id) target for each. Nothing changes if any
        backup is refused."""
        rows = [self.catalog.get_backup(b) for b in inp.backup_ids]
        pairs = [DeleteTarget(row.id, f"{task_id}-{i}") for i, row in enumerate(rows)]
        if self._find_task(pairs[0][1]) is None:
            refused = [r for r in rows if r.status not in {s.value for s in DELETABLE}]
            if refused:
                listing = ", ".join(f"{r.id} ({r.status})" for r in refused)
                raise InvalidState(
                    f"only available, error or delete_failed backups can be deleted: {listing}"
                )
            now = utcnow()
            locked = [r for r in rows if r.locked_until and as_utc(r.locked_until) > now]
            if locked:
                listing = ", ".join(
                    f"{r.id} until {as_utc(r.locked_until):%Y-%m-%d %H:%M} UTC"  # type: ignore[arg-type]
                    for r in locked
                )
                raise ObjectLocked(
                    f"backups locked by S3 Object Lock (compliance mode) cannot be deleted "
                    f"before their lock date: {listing}"
                )
            tasks = [
                self._running_task(
                    tid,
                    TaskKind.DELETE,
                    workflow_id,
                    row.id,
                    row.name,
                    row.server_id,
                    row.server_name,
                    run_id=run_id,
                )
                for row, (_, tid) in zip(rows, pairs, strict=True)
            ]
            self.catalog.begin_delete([r.id for r in rows], tasks)
        return pairs

    def delete_backup(self, backup_id: str, task_id: str) -> None:
        """Remove a backup's manifests, descriptor and catalog rows (chunks are left to GC).
        The ``deleting`` backup and its task show how many of its objects are gone (B9)."""

        def progress(done: int, total: int) -> None:
            pct = min(99, done * 100 // max(total, 1))
            with self.catalog.unit_of_work():
                self.catalog.update_backup(backup_id, progress=pct)
                self.catalog.update_task(task_id, progress=pct)

        self.store.delete_backup_objects(backup_id, progress)
        with self.catalog.unit_of_work():
            self.catalog.delete_backup(backup_id)
            self.catalog.finish_task(task_id, ok=True)

    def fail_delete(self, backup_id: str, task_id: str, reason: str) -> None:
        with self.catalog.unit_of_work():
            if self.catalog.find_backup(backup_id) is not None:
                self.catalog.update_backup(
                    backup_id, status=BackupStatus.DELETE_FAILED.value, error=reason
                )
            self.catalog.finish_task(task_id, ok=False, reason=reason)

    def collect_garbage(
        self, heartbeat: Heartbeat | None = None, owner: str | None = None, site: str = "primary"
    ) -> SweepResult:
        """Delete chunks that no manifest references (D1): one sweep per project at a time
        under a lease, never beside a backup (csbs.gc). On the replica (issue 17), first
        delete the copies of backups the primary deleted once the replica's retention
        lets them go, never beside a replication."""
        if site == "replica":
            if not self.settings.has_replica:
                return SweepResult(
                    manifests=0, chunks=0, chunks_deleted=0, bytes_freed=0, site=site,
                    note="no replica is configured",
                )  # fmt: skip
            replica = self.ctx.replica_store()
            pruned: list[int] = []
            notes: list[str] = []

            def prune() -> None:
                done, kept = replicate.prune_replica(
                    self.catalog, replica, self.settings.replica_retention_days
                )
                pruned.append(done)
                notes.extend(kept)

            result = gc.collect_garbage(
                self.catalog,
                replica,
                self.settings.gc_lease_seconds,
                owner,
                heartbeat,
                shard_chunks=self.settings.gc_shard_chunks,
                site="replica",
                before_marking=prune,
            )
            return result.model_copy(
                update={
                    "site": "replica",
                    "replicas_pruned": sum(pruned),
                    "note": "; ".join(notes),
                }
            )
        return gc.collect_garbage(
            self.catalog,
            self.store,
            self.settings.gc_lease_seconds,
            owner,
            heartbeat,
            shard_chunks=self.settings.gc_shard_chunks,
        )
