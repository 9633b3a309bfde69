"""Backups (B1-B15): validate and claim the server, group-snapshot, chunk and upload
each disk (resuming from its checkpoint), commit the descriptor; fail with a reason."""

from __future__ import annotations

import contextlib
import random
from datetime import datetime

from csbs import locks, quota
from csbs.catalog import (
    BackupRow,
    BackupView,
    DiskBackupRow,
    utcnow,
)
from csbs.catalog.policies import PolicyCatalog
from csbs.errors import (
    Conflict,
    CorruptData,
    CsbsError,
    GarbageCollectionRunning,
    InvalidInput,
    InvalidState,
    NotFound,
)
from csbs.format import BackupDescriptor, DescriptorDisk, DescriptorServer, Manifest
from csbs.locks import as_utc
from csbs.model import (
    BackupServerInput,
    BackupStatus,
    PreparedBackup,
    Server,
    TaskKind,
    TransferStats,
)
from csbs.naming import default_name
from csbs.policy import PolicySpec
from csbs.rules import (
    BACKUP_STATES,
    backup_warnings,
    full_read_note,
)

#: Called by long steps with resumable details; activities turn it into a heartbeat.
from csbs.services.base import Heartbeat, Service, _pct, _Throttle
from csbs.transfer import backup_disk


def _same_run(row: BackupRow, workflow_id: str, run_id: str) -> bool:
    """Whether a backup row was created by this run (by workflow id for rows, or callers,
    that carry no run id)."""
    if run_id and row.run_id:
        return row.run_id == run_id
    return row.workflow_id == workflow_id


