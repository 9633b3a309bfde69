"""``ReplicateBackup``: copy a backup to the second site (issue 17), the chunks the
replica lacks first, then its manifests and descriptor; a retry resumes."""

from __future__ import annotations

from collections.abc import Awaitable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import ReplicateBackupInput, new_id
    from csbs.steps import FinishReplicate, OfTask, ReplicateResult

from workflows.common import (
    SA_BACKUP_ID,
    SA_OPERATION,
    SA_SERVER_ID,
    fail_run,
    local_step,
    tag,
    transfer,
    validated,
)


@workflow.defn(name="ReplicateBackup", failure_exception_types=[ValidationError])
class ReplicateBackup:
    """Replicate one available backup; fails with the reason on its task and backup."""

    @workflow.run
    async def run(self, inp: ReplicateBackupInput) -> ReplicateResult:
        task_id = new_id("task", workflow.uuid4())
        tag(SA_BACKUP_ID.value_set(inp.backup_id), SA_OPERATION.value_set("replicate"))
        workflow.set_current_details("validating")
        plan = await validated(
            local_step(A.prepare_replicate, OfTask(backup_id=inp.backup_id, task_id=task_id))
        )
        tag(SA_SERVER_ID.value_set(plan.server_id))
        workflow.set_current_details("copying what the replica lacks")
        try:
            result = await transfer(
                A.replicate_backup, plan, summary=f"replicate backup {inp.backup_id}"
            )
        except BaseException as err:

            def record(reason: str) -> Awaitable[None]:
                stopped = FinishReplicate(backup_id=inp.backup_id, task_id=task_id, error=reason)
                return local_step(A.finish_replicate, stopped, cleanup=True)

            await fail_run("replicate", err, record)
        await local_step(
            A.finish_replicate,
            FinishReplicate(backup_id=inp.backup_id, task_id=task_id, result=result),
            cleanup=True,
        )
        workflow.set_current_details("done")
        return result
