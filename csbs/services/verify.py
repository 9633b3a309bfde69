"""Verification: read every chunk of a backup back and check its digest; record the
outcome and the chunks found missing or corrupt (they are uploaded again)."""

from __future__ import annotations

from datetime import timedelta

from csbs import verify
from csbs.catalog import (
    BackupFilter,
    utcnow,
)
from csbs.errors import (
    CorruptData,
    InvalidState,
    NotFound,
)
from csbs.model import (
    BackupStatus,
    ChunkProblem,
    TaskKind,
    VerifyDiskResult,
    VerifyPlan,
    VerifyStatus,
)

#: Called by long steps with resumable details; activities turn it into a heartbeat.
from csbs.services.base import Heartbeat, Service
from csbs.steps import VerifySummary


class VerifyService(Service):
    """Every step of a verification."""

    def prepare_verify(
        self, backup_id: str, task_id: str, workflow_id: str, replica: bool = False
    ) -> VerifyPlan:
        """Open a verify task for an available (or restoring) backup (``replica``: one
        replicated to the second site, whose copy is verified)."""
        self.source(replica).ensure_config()
        backup = self.catalog.get_backup(backup_id)
        if self._find_task(task_id) is None:
            if backup.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
                raise InvalidState(
                    f"backup {backup.id} is {backup.status}; only available backups are verified"
                )
            if replica and backup.replica_status != "replicated":
                raise InvalidState(
                    f"backup {backup.id} is not on the replica (replication: "
                    f"{backup.replica_status or 'never'}): run csbs backup replicate "
                    f"{backup.id} first"
                )
            self.catalog.add_task(
                self._running_task(
                    task_id,
                    TaskKind.VERIFY,
                    workflow_id,
                    backup.id,
                    backup.name,
                    backup.server_id,
                    backup.server_name,
                    detail="the copy on the replica" if replica else None,
                )
            )
        return VerifyPlan(
            backup_id=backup.id,
            backup_name=backup.name,
            server_id=backup.server_id,
            task_id=task_id,
            disk_ids=[d.disk_id for d in self.catalog.disk_backups(backup.id)],
        )

    def verify_disk(
        self,
        backup_id: str,
        disk_id: str,
        heartbeat: Heartbeat | None = None,
        replica: bool = False,
    ) -> VerifyDiskResult:
        """Read every chunk of one disk of a backup and check its digest."""
        return verify.verify_disk(
            self.source(replica),
            backup_id,
            disk_id,
            self.settings.transfer_concurrency,
            heartbeat,
        )

    def finish_verify(
        self,
        backup_id: str,
        task_id: str,
        results: list[VerifyDiskResult],
        error: str | None,
        replica: bool = False,
    ) -> VerifySummary:
        """Record the outcome on the backup and its task; a backup whose descriptor is gone
        fails too (restore needs it). A verification of the replica records its failure
        as the backup's ``replica_error`` and leaves the primary's record alone."""
        problems = [p for r in results for p in r.problems]
        if error is None:
            try:
                self.source(replica).get_descriptor(backup_id)
            except (NotFound, CorruptData, ValueError) as exc:
                problems.insert(
                    0,
                    ChunkProblem(
                        disk_id="-", index=None, chunk_id=None, problem="manifest", message=str(exc)
                    ),
                )
        ok = error is None and not problems
        reason = None if ok else (error or f"verify found {verify.describe(problems)}")
        with self.catalog.unit_of_work():
            if replica:
                if reason is not None:
                    reason = f"replica: {reason}"
                if error is None:
                    self.catalog.update_backup(backup_id, replica_error=reason)
            elif error is None:
                self._suspect(backup_id, problems)
                self.catalog.update_backup(
                    backup_id,
                    verified_at=utcnow(),
                    verify_status=(VerifyStatus.OK if ok else VerifyStatus.FAILED).value,
                    verify_error=reason,
                )
            self.catalog.finish_task(task_id, ok=ok, reason=reason)
        return VerifySummary(
            backup_id=backup_id,
            ok=ok,
            chunks_checked=sum(r.chunks_checked for r in results),
            bytes_checked=sum(r.bytes_checked for r in results),
            problems=problems,
            reason=reason,
        )

    def backups_to_verify(self, max_age_days: int) -> list[str]:
        """Available backups never verified, or not in the last ``max_age_days`` days."""
        cutoff = utcnow() - timedelta(days=max_age_days)
        rows = self.catalog.list_backups(BackupFilter(status=BackupStatus.AVAILABLE.value))
        return [r.id for r in rows if r.verified_at is None or r.verified_at < cutoff]
