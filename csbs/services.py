"""The service layer: every step of backup, restore and delete, for activities and the CLI.

Each method is one step a workflow retries as a unit, so each is idempotent: calling it
again after a crash either finds its work done or finishes it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from csbs import gc, verify
from csbs.catalog import (
    BackupFilter,
    BackupRow,
    Catalog,
    DiskBackupRow,
    TaskRow,
    backup_json,
    utcnow,
)
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.drivers import ComputeDriver, make_driver
from csbs.errors import (
    Conflict,
    CorruptData,
    GarbageCollectionRunning,
    InvalidInput,
    InvalidState,
    NotFound,
    QuotaExceeded,
)
from csbs.format import BackupDescriptor, DescriptorDisk, DescriptorServer, Manifest
from csbs.model import (
    BackupServerInput,
    BackupStatus,
    ChunkProblem,
    DeleteBackupsInput,
    Disk,
    PreparedBackup,
    RestoreItem,
    RestorePlan,
    RestoreServerInput,
    Server,
    TaskKind,
    TaskStatus,
    TransferStats,
    VerifyDiskResult,
    VerifyPlan,
)
from csbs.naming import default_name
from csbs.rules import (
    BACKUP_STATES,
    DELETABLE,
    RESTORE_REFUSED_STATES,
    backup_warnings,
    full_read_note,
    plan_disk_mapping,
)
from csbs.transfer import backup_disk, restore_disk

#: Called by long steps with resumable details; activities turn it into a heartbeat.
Heartbeat = Callable[[dict[str, Any]], None]


class _Throttle:
    """Lets an action through at most once per ``interval`` seconds (thread-safe)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = 0.0
        self.lock = threading.Lock()

    def ready(self, force: bool = False) -> bool:
        with self.lock:
            now = time.monotonic()
            if force or now - self.last >= self.interval:
                self.last = now
                return True
            return False


def _pct(done: int, total: int) -> int:
    return 100 if total == 0 else min(100, int(done * 100 / total))


