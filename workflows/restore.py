"""``RestoreServer``: put every disk of a server back to a backup's instant."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from csbs.model import (
        RestoreItem,
        RestorePlan,
        RestoreServerInput,
        TransferStats,
        describe,
    )

from workflows.common import (
    HEARTBEAT_TIMEOUT,
    RETRY,
    SA_BACKUP_ID,
    SA_OPERATION,
    SA_SERVER_ID,
    StepFailed,
    act,
    all_or_cancel,
    reason_of,
    step,
    tag,
    transfer,
)
from workflows.verify import verify_disk

#: Listing the store to check every chunk of a large backup is there.
CHECK_TIMEOUT = timedelta(minutes=30)


@workflow.defn(name="RestoreServer", failure_exception_types=[ValidationError])
class RestoreServer:
    """Validate; stop the server; restore each disk in parallel; start it unless told not to."""

    def __init__(self) -> None:
        self._progress: dict[str, Any] = {"step": "starting", "disks_done": 0, "disks_total": 0}

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        return self._progress

    def _at(self, step_name: str) -> None:
        self._progress["step"] = step_name
        done, total = self._progress["disks_done"], self._progress["disks_total"]
        workflow.set_current_details(f"{step_name}; disks {done}/{total}" if total else step_name)

    @workflow.run
    async def run(self, inp: RestoreServerInput) -> dict[str, Any]:
        task_id = f"task-{workflow.uuid4().hex[:16]}"
        tag(SA_BACKUP_ID.value_set(inp.backup_id), SA_OPERATION.value_set("restore"))
        self._at("validating")
        try:
            plan: RestorePlan = await act("prepare_restore", inp, task_id, result_type=RestorePlan)
        except Exception as err:
            failed = reason_of("validate", err)
            raise ApplicationError(
                failed.reason, type=failed.error_type, non_retryable=True
            ) from err
        tag(SA_SERVER_ID.value_set(plan.server_id))
        self._progress.update(
            backup_id=plan.backup_id,
            task_id=task_id,
            disks_total=len(plan.items),
            warnings=plan.warnings,
        )
        stopped = False
        try:
            self._at("checking the backup")
            await step(
                "check backup",
                workflow.execute_activity(
                    "check_restore",
                    args=[plan.backup_id, [i.source_disk_id for i in plan.items]],
                    start_to_close_timeout=CHECK_TIMEOUT,
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    retry_policy=RETRY,
                    summary="check every chunk is in the object store",
                ),
            )
            if inp.verify:
                await self._verify_first(plan)
            self._at("stopping server")
            await step("stop server", act("stop_server", plan.server_id))
            stopped = True
            self._at("restoring")
            await all_or_cancel([self._disk(plan.backup_id, item) for item in plan.items])
            if inp.power_on:
                self._at("starting server")
                await step("start server", act("start_server", plan.server_id))
            await act("finish_restore", plan.backup_id, plan.task_id, True, None, cleanup=True)
            self._at("done")
            return {
                "backup_id": plan.backup_id,
                "server_id": plan.server_id,
                "task_id": task_id,
                "disks": [i.model_dump() for i in plan.items],
                "powered_on": inp.power_on,
                "warnings": plan.warnings,
            }
        except BaseException as err:
            failed = reason_of("restore", err)
            reason = failed.reason
            if stopped:
                reason += "; the server was left stopped"
            self._at("failed")
            await act("finish_restore", plan.backup_id, plan.task_id, False, reason, cleanup=True)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise ApplicationError(reason, type=failed.error_type, non_retryable=True) from err

    async def _verify_first(self, plan: RestorePlan) -> None:
        """Read and check every chunk to restore; any problem fails the restore before the
        server is stopped or a disk written."""
        self._at("verifying")
        results = await all_or_cancel(
            [verify_disk(plan.backup_id, item.source_disk_id) for item in plan.items]
        )
        problems = [p for r in results for p in r.problems]
        if problems:
            raise StepFailed(
                f"verify before restore found {describe(problems)}; no disk was touched",
                "CorruptData",
            )

    async def _disk(self, backup_id: str, item: RestoreItem) -> TransferStats:
        stats: TransferStats = await step(
            f"restore of disk {item.source_disk_id} onto {item.target_disk_id}",
            transfer(
                "restore_disk",
                backup_id,
                item,
                result_type=TransferStats,
                summary=f"disk {item.source_disk_id} -> {item.target_disk_id}",
            ),
        )
        self._progress["disks_done"] += 1
        self._at("restoring")
        return stats