class BackupService(Service):
    """Every step of a backup, each idempotent (a workflow retries it as a unit)."""

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
            self._check_quota(server)
            lock_days = self._lock_days(inp.policy_id)
            if lock_days:
                self.store.require_object_lock(lock_days)
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
                self._backup_row(
                    inp,
                    backup_id,
                    name,
                    server,
                    BackupStatus.CREATING,
                    workflow_id,
                    run_id,
                    parent_id=parent.id if parent else None,
                    size_bytes=server.size_bytes,
                    created_at=now,
                    locked_until=locks.lock_until(now, lock_days),
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
        server = self.driver.get_server(backup.server_id)
        return PreparedBackup(
            backup_id=backup.id,
            task_id=task_id,
            name=backup.name,
            server_id=backup.server_id,
            server_name=backup.server_name,
            disk_ids=[d.disk_id for d in self.catalog.disk_backups(backup_id)],
            parent_id=backup.parent_id,
            server_state=server.state.value,
            route=self.route(server),
        )

    def _backup_row(
        self,
        inp: BackupServerInput,
        backup_id: str,
        name: str,
        server: Server | None,
        status: BackupStatus,
        workflow_id: str,
        run_id: str,
        **fields: object,
    ) -> BackupRow:
        """The catalog row of a backup made (or refused) now for ``inp``."""
        return BackupRow.model_validate(
            {
                "id": backup_id,
                "project": self.settings.project,
                "name": name,
                "description": inp.description or "",
                "server_id": inp.server_id,
                "server_name": server.name if server else "",
                "server_type": server.type if server else "",
                "status": status.value,
                "kind": inp.kind.value,
                "policy_id": inp.policy_id,
                "created_at": fields.pop("created_at", None) or utcnow(),
                "workflow_id": workflow_id,
                "run_id": run_id or None,
                **fields,
            }
        )

    def _lock_days(self, policy_id: str | None) -> int:
        """How long a backup is locked (issue 17): ``CSBS_OBJECT_LOCK_DAYS``, or its
        policy's ``--lock-days`` when longer."""
        days = self.settings.object_lock_days
        if policy_id is not None:
            with contextlib.suppress(NotFound):
                row = PolicyCatalog(self.catalog).get(policy_id)
                days = max(days, PolicySpec.model_validate_json(row.spec).lock_days or 0)
        return days

    def _check_quota(self, server: Server) -> None:
        """B15: refuse before anything is written when the backup's disks would pass the
        tenant's disk-backup quota, or it already stores its byte quota."""
        limits = quota.quota_of(self.settings, self.catalog)
        if limits.disk_backups is None and limits.bytes is None:
            return
        used_bytes = (
            quota.stored_bytes(self.catalog, self.store) if limits.bytes is not None else None
        )
        quota.check_quota(
            self.settings.project,
            limits,
            len(server.disks),
            self.catalog.disk_backups_used(),
            used_bytes,
        )

    def check_request(self, inp: BackupServerInput) -> Server:
        """Everything ``prepare_backup`` refuses that can be known before a workflow
        starts (the server, its state and disks, its running backup, the quota): a
        command refused here starts nothing and records nothing."""
        server = self.driver.get_server(inp.server_id)
        self._check_backup_allowed(server)
        busy = self.catalog.server_busy(server.id)
        if busy is not None:
            raise Conflict(
                f"server {server.id} is {busy}; only one backup or restore of a server "
                f"can run at a time"
            )
        self._check_quota(server)
        return server

    def refuse_backup(
        self,
        inp: BackupServerInput,
        backup_id: str,
        task_id: str,
        reason: str,
        workflow_id: str,
        run_id: str = "",
    ) -> None:
        """A backup workflow refused at validation (B10, guide 3.3): leave what a failed
        backup leaves, a backup in ``error`` and a failed backup task, both with the
        reason, whoever started it. A backup id of another run is not touched: that
        refusal leaves only the task."""
        existing = self.catalog.find_backup(backup_id)
        if existing is not None and _same_run(existing, workflow_id, run_id):
            self.fail_backup(backup_id, task_id, reason, run_id)
            return
        if self._find_task(task_id) is not None:
            return  # recorded by an earlier attempt of this step
        try:
            server: Server | None = self.driver.get_server(inp.server_id)
        except CsbsError:
            server = None
        name = inp.name or default_name(inp.kind, random.Random(backup_id))
        now = utcnow()
        own = existing is None
        task = self._failed_task(
            task_id,
            TaskKind.BACKUP,
            workflow_id,
            backup_id if own else None,
            name,
            inp.server_id,
            server.name if server else "",
            reason,
            run_id,
        )
        with self.catalog.unit_of_work():
            if own:
                self.catalog.add_backup(
                    self._backup_row(
                        inp,
                        backup_id,
                        name,
                        server,
                        BackupStatus.ERROR,
                        workflow_id,
                        run_id,
                        created_at=now,
                        finished_at=now,
                        error=reason,
                    )
                )
            self.catalog.add_task(task)

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
        unsupported = [d.unsupported for d in server.disks if d.unsupported]
        if unsupported:
            raise InvalidInput(
                f"server {server.id} cannot be backed up: {'; '.join(map(str, unsupported))}"
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
            throttle, beat = _Throttle(1.0), _Throttle(1.0)
            suspect = self.catalog.suspect_chunks()
            repaired: set[bytes] = set()
            uploaded: set[bytes] = set()
            need = as_utc(backup.locked_until) if backup.locked_until else None
            generation = (
                locks.generation(need, self.settings.object_lock_slack_days) if need else None
            )

            last_staged = [staged]

            def on_progress(done: int, staged_now: int, stats: TransferStats) -> None:
                # A heartbeat is a round trip to the worker's event loop: once a second is
                # plenty, and always when the resume point moves (it is in the details).
                finished = done == stats.chunks_total
                if heartbeat is not None and (
                    beat.ready(force=finished or staged_now != last_staged[0])
                ):
                    last_staged[0] = staged_now
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
                lock_until=generation,
                uploaded=uploaded,
            )
        finally:
            reader.close()
        if self.catalog.get_backup(backup_id).status != BackupStatus.CREATING:
            # A stale attempt that outlived its workflow must not overwrite anything.
            raise InvalidState(f"backup {backup_id} is no longer being created")
        chunks_until = None
        if need is not None and generation is not None:
            chunks_until = self._lock_chunks(
                backup, disk_id, manifest, parent, uploaded, need, generation
            )
            stats.locks_extended = chunks_until[1]
        self.store.put_manifest(manifest, lock_until=need)
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
            chunks_locked_until=chunks_until[0] if chunks_until else None,
        )
        return stats

    def _lock_chunks(
        self,
        backup: BackupRow,
        disk_id: str,
        manifest: Manifest,
        parent: Manifest | None,
        uploaded: set[bytes],
        need: datetime,
        generation: datetime,
    ) -> tuple[datetime, int]:
        """Make every chunk of a disk backup locked at least until ``need`` (issue 17):
        the ones it uploaded are locked to ``generation`` already; the reused ones are
        extended to it in one parallel pass, unless the parent's generation still covers
        them. Returns the date every chunk of the disk is locked until, and how many
        locks were extended."""
        parent_until = None
        if parent is not None and backup.parent_id is not None:
            rows = {d.disk_id: d for d in self.catalog.disk_backups(backup.parent_id)}
            row = rows.get(disk_id)
            parent_until = row.chunks_locked_until if row is not None else None
        parent_ids = parent.chunk_ids() if parent is not None else None
        todo = locks.chunks_to_extend(
            manifest.chunk_ids(), uploaded, parent_ids, parent_until, need
        )
        extended, _longer = self.store.extend_chunk_locks(todo, generation)
        if parent_ids is not None and parent_until is not None and as_utc(parent_until) >= need:
            return min(as_utc(parent_until), generation), extended
        return generation, extended

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
            overall = min(99, int(sum(d.progress * d.size_bytes for d in disks) / total))
            self.catalog.update_backup(backup_id, progress=overall)
            self.catalog.set_task_progress(backup_id, TaskKind.BACKUP, overall)

    def commit_backup(self, backup_id: str, task_id: str) -> BackupView:
        """Write the backup's descriptor, mark it ``available`` and its task succeeded."""
        backup = self.catalog.get_backup(backup_id)
        disks = self.catalog.disk_backups(backup_id)
        missing = [d.disk_id for d in disks if not d.done]
        if missing:
            raise InvalidState(f"backup {backup_id}: disks {missing} were not backed up")
        finished = utcnow()
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
            finished_at=finished,
            server=DescriptorServer(
                id=backup.server_id, name=backup.server_name, type=backup.server_type
            ),
            chunk_size=self.settings.chunk_size,
            locked_until=as_utc(backup.locked_until) if backup.locked_until else None,
            disks=[
                DescriptorDisk(
                    disk_id=d.disk_id,
                    name=d.disk_name,
                    role=d.role,
                    size_bytes=d.size_bytes,
                    data_bytes=d.data_bytes,
                    stored_bytes=d.stored_bytes,
                    manifest=self.store.manifest_key(backup_id, d.disk_id),
                )
                for d in disks
            ],
        )
        self.store.put_descriptor(descriptor, lock_until=descriptor.locked_until)
        self.store.delete_staging(backup_id)
        with self.catalog.unit_of_work():
            row = self._commit_rows(backup_id, task_id, disks, finished)
        return BackupView.of(row, disks)

    def _commit_rows(
        self, backup_id: str, task_id: str, disks: list[DiskBackupRow], finished: datetime
    ) -> BackupRow:
        row = self.catalog.update_backup(
            backup_id,
            status=BackupStatus.AVAILABLE.value,
            progress=100,
            finished_at=finished,
            data_bytes=sum(d.data_bytes for d in disks),
            stored_bytes=sum(d.stored_bytes for d in disks),
            size_bytes=sum(d.size_bytes for d in disks),
            error=None,
            chunks_locked_until=min(
                (as_utc(d.chunks_locked_until) for d in disks if d.chunks_locked_until),
                default=None,
            ),
        )
        self.catalog.finish_task(task_id, ok=True)
        self.catalog.release_server(row.server_id, backup_id)
        # Chunks it uploaded anew are stored now; those it shares were counted already.
        self.catalog.add_usage(row.stored_bytes)
        return row

    def fail_backup(self, backup_id: str, task_id: str, reason: str, run_id: str = "") -> None:
        """Leave the backup in ``error`` and its task failed with ``reason``; a backup of
        another run (an id it was refused) is not touched."""
        with self.catalog.unit_of_work():
            self._fail_rows(backup_id, task_id, reason, run_id)

    def _fail_rows(self, backup_id: str, task_id: str, reason: str, run_id: str) -> None:
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
