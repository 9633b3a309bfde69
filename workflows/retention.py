"""``RetentionCleanup``: apply every policy's retention (P4, P5); daily from its schedule."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ConfigDict, ValidationError

    from csbs.model import DeleteBackupsInput

from workflows.common import RETRY, SA_OPERATION, STEP_TIMEOUT, reason_of, tag


class RetentionCleanupInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


@workflow.defn(name="RetentionCleanup", failure_exception_types=[ValidationError])
class RetentionCleanup:
    """For each policy, delete the scheduled backups its retention expires."""

    @workflow.run
    async def run(self, inp: RetentionCleanupInput | None = None) -> dict[str, Any]:
        tag(SA_OPERATION.value_set("retention"))
        policy_ids: list[str] = await workflow.execute_activity(
            "list_policy_ids",
            result_type=list[str],
            start_to_close_timeout=STEP_TIMEOUT,
            retry_policy=RETRY,
        )
        report: dict[str, Any] = {}
        for policy_id in policy_ids:
            expired: list[str] = await workflow.execute_activity(
                "policy_expired_backups",
                args=[policy_id],
                result_type=list[str],
                start_to_close_timeout=STEP_TIMEOUT,
                retry_policy=RETRY,
            )
            entry: dict[str, Any] = {"expired": expired}
            if expired:
                workflow.set_current_details(f"policy {policy_id}: deleting {len(expired)}")
                try:
                    await workflow.execute_child_workflow(
                        "DeleteBackups",
                        DeleteBackupsInput(backup_ids=expired),
                        id=f"retention-{workflow.info().workflow_id}-{policy_id}",
                        result_type=dict[str, Any],
                    )
                except ChildWorkflowError as err:
                    entry["error"] = reason_of("retention", err).reason
            report[policy_id] = entry
        return report
