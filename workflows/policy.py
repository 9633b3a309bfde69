"""``RunPolicy``: back up every server bound to a policy, then apply its retention (P4-P8)."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import (
        BackupKind,
        BackupServerInput,
        ReplicateBackupInput,
        RunPolicyInput,
        new_id,
    )
    from csbs.steps import PlanPolicyRun, PolicyRefusal, PolicySkips

from workflows.backup import BackupServer
from workflows.common import SA_OPERATION, SA_POLICY_ID, queued_step, reason_of, run_failure, tag
from workflows.replicate import ReplicateBackup
from workflows.retention import apply_retention


@workflow.defn(name="RunPolicy", failure_exception_types=[ValidationError])
class RunPolicy:
    """Back up bound servers as child ``BackupServer`` runs (bounded), skip busy ones with a
    recorded reason, then delete what the policy's retention expires."""

    def __init__(self) -> None:
        self._progress: dict[str, Any] = {"step": "starting", "done": 0, "total": 0}

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        return self._progress

    @workflow.run
    async def run(self, inp: RunPolicyInput) -> dict[str, Any]:
        tag(SA_POLICY_ID.value_set(inp.policy_id), SA_OPERATION.value_set("policy"))
        try:
            plan = await queued_step(
                A.plan_policy_run, PlanPolicyRun(policy_id=inp.policy_id, trigger=inp.trigger)
            )
        except Exception as err:
            # T1, guide 3.3: a run that was started and then refused leaves a failed task.
            failed = reason_of("policy run", err)
            refusal = PolicyRefusal(
                policy_id=inp.policy_id,
                trigger=inp.trigger,
                reason=failed.reason,
                run_id=workflow.info().workflow_id,
            )
            await queued_step(A.record_policy_refusal, refusal, cleanup=True)
            raise run_failure(failed) from err
        if plan.skipped:
            skips = PolicySkips(
                policy_id=inp.policy_id, skipped=plan.skipped, run_id=workflow.info().workflow_id
            )
            await queued_step(A.record_policy_skips, skips)
        kind = BackupKind.SCHEDULED if inp.trigger == "scheduled" else BackupKind.POLICY_MANUAL
        ids = {s: new_id("bk", workflow.uuid4()) for s in plan.server_ids}
        self._progress.update(step="backing up", total=len(ids))
        workflow.set_current_details(f"backing up {len(ids)} server(s)")
        limit = asyncio.Semaphore(inp.concurrency)
        outcomes: dict[str, str] = {}
        replicas: dict[str, str] = {}

        async def one(server_id: str) -> None:
            async with limit:
                backup_id = ids[server_id]
                try:
                    await workflow.execute_child_workflow(
                        BackupServer.run,
                        BackupServerInput(
                            server_id=server_id,
                            backup_id=backup_id,
                            kind=kind,
                            policy_id=inp.policy_id,
                        ),
                        id=f"backup-{backup_id}",
                        static_summary=f"backup {backup_id} of server {server_id} "
                        f"(policy {inp.policy_id})",
                    )
                    outcomes[server_id] = "available"
                except ChildWorkflowError as err:
                    outcomes[server_id] = reason_of(f"backup of {server_id}", err).reason
                if plan.replicate and outcomes[server_id] == "available":
                    # Issue 17: the policy replicates each backup it makes; a failed copy
                    # leaves the backup as it is, with the reason on its own task.
                    try:
                        await workflow.execute_child_workflow(
                            ReplicateBackup.run,
                            ReplicateBackupInput(backup_id=backup_id),
                            id=f"replicate-{backup_id}",
                            static_summary=f"replication of backup {backup_id}",
                        )
                        replicas[server_id] = "replicated"
                    except ChildWorkflowError as err:
                        replicas[server_id] = reason_of("replicate", err).reason
                self._progress["done"] += 1
                workflow.set_current_details(
                    f"backing up: {self._progress['done']}/{len(ids)} done"
                )

        await asyncio.gather(*(one(s) for s in plan.server_ids))

        self._progress["step"] = "retention"
        workflow.set_current_details("applying retention")
        retention = await apply_retention(inp.policy_id, f"retention-{workflow.info().workflow_id}")
        self._progress["step"] = "done"
        return {
            "policy_id": inp.policy_id,
            "trigger": inp.trigger,
            "backups": {
                s: {"backup_id": ids[s], "outcome": outcomes[s]}
                | ({"replica": replicas[s]} if s in replicas else {})
                for s in ids
            },
            "skipped": plan.skipped,
            "retention": retention,
        }
