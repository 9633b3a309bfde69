"""Restores (R1-R5): check the backup, take the server's lock, write each disk from its
manifest, give the lock back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from csbs import verify
from csbs.catalog import BackupRow
from csbs.chunkstore import ChunkStore
from csbs.delta import DeltaPlan, plan_delta
from csbs.drivers.base import InstantSource
from csbs.errors import (
    Conflict,
    CorruptData,
    InvalidInput,
    InvalidState,
    NotFound,
)
from csbs.format import Manifest
from csbs.model import (
    BackupStatus,
    Disk,
    InstantResult,
    RestoreItem,
    RestorePlan,
    RestoreServerInput,
    Server,
    TaskKind,
    TaskStatus,
    TransferStats,
)
from csbs.nbd_server import BackupDiskReader, NbdServer
from csbs.rules import (
    RESTORE_REFUSED_STATES,
    plan_disk_mapping,
)

#: Called by long steps with resumable details; activities turn it into a heartbeat.
from csbs.services.base import Heartbeat, Service, _Throttle
from csbs.transfer import restore_disk


class RestoreService(Service):
    """Every step of a restore, each idempotent."""

    def prepare_restore(
        self, inp: RestoreServerInput, task_id: str, workflow_id: str, run_id: str = ""
    ) -> RestorePlan:
        """Check backup, server and disk mapping; then, in one transaction, take the
        server's lock, mark the backup ``restoring`` and record the task (a backup or
        another restore of the server, or a delete of the backup, that got there first
        makes it refuse, and nothing changes)."""
        existing = self._find_task(task_id)
        backup, server, items, warnings = self._plan(inp, check_status=existing is None)
        for item in items:
            if inp.full:
                item.why_full = "full restore asked (--full)"
            elif item.create:
                item.why_full = "full restore: the disk is re-created"
            elif item.source_disk_id != item.target_disk_id:
                item.why_full = "full restore: onto another disk"
            else:
                item.delta = True
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
            chunk = self.settings.chunk_size
            task.disks_progress = json.dumps(
                {i.source_disk_id: [0, -(-i.size_bytes // chunk)] for i in items}, sort_keys=True
            )
            self._with_server_lock(
                server.id, lambda: self.catalog.begin_restore(server.id, backup.id, task)
            )
        return RestorePlan(
            backup_id=backup.id,
            backup_name=backup.name,
            task_id=task_id,
            server_id=server.id,
            items=items,
            warnings=warnings,
            route=self.route(server),
            from_replica=inp.from_replica,
        )

    def _plan(
        self, inp: RestoreServerInput, check_status: bool = True
    ) -> tuple[BackupRow, Server, list[RestoreItem], list[str]]:
        """The backup, the server and the disk mapping of a restore, or its refusal."""
        backup = self.catalog.get_backup(inp.backup_id)
        if check_status and backup.status != BackupStatus.AVAILABLE:
            raise InvalidState(
                f"backup {backup.id} is {backup.status}; only available backups can be restored"
            )
        if inp.from_replica:
            self.settings.replica()  # refuses when no replica is configured
            if check_status and backup.replica_status != "replicated":
                raise InvalidState(
                    f"backup {backup.id} is not on the replica (replication: "
                    f"{backup.replica_status or 'never'}); restore it from the primary, or "
                    f"run csbs backup replicate {backup.id} first"
                )
        server = self.driver.get_server(backup.server_id)
        unsupported = self.driver.instant_support() if inp.instant else None
        if unsupported is not None:
            raise InvalidInput(f"instant: {unsupported}")
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
        return backup, server, items, warnings

    def check_request(self, inp: RestoreServerInput) -> None:
        """Everything ``prepare_restore`` refuses that can be known before a workflow
        starts: a command refused here starts nothing and records nothing."""
        _, server, _, _ = self._plan(inp)
        busy = self.catalog.server_busy(server.id)
        if busy is not None:
            raise Conflict(f"server {server.id} is {busy}; restore it when that has finished")

    def refuse_restore(
        self,
        inp: RestoreServerInput,
        task_id: str,
        reason: str,
        workflow_id: str,
        run_id: str = "",
    ) -> None:
        """A restore workflow refused at validation (R6, guide 3.3): a failed restore task
        with the reason, whoever started it. The backup is left as it is."""
        existing = self._find_task(task_id)
        if existing is not None:
            if existing.status == TaskStatus.RUNNING.value:
                self.finish_restore(inp.backup_id, task_id, ok=False, reason=reason)
            return
        backup = self.catalog.find_backup(inp.backup_id)
        self.catalog.add_task(
            self._failed_task(
                task_id,
                TaskKind.RESTORE,
                workflow_id,
                backup.id if backup else None,
                backup.name if backup else "",
                backup.server_id if backup else None,
                backup.server_name if backup else "",
                reason,
                run_id,
            )
        )

    def check_restore(
        self,
        backup_id: str,
        disk_ids: list[str],
        heartbeat: Heartbeat | None = None,
        from_replica: bool = False,
    ) -> None:
        """Refuse, before any disk is touched, a backup that failed its last verification
        or whose chunks are not all in the object store (and a wrong or missing key)."""
        store = self.source(from_replica)
        store.ensure_config()
        backup = self.catalog.get_backup(backup_id)
        if backup.verify_status == "failed":
            raise CorruptData(
                f"backup {backup.id} failed verification at {backup.verified_at:%Y-%m-%d %H:%M} "
                f"({backup.verify_error}); restore refused before any disk was touched"
            )
        beat = heartbeat or (lambda _details: None)
        manifests = [store.get_manifest(backup.id, d) for d in disk_ids]
        distinct = len(set().union(*(m.chunk_ids() for m in manifests))) if manifests else 0
        beat({"step": "listing"})
        index = self._chunk_index(distinct, store)
        beat({"step": "checking", "chunks": distinct})
        missing = verify.missing_chunks(store, backup.id, disk_ids, index, beat)
        if not from_replica:  # the replica's damage says nothing of the primary's chunks
            self._suspect(backup.id, missing)
        if missing:
            raise CorruptData(
                f"backup {backup.id} cannot be restored: {verify.describe(missing)}; restore "
                f"refused before any disk was touched"
            )

    def restore_disk(
        self,
        backup_id: str,
        item: RestoreItem,
        done: int = 0,
        heartbeat: Heartbeat | None = None,
        from_replica: bool = False,
    ) -> TransferStats:
        """Write one backed-up disk onto its target disk (the server is stopped)."""
        store = self.source(from_replica)
        backup = self.catalog.get_backup(backup_id)
        manifest = self._checked_manifest(backup_id, item.source_disk_id, store)
        target = self._target_disk(backup.server_id, item)
        # Restoring onto the original disk returns it to its size at backup time (R5);
        # onto another (larger) disk, the data goes to its start and the size stays.
        size = (
            manifest.size_bytes if item.target_disk_id == item.source_disk_id else target.size_bytes
        )
        self.release_stale_snapshots(backup.server_id)
        running = self.catalog.list_tasks(
            kind=TaskKind.RESTORE, status=TaskStatus.RUNNING, backup_id=backup_id
        )
        task = running[0] if running else None
        # Asked before the writer opens: opening may resize the disk and drop its tracking.
        delta = self._delta_plan(backup.server_id, item, manifest, target.size_bytes, store)
        if task is not None and done == 0:
            self.catalog.add_task_note(task.id, f"disk {item.source_disk_id}: {delta.note}")
        writer = self.driver.open_disk_writer(backup.server_id, item.target_disk_id, size)
        throttle, beat = _Throttle(1.0), _Throttle(1.0)

        def on_progress(done_now: int, _staged: int, stats: TransferStats) -> None:
            # A heartbeat is a round trip to the worker's event loop: once a second (a
            # retry rewrites at most that second's chunks, which is harmless).
            if heartbeat is not None and beat.ready(force=done_now == stats.chunks_total):
                heartbeat({"done": done_now})
            if throttle.ready(force=done_now == stats.chunks_total) and task is not None:
                # B9, T1: the backup shows ``restoring`` with the progress of all its
                # disks, and so does the restore task.
                overall = self.catalog.disk_progress(
                    task.id, item.source_disk_id, done_now, stats.chunks_total
                )
                self.catalog.update_backup(backup_id, progress=overall)

        try:
            if size > manifest.size_bytes and done == 0:
                writer.zero(manifest.size_bytes, size - manifest.size_bytes)
            return restore_disk(
                store,
                manifest,
                writer,
                start=done,
                concurrency=self.settings.transfer_concurrency,
                progress=on_progress,
                positions=delta.positions,
                max_concurrency=self.settings.transfer_concurrency_max,
            )
        finally:
            writer.close()

    def instant_restore(
        self,
        plan: RestorePlan,
        heartbeat: Heartbeat | None = None,
        running: Callable[[], None] | None = None,
        poll_seconds: float = 1.0,
    ) -> InstantResult:
        """Run the server from the backup at once and copy its disks in the background
        (issue 18, the guide's 即时恢复). While this step runs, it serves each backed-up
        disk read-only over NBD from the object store (fetched on demand, cached, read
        ahead) to the server's disk images, which read through to it. ``running`` is
        called once the server runs. Retried after a worker restart, it serves again on
        the same sockets (QEMU reconnects) and resumes the copy; the disks are never put
        back in place twice, so the guest's writes since it started are kept."""
        backup = self.catalog.get_backup(plan.backup_id)
        store = self.source(plan.from_replica)
        server_id = plan.server_id
        served: list[tuple[NbdServer, threading.Thread]] = []
        readers: list[BackupDiskReader] = []
        beat = heartbeat or (lambda _details: None)
        try:
            sources = []
            for item in plan.items:
                manifest = self._checked_manifest(backup.id, item.source_disk_id, store)
                target = self._target_disk(backup.server_id, item)
                size = (
                    manifest.size_bytes
                    if item.target_disk_id == item.source_disk_id
                    else target.size_bytes
                )
                socket_path = self.driver.instant_socket(server_id, item.target_disk_id)
                export = f"{backup.id}/{item.source_disk_id}"
                # A small cache per disk (12 chunks): a server may have many disks.
                reader = BackupDiskReader(store, manifest, cache_chunks=12, readahead=4)
                readers.append(reader)
                nbd = NbdServer(reader, export, Path(socket_path))
                thread = threading.Thread(target=nbd.serve_forever, daemon=True)
                thread.start()
                served.append((nbd, thread))
                sources.append(
                    InstantSource(
                        disk_id=item.target_disk_id,
                        size_bytes=size,
                        socket=socket_path,
                        export=export,
                    )
                )
            if self.driver.instant_backup(server_id) != backup.id:
                self.release_stale_snapshots(server_id)
                self.driver.instant_attach(server_id, backup.id, sources)
                self.catalog.add_task_note(
                    plan.task_id,
                    "the server runs from the backup; its disks are copied in the background",
                )
            if running is not None:
                running()
            return self._stream(plan, beat, readers, poll_seconds)
        finally:
            for nbd, thread in served:
                nbd.close()
                thread.join(timeout=5)

    def _stream(
        self,
        plan: RestorePlan,
        beat: Heartbeat,
        readers: list[BackupDiskReader],
        poll_seconds: float,
    ) -> InstantResult:
        """Move the copy on until every disk is finished, with progress on the task."""
        by_target = {i.target_disk_id: i for i in plan.items}
        noted: set[str] = set()
        while True:
            states = self.driver.instant_stream(plan.server_id)
            for state in states:
                item = by_target.get(state.disk_id)
                if item is None:
                    continue
                if state.error and state.error not in noted:
                    noted.add(state.error)
                    self.catalog.add_task_note(
                        plan.task_id,
                        f"disk {item.source_disk_id}: the copy stopped ({state.error}); "
                        f"started again",
                    )
                chunks = -(-item.size_bytes // self.settings.chunk_size)
                done = chunks if state.finished else chunks * state.done // max(state.total, 1)
                overall = self.catalog.disk_progress(
                    plan.task_id, item.source_disk_id, done, chunks
                )
                self.catalog.update_backup(plan.backup_id, progress=overall)
            finished = all(s.finished for s in states)
            beat({"step": "streaming", "finished": finished})
            if finished:
                return InstantResult(
                    disks=len(states),
                    chunks_fetched=sum(r.chunks_fetched for r in readers),
                    bytes_fetched=sum(r.bytes_fetched for r in readers),
                )
            time.sleep(poll_seconds)

    def _checked_manifest(self, backup_id: str, disk_id: str, store: ChunkStore) -> Manifest:
        """The disk's manifest, refused when its size disagrees with the catalog's record:
        the manifest decides how far the target disk is cut or grown, never on the word of
        an object the catalog does not vouch for."""
        manifest = store.get_manifest(backup_id, disk_id)
        recorded = {d.disk_id: d.size_bytes for d in self.catalog.disk_backups(backup_id)}
        if manifest.size_bytes != recorded.get(disk_id):
            raise CorruptData(
                f"manifest of disk {disk_id} of backup {backup_id} says its size "
                f"is {manifest.size_bytes} bytes, the catalog "
                f"{recorded.get(disk_id)}; restore refused, the disk is untouched"
            )
        return manifest

    def _target_disk(self, server_id: str, item: RestoreItem) -> Disk:
        """The disk a backed-up disk is restored onto, re-created first if it was removed
        since the backup (R5)."""
        server = self.driver.get_server(server_id)
        if item.create and not any(d.id == item.target_disk_id for d in server.disks):
            like = Disk(
                id=item.target_disk_id, name=item.name, size_bytes=item.size_bytes, role=item.role
            )
            self.driver.recreate_disk(server.id, like, item.size_bytes)
            server = self.driver.get_server(server_id)
        return server.disk(item.target_disk_id)

    def _delta_plan(
        self,
        server_id: str,
        item: RestoreItem,
        manifest: Manifest,
        disk_size: int,
        store: ChunkStore,
    ) -> DeltaPlan:
        """Which chunks this disk needs (issue 18: delta restore), or all with the reason.
        The baseline backup must still be in the catalog with a readable manifest."""
        if not item.delta:
            return DeltaPlan(None, item.why_full or "full restore")
        baseline = self.driver.restore_baseline(server_id, item.target_disk_id)
        base_manifest: Manifest | None = None
        why = baseline.reason
        if baseline.backup_id is not None:
            row = self.catalog.find_backup(baseline.backup_id)
            if row is None or row.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
                why = f"backup {baseline.backup_id}, where the disk's tracking starts, is gone"
            else:
                try:
                    base_manifest = store.get_manifest(baseline.backup_id, item.source_disk_id)
                except (NotFound, CorruptData) as exc:
                    why = f"the manifest of backup {baseline.backup_id} cannot be read ({exc})"
        return plan_delta(
            manifest,
            base_manifest,
            baseline.backup_id if base_manifest is not None else None,
            baseline.changed,
            disk_size,
            why,
        )

    def finish_restore(self, backup_id: str, task_id: str, ok: bool, reason: str | None) -> None:
        """The backup is ``available`` again, the server's lock free; the task records the
        outcome."""
        with self.catalog.unit_of_work():
            task = self.catalog.get_task(task_id)
            self.catalog.end_restore(task.server_id or "", backup_id, task_id)
            self.catalog.finish_task(task_id, ok=ok, reason=reason)
