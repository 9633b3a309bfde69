"""Shared pieces of the workflows: search attributes, retry policies, failure reasons."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar, cast, overload

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    TimeoutType,
)
from temporalio.exceptions import (
    TimeoutError as StepTimeout,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities import CsbsActivities
    from csbs import tuning
    from csbs.model import HostRoute
    from csbs.steps import SweepResult, SweepSite

SA_SERVER_ID = SearchAttributeKey.for_keyword("CsbsServerId")
SA_BACKUP_ID = SearchAttributeKey.for_keyword("CsbsBackupId")
SA_POLICY_ID = SearchAttributeKey.for_keyword("CsbsPolicyId")
SA_OPERATION = SearchAttributeKey.for_keyword("CsbsOperation")
SEARCH_ATTRIBUTES = [SA_SERVER_ID, SA_BACKUP_ID, SA_POLICY_ID, SA_OPERATION]

#: Short bookkeeping steps (catalog, driver calls).
STEP_TIMEOUT = timedelta(minutes=2)
#: Stopping a server: a graceful shutdown may take up to CSBS_SHUTDOWN_TIMEOUT (at most
#: 8 minutes) before the server is forced off.
POWER_TIMEOUT = timedelta(minutes=10)
#: Data transfer of one disk: long, but watched by heartbeats.
TRANSFER_TIMEOUT = timedelta(hours=24)
HEARTBEAT_TIMEOUT = tuning.HEARTBEAT_TIMEOUT

#: Retryable failures (S3, database or driver hiccups, a lost worker) are retried for
#: about 2.5 minutes (1, 2, 4, 8, 16, then every 30 s); transfers resume from their
#: checkpoint, so a retry costs little. Errors that need a person fail at once.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)
#: Clean-up must happen: retry it for much longer.
CLEANUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=60,
)

T = TypeVar("T")
A = TypeVar("A")


@overload
def local_step(
    step: Callable[[Any], T], *, cleanup: bool = False, timeout: timedelta = STEP_TIMEOUT
) -> Awaitable[T]: ...


@overload
def local_step(
    step: Callable[[Any, A], T],
    arg: A,
    *,
    cleanup: bool = False,
    timeout: timedelta = STEP_TIMEOUT,
) -> Awaitable[T]: ...


def local_step(
    step: Callable[..., Any],
    arg: Any = None,
    *,
    cleanup: bool = False,
    timeout: timedelta = STEP_TIMEOUT,
) -> Awaitable[Any]:
    """Run a short bookkeeping step (catalog record, snapshot, power) as a local activity:
    the worker that runs the workflow task runs it at once, with no round trip through a
    task queue, which keeps a small backup's end-to-end time near its data-bound time.
    ``step`` is a method of ``CsbsActivities``, ``arg`` its one input model. Clean-up
    steps (``cleanup``) retry far longer. Data transfers stay normal activities."""
    args = [] if arg is None else [arg]
    return workflow.execute_local_activity_method(
        cast(Any, step),
        args=args,
        start_to_close_timeout=timeout,
        retry_policy=CLEANUP_RETRY if cleanup else RETRY,
    )


def _queued(step: Callable[..., Any], *args: Any, **options: Any) -> Awaitable[Any]:
    """A step as a normal activity: any worker of the queue runs it."""
    return cast(Awaitable[Any], workflow.execute_activity_method(cast(Any, step), *args, **options))


def queued_step(step: Callable[[Any, A], T], arg: A, *, cleanup: bool = False) -> Awaitable[T]:
    """Run a bookkeeping step as a normal activity (any worker of the queue): for steps
    that may wait on other work, such as a delete's catalog transaction."""
    retry = CLEANUP_RETRY if cleanup else RETRY
    return _queued(step, arg, start_to_close_timeout=STEP_TIMEOUT, retry_policy=retry)


async def _on_agent(route: HostRoute, step: Callable[..., Any], arg: Any, **options: Any) -> Any:
    """A step on a host agent's queue. No agent taking it within the route's wait fails it
    at once with a reason that names the host (a retry goes back to the same queue, so an
    agent that returns in time picks up where the last one stopped)."""
    try:
        return await _queued(
            step,
            arg,
            task_queue=route.queue,
            schedule_to_start_timeout=timedelta(seconds=route.wait_seconds),
            **options,
        )
    except ActivityError as err:
        cause = err.cause
        if isinstance(cause, StepTimeout) and cause.type == TimeoutType.SCHEDULE_TO_START:
            raise ApplicationError(
                f"host {route.host} has no agent: no worker took the step within "
                f"{route.wait_seconds} s (run python worker.py --host {route.host} there)",
                type="HostUnavailable",
                non_retryable=True,
            ) from err
        raise


def on_host(
    route: HostRoute,
    step: Callable[[Any, A], T],
    arg: A,
    *,
    cleanup: bool = False,
    timeout: timedelta = STEP_TIMEOUT,
) -> Awaitable[T]:
    """A data-plane step of a server (snapshot, release, power): a local activity when
    this run's worker serves the server's host, else an activity on the host's agent."""
    if route.queue is None:
        return local_step(step, arg, cleanup=cleanup, timeout=timeout)
    retry = CLEANUP_RETRY if cleanup else RETRY
    # The step heartbeats while it runs (activities._kept_alive): a killed agent is
    # noticed within the heartbeat timeout and the step retried when an agent returns.
    options = {"heartbeat_timeout": HEARTBEAT_TIMEOUT, "retry_policy": retry}
    return cast(
        Awaitable[T], _on_agent(route, step, arg, start_to_close_timeout=timeout, **options)
    )


