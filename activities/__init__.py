"""Temporal activities: thin adapters from the workflows to ``csbs.services``.

They hold no business rules. They turn core errors into typed ``ApplicationError``s
(non-retryable unless the core says otherwise), turn progress into heartbeats, and pick
the resume point of a retried transfer from the last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.service import RPCError, RPCStatusCode

from activities import metrics
from csbs.catalog import BackupView
from csbs.errors import CsbsError
from csbs.model import (
    InstantResult,
    PolicyRunPlan,
    PreparedBackup,
    RestorePlan,
    RetentionPlan,
    TransferStats,
    VerifyDiskResult,
    VerifyPlan,
)
from csbs.policy_service import PolicyService
from csbs.services import Services
from csbs.steps import (
    BackupIds,
    BackupsToVerify,
    CheckRestore,
    DeletePlan,
    FailTask,
    FinishReplicate,
    FinishRestore,
    FinishVerify,
    InstantRestore,
    OfBackup,
    OfDisk,
    OfPolicy,
    OfServer,
    OfTask,
    PlanPolicyRun,
    PolicyIds,
    PolicyRefusal,
    PolicySkips,
    PrepareBackup,
    PrepareDelete,
    PrepareRestore,
    Reconciled,
    RefuseBackup,
    RefuseRestore,
    ReleaseSnapshot,
    ReplicatePlan,
    ReplicateResult,
    RestoreDisk,
    SnapshotTaken,
    SweepResult,
    SweepSite,
    VerifySummary,
)
from csbs.telemetry import set_attributes, step_span

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


def _typed_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CsbsError as exc:
            raise ApplicationError(
                str(exc), type=exc.type_name, non_retryable=not exc.retryable
            ) from exc

    return wrapper


def _kept_alive(fn: Callable[P, R]) -> Callable[P, R]:
    """Heartbeat while a short step runs, when its run asked for heartbeats (a step on a
    host agent's queue): an agent killed in the middle of it is noticed within the
    heartbeat timeout, not the step's whole timeout, and the step is retried."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        timeout = activity.info().heartbeat_timeout if activity.in_activity() else None
        if not timeout or activity.info().is_local:
            return fn(*args, **kwargs)
        done = threading.Event()
        beat = contextvars.copy_context()

        def keep_alive() -> None:
            while not done.wait(timeout.total_seconds() / 3):
                beat.run(activity.heartbeat)

        thread = threading.Thread(target=keep_alive, name="keep-alive", daemon=True)
        thread.start()
        try:
            return fn(*args, **kwargs)
        finally:
            done.set()
            thread.join()

    return wrapper


def _step(name: str, keep_alive: bool = False) -> Callable[[F], F]:
    """Register a method as the activity ``name``, its core errors typed (``_typed_errors``).
    Cancellation is cooperative: the SDK never raises an exception into the activity's
    thread (it can land at any bytecode, inside a lock's ``with`` or a thread pool's
    start-up, and wedge the whole worker); long steps see it at their next heartbeat.
    ``keep_alive``: a short step that does not heartbeat itself (see ``_kept_alive``)."""

    def register(fn: F) -> F:
        typed: F = _typed_errors(_kept_alive(fn) if keep_alive else fn)  # type: ignore[assignment]
        return activity.defn(name=name, no_thread_cancel_exception=True)(typed)

    return register


def _heartbeat(details: dict[str, Any]) -> None:
    activity.heartbeat(details)
    if activity.is_cancelled():
        raise CancelledError("activity cancelled")


def _stats_attributes(span: Any, stats: TransferStats) -> None:
    """Bytes and chunk counts of a transfer on its span."""
    set_attributes(span, **{k: v for k, v in stats.model_dump().items() if v})


def _resume_details() -> dict[str, Any]:
    details = activity.info().heartbeat_details
    if details and isinstance(details[0], dict):
        return details[0]
    return {}


def _run_id() -> str:
    return activity.info().workflow_run_id or ""


#: How a closed run's status reads in a reason.
_CLOSED = {
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "continued as new",
    WorkflowExecutionStatus.TIMED_OUT: "timed out",
}


class CsbsActivities:
    """Every activity of csbs, bound to one service instance.

    With a Temporal ``client`` (and the event loop it runs on), the service can ask
    whether the run behind a task has closed, so that operations whose runs were
    terminated or timed out are reconciled instead of holding their locks forever.
    """

    def __init__(
        self,
        services: Services,
        client: Client | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.services = services
        self.policies = PolicyService(services.catalog, services.driver, services.store)
        self.client, self.loop = client, loop
        if client is not None and loop is not None:
            services.closed_run = self._closed_run

    def _closed_run(self, workflow_id: str, run_id: str | None) -> str | None:
        """Why the run is closed ("its workflow backup-x was terminated"), or None while
        it runs or when Temporal cannot be asked (then nothing is reconciled)."""
        assert self.client is not None and self.loop is not None
        client = self.client

        async def ask() -> str | None:
            handle = client.get_workflow_handle(workflow_id, run_id=run_id or None)
            try:
                desc = await handle.describe()
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return f"its workflow {workflow_id} no longer exists"
                raise
            if desc.status in (None, WorkflowExecutionStatus.RUNNING):
                return None
            return f"its workflow {workflow_id} was {_CLOSED.get(desc.status, 'closed')}"

        try:
            return asyncio.run_coroutine_threadsafe(ask(), self.loop).result(timeout=30)
        except Exception:
            return None

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.prepare_backup,
            self.take_snapshot,
            self.backup_disk,
            self.commit_backup,
            self.fail_backup,
            self.refuse_backup,
            self.release_snapshot,
            self.prepare_restore,
            self.refuse_restore,
            self.stop_server,
            self.start_server,
            self.check_restore,
            self.restore_disk,
            self.instant_restore,
            self.finish_restore,
            self.prepare_delete,
            self.delete_backup,
            self.fail_delete,
            self.collect_garbage,
            self.reconcile_operations,
            self.plan_policy_run,
            self.record_policy_skips,
            self.record_policy_refusal,
            self.policy_expired_backups,
            self.list_policy_ids,
            self.prepare_verify,
            self.verify_disk,
            self.finish_verify,
            self.backups_to_verify,
            self.prepare_replicate,
            self.replicate_backup,
            self.finish_replicate,
        ]

    def data_plane(self) -> list[Callable[..., Any]]:
        """What a host agent serves for the servers of its host: snapshot, reads and
        uploads, restore writes and power. Chunks go from there straight to S3."""
        return [
            self.take_snapshot,
            self.backup_disk,
            self.release_snapshot,
            self.stop_server,
            self.start_server,
            self.restore_disk,
            self.instant_restore,
        ]

    # -- backup ------------------------------------------------------------------------------
    @_step("prepare_backup")
    def prepare_backup(self, inp: PrepareBackup) -> PreparedBackup:
        return self.services.backup.prepare_backup(
            inp.request, inp.backup_id, inp.task_id, activity.info().workflow_id or "", _run_id()
        )

    @_step("take_snapshot", keep_alive=True)
    def take_snapshot(self, inp: OfBackup) -> SnapshotTaken:
        with step_span("csbs.snapshot", backup_id=inp.backup_id) as span:
            disks = self.services.backup.take_snapshot(inp.backup_id)
            set_attributes(span, disks=len(disks), disk_ids=",".join(disks))
            return SnapshotTaken(disk_ids=disks)

    @_step("backup_disk")
    def backup_disk(self, inp: OfDisk) -> TransferStats:
        # A retried attempt resumes from the checkpoint its predecessor saved in S3.
        resume = activity.info().attempt > 1
        with step_span(
            "csbs.transfer", backup_id=inp.backup_id, disk_id=inp.disk_id, resumed=resume
        ) as span:
            stats = self.services.backup.backup_disk(
                inp.backup_id, inp.disk_id, resume=resume, heartbeat=_heartbeat
            )
            _stats_attributes(span, stats)
        metrics.transfer("backup", stats)
        return stats

    @_step("commit_backup")
    def commit_backup(self, inp: OfTask) -> BackupView:
        record = self.services.backup.commit_backup(inp.backup_id, inp.task_id)
        metrics.backup_committed(record)
        return record

    @_step("fail_backup")
    def fail_backup(self, inp: FailTask) -> None:
        self.services.backup.fail_backup(inp.backup_id, inp.task_id, inp.reason, _run_id())

    @_step("refuse_backup")
    def refuse_backup(self, inp: RefuseBackup) -> None:
        self.services.backup.refuse_backup(
            inp.request,
            inp.backup_id,
            inp.task_id,
            inp.reason,
            activity.info().workflow_id or "",
            _run_id(),
        )

    @_step("release_snapshot", keep_alive=True)
    def release_snapshot(self, inp: ReleaseSnapshot) -> None:
        self.services.backup.release_snapshot(inp.server_id, inp.backup_id, inp.committed)

    # -- restore -----------------------------------------------------------------------------
    @_step("prepare_restore")
    def prepare_restore(self, inp: PrepareRestore) -> RestorePlan:
        return self.services.restore.prepare_restore(
            inp.request, inp.task_id, activity.info().workflow_id or "", _run_id()
        )

    @_step("refuse_restore")
    def refuse_restore(self, inp: RefuseRestore) -> None:
        self.services.restore.refuse_restore(
            inp.request, inp.task_id, inp.reason, activity.info().workflow_id or "", _run_id()
        )

    @_step("stop_server", keep_alive=True)
    def stop_server(self, inp: OfServer) -> str | None:
        return self.services.restore.stop_server(inp.server_id, inp.task_id)

    @_step("start_server", keep_alive=True)
    def start_server(self, inp: OfServer) -> None:
        self.services.restore.start_server(inp.server_id)

    @_step("check_restore")
    def check_restore(self, inp: CheckRestore) -> None:
        self.services.restore.check_restore(
            inp.backup_id, inp.disk_ids, heartbeat=_heartbeat, from_replica=inp.from_replica
        )

    @_step("restore_disk")
    def restore_disk(self, inp: RestoreDisk) -> TransferStats:
        done = int(_resume_details().get("done", 0))
        item = inp.item
        with step_span(
            "csbs.restore",
            backup_id=inp.backup_id,
            disk_id=item.source_disk_id,
            target_disk_id=item.target_disk_id,
            resumed_at_chunk=done or None,
        ) as span:
            stats = self.services.restore.restore_disk(
                inp.backup_id, item, done=done, heartbeat=_heartbeat, from_replica=inp.from_replica
            )
            _stats_attributes(span, stats)
        metrics.transfer("restore", stats)
        return stats

    @_step("instant_restore")
    def instant_restore(self, inp: InstantRestore) -> InstantResult:
        info = activity.info()

        def running() -> None:
            # The workflow learns the server runs (its progress and the CLI say so) while
            # this step goes on serving the disks until they are copied.
            self._signal(info.workflow_id or "", info.workflow_run_id, "instant_running")

        with step_span(
            "csbs.instant_restore", backup_id=inp.plan.backup_id, server_id=inp.plan.server_id
        ):
            return self.services.restore.instant_restore(
                inp.plan, heartbeat=_heartbeat, running=running
            )

    def _signal(self, workflow_id: str, run_id: str | None, signal: str) -> None:
        """Signal a workflow run from an activity's thread (no-op without a client)."""
        if self.client is None or self.loop is None or not workflow_id:
            return
        handle = self.client.get_workflow_handle(workflow_id, run_id=run_id or None)
        asyncio.run_coroutine_threadsafe(handle.signal(signal), self.loop).result(timeout=30)

    @_step("finish_restore")
    def finish_restore(self, inp: FinishRestore) -> None:
        self.services.restore.finish_restore(inp.backup_id, inp.task_id, inp.ok, inp.reason)

    # -- delete ------------------------------------------------------------------------------
    @_step("prepare_delete")
    def prepare_delete(self, inp: PrepareDelete) -> DeletePlan:
        targets = self.services.delete.prepare_delete(
            inp.request, inp.task_id, activity.info().workflow_id or "", _run_id()
        )
        return DeletePlan(targets=targets)

    @_step("delete_backup")
    def delete_backup(self, inp: OfTask) -> None:
        self.services.delete.delete_backup(inp.backup_id, inp.task_id)

    @_step("fail_delete")
    def fail_delete(self, inp: FailTask) -> None:
        self.services.delete.fail_delete(inp.backup_id, inp.task_id, inp.reason)

    @_step("collect_garbage")
    def collect_garbage(self, inp: SweepSite | None = None) -> SweepResult:
        # Every attempt of this activity is one owner: a retry that Temporal started
        # because the previous attempt went silent takes its lease over at once.
        info = activity.info()
        owner = hashlib.sha256(f"{info.workflow_run_id}/{info.activity_id}".encode())
        return self.services.delete.collect_garbage(
            heartbeat=_heartbeat,
            owner=owner.hexdigest()[:16],
            site=inp.site if inp is not None else "primary",
        )

    @_step("reconcile_operations")
    def reconcile_operations(self) -> Reconciled:
        return Reconciled(count=self.services.reconcile())

    # -- policies ----------------------------------------------------------------------------
    @_step("plan_policy_run")
    def plan_policy_run(self, inp: PlanPolicyRun) -> PolicyRunPlan:
        return self.policies.plan_run(inp.policy_id, inp.trigger)

    @_step("record_policy_refusal")
    def record_policy_refusal(self, inp: PolicyRefusal) -> None:
        self.policies.record_refusal(inp.policy_id, inp.trigger, inp.reason, inp.run_id)

    @_step("record_policy_skips")
    def record_policy_skips(self, inp: PolicySkips) -> None:
        self.policies.record_skips(inp.policy_id, inp.skipped, inp.run_id)

    @_step("policy_expired_backups")
    def policy_expired_backups(self, inp: OfPolicy) -> RetentionPlan:
        return self.policies.retention(inp.policy_id)

    @_step("list_policy_ids")
    def list_policy_ids(self) -> PolicyIds:
        return PolicyIds(policy_ids=[p.id for p in self.policies.policies.all()])

    # -- verify ------------------------------------------------------------------------------
    @_step("prepare_verify")
    def prepare_verify(self, inp: OfTask) -> VerifyPlan:
        return self.services.verify.prepare_verify(
            inp.backup_id, inp.task_id, activity.info().workflow_id or "", replica=inp.replica
        )

    @_step("verify_disk")
    def verify_disk(self, inp: OfDisk) -> VerifyDiskResult:
        with step_span("csbs.verify", backup_id=inp.backup_id, disk_id=inp.disk_id) as span:
            result = self.services.verify.verify_disk(
                inp.backup_id, inp.disk_id, heartbeat=_heartbeat, replica=inp.replica
            )
            set_attributes(
                span,
                chunks_checked=result.chunks_checked,
                bytes_checked=result.bytes_checked,
                problems=len(result.problems),
            )
        return result

    @_step("finish_verify")
    def finish_verify(self, inp: FinishVerify) -> VerifySummary:
        return self.services.verify.finish_verify(
            inp.backup_id, inp.task_id, inp.results, inp.error, replica=inp.replica
        )

    @_step("backups_to_verify")
    def backups_to_verify(self, inp: BackupsToVerify) -> BackupIds:
        return BackupIds(backup_ids=self.services.verify.backups_to_verify(inp.max_age_days))

    # -- replicate ---------------------------------------------------------------------------
    @_step("prepare_replicate")
    def prepare_replicate(self, inp: OfTask) -> ReplicatePlan:
        return self.services.replicate.prepare_replicate(
            inp.backup_id, inp.task_id, activity.info().workflow_id or "", _run_id()
        )

    @_step("replicate_backup")
    def replicate_backup(self, inp: ReplicatePlan) -> ReplicateResult:
        with step_span("csbs.replicate", backup_id=inp.backup_id) as span:
            result = self.services.replicate.replicate_backup(
                inp.backup_id, inp.parent_id, heartbeat=_heartbeat
            )
            set_attributes(
                span,
                chunks_copied=result.chunks_copied,
                bytes_copied=result.bytes_copied,
                chunks_checked=result.chunks_checked,
            )
        return result

    @_step("finish_replicate")
    def finish_replicate(self, inp: FinishReplicate) -> None:
        self.services.replicate.finish_replicate(inp.backup_id, inp.task_id, inp.result, inp.error)
