"""``RestoreServer``: put every disk of a server back to a backup's instant."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import (
        InstantResult,
        RestoreItem,
        RestorePlan,
        RestoreServerInput,
        TransferStats,
        describe,
        new_id,
    )
    from csbs.steps import (
        CheckRestore,
        FinishRestore,
        InstantRestore,
        OfServer,
        PrepareRestore,
        RefuseRestore,
        RestoreDisk,
    )

from workflows import common as wf
from workflows.verify import verify_disk

#: Listing the store to check every chunk of a large backup is there.
CHECK_TIMEOUT = timedelta(minutes=30)
#: Copying a large server's disks in the background, at whatever pace the guest allows.
INSTANT_TIMEOUT = timedelta(days=7)


@workflow.defn(name="RestoreServer", failure_exception_types=[ValidationError])
class RestoreServer(wf.DiskProgress):
    """Validate; stop the server; restore each disk in parallel; start it unless told not to."""

    @workflow.run
    async def run(self, inp: RestoreServerInput) -> dict[str, Any]:
        task_id = new_id("task", workflow.uuid4())
        wf.tag(wf.SA_BACKUP_ID.value_set(inp.backup_id), wf.SA_OPERATION.value_set("restore"))
        self._at("validating")
        try:
            plan = await wf.local_step(
                A.prepare_restore, PrepareRestore(request=inp, task_id=task_id)
            )
        except Exception as err:
            # R6, guide 3.3: a refused restore leaves a failed restore task with the reason.
            failed = wf.reason_of("validate", err)
            refusal = RefuseRestore(request=inp, task_id=task_id, reason=failed.reason)
            await wf.local_step(A.refuse_restore, refusal, cleanup=True)
            raise wf.run_failure(failed) from err
        wf.tag(wf.SA_SERVER_ID.value_set(plan.server_id))
        self._route = plan.route
        self._progress.update(
            backup_id=plan.backup_id,
            server_id=plan.server_id,
            task_id=task_id,
            disks_total=len(plan.items),
            warnings=plan.warnings,
        )
        stopped = False
        try:
            self._at("checking the backup")
            check = CheckRestore(
                backup_id=plan.backup_id,
                disk_ids=[i.source_disk_id for i in plan.items],
                from_replica=plan.from_replica,
            )
            await wf.step(
                "check backup",
                wf.transfer(
                    A.check_restore,
                    check,
                    summary="check every chunk is in the object store",
                    timeout=CHECK_TIMEOUT,
                ),
            )
            if inp.verify:
                await self._verify_first(plan)
            self._at("stopping server")
            await wf.step(
                "stop server",
                wf.on_host(
                    plan.route,
                    A.stop_server,
                    OfServer(server_id=plan.server_id, task_id=plan.task_id),
                    timeout=wf.POWER_TIMEOUT,
                ),
            )
            stopped = True
            extra: dict[str, Any] = {}
            if inp.instant:
                fetched = await self._instant(plan)
                extra = {"instant": True, "bytes_fetched": fetched.bytes_fetched}
            else:
                self._at("restoring")
                await wf.all_or_cancel([self._disk(plan, i) for i in plan.items])
                if inp.power_on:
                    self._at("starting server")
                    await wf.step(
                        "start server",
                        wf.on_host(plan.route, A.start_server, OfServer(server_id=plan.server_id)),
                    )
            await self._finish(plan, ok=True)
            self._at("done")
            return {
                "backup_id": plan.backup_id,
                "server_id": plan.server_id,
                "task_id": task_id,
                "disks": [i.model_dump() for i in plan.items],
                "powered_on": inp.power_on,
                "warnings": plan.warnings,
                **extra,
            }
        except BaseException as err:
            failed = wf.reason_of("restore", err)
            reason = failed.reason
            if stopped:
                reason += "; the server was left stopped"
            self._at("failed")
            await self._finish(plan, ok=False, reason=reason)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise wf.run_failure(wf.StepFailed(reason, failed.error_type)) from err

    @workflow.signal(name="instant_running")
    def instant_running(self) -> None:
        """The instant restore's step reports the server runs from the backup."""
        if self._progress["step"] == "starting from the backup":
            self._at("copying disks")

    async def _instant(self, plan: RestorePlan) -> InstantResult:
        """Run the server from the backup now; copy its disks in the background. Until
        the copy has finished the run goes on (step ``copying disks``), and the server
        depends on it; a worker restart retries the step, which picks up where it was."""
        self._at("starting from the backup")
        return await wf.step(
            "instant restore",
            wf.transfer(
                A.instant_restore,
                InstantRestore(plan=plan),
                summary="run the server from the backup; copy its disks",
                timeout=INSTANT_TIMEOUT,
                route=self._route,
            ),
        )

    async def _finish(self, plan: RestorePlan, ok: bool, reason: str | None = None) -> None:
        finish = FinishRestore(backup_id=plan.backup_id, task_id=plan.task_id, ok=ok, reason=reason)
        await wf.local_step(A.finish_restore, finish, cleanup=True)

    async def _verify_first(self, plan: RestorePlan) -> None:
        """Read and check every chunk to restore; any problem fails the restore before the
        server is stopped or a disk written."""
        self._at("verifying")
        results = await wf.all_or_cancel(
            [
                verify_disk(plan.backup_id, item.source_disk_id, plan.from_replica)
                for item in plan.items
            ]
        )
        problems = [p for r in results for p in r.problems]
        if problems:
            raise wf.StepFailed(
                f"verify before restore found {describe(problems)}; no disk was touched",
                "CorruptData",
            )

    async def _disk(self, plan: RestorePlan, item: RestoreItem) -> TransferStats:
        write = wf.transfer(
            A.restore_disk,
            RestoreDisk(backup_id=plan.backup_id, item=item, from_replica=plan.from_replica),
            summary=f"disk {item.source_disk_id} -> {item.target_disk_id}",
            route=self._route,
        )
        name = f"restore of disk {item.source_disk_id} onto {item.target_disk_id}"
        return await self._disk_step(name, write, then="restoring")
