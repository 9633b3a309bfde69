"""``BackupServer``: one crash-consistent backup of every disk of a server."""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.catalog import BackupView
    from csbs.model import BackupServerInput, TransferStats, new_id
    from csbs.steps import (
        FailTask,
        OfBackup,
        OfDisk,
        OfServer,
        OfTask,
        PrepareBackup,
        RefuseBackup,
        ReleaseSnapshot,
    )

from workflows.common import (
    POWER_TIMEOUT,
    SA_BACKUP_ID,
    SA_OPERATION,
    SA_POLICY_ID,
    SA_SERVER_ID,
    DiskProgress,
    all_or_cancel,
    local_step,
    on_host,
    reason_of,
    run_failure,
    step,
    tag,
    transfer,
)


@workflow.defn(name="BackupServer", failure_exception_types=[ValidationError])
class BackupServer(DiskProgress):
    """Validate, group-snapshot, upload every disk in parallel, commit; always release."""

    @workflow.run
    async def run(self, inp: BackupServerInput) -> BackupView:
        backup_id = inp.backup_id or new_id("bk", workflow.uuid4())
        task_id = new_id("task", workflow.uuid4())
        pairs = [
            SA_SERVER_ID.value_set(inp.server_id),
            SA_BACKUP_ID.value_set(backup_id),
            SA_OPERATION.value_set("backup"),
        ]
        if inp.policy_id:
            pairs.append(SA_POLICY_ID.value_set(inp.policy_id))
        tag(*pairs)
        self._progress.update(backup_id=backup_id, task_id=task_id)

        self._at("validating")
        try:
            prepared = await local_step(
                A.prepare_backup, PrepareBackup(request=inp, backup_id=backup_id, task_id=task_id)
            )
        except Exception as err:
            failed = reason_of("validate", err)
            # B10, guide 3.3: a refused backup is a failed backup, an ``error`` backup and
            # a failed task with the reason, whoever started it.
            refusal = RefuseBackup(
                request=inp, backup_id=backup_id, task_id=task_id, reason=failed.reason
            )
            await local_step(A.refuse_backup, refusal, cleanup=True)
            raise run_failure(failed) from err

        committed = released = False
        # Snapshot, reads and power run where the server is: here, or on its host's agent.
        self._route = route = prepared.route
        # B12: an offline backup stops a running server for the snapshot only.
        restart = inp.offline and prepared.server_state == "running"
        try:
            if restart:
                self._at("stopping server")
                await step(
                    "stop server",
                    on_host(
                        route,
                        A.stop_server,
                        OfServer(server_id=inp.server_id, task_id=task_id),
                        timeout=POWER_TIMEOUT,
                    ),
                )
            self._at("snapshot", name=prepared.name)
            try:
                snapshot = await step(
                    "group snapshot", on_host(route, A.take_snapshot, OfBackup(backup_id=backup_id))
                )
                disk_ids = snapshot.disk_ids
            finally:
                if restart:
                    self._at("starting server")
                    await on_host(
                        route, A.start_server, OfServer(server_id=inp.server_id), cleanup=True
                    )
            self._progress["disks_total"] = len(disk_ids)
            self._at("uploading")
            await all_or_cancel([self._disk(backup_id, d) for d in disk_ids])
            self._at("committing")
            result = await step(
                "commit", local_step(A.commit_backup, OfTask(backup_id=backup_id, task_id=task_id))
            )
            committed = True
            self._at("done")
            return result
        except BaseException as err:
            failed = reason_of("backup", err)
            self._at("failed", reason=failed.reason)
            # Release first: the failure record frees the server for the next backup.
            released = True
            await self._release(inp.server_id, backup_id, committed=False)
            await local_step(
                A.fail_backup,
                FailTask(backup_id=backup_id, task_id=task_id, reason=failed.reason),
                cleanup=True,
            )
            if isinstance(err, asyncio.CancelledError):
                raise
            raise run_failure(failed) from err
        finally:
            if not released:
                await self._release(inp.server_id, backup_id, committed)

    async def _release(self, server_id: str, backup_id: str, committed: bool) -> None:
        release = ReleaseSnapshot(server_id=server_id, backup_id=backup_id, committed=committed)
        route = self._route
        try:
            await on_host(route, A.release_snapshot, release, cleanup=True)
        except (ActivityError, ApplicationError) as err:
            if route.queue is None:
                raise
            # The host's agent is gone: it releases what no running backup owns before
            # its next snapshot. The backup's own record must not wait for it.
            workflow.logger.warning("snapshot %s not released: %s", backup_id, err)

    async def _disk(self, backup_id: str, disk_id: str) -> TransferStats:
        upload = transfer(
            A.backup_disk,
            OfDisk(backup_id=backup_id, disk_id=disk_id),
            summary=f"disk {disk_id}",
            route=self._route,
        )
        return await self._disk_step(f"upload of disk {disk_id}", upload, then="uploading")