def transfer(
    step: Callable[[Any, A], T],
    arg: A,
    *,
    summary: str,
    timeout: timedelta = TRANSFER_TIMEOUT,
    route: HostRoute | None = None,
) -> Awaitable[T]:
    """Run a data transfer (a disk's backup, restore or verification, a check of every
    chunk) as a normal activity: any worker of the queue (of the server's host agent, on
    a ``route`` to one), heartbeats (a silent one is retried, resuming from its
    checkpoint), and cancellation that waits for the activity's clean-up."""
    options: dict[str, Any] = {
        "start_to_close_timeout": timeout,
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "retry_policy": RETRY,
        "cancellation_type": ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        "summary": summary,
    }
    if route is not None and route.queue is not None:
        return cast(Awaitable[T], _on_agent(route, step, arg, **options))
    return _queued(step, arg, **options)


#: A sweep may take hours on a large repository; it heartbeats every second in every
#: phase, so a silent one is given up after HEARTBEAT_TIMEOUT and retried.
SWEEP_TIMEOUT = timedelta(hours=6)


def sweep(site: str = "primary") -> Awaitable[SweepResult]:
    """Run one garbage-collection sweep (``collect_garbage``) of the worker's project (of
    its replica, with ``site="replica"``)."""
    return _queued(
        CsbsActivities.collect_garbage,
        SweepSite(site=site),
        start_to_close_timeout=SWEEP_TIMEOUT,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        retry_policy=RETRY,
        summary="sweep unreferenced chunks" + (" of the replica" if site == "replica" else ""),
    )


def tag(*pairs: SearchAttributeUpdate[Any]) -> None:
    """Upsert search attributes so the run is found by server, backup and operation."""
    workflow.upsert_search_attributes(list(pairs))


class StepFailed(Exception):
    """A step of the workflow failed; ``reason`` is what a person reads in the task."""

    def __init__(self, reason: str, error_type: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


def reason_of(step: str, err: BaseException) -> StepFailed:
    """Build the reason a person can act on: which step, then the root cause."""
    if isinstance(err, StepFailed):
        return err
    cause: BaseException = err
    while isinstance(cause, (ActivityError, ChildWorkflowError)) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return StepFailed(f"{step}: {cause.message}", cause.type or "ApplicationError")
    if isinstance(cause, (CancelledError, asyncio.CancelledError)):
        return StepFailed(f"{step}: cancelled", "Cancelled")
    message = getattr(cause, "message", None) or str(cause) or type(cause).__name__
    return StepFailed(f"{step}: {message}", type(cause).__name__)


async def step(name: str, awaitable: Awaitable[T]) -> T:
    """Await a step, converting its failure into a StepFailed naming it. A step that
    reports it was cancelled was cancelled by this run (the run itself is being cancelled,
    or a sibling failed): that stays a cancellation, so that a cancelled run ends
    ``Canceled`` and not ``Failed``."""
    try:
        return await awaitable
    except (ActivityError, ApplicationError) as err:
        if isinstance(err, ActivityError) and isinstance(err.cause, CancelledError):
            raise asyncio.CancelledError(f"{name}: cancelled") from err
        raise reason_of(name, err) from err


def run_failure(failed: StepFailed) -> ApplicationError:
    """The run's own failure: the step's reason, typed, never retried."""
    return ApplicationError(failed.reason, type=failed.error_type, non_retryable=True)


async def fail_run(
    what: str, err: BaseException, record: Callable[[str], Awaitable[Any]]
) -> NoReturn:
    """A run's step failed with ``err``: ``record`` the reason (its clean-up step), then
    end the run: cancelled when it was cancelled, else failed with the reason."""
    failed = reason_of(what, err)
    await record(failed.reason)
    if isinstance(err, asyncio.CancelledError):
        raise err
    raise run_failure(failed) from err


async def validated(awaitable: Awaitable[T], what: str = "validate") -> T:
    """Await the step that validates a request: its failure fails the run at once, with
    the reason (``validate: server s1 is stopped``); nothing was started to clean up."""
    try:
        return await awaitable
    except Exception as err:
        raise run_failure(reason_of(what, err)) from err


class DiskProgress:
    """The progress of a run that works disk by disk (``progress`` query and the run's
    current details): its step, and disks done of total."""

    def __init__(self) -> None:
        self._progress: dict[str, Any] = {"step": "starting", "disks_done": 0, "disks_total": 0}
        #: Where the server's data-plane steps run (known once the request is validated).
        self._route = HostRoute()

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        """Where the run is: its step, backup and task ids, disks done of total."""
        return self._progress

    def _at(self, step_name: str, **extra: Any) -> None:
        self._progress.update(step=step_name, **extra)
        done, total = self._progress["disks_done"], self._progress["disks_total"]
        workflow.set_current_details(f"{step_name}; disks {done}/{total}" if total else step_name)

    async def _disk_step(self, name: str, awaitable: Awaitable[T], then: str) -> T:
        """Await one disk's step (named ``name`` in a failure), then count it done."""
        result = await step(name, awaitable)
        self._progress["disks_done"] += 1
        self._at(then)
        return result


async def all_or_cancel(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Run steps in parallel; on the first failure cancel the rest and wait for them."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
