"""What every service of csbs shares: its settings, catalog, object store and compute
driver; task records; snapshot clean-up; server locks and the reconciliation of
operations whose Temporal runs closed without finishing them."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from csbs.catalog import (
    Catalog,
    TaskRow,
    utcnow,
)
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.drivers import ComputeDriver
from csbs.errors import (
    Conflict,
    InvalidState,
    NotFound,
)
from csbs.model import (
    BackupStatus,
    ChunkProblem,
    HostRoute,
    Server,
    TaskKind,
    TaskStatus,
)

#: Called by long steps with resumable details; activities turn it into a heartbeat.


Heartbeat = Callable[[dict[str, Any]], None]


log = logging.getLogger(__name__)


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


@dataclass
class Context:
    """What the services of one project work on."""

    settings: Settings
    catalog: Catalog
    store: ChunkStore
    driver: ComputeDriver
    #: Given a task's workflow id and run id, why its run is closed ("its workflow was
    #: terminated"), or None while it runs or cannot be told. The worker sets it (it asks
    #: Temporal); without it nothing is reconciled.
    closed_run: Callable[[str, str | None], str | None] | None = None
    #: The second site's repository (issue 17), built on first use.
    replica: ChunkStore | None = None

    def replica_store(self) -> ChunkStore:
        """The replica's repository of this project (InvalidState when none is set)."""
        if self.replica is None:
            self.replica = ChunkStore(self.settings.replica())
        return self.replica


class Service:
    """The shared part of every feature service (``Services`` builds them over one
    context, so they share one catalog, store, driver and ``closed_run``)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings, self.catalog = ctx.settings, ctx.catalog
        self.store, self.driver = ctx.store, ctx.driver
        self._progress_lock = threading.Lock()

    @property
    def closed_run(self) -> Callable[[str, str | None], str | None] | None:
        return self.ctx.closed_run

    def source(self, replica: bool) -> ChunkStore:
        """Where a step reads: the primary, or the second site (issue 17)."""
        return self.ctx.replica_store() if replica else self.store

    def _claim_server(self, server_id: str, holder: str, operation: str) -> None:
        """Take the server's lock (see ``_with_server_lock``)."""
        self._with_server_lock(
            server_id, lambda: self.catalog.claim_server(server_id, holder, operation)
        )

    def _with_server_lock(self, server_id: str, claim: Callable[[], None]) -> None:
        """Run ``claim`` (a step that takes the server's lock); when the lock's holder
        belongs to a run that closed without finishing (terminated, timed out), reconcile
        it and claim once more."""
        try:
            claim()
        except Conflict:
            if not self.reconcile(server_id=server_id):
                raise
            claim()

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

    def route(self, server: Server) -> HostRoute:
        """Where the server's data-plane steps run: here, or on its host's agent."""
        s = self.settings
        queue = None if server.host == s.host else s.host_queue(server.host)
        return HostRoute(host=server.host, queue=queue, wait_seconds=s.host_wait_seconds)

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

    def _failed_task(
        self,
        task_id: str,
        kind: TaskKind,
        workflow_id: str,
        backup_id: str | None,
        backup_name: str,
        server_id: str | None,
        server_name: str,
        reason: str,
        run_id: str = "",
    ) -> TaskRow:
        """The record of a task refused as it started: failed now, with the reason."""
        now = utcnow()
        task = self._running_task(
            task_id, kind, workflow_id, backup_id or "", backup_name, server_id or "",
            server_name, started_at=now, run_id=run_id,
        )  # fmt: skip
        task.backup_id, task.server_id = backup_id, server_id
        task.status, task.finished_at, task.reason = TaskStatus.FAILED.value, now, reason
        return task

    def _find_task(self, task_id: str) -> TaskRow | None:
        try:
            return self.catalog.get_task(task_id)
        except NotFound:
            return None

    def stop_server(self, server_id: str, task_id: str | None = None) -> str | None:
        """Stop a server gracefully; a warning (it had to be forced off) is added to the
        task's detail, where ``csbs task show`` and the task list show it."""
        warning = self.driver.stop(server_id)
        if warning is not None:
            log.warning("%s", warning)
            if task_id is not None:
                detail = self.catalog.get_task(task_id).detail
                if warning not in (detail or ""):
                    self.catalog.update_task(
                        task_id, detail="; ".join(filter(None, [detail, warning]))
                    )
        return warning

    def start_server(self, server_id: str) -> None:
        self.driver.start(server_id)

    def _chunk_index(self, to_read: int, store: ChunkStore | None = None) -> set[bytes] | None:
        """Every chunk id of the store when listing them is cheaper than a HEAD for each
        chunk to read: with at least a LIST page's worth of chunks to read, and at most
        4 ids listed per chunk to read. Otherwise None (HEAD each new chunk)."""
        if to_read < 100:
            return None
        return (store or self.store).chunk_index(4 * to_read)

    def _suspect(self, backup_id: str, problems: list[ChunkProblem]) -> None:
        """Chunks found missing or corrupt are never reused by a backup again: the next
        one that reads their data uploads them anew (and the old backups heal)."""
        self.catalog.add_suspect_chunks(
            [(p.chunk_id, p.problem, backup_id) for p in problems if p.chunk_id is not None]
        )

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