class CsbsService:
    """Backup, restore and delete over one catalog, one object store and one driver."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        store: ChunkStore | None = None,
        driver: ComputeDriver | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog or Catalog(settings.effective_database_url, settings.project)
        self.store = store or ChunkStore(settings)
        self.driver = driver or make_driver(settings)
        self._progress_lock = threading.Lock()
        #: Given a task's workflow id and run id, why its run is closed ("its workflow was
        #: terminated"), or None while it runs or cannot be told. The worker sets it (it
        #: asks Temporal); without it nothing is reconciled.
        self.closed_run: Callable[[str, str | None], str | None] | None = None

    # -- backup ----------------------------------------------------------------------------
    def prepare_backup(
        self,
        inp: BackupServerInput,
        backup_id: str,
        task_id: str,
        workflow_id: str,
        run_id: str = "",
    ) -> PreparedBackup:
        """Validate the server and create the backup (``creating``) and its task.

        A backup id that another run created is refused and left as it is (a reset or a
        reused id must never adopt, or fail, someone else's backup); the creating run's own
        retry finds its backup and goes on.
        """
        existing = self.catalog.find_backup(backup_id)
        if existing is not None and not _same_run(existing, workflow_id, run_id):
            raise Conflict(
                f"backup id {backup_id} belongs to another run (workflow "
                f"{existing.workflow_id}, {existing.status}); start the backup with a new id"
            )
        if existing is not None and existing.status != BackupStatus.CREATING:
            raise InvalidState(f"backup {backup_id} is {existing.status}; it cannot be made again")
        if existing is None:
            server = self.driver.get_server(inp.server_id)
            self._check_backup_allowed(server)
            self._check_quota()
            self._claim_server(server.id, backup_id, "backup")
            if self.catalog.gc_running(self.settings.gc_lease_seconds):
                self.catalog.release_server(server.id, backup_id)
                raise GarbageCollectionRunning(
                    "garbage collection is sweeping this project's chunks; the backup "
                    "starts when it is done"
                )
            parent = self.catalog.last_available_backup(server.id)
            name = inp.name or default_name(inp.kind, random.Random(backup_id))
            now = utcnow()
            self.catalog.add_task(
                self._running_task(
                    task_id,
                    TaskKind.BACKUP,
                    workflow_id,
                    backup_id,
                    name,
                    server.id,
                    server.name,
                    "; ".join(backup_warnings(server)) or None,
                    started_at=now,
                    run_id=run_id,
                )
            )
            self.catalog.add_backup(
                BackupRow(
                    id=backup_id,
                    project=self.settings.project,
                    name=name,
                    description=inp.description or "",
                    server_id=server.id,
                    server_name=server.name,
                    server_type=server.type,
                    status=BackupStatus.CREATING.value,
                    kind=inp.kind.value,
                    policy_id=inp.policy_id,
                    parent_id=parent.id if parent else None,
                    created_at=now,
                    size_bytes=server.size_bytes,
                    workflow_id=workflow_id,
                    run_id=run_id or None,
                )
            )
            for disk in server.disks:
                self.catalog.upsert_disk_backup(
                    DiskBackupRow(
                        backup_id=backup_id,
                        disk_id=disk.id,
                        disk_name=disk.name,
                        role=disk.role.value,
                        size_bytes=disk.size_bytes,
                    )
                )
        backup = self.catalog.get_backup(backup_id)
        return PreparedBackup(
            backup_id=backup.id,
            task_id=task_id,
            name=backup.name,
            server_id=backup.server_id,
            server_name=backup.server_name,
            disk_ids=[d.disk_id for d in self.catalog.disk_backups(backup_id)],
            parent_id=backup.parent_id,
            server_state=self.driver.get_server(backup.server_id).state.value,
        )

    def _claim_server(self, server_id: str, holder: str, operation: str) -> None:
        """Take the server's lock; when a holder's run has closed without finishing
        (terminated, timed out), reconcile it first and take the lock."""
        try:
            self.catalog.claim_server(server_id, holder, operation)
        except Conflict:
            if not self.reconcile(server_id=server_id):
                raise
            self.catalog.claim_server(server_id, holder, operation)

    def _check_quota(self) -> None:
        """B15: refuse before anything is written when the tenant is at its quota."""
        s = self.settings
        if s.quota_backups is None and s.quota_bytes is None:
            return
        backups = self.catalog.list_backups()
        if s.quota_backups is not None and len(backups) >= s.quota_backups:
            raise QuotaExceeded(
                f"project {s.project} has {len(backups)} backups and its quota is "
                f"{s.quota_backups}; delete backups or raise CSBS_QUOTA_BACKUPS"
            )
        stored = sum(b.stored_bytes for b in backups)
        if s.quota_bytes is not None and stored >= s.quota_bytes:
            raise QuotaExceeded(
                f"project {s.project} stores {stored} bytes and its quota is {s.quota_bytes} "
                f"bytes; delete backups or raise CSBS_QUOTA_BYTES"
            )

    @staticmethod
    def _check_backup_allowed(server: Server) -> None:
        if server.state not in BACKUP_STATES:
            raise InvalidState(
                f"server {server.id} is {server.state.value}; only running or stopped "
                f"servers can be backed up"
            )
        shared = [d.id for d in server.disks if d.shared]
        if shared:
            raise InvalidInput(
                f"server {server.id} has shared disk(s) {', '.join(shared)}; servers with "
                f"shared disks cannot be backed up"
            )

    def take_snapshot(self, backup_id: str) -> list[str]:
        """Group-snapshot all disks of the backup's server; return the disk ids."""
        backup = self.catalog.get_backup(backup_id)
        self.store.ensure_config()  # fail before the snapshot when the store is unusable
        self.release_stale_snapshots(backup.server_id, keep=backup_id)
        snapshot = self.driver.group_snapshot(backup.server_id, backup_id)
        if self.catalog.get_backup(backup_id).status != BackupStatus.CREATING:
            # A stale attempt that outlived its workflow (cancelled, timed out) must not
            # leave a snapshot behind that nothing would release.
            self.driver.release_snapshot(backup.server_id, backup_id, committed=False)
            raise InvalidState(f"backup {backup_id} is no longer being created")
        if backup.snapshot_at is None:
            self.catalog.update_backup(backup_id, snapshot_at=utcnow())
        return [d.disk_id for d in snapshot.disks]

    def backup_disk(
        self, backup_id: str, disk_id: str, resume: bool = False, heartbeat: Heartbeat | None = None
    ) -> TransferStats:
        """Chunk, diff and upload one disk of the snapshot; write its manifest.

        With ``resume`` (a retried attempt), continue after the positions that the last
        staging checkpoint in S3 records as final, instead of starting over.
        """
        backup = self.catalog.get_backup(backup_id)
        reader = self.driver.open_snapshot(backup.server_id, backup_id, disk_id)
        try:
            parent = self._parent_manifest(backup.parent_id, disk_id)
            changed, note = None, full_read_note(reader, parent, backup.parent_id)
            if note is None:
                changed = reader.changed_ranges()
                if changed is None:
                    note = "the driver reported no changed-block map for this disk"
            manifest, staged = None, 0
            if resume:
                # A checkpoint is only a shortcut: one that cannot be read (an upload cut
                # off by a crash can leave a stub) means starting the disk over.
                with contextlib.suppress(NotFound, CorruptData):
                    manifest = self.store.get_manifest(backup_id, disk_id, staging=True)
                    staged, manifest.complete = manifest.complete or 0, None
            if manifest is None:
                manifest = Manifest(backup_id, disk_id, reader.size_bytes, self.settings.chunk_size)
            throttle = _Throttle(1.0)
            suspect = self.catalog.suspect_chunks()
            repaired: set[bytes] = set()

            def on_progress(done: int, staged_now: int, stats: TransferStats) -> None:
                if heartbeat is not None:
                    heartbeat({"staged": staged_now, "done": done})
                if throttle.ready(force=done == stats.chunks_total):
                    self._disk_progress(backup_id, disk_id, _pct(done, stats.chunks_total))

            stats = backup_disk(
                self.store,
                reader,
                manifest,
                parent,
                changed,
                start=staged,
                concurrency=self.settings.transfer_concurrency,
                checkpoint_seconds=self.settings.checkpoint_seconds,
                progress=on_progress,
                chunk_index=self._chunk_index,
                suspect=suspect,
                repaired=repaired,
            )
        finally:
            reader.close()
        if self.catalog.get_backup(backup_id).status != BackupStatus.CREATING:
            # A stale attempt that outlived its workflow must not overwrite anything.
            raise InvalidState(f"backup {backup_id} is no longer being created")
        self.store.put_manifest(manifest)
        # Uploaded anew from data whose digest is their id: whole again in the store.
        self.catalog.clear_suspect_chunks(sorted(repaired))
        stats.data_bytes = manifest.data_bytes()
        self.catalog.update_disk_backup(
            backup_id,
            disk_id,
            size_bytes=manifest.size_bytes,
            data_bytes=stats.data_bytes,
            stored_bytes=stats.bytes_uploaded,
            bytes_read=stats.bytes_read,
            chunks_total=stats.chunks_total,
            chunks_uploaded=stats.chunks_uploaded,
            chunks_reused=stats.chunks_reused,
            chunks_zero=stats.chunks_zero,
            read_mode=stats.read_mode,
            read_note=note or "",
            progress=100,
            done=True,
        )
        return stats

    def _chunk_index(self, to_read: int) -> set[bytes] | None:
        """Every chunk id of the store when listing them is cheaper than a HEAD for each
        chunk to read: with at least a LIST page's worth of chunks to read, and at most
        4 ids listed per chunk to read. Otherwise None (HEAD each new chunk)."""
        if to_read < 100:
            return None
        return self.store.chunk_index(4 * to_read)

    def _parent_manifest(self, parent_id: str | None, disk_id: str) -> Manifest | None:
        if parent_id is None:
            return None
        try:
            return self.store.get_manifest(parent_id, disk_id)
        except NotFound:
            return None  # the disk is new since the parent: read it whole

    def _disk_progress(self, backup_id: str, disk_id: str, pct: int) -> None:
        with self._progress_lock:
            self.catalog.update_disk_backup(backup_id, disk_id, progress=pct)
            disks = self.catalog.disk_backups(backup_id)
            total = sum(d.size_bytes for d in disks) or 1
            overall = int(sum(d.progress * d.size_bytes for d in disks) / total)
            self.catalog.update_backup(backup_id, progress=min(overall, 99))

    def commit_backup(self, backup_id: str, task_id: str) -> dict[str, Any]:
        """Write the backup's descriptor, mark it ``available`` and its task succeeded."""
        backup = self.catalog.get_backup(backup_id)
        disks = self.catalog.disk_backups(backup_id)
        missing = [d.disk_id for d in disks if not d.done]
        if missing:
            raise InvalidState(f"backup {backup_id}: disks {missing} were not backed up")
        descriptor = BackupDescriptor(
            backup_id=backup.id,
            project=backup.project,
            name=backup.name,
            description=backup.description,
            kind=backup.kind,
            policy_id=backup.policy_id,
            parent_id=backup.parent_id,
            created_at=backup.created_at,
            snapshot_at=backup.snapshot_at,
            server=DescriptorServer(
                id=backup.server_id, name=backup.server_name, type=backup.server_type
            ),
            chunk_size=self.settings.chunk_size,
            disks=[
                DescriptorDisk(
                    disk_id=d.disk_id,
                    name=d.disk_name,
                    role=d.role,
                    size_bytes=d.size_bytes,
                    data_bytes=d.data_bytes,
                    manifest=self.store.manifest_key(backup_id, d.disk_id),
                )
                for d in disks
            ],
        )
        self.store.put_descriptor(descriptor)
        self.store.delete_staging(backup_id)
        row = self.catalog.update_backup(
            backup_id,
            status=BackupStatus.AVAILABLE.value,
            progress=100,
            finished_at=utcnow(),
            data_bytes=sum(d.data_bytes for d in disks),
            stored_bytes=sum(d.stored_bytes for d in disks),
            size_bytes=sum(d.size_bytes for d in disks),
            error=None,
        )
        self.catalog.finish_task(task_id, ok=True)
        self.catalog.release_server(row.server_id, backup_id)
        return backup_json(row, disks)

    def fail_backup(self, backup_id: str, task_id: str, reason: str, run_id: str = "") -> None:
        """Leave the backup in ``error`` and its task failed with ``reason``; a backup of
        another run (an id it was refused) is not touched."""
        backup = self.catalog.find_backup(backup_id)
        if backup is not None and run_id and backup.run_id and backup.run_id != run_id:
            backup = None
        if backup is not None:
            with contextlib.suppress(InvalidState, NotFound):
                self.catalog.transition_backup(
                    backup_id,
                    {BackupStatus.CREATING},
                    BackupStatus.ERROR,
                    error=reason,
                    finished_at=utcnow(),
                )
            self.catalog.release_server(backup.server_id, backup_id)
        with contextlib.suppress(NotFound):
            self.catalog.finish_task(task_id, ok=False, reason=reason)

    def release_stale_snapshots(self, server_id: str, keep: str | None = None) -> list[str]:
        """Release the snapshots of a server that no running backup owns (a crash or a
        failed clean-up left them), so they never block later backups or restores. A
        snapshot whose backup was committed keeps its changed-block chain."""
        released = []
        for snapshot_id in self.driver.snapshots(server_id):
            if snapshot_id == keep:
                continue
            try:
                status = self.catalog.get_backup(snapshot_id).status
            except NotFound:
                status = None
            if status == BackupStatus.CREATING:
                continue
            committed = status not in (None, BackupStatus.ERROR)
            self.driver.release_snapshot(server_id, snapshot_id, committed)
            released.append(snapshot_id)
        return released

    def release_snapshot(self, server_id: str, backup_id: str, committed: bool) -> None:
        # A server that is gone took its snapshot with it.
        with contextlib.suppress(NotFound):
            self.driver.release_snapshot(server_id, backup_id, committed)

    # -- restore ---------------------------------------------------------------------------
    def prepare_restore(
        self, inp: RestoreServerInput, task_id: str, workflow_id: str, run_id: str = ""
    ) -> RestorePlan:
        """Check backup, server and disk mapping; then, in one transaction, take the
        server's lock, mark the backup ``restoring`` and record the task (a backup or
        another restore of the server, or a delete of the backup, that got there first
        makes it refuse, and nothing changes)."""
        backup = self.catalog.get_backup(inp.backup_id)
        existing = self._find_task(task_id)
        if existing is None and backup.status != BackupStatus.AVAILABLE:
            raise InvalidState(
                f"backup {backup.id} is {backup.status}; only available backups can be restored"
            )
        server = self.driver.get_server(backup.server_id)
        if server.state in RESTORE_REFUSED_STATES:
            raise InvalidState(
                f"server {server.id} is {server.state.value}; servers in fault, resizing or "
                f"resize_verifying cannot be restored"
            )
        items, warnings = plan_disk_mapping(
            server,
            [d.view() for d in self.catalog.disk_backups(backup.id)],
            inp.disk_mapping,
            inp.disk_ids,
        )
        if existing is None:
            task = self._running_task(
                task_id,
                TaskKind.RESTORE,
                workflow_id,
                backup.id,
                backup.name,
                server.id,
                server.name,
                "; ".join(warnings) or None,
                run_id=run_id,
            )
            try:
                self.catalog.begin_restore(server.id, backup.id, task)
            except Conflict:
                if not self.reconcile(server_id=server.id):
                    raise
                self.catalog.begin_restore(server.id, backup.id, task)
        return RestorePlan(
            backup_id=backup.id,
            backup_name=backup.name,
            task_id=task_id,
            server_id=server.id,
            items=items,
            warnings=warnings,
        )

    def _running_task(
        self,
        task_id: str,
        kind: TaskKind,
        workflow_id: str,
        backup_id: str,
        backup_name: str,
        server_id: str,
        server_name: str,
        detail: str | None = None,
        started_at: datetime | None = None,
        run_id: str = "",
    ) -> TaskRow:
        """The record of a task that starts now (backup, restore, verify or delete)."""
        return TaskRow(
            id=task_id,
            project=self.settings.project,
            kind=kind.value,
            status=TaskStatus.RUNNING.value,
            backup_id=backup_id,
            backup_name=backup_name,
            server_id=server_id,
            server_name=server_name,
            workflow_id=workflow_id,
            started_at=started_at or utcnow(),
            detail=detail,
            run_id=run_id or None,
        )

    def _find_task(self, task_id: str) -> TaskRow | None:
        try:
            return self.catalog.get_task(task_id)
        except NotFound:
            return None

    def stop_server(self, server_id: str) -> None:
        self.driver.stop(server_id)

    def start_server(self, server_id: str) -> None:
        self.driver.start(server_id)

    def restore_disk(
        self,
        backup_id: str,
        item: RestoreItem,
        done: int = 0,
        heartbeat: Heartbeat | None = None,
    ) -> TransferStats:
        """Write one backed-up disk onto its target disk (the server is stopped)."""
        backup = self.catalog.get_backup(backup_id)
        manifest = self.store.get_manifest(backup_id, item.source_disk_id)
        recorded = {d.disk_id: d.size_bytes for d in self.catalog.disk_backups(backup_id)}
        if manifest.size_bytes != recorded.get(item.source_disk_id):
            # The manifest decides how far the target disk is cut or grown: never on the
            # word of an object the catalog does not vouch for.
            raise CorruptData(
                f"manifest of disk {item.source_disk_id} of backup {backup_id} says its size "
                f"is {manifest.size_bytes} bytes, the catalog "
                f"{recorded.get(item.source_disk_id)}; restore refused, the disk is untouched"
            )
        server = self.driver.get_server(backup.server_id)
        if item.create and not any(d.id == item.target_disk_id for d in server.disks):
            like = Disk(
                id=item.target_disk_id, name=item.name, size_bytes=item.size_bytes, role=item.role
            )
            self.driver.add_disk(server.id, item.size_bytes, like)
            server = self.driver.get_server(backup.server_id)
        target = server.disk(item.target_disk_id)
        # Restoring onto the original disk returns it to its size at backup time (R5);
        # onto another (larger) disk, the data goes to its start and the size stays.
        size = (
            manifest.size_bytes if item.target_disk_id == item.source_disk_id else target.size_bytes
        )
        self.release_stale_snapshots(backup.server_id)
        writer = self.driver.open_disk_writer(backup.server_id, item.target_disk_id, size)
        throttle = _Throttle(1.0)

        def on_progress(done_now: int, _staged: int, stats: TransferStats) -> None:
            if heartbeat is not None:
                heartbeat({"done": done_now})
            if throttle.ready(force=done_now == stats.chunks_total):
                self.catalog.update_backup(
                    backup_id, progress=min(99, _pct(done_now, stats.chunks_total))
                )

        try:
            if size > manifest.size_bytes and done == 0:
                writer.zero(manifest.size_bytes, size - manifest.size_bytes)
            return restore_disk(
                self.store,
                manifest,
                writer,
                start=done,
                concurrency=self.settings.transfer_concurrency,
                progress=on_progress,
            )
        finally:
            writer.close()

    def finish_restore(self, backup_id: str, task_id: str, ok: bool, reason: str | None) -> None:
        """The backup is ``available`` again, the server's lock free; the task records the
        outcome."""
        task = self.catalog.get_task(task_id)
        self.catalog.end_restore(task.server_id or "", backup_id, task_id)
        self.catalog.finish_task(task_id, ok=ok, reason=reason)

    # -- verify ----------------------------------------------------------------------------
    def prepare_verify(self, backup_id: str, task_id: str, workflow_id: str) -> VerifyPlan:
        """Open a verify task for an available (or restoring) backup."""
        self.store.ensure_config()
        backup = self.catalog.get_backup(backup_id)
        if self._find_task(task_id) is None:
            if backup.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
                raise InvalidState(
                    f"backup {backup.id} is {backup.status}; only available backups are verified"
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
        self, backup_id: str, disk_id: str, heartbeat: Heartbeat | None = None
    ) -> VerifyDiskResult:
        """Read every chunk of one disk of a backup and check its digest."""
        return verify.verify_disk(
            self.store, backup_id, disk_id, self.settings.transfer_concurrency, heartbeat
        )

    def finish_verify(
        self, backup_id: str, task_id: str, results: list[VerifyDiskResult], error: str | None
    ) -> dict[str, Any]:
        """Record the outcome on the backup and its task; a backup whose descriptor is gone
        fails too (restore needs it)."""
        problems = [p for r in results for p in r.problems]
        if error is None:
            try:
                self.store.get_descriptor(backup_id)
            except (NotFound, CorruptData, ValueError) as exc:
                problems.insert(
                    0,
                    ChunkProblem(
                        disk_id="-", index=None, chunk_id=None, problem="manifest", message=str(exc)
                    ),
                )
        ok = error is None and not problems
        reason = None if ok else (error or f"verify found {verify.describe(problems)}")
        self._suspect(backup_id, problems)
        if error is None:
            self.catalog.update_backup(
                backup_id,
                verified_at=utcnow(),
                verify_status="ok" if ok else "failed",
                verify_error=reason,
            )
        self.catalog.finish_task(task_id, ok=ok, reason=reason)
        return {
            "backup_id": backup_id,
            "ok": ok,
            "chunks_checked": sum(r.chunks_checked for r in results),
            "bytes_checked": sum(r.bytes_checked for r in results),
            "problems": [p.model_dump() for p in problems],
            "reason": reason,
        }

    def _suspect(self, backup_id: str, problems: list[ChunkProblem]) -> None:
        """Chunks found missing or corrupt are never reused by a backup again: the next
        one that reads their data uploads them anew (and the old backups heal)."""
        self.catalog.add_suspect_chunks(
            [(p.chunk_id, p.problem, backup_id) for p in problems if p.chunk_id is not None]
        )

    def backups_to_verify(self, max_age_days: int) -> list[str]:
        """Available backups never verified, or not in the last ``max_age_days`` days."""
        cutoff = utcnow() - timedelta(days=max_age_days)
        rows = self.catalog.list_backups(BackupFilter(status=BackupStatus.AVAILABLE.value))
        return [r.id for r in rows if r.verified_at is None or r.verified_at < cutoff]

    def check_restore(
        self, backup_id: str, disk_ids: list[str], heartbeat: Heartbeat | None = None
    ) -> None:
        """Refuse, before any disk is touched, a backup that failed its last verification
        or whose chunks are not all in the object store (and a wrong or missing key)."""
        self.store.ensure_config()
        backup = self.catalog.get_backup(backup_id)
        if backup.verify_status == "failed":
            raise CorruptData(
                f"backup {backup.id} failed verification at {backup.verified_at:%Y-%m-%d %H:%M} "
                f"({backup.verify_error}); restore refused before any disk was touched"
            )
        beat = heartbeat or (lambda _details: None)
        manifests = [self.store.get_manifest(backup.id, d) for d in disk_ids]
        distinct = len(set().union(*(m.chunk_ids() for m in manifests))) if manifests else 0
        beat({"step": "listing"})
        index = self._chunk_index(distinct)
        beat({"step": "checking", "chunks": distinct})
        missing = verify.missing_chunks(self.store, backup.id, disk_ids, index, beat)
        self._suspect(backup.id, missing)
        if missing:
            raise CorruptData(
                f"backup {backup.id} cannot be restored: {verify.describe(missing)}; restore "
                f"refused before any disk was touched"
            )

    # -- delete ----------------------------------------------------------------------------
    def prepare_delete(
        self, inp: DeleteBackupsInput, task_id: str, workflow_id: str, run_id: str = ""
    ) -> list[tuple[str, str]]:
        """Mark every backup ``deleting`` with one task each, in one transaction: each must
        be available, error or delete_failed at that moment (a restore that got there
        first keeps it). Returns (backup_id, task_id) pairs. Nothing changes if any
        backup is refused."""
        rows = [self.catalog.get_backup(b) for b in inp.backup_ids]
        pairs = [(row.id, f"{task_id}-{i}") for i, row in enumerate(rows)]
        if self._find_task(pairs[0][1]) is None:
            refused = [r for r in rows if r.status not in {s.value for s in DELETABLE}]
            if refused:
                listing = ", ".join(f"{r.id} ({r.status})" for r in refused)
                raise InvalidState(
                    f"only available, error or delete_failed backups can be deleted: {listing}"
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
        """Remove a backup's manifests, descriptor and catalog rows (chunks are left to GC)."""
        self.store.delete_backup_objects(backup_id)
        self.catalog.delete_backup(backup_id)
        self.catalog.finish_task(task_id, ok=True)

    def collect_garbage(
        self, heartbeat: Heartbeat | None = None, owner: str | None = None
    ) -> dict[str, int]:
        """Delete chunks that no manifest references (D1): one sweep per tenant at a time
        under a lease, never beside a backup (csbs.gc)."""
        return gc.collect_garbage(
            self.catalog, self.store, self.settings.gc_lease_seconds, owner, heartbeat
        )

    # -- reconciliation --------------------------------------------------------------------
    def reconcile(self, server_id: str | None = None) -> int:
        """Finish the records of operations whose Temporal run closed without finishing
        them (terminated, timed out, reset): a backup becomes ``error`` with the reason and
        its lock and snapshot go; a restore's backup is ``available`` again and the
        server's lock goes; a delete's backup becomes ``delete_failed``; the task fails
        with the reason. Needs ``closed_run`` (the worker sets it); returns how many."""
        if self.closed_run is None:
            return 0
        count = 0
        for task in self.catalog.list_tasks(status=TaskStatus.RUNNING, server_id=server_id):
            if not task.workflow_id:
                continue
            why = self.closed_run(task.workflow_id, task.run_id)
            if why is None:
                continue
            reason = f"{why}; the operation did not finish"
            self._reconcile_task(task, reason)
            count += 1
        return count

    def _reconcile_task(self, task: TaskRow, reason: str) -> None:
        backup = self.catalog.find_backup(task.backup_id) if task.backup_id else None
        if task.kind == TaskKind.BACKUP and backup is not None:
            with contextlib.suppress(InvalidState):
                self.catalog.transition_backup(
                    backup.id,
                    {BackupStatus.CREATING},
                    BackupStatus.ERROR,
                    error=reason,
                    finished_at=utcnow(),
                )
            self.release_snapshot(backup.server_id, backup.id, committed=False)
            self.catalog.release_server(backup.server_id, backup.id)
        elif task.kind == TaskKind.RESTORE:
            reason += "; the server may be stopped with disks partly restored: restore again"
            self.catalog.end_restore(task.server_id or "", task.backup_id or "", task.id)
        elif task.kind == TaskKind.DELETE and backup is not None:
            with contextlib.suppress(InvalidState):
                self.catalog.transition_backup(
                    backup.id, {BackupStatus.DELETING}, BackupStatus.DELETE_FAILED, error=reason
                )
        self.catalog.finish_task(task.id, ok=False, reason=reason)

    def fail_delete(self, backup_id: str, task_id: str, reason: str) -> None:
        if self.catalog.find_backup(backup_id) is not None:
            self.catalog.update_backup(
                backup_id, status=BackupStatus.DELETE_FAILED.value, error=reason
            )
        self.catalog.finish_task(task_id, ok=False, reason=reason)


def _same_run(row: BackupRow, workflow_id: str, run_id: str) -> bool:
    """Whether a backup row was created by this run (by workflow id for rows, or callers,
    that carry no run id)."""
    if run_id and row.run_id:
        return row.run_id == run_id
    return row.workflow_id == workflow_id
