"""Workflow branches on Temporal's time-skipping test server, with mocked activities: the
durable waits of ``CollectGarbage`` (issue 14) take no wall-clock time here."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from csbs.steps import Reconciled, SweepResult, SweepSite
from workflows import CollectGarbage


@pytest.fixture
def env(time_skipping_env: WorkflowEnvironment) -> WorkflowEnvironment:
    return time_skipping_env


def sweeps(outcomes: list[str]) -> tuple[list[Callable[..., Any]], list[str]]:
    """Mock activities: ``collect_garbage`` raises the typed error named by each outcome in
    turn ("ok" sweeps); the list records the calls."""
    calls: list[str] = []

    @activity.defn(name="reconcile_operations")
    async def reconcile() -> Reconciled:
        calls.append("reconcile")
        return Reconciled(count=1)

    @activity.defn(name="collect_garbage")
    async def sweep(site: SweepSite | None = None) -> SweepResult:
        if site is not None and site.site == "replica":
            return SweepResult(
                manifests=0, chunks=0, chunks_deleted=0, bytes_freed=0, site="replica",
                note="no replica is configured",
            )  # fmt: skip
        outcome = outcomes[min(len(calls) - 1, len(outcomes) - 1)]
        calls.append(outcome)
        if outcome != "ok":
            raise ApplicationError(f"{outcome} for the test", type=outcome, non_retryable=True)
        return SweepResult(manifests=2, chunks=9, chunks_deleted=3, bytes_freed=300)

    return [reconcile, sweep], calls


async def run_gc(env: WorkflowEnvironment, outcomes: list[str], inp: dict[str, Any]) -> Any:
    activities, calls = sweeps(outcomes)
    queue = f"ts-{uuid.uuid4().hex[:8]}"
    async with Worker(
        env.client, task_queue=queue, workflows=[CollectGarbage], activities=activities
    ):
        result = await env.client.execute_workflow(
            "CollectGarbage", inp, id=f"gc-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
    return result, calls


async def test_a_deferred_sweep_waits_durably_and_then_sweeps(env: WorkflowEnvironment) -> None:
    outcomes = ["GarbageCollectionDeferred", "GarbageCollectionRunning", "ok"]
    result, calls = await run_gc(env, outcomes, {"retry_seconds": 600})
    assert calls == ["reconcile", *outcomes]
    assert result["waited_seconds"] == 1200 and result["chunks_deleted"] == 3
    assert result["reconciled"] == 1 and result["replica"] is None


async def test_a_sweep_gives_up_after_its_longest_wait_with_the_reason(
    env: WorkflowEnvironment,
) -> None:
    with pytest.raises(WorkflowFailureError) as failure:
        await run_gc(
            env, ["GarbageCollectionDeferred"], {"retry_seconds": 3600, "max_wait_seconds": 7200}
        )
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "GarbageCollectionDeferred"
    assert "GarbageCollectionDeferred for the test" in cause.message


async def test_a_sweep_that_cannot_read_a_manifest_fails_at_once(env: WorkflowEnvironment) -> None:
    with pytest.raises(WorkflowFailureError) as failure:
        await run_gc(env, ["UnreadableManifest", "ok"], {"retry_seconds": 1})
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "UnreadableManifest"
