"""``RetentionCleanup``: apply every policy's retention (P4, P5); daily from its schedule."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import DeleteBackupsInput, RetentionCleanupInput
    from csbs.steps import OfPolicy

from workflows.common import SA_OPERATION, local_step, reason_of, tag
from workflows.delete import DeleteBackups


async def apply_retention(policy_id: str, delete_workflow_id: str) -> dict[str, Any]:
    """Delete what one policy's retention expires now, via a ``DeleteBackups`` child."""
    plan = await local_step(A.policy_expired_backups, OfPolicy(policy_id=policy_id))
    expired = plan.expired
    entry: dict[str, Any] = {"expired": expired}
    if plan.kept:
        entry["kept"] = plan.kept
    if expired:
        try:
            entry["result"] = await workflow.execute_child_workflow(
                DeleteBackups.run, DeleteBackupsInput(backup_ids=expired), id=delete_workflow_id
            )
        except ChildWorkflowError as err:
            entry["error"] = reason_of("retention", err).reason
    return entry


@workflow.defn(name="RetentionCleanup", failure_exception_types=[ValidationError])
class RetentionCleanup:
    """For each policy, delete the scheduled backups its retention expires."""

    @workflow.run
    async def run(self, inp: RetentionCleanupInput | None = None) -> dict[str, Any]:
        tag(SA_OPERATION.value_set("retention"))
        policy_ids = (await local_step(A.list_policy_ids)).policy_ids
        report: dict[str, Any] = {}
        for policy_id in policy_ids:
            workflow.set_current_details(f"policy {policy_id}")
            report[policy_id] = await apply_retention(
                policy_id, f"retention-{workflow.info().workflow_id}-{policy_id}"
            )
        return report
