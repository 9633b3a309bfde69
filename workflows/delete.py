"""``DeleteBackups``: delete one or several backups (their chunks are left to GC)."""

from __future__ import annotations

import contextlib
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import CollectGarbageInput, DeleteBackupsInput, new_id
    from csbs.steps import FailTask, OfTask, PrepareDelete

from workflows.common import (
    SA_BACKUP_ID,
    SA_OPERATION,
    queued_step,
    reason_of,
    sweep,
    tag,
    validated,
)
from workflows.gc import CollectGarbage


@workflow.defn(name="DeleteBackups", failure_exception_types=[ValidationError])
class DeleteBackups:
    """Check all backups may go, mark them ``deleting``, delete each; failures -> delete_failed."""

    def __init__(self) -> None:
        self._progress: dict[str, Any] = {"step": "starting", "deleted": [], "failed": {}}

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        return self._progress

    @workflow.run
    async def run(self, inp: DeleteBackupsInput) -> dict[str, Any]:
        task_id = new_id("task", workflow.uuid4())
        tag(SA_BACKUP_ID.value_set(inp.backup_ids[0]), SA_OPERATION.value_set("delete"))
        prepare = queued_step(A.prepare_delete, PrepareDelete(request=inp, task_id=task_id))
        plan = await validated(prepare)
        for backup_id, backup_task in plan.targets:
            self._progress["step"] = f"deleting {backup_id}"
            workflow.set_current_details(self._progress["step"])
            try:
                await queued_step(A.delete_backup, OfTask(backup_id=backup_id, task_id=backup_task))
                self._progress["deleted"].append(backup_id)
            except Exception as err:
                reason = reason_of(f"delete of backup {backup_id}", err).reason
                self._progress["failed"][backup_id] = reason
                failure = FailTask(backup_id=backup_id, task_id=backup_task, reason=reason)
                await queued_step(A.fail_delete, failure, cleanup=True)
        if self._progress["deleted"]:
            self._progress["step"] = "reclaiming storage"
            workflow.set_current_details(self._progress["step"])
            try:
                self._progress["reclaimed"] = (await sweep()).model_dump()
            except ActivityError as err:
                # Backups are running (or another sweep, or S3 failed): hand the sweep to
                # a CollectGarbage run that waits for them, so it is never forgotten.
                reclaim = f"collect-garbage-after-delete.{workflow.info().task_queue}"
                self._progress["reclaimed"] = {
                    "deferred": reason_of("reclaim", err).reason,
                    "handed_to": reclaim,
                }
                with contextlib.suppress(WorkflowAlreadyStartedError):
                    await workflow.start_child_workflow(
                        CollectGarbage.run,
                        CollectGarbageInput(),
                        id=reclaim,
                        parent_close_policy=ParentClosePolicy.ABANDON,
                        static_summary="sweep deferred by a delete while backups ran",
                    )
        self._progress["step"] = "done"
        if self._progress["failed"]:
            raise ApplicationError(
                "; ".join(self._progress["failed"].values()),
                type="DeleteFailed",
                non_retryable=True,
            )
        return {"deleted": self._progress["deleted"], "reclaimed": self._progress.get("reclaimed")}
