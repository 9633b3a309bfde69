"""``CollectGarbage``: reconcile operations whose runs closed without finishing, then sweep
chunks that no manifest references any more (D1); daily from its schedule."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities import CsbsActivities as A
    from csbs.model import CollectGarbageInput
    from csbs.steps import SweepResult

from workflows.common import SA_OPERATION, local_step, reason_of, run_failure, sweep, tag

#: A sweep that meets these waits and tries again (backups run, another sweep holds the
#: lease); anything else fails the run with its reason.
WAIT_TYPES = {"GarbageCollectionDeferred", "GarbageCollectionRunning", "LeaseLost"}


@workflow.defn(name="CollectGarbage", failure_exception_types=[ValidationError])
class CollectGarbage:
    """Reconcile closed runs; then mark every chunk a manifest references and delete the
    rest, never beside a backup: while backups run, wait and try again."""

    @workflow.run
    async def run(self, inp: CollectGarbageInput | None = None) -> dict[str, Any]:
        inp = inp or CollectGarbageInput()
        tag(SA_OPERATION.value_set("gc"))
        workflow.set_current_details("reconciling operations whose runs closed")
        reconciled = (await local_step(A.reconcile_operations)).count
        waited = 0
        while True:
            workflow.set_current_details("sweeping unreferenced chunks")
            try:
                result: SweepResult = await sweep()
                break
            except ActivityError as err:
                failed = reason_of("sweep", err)
                if failed.error_type not in WAIT_TYPES or waited >= inp.max_wait_seconds:
                    raise run_failure(failed) from err
                workflow.set_current_details(
                    f"waiting {inp.retry_seconds} s ({failed.reason}); waited {waited} s"
                )
                await workflow.sleep(inp.retry_seconds)
                waited += inp.retry_seconds
        workflow.set_current_details(f"deleted {result.chunks_deleted} chunks")
        replica = await self._replica(inp)
        return {
            **result.model_dump(),
            "reconciled": reconciled,
            "waited_seconds": waited,
            "replica": replica.model_dump() if replica is not None else None,
        }

    async def _replica(self, inp: CollectGarbageInput) -> SweepResult | None:
        """The replica's retention and sweep (issue 17): waits while replications run,
        like the primary's for backups; None when there is no replica."""
        waited = 0
        while True:
            workflow.set_current_details("sweeping the replica")
            try:
                result = await sweep("replica")
                break
            except ActivityError as err:
                failed = reason_of("sweep of the replica", err)
                if failed.error_type not in WAIT_TYPES or waited >= inp.max_wait_seconds:
                    raise run_failure(failed) from err
                workflow.set_current_details(f"replica: waiting {inp.retry_seconds} s")
                await workflow.sleep(inp.retry_seconds)
                waited += inp.retry_seconds
        return None if result.note == "no replica is configured" else result
