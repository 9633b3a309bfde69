"""``CollectGarbage``: sweep chunks that no manifest references any more (D1)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ConfigDict, ValidationError

from workflows.common import RETRY, SA_OPERATION, tag


class CollectGarbageInput(BaseModel):
    """Input of ``CollectGarbage`` (the worker's project is swept)."""

    model_config = ConfigDict(extra="forbid")


@workflow.defn(name="CollectGarbage", failure_exception_types=[ValidationError])
class CollectGarbage:
    """Mark every chunk referenced by a manifest, delete the rest; never beside a backup."""

    @workflow.run
    async def run(self, inp: CollectGarbageInput | None = None) -> dict[str, Any]:
        tag(SA_OPERATION.value_set("gc"))
        workflow.set_current_details("sweeping unreferenced chunks")
        result: dict[str, Any] = await workflow.execute_activity(
            "collect_garbage",
            result_type=dict[str, Any],
            start_to_close_timeout=timedelta(hours=6),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=RETRY,
        )
        workflow.set_current_details(f"deleted {result['chunks_deleted']} chunks")
        return result
