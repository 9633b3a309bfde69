"""Replication to the second site (issue 17): open a task for an available backup, copy
what the replica lacks (``csbs.replicate``), record the outcome on the backup."""

from __future__ import annotations

from csbs import replicate
from csbs.catalog import BackupRow, utcnow
from csbs.errors import CsbsError, GarbageCollectionRunning, InvalidState, NotFound
from csbs.model import BackupStatus, TaskKind
from csbs.services.base import Heartbeat, Service
from csbs.steps import ReplicatePlan, ReplicateResult


class ReplicateService(Service):
    """Every step of a replication."""

    def lock_key(self, backup_id: str) -> str:
        return f"replicate:{backup_id}"

    def prepare_replicate(
        self, backup_id: str, task_id: str, workflow_id: str, run_id: str = ""
    ) -> ReplicatePlan:
        """Open the task of a replication of an available backup and hold the backup's
        replication lock (one replication of a backup at a time, none beside a sweep of
        the replica)."""
        if self._find_task(task_id) is None:
            try:
                backup = self._begin(backup_id, task_id, workflow_id, run_id)
            except CsbsError as exc:
                if not exc.retryable:  # refused: a failed task says why (T1)
                    row = self.catalog.find_backup(backup_id)
                    failed = self._failed_task(
                        task_id,
                        TaskKind.REPLICATE,
                        workflow_id,
                        None,
                        "",
                        None,
                        "",
                        str(exc),
                        run_id,
                    )
                    if row is not None:
                        failed.backup_id, failed.backup_name = row.id, row.name
                        failed.server_id, failed.server_name = row.server_id, row.server_name
                    self.catalog.add_task(failed)
                raise
        else:
            backup = self.catalog.get_backup(backup_id)
        parent = None
        if backup.parent_id:
            row = self.catalog.find_backup(backup.parent_id)
            if row is not None and row.replica_status == "replicated":
                parent = row.id
        return ReplicatePlan(
            backup_id=backup.id, task_id=task_id, server_id=backup.server_id, parent_id=parent
        )

    def _begin(self, backup_id: str, task_id: str, workflow_id: str, run_id: str) -> BackupRow:
        self.ctx.replica_store()  # refuses at once when no replica is configured
        backup = self.catalog.get_backup(backup_id)
        if backup.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
            raise InvalidState(
                f"backup {backup.id} is {backup.status}; only available backups are replicated"
            )
        self.catalog.claim_server(self.lock_key(backup.id), task_id, "replicate")
        if self.catalog.gc_running(self.settings.gc_lease_seconds, site="replica"):
            self.catalog.release_server(self.lock_key(backup.id), task_id)
            raise GarbageCollectionRunning(
                "replication waits: a sweep of the replica holds its chunks; it is retried"
            )
        with self.catalog.unit_of_work():
            self.catalog.add_task(
                self._running_task(
                    task_id,
                    TaskKind.REPLICATE,
                    workflow_id,
                    backup.id,
                    backup.name,
                    backup.server_id,
                    backup.server_name,
                    run_id=run_id,
                )
            )
            self.catalog.update_backup(backup.id, replica_status="replicating")
        return backup

    def replicate_backup(
        self, backup_id: str, parent_id: str | None, heartbeat: Heartbeat | None = None
    ) -> ReplicateResult:
        """Copy the backup's missing chunks, then its manifests and descriptor."""
        return replicate.replicate_backup(
            self.store,
            self.ctx.replica_store(),
            backup_id,
            parent_id,
            self.settings.transfer_concurrency,
            heartbeat,
            slack_days=self.settings.object_lock_slack_days,
        )

    def finish_replicate(
        self,
        backup_id: str,
        task_id: str,
        result: ReplicateResult | None,
        error: str | None,
    ) -> None:
        """Record the outcome on the backup and its task; free the replication lock."""
        with self.catalog.unit_of_work():
            if self.catalog.find_backup(backup_id) is not None:
                if error is None:
                    self.catalog.update_backup(
                        backup_id,
                        replica_status="replicated",
                        replicated_at=utcnow(),
                        replica_error=None,
                    )
                else:
                    self.catalog.update_backup(
                        backup_id, replica_status="failed", replica_error=error
                    )
            try:
                task = self.catalog.get_task(task_id)
            except NotFound:
                task = None
            if task is not None and task.status == "running":
                if result is not None:
                    self.catalog.update_task(
                        task_id,
                        detail=(
                            f"{result.chunks_copied} of {result.chunks_referenced} chunks "
                            f"copied ({result.bytes_copied} bytes), {result.chunks_checked} "
                            f"looked up, in {result.seconds:.1f} s"
                            + (f"; {result.note}" if result.note else "")
                        ),
                    )
                self.catalog.finish_task(task_id, ok=error is None, reason=error)
        self.catalog.release_server(self.lock_key(backup_id), task_id)
