"""``VerifyBackup``: read every chunk of a backup and check its digest; ``VerifyBackups``:
verify every backup not verified lately (the verify schedule)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import VerifyBackupInput, VerifyBackupsInput, VerifyDiskResult, new_id
    from csbs.steps import BackupsToVerify, FinishVerify, OfDisk, OfTask, VerifySummary

from workflows.common import (
    SA_BACKUP_ID,
    SA_OPERATION,
    SA_SERVER_ID,
    all_or_cancel,
    fail_run,
    local_step,
    reason_of,
    tag,
    transfer,
    validated,
)


async def verify_disk(backup_id: str, disk_id: str, replica: bool = False) -> VerifyDiskResult:
    """The ``verify_disk`` activity of one disk (also run by restores asked to verify);
    ``replica``: the copy on the second site."""
    return await transfer(
        A.verify_disk,
        OfDisk(backup_id=backup_id, disk_id=disk_id, replica=replica),
        summary=f"verify disk {disk_id}" + (" on the replica" if replica else ""),
    )


@workflow.defn(name="VerifyBackup", failure_exception_types=[ValidationError])
class VerifyBackup:
    """Verify one backup; fails with ``CorruptData`` naming each bad chunk and disk."""

    @workflow.run
    async def run(self, inp: VerifyBackupInput) -> VerifySummary:
        task_id = new_id("task", workflow.uuid4())
        tag(SA_BACKUP_ID.value_set(inp.backup_id), SA_OPERATION.value_set("verify"))
        workflow.set_current_details("validating")
        plan = await validated(
            local_step(
                A.prepare_verify,
                OfTask(backup_id=inp.backup_id, task_id=task_id, replica=inp.replica),
            )
        )
        tag(SA_SERVER_ID.value_set(plan.server_id))
        workflow.set_current_details(f"verifying {len(plan.disk_ids)} disk(s)")
        try:
            results = await all_or_cancel(
                [verify_disk(inp.backup_id, d, inp.replica) for d in plan.disk_ids]
            )
        except BaseException as err:

            def record(reason: str) -> Awaitable[VerifySummary]:
                stopped = FinishVerify(
                    backup_id=inp.backup_id,
                    task_id=task_id,
                    results=[],
                    error=reason,
                    replica=inp.replica,
                )
                return local_step(A.finish_verify, stopped, cleanup=True)

            await fail_run("verify", err, record)
        summary = await local_step(
            A.finish_verify,
            FinishVerify(
                backup_id=inp.backup_id, task_id=task_id, results=results, replica=inp.replica
            ),
        )
        workflow.set_current_details("done" if summary.ok else "found problems")
        if not summary.ok:
            raise ApplicationError(
                summary.reason or "verify found problems",
                summary,
                type="CorruptData",
                non_retryable=True,
            )
        return summary


@workflow.defn(name="VerifyBackups", failure_exception_types=[ValidationError])
class VerifyBackups:
    """Verify every available backup not verified in ``max_age_days`` (the schedule)."""

    @workflow.run
    async def run(self, inp: VerifyBackupsInput) -> dict[str, Any]:
        tag(SA_OPERATION.value_set("verify"))
        found = await local_step(
            A.backups_to_verify, BackupsToVerify(max_age_days=inp.max_age_days)
        )
        ids = found.backup_ids
        limit = asyncio.Semaphore(inp.concurrency)
        outcomes: dict[str, str] = {}

        async def one(backup_id: str) -> None:
            async with limit:
                try:
                    await workflow.execute_child_workflow(
                        VerifyBackup.run,
                        VerifyBackupInput(backup_id=backup_id),
                        id=f"verify-{backup_id}-{workflow.info().workflow_id}",
                        static_summary=f"verify of backup {backup_id}",
                    )
                    outcomes[backup_id] = "ok"
                except ChildWorkflowError as err:
                    outcomes[backup_id] = reason_of("verify", err).reason
                workflow.set_current_details(f"verified {len(outcomes)}/{len(ids)}")

        await asyncio.gather(*(one(b) for b in ids))
        failed = {b: r for b, r in outcomes.items() if r != "ok"}
        return {"verified": len(ids), "ok": len(ids) - len(failed), "failed": failed}
