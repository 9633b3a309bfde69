"""Every workflow's branches on Temporal's time-skipping test server, with the activities
replaced by fakes (issue 19): failure paths, clean-up, cancellation and retries. They
assert what an operator sees: the run's outcome and reason, and which steps ran (a
snapshot always released, a failed backup always recorded, a server never stopped for a
restore that cannot go ahead)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from csbs import steps as st
from csbs import tuning
from csbs.catalog import BackupView
from csbs.model import (
    BackupServerInput,
    DeleteBackupsInput,
    PolicyRunPlan,
    PreparedBackup,
    ReplicateBackupInput,
    RestoreItem,
    RestorePlan,
    RestoreServerInput,
    RetentionPlan,
    RunPolicyInput,
    TransferStats,
    VerifyBackupInput,
    VerifyDiskResult,
    VerifyPlan,
)
from workflows import ALL_WORKFLOWS

Behaviour = Callable[[Any], Any]


def refuse(message: str, type: str = "InvalidState") -> Behaviour:
    def raise_(_: Any) -> Any:
        raise ApplicationError(message, type=type, non_retryable=True)

    return raise_


class Fakes:
    """Fake activities under the real names; each call is recorded as ``(name, input)``.
    ``plan`` maps a name to a function of the input (raise to fail the step)."""

    def __init__(self, **plan: Behaviour) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.plan = plan
        self.attempts: dict[str, int] = {}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def inputs(self, name: str) -> list[Any]:
        return [inp for n, inp in self.calls if n == name]

    async def _run(self, name: str, inp: Any, default: Any) -> Any:
        self.calls.append((name, inp))
        self.attempts[name] = activity.info().attempt
        behaviour = self.plan.get(name)
        if behaviour is None:
            return default
        result = behaviour(inp)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def activities(self) -> list[Callable[..., Any]]:
        f = self

        @activity.defn(name="prepare_backup")
        async def prepare_backup(inp: st.PrepareBackup) -> PreparedBackup:
            prepared = PreparedBackup(
                backup_id=inp.backup_id,
                task_id=inp.task_id,
                name="b",
                server_id=inp.request.server_id,
                server_name="s",
                disk_ids=["d1", "d2"],
                parent_id=None,
            )
            return await f._run("prepare_backup", inp, prepared)  # type: ignore[no-any-return]

        @activity.defn(name="take_snapshot")
        async def take_snapshot(inp: st.OfBackup) -> st.SnapshotTaken:
            taken = st.SnapshotTaken(disk_ids=["d1", "d2"])
            return await f._run("take_snapshot", inp, taken)  # type: ignore[no-any-return]

        @activity.defn(name="backup_disk")
        async def backup_disk(inp: st.OfDisk) -> TransferStats:
            return await f._run("backup_disk", inp, TransferStats())  # type: ignore[no-any-return]

        @activity.defn(name="commit_backup")
        async def commit_backup(inp: st.OfTask) -> BackupView:
            return await f._run("commit_backup", inp, view(inp.backup_id))  # type: ignore[no-any-return]

        @activity.defn(name="fail_backup")
        async def fail_backup(inp: st.FailTask) -> None:
            await f._run("fail_backup", inp, None)

        @activity.defn(name="refuse_backup")
        async def refuse_backup(inp: st.RefuseBackup) -> None:
            await f._run("refuse_backup", inp, None)

        @activity.defn(name="refuse_restore")
        async def refuse_restore(inp: st.RefuseRestore) -> None:
            await f._run("refuse_restore", inp, None)

        @activity.defn(name="release_snapshot")
        async def release_snapshot(inp: st.ReleaseSnapshot) -> None:
            await f._run("release_snapshot", inp, None)

        @activity.defn(name="stop_server")
        async def stop_server(inp: st.OfServer) -> None:
            await f._run("stop_server", inp, None)

        @activity.defn(name="start_server")
        async def start_server(inp: st.OfServer) -> None:
            await f._run("start_server", inp, None)

        @activity.defn(name="prepare_restore")
        async def prepare_restore(inp: st.PrepareRestore) -> RestorePlan:
            plan = RestorePlan(
                backup_id=inp.request.backup_id,
                backup_name="b",
                task_id=inp.task_id,
                server_id="srv-1",
                items=[
                    RestoreItem(source_disk_id=d, target_disk_id=d, size_bytes=1)
                    for d in ("d1", "d2")
                ],
            )
            return await f._run("prepare_restore", inp, plan)  # type: ignore[no-any-return]

        @activity.defn(name="check_restore")
        async def check_restore(inp: st.CheckRestore) -> None:
            await f._run("check_restore", inp, None)

        @activity.defn(name="restore_disk")
        async def restore_disk(inp: st.RestoreDisk) -> TransferStats:
            return await f._run("restore_disk", inp, TransferStats())  # type: ignore[no-any-return]

        @activity.defn(name="finish_restore")
        async def finish_restore(inp: st.FinishRestore) -> None:
            await f._run("finish_restore", inp, None)

        @activity.defn(name="prepare_delete")
        async def prepare_delete(inp: st.PrepareDelete) -> st.DeletePlan:
            targets = [
                st.DeleteTarget(b, f"{inp.task_id}-{i}")
                for i, b in enumerate(inp.request.backup_ids)
            ]
            return await f._run("prepare_delete", inp, st.DeletePlan(targets=targets))  # type: ignore[no-any-return]

        @activity.defn(name="delete_backup")
        async def delete_backup(inp: st.OfTask) -> None:
            await f._run("delete_backup", inp, None)

        @activity.defn(name="fail_delete")
        async def fail_delete(inp: st.FailTask) -> None:
            await f._run("fail_delete", inp, None)

        @activity.defn(name="collect_garbage")
        async def collect_garbage(inp: st.SweepSite | None = None) -> st.SweepResult:
            swept = st.SweepResult(manifests=1, chunks=4, chunks_deleted=2, bytes_freed=20)
            return await f._run("collect_garbage", inp, swept)  # type: ignore[no-any-return]

        @activity.defn(name="reconcile_operations")
        async def reconcile_operations() -> st.Reconciled:
            return await f._run("reconcile_operations", None, st.Reconciled(count=0))  # type: ignore[no-any-return]

        @activity.defn(name="plan_policy_run")
        async def plan_policy_run(inp: st.PlanPolicyRun) -> PolicyRunPlan:
            plan = PolicyRunPlan(policy_id=inp.policy_id, server_ids=["srv-1", "srv-2"])
            return await f._run("plan_policy_run", inp, plan)  # type: ignore[no-any-return]

        @activity.defn(name="record_policy_refusal")
        async def record_policy_refusal(inp: st.PolicyRefusal) -> None:
            await f._run("record_policy_refusal", inp, None)

        @activity.defn(name="record_policy_skips")
        async def record_policy_skips(inp: st.PolicySkips) -> None:
            await f._run("record_policy_skips", inp, None)

        @activity.defn(name="policy_expired_backups")
        async def policy_expired_backups(inp: st.OfPolicy) -> RetentionPlan:
            return await f._run("policy_expired_backups", inp, RetentionPlan())  # type: ignore[no-any-return]

        @activity.defn(name="list_policy_ids")
        async def list_policy_ids() -> st.PolicyIds:
            return await f._run("list_policy_ids", None, st.PolicyIds(policy_ids=[]))  # type: ignore[no-any-return]

        @activity.defn(name="prepare_verify")
        async def prepare_verify(inp: st.OfTask) -> VerifyPlan:
            plan = VerifyPlan(
                backup_id=inp.backup_id,
                backup_name="b",
                server_id="srv-1",
                task_id=inp.task_id,
                disk_ids=["d1"],
            )
            return await f._run("prepare_verify", inp, plan)  # type: ignore[no-any-return]

        @activity.defn(name="verify_disk")
        async def verify_disk(inp: st.OfDisk) -> VerifyDiskResult:
            result = VerifyDiskResult(disk_id=inp.disk_id, chunks_checked=1, bytes_checked=1)
            return await f._run("verify_disk", inp, result)  # type: ignore[no-any-return]

        @activity.defn(name="finish_verify")
        async def finish_verify(inp: st.FinishVerify) -> st.VerifySummary:
            problems = [p for r in inp.results for p in r.problems]
            summary = st.VerifySummary(
                backup_id=inp.backup_id,
                ok=not problems and inp.error is None,
                chunks_checked=1,
                bytes_checked=1,
                problems=problems,
                reason=inp.error or (f"{len(problems)} problem(s)" if problems else None),
            )
            return await f._run("finish_verify", inp, summary)  # type: ignore[no-any-return]

        @activity.defn(name="backups_to_verify")
        async def backups_to_verify(inp: st.BackupsToVerify) -> st.BackupIds:
            return await f._run("backups_to_verify", inp, st.BackupIds(backup_ids=[]))  # type: ignore[no-any-return]

        @activity.defn(name="prepare_replicate")
        async def prepare_replicate(inp: st.OfTask) -> st.ReplicatePlan:
            plan = st.ReplicatePlan(backup_id=inp.backup_id, task_id=inp.task_id, server_id="s")
            return await f._run("prepare_replicate", inp, plan)  # type: ignore[no-any-return]

        @activity.defn(name="replicate_backup")
        async def replicate_backup(inp: st.ReplicatePlan) -> st.ReplicateResult:
            done = st.ReplicateResult(
                backup_id=inp.backup_id, chunks_referenced=2, chunks_checked=2,
                chunks_copied=2, bytes_copied=2, manifests=1, seconds=0.1,
            )  # fmt: skip
            return await f._run("replicate_backup", inp, done)  # type: ignore[no-any-return]

        @activity.defn(name="finish_replicate")
        async def finish_replicate(inp: st.FinishReplicate) -> None:
            await f._run("finish_replicate", inp, None)

        return [
            prepare_replicate,
            replicate_backup,
            finish_replicate,
            prepare_backup,
            take_snapshot,
            backup_disk,
            commit_backup,
            fail_backup,
            refuse_backup,
            refuse_restore,
            release_snapshot,
            stop_server,
            start_server,
            prepare_restore,
            check_restore,
            restore_disk,
            finish_restore,
            prepare_delete,
            delete_backup,
            fail_delete,
            collect_garbage,
            reconcile_operations,
            plan_policy_run,
            record_policy_skips,
            record_policy_refusal,
            policy_expired_backups,
            list_policy_ids,
            prepare_verify,
            verify_disk,
            finish_verify,
            backups_to_verify,
        ]


def view(backup_id: str) -> BackupView:
    return BackupView.model_validate(
        {
            "id": backup_id,
            "name": "b",
            "description": "",
            "server_id": "srv-1",
            "server_name": "s",
            "server_type": "local",
            "status": "available",
            "kind": "manual",
            "policy_id": None,
            "parent_id": None,
            "created_at": None,
            "finished_at": None,
            "progress": 100,
            "size_bytes": 0,
            "stored_bytes": 0,
            "disks": [],
            "snapshot_at": None,
            "data_bytes": 0,
            "error": None,
            "project": "default",
            "verified_at": None,
            "verify_status": None,
            "verify_error": None,
        }
    )


class Run:
    """A worker with the fakes on its own queue while the block runs."""

    def __init__(self, env: WorkflowEnvironment, fakes: Fakes) -> None:
        self.env, self.fakes = env, fakes
        self.queue = f"ts-{uuid.uuid4().hex[:8]}"

    async def __aenter__(self) -> Run:
        self.worker = Worker(
            self.env.client,
            task_queue=self.queue,
            workflows=ALL_WORKFLOWS,
            activities=self.fakes.activities(),
        )
        await self.worker.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.worker.__aexit__(*exc)

    async def start(self, workflow: str, inp: Any) -> WorkflowHandle[Any, Any]:
        return await self.env.client.start_workflow(
            workflow, inp, id=f"{workflow}-{uuid.uuid4().hex[:8]}", task_queue=self.queue
        )


async def outcome(
    env: WorkflowEnvironment, fakes: Fakes, workflow: str, inp: Any
) -> tuple[Any, ApplicationError | None]:
    """Run the workflow to its end: (result, None), or (None, the application error)."""
    async with Run(env, fakes) as run:
        handle = await run.start(workflow, inp)
        try:
            return await handle.result(), None
        except WorkflowFailureError as err:
            assert isinstance(err.cause, ApplicationError), err.cause
            return None, err.cause


@pytest.fixture
def env(
    time_skipping_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> WorkflowEnvironment:
    """The session's time-skipping server; transfers heartbeat-timed at 2 s, so that a
    cancellation reaches a fake transfer within a heartbeat or two."""
    monkeypatch.setattr(tuning, "HEARTBEAT_TIMEOUT", timedelta(seconds=2))
    return time_skipping_env


# -- BackupServer -------------------------------------------------------------------------------
async def test_a_backup_uploads_every_disk_then_commits_and_releases_its_snapshot(
    env: WorkflowEnvironment,
) -> None:
    fakes = Fakes()
    result, error = await outcome(env, fakes, "BackupServer", BackupServerInput(server_id="s1"))
    assert error is None and result["status"] == "available"
    assert fakes.names()[:2] == ["prepare_backup", "take_snapshot"]
    assert sorted(i.disk_id for i in fakes.inputs("backup_disk")) == ["d1", "d2"]
    assert fakes.names()[-2:] == ["commit_backup", "release_snapshot"]
    assert fakes.inputs("release_snapshot")[0].committed is True
    assert "fail_backup" not in fakes.names()


async def test_a_refused_backup_records_the_reason_and_takes_no_snapshot(
    env: WorkflowEnvironment,
) -> None:
    fakes = Fakes(prepare_backup=refuse("server s1 is stopped", "InvalidState"))
    _, error = await outcome(env, fakes, "BackupServer", BackupServerInput(server_id="s1"))
    assert error is not None and error.type == "InvalidState"
    assert error.message == "validate: server s1 is stopped"
    assert fakes.names() == ["prepare_backup", "refuse_backup"]
    refusal = fakes.inputs("refuse_backup")[0]
    assert refusal.reason == "validate: server s1 is stopped"  # B10: recorded with its reason
    assert refusal.request.server_id == "s1" and refusal.backup_id.startswith("bk-")


async def test_a_failed_disk_cancels_the_others_and_fails_the_backup_with_its_reason(
    env: WorkflowEnvironment,
) -> None:
    async def upload(inp: st.OfDisk) -> TransferStats:
        if inp.disk_id == "d2":
            raise ApplicationError("S3 refused the write", type="StorageError", non_retryable=True)
        while True:  # d1 is long: it must be cancelled, not awaited
            activity.heartbeat()
            await asyncio.sleep(1)

    fakes = Fakes(backup_disk=upload)
    _, error = await outcome(env, fakes, "BackupServer", BackupServerInput(server_id="s1"))
    assert error is not None and error.type == "StorageError"
    assert "upload of disk d2: S3 refused the write" in error.message
    assert "commit_backup" not in fakes.names()
    assert fakes.inputs("release_snapshot")[0].committed is False
    assert "upload of disk d2" in fakes.inputs("fail_backup")[0].reason
    # Released before the failure is recorded: the record frees the server.
    assert fakes.names().index("release_snapshot") < fakes.names().index("fail_backup")


async def test_a_transient_upload_failure_is_retried_and_the_backup_completes(
    env: WorkflowEnvironment,
) -> None:
    def flaky(inp: st.OfDisk) -> TransferStats:
        if activity.info().attempt < 3:
            raise ApplicationError("connection reset", type="StorageUnavailable")
        return TransferStats()

    fakes = Fakes(backup_disk=flaky)
    result, error = await outcome(env, fakes, "BackupServer", BackupServerInput(server_id="s1"))
    assert error is None and result["status"] == "available"
    assert len(fakes.inputs("backup_disk")) == 6  # two disks, three attempts each


async def test_a_cancelled_backup_releases_its_snapshot_and_records_the_cancellation(
    env: WorkflowEnvironment,
) -> None:
    uploading = asyncio.Event()

    async def slow(inp: st.OfDisk) -> TransferStats:
        uploading.set()
        while True:  # until the cancellation reaches it through a heartbeat
            activity.heartbeat()
            await asyncio.sleep(0.2)

    fakes = Fakes(backup_disk=slow)
    async with Run(env, fakes) as run:
        handle = await run.start("BackupServer", BackupServerInput(server_id="s1"))
        await asyncio.wait_for(uploading.wait(), 30)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert fakes.inputs("release_snapshot")[0].committed is False
    assert fakes.inputs("fail_backup")[0].reason == "backup: cancelled"


async def test_an_offline_backup_starts_its_server_again_even_when_the_snapshot_fails(
    env: WorkflowEnvironment,
) -> None:
    def running(inp: st.PrepareBackup) -> PreparedBackup:
        return PreparedBackup(
            backup_id=inp.backup_id,
            task_id=inp.task_id,
            name="b",
            server_id="s1",
            server_name="s",
            disk_ids=["d1"],
            parent_id=None,
            server_state="running",
        )

    fakes = Fakes(
        prepare_backup=running,
        take_snapshot=refuse("snapshot failed: disk busy", "DriverError"),
    )
    inp = BackupServerInput(server_id="s1", offline=True)
    _, error = await outcome(env, fakes, "BackupServer", inp)
    assert error is not None and "group snapshot: snapshot failed" in error.message
    names = fakes.names()
    assert names.index("stop_server") < names.index("take_snapshot") < names.index("start_server")


# -- RestoreServer ------------------------------------------------------------------------------
async def test_a_restore_whose_chunks_are_missing_never_stops_the_server(
    env: WorkflowEnvironment,
) -> None:
    fakes = Fakes(check_restore=refuse("2 chunks are missing", "CorruptData"))
    _, error = await outcome(env, fakes, "RestoreServer", RestoreServerInput(backup_id="bk-1"))
    assert error is not None and error.type == "CorruptData"
    assert "check backup: 2 chunks are missing" in error.message
    assert "stop_server" not in fakes.names() and "restore_disk" not in fakes.names()
    finished = fakes.inputs("finish_restore")[0]
    assert finished.ok is False and "2 chunks are missing" in finished.reason


async def test_a_refused_restore_leaves_a_failed_task_with_the_reason(
    env: WorkflowEnvironment,
) -> None:
    """R6, T1: a restore refused at validation records a failed task with the reason."""
    fakes = Fakes(prepare_restore=refuse("backup bk-1 is error", "InvalidState"))
    _, error = await outcome(env, fakes, "RestoreServer", RestoreServerInput(backup_id="bk-1"))
    assert error is not None and error.message == "validate: backup bk-1 is error"
    assert fakes.names() == ["prepare_restore", "refuse_restore"]
    refusal = fakes.inputs("refuse_restore")[0]
    assert refusal.reason == "validate: backup bk-1 is error"
    assert refusal.request.backup_id == "bk-1"


async def test_a_restore_that_fails_after_stopping_says_the_server_was_left_stopped(
    env: WorkflowEnvironment,
) -> None:
    async def fail_d2(inp: st.RestoreDisk) -> TransferStats:
        if inp.item.source_disk_id == "d2":
            raise ApplicationError("disk d2 is gone", type="DiskUnavailable", non_retryable=True)
        while True:  # d1 runs until the failure of d2 cancels it
            activity.heartbeat()
            await asyncio.sleep(0.2)

    fakes = Fakes(restore_disk=fail_d2)
    _, error = await outcome(env, fakes, "RestoreServer", RestoreServerInput(backup_id="bk-1"))
    assert error is not None and error.message.endswith("; the server was left stopped")
    assert "start_server" not in fakes.names()
    assert fakes.inputs("finish_restore")[0].ok is False


async def test_a_restore_powers_on_only_when_asked(env: WorkflowEnvironment) -> None:
    on, off = Fakes(), Fakes()
    result, _ = await outcome(env, on, "RestoreServer", RestoreServerInput(backup_id="bk-1"))
    assert result["powered_on"] is True and "start_server" in on.names()
    inp = RestoreServerInput(backup_id="bk-1", power_on=False)
    result, _ = await outcome(env, off, "RestoreServer", inp)
    assert result["powered_on"] is False and "start_server" not in off.names()
    assert off.inputs("finish_restore")[0].ok is True


async def test_a_restore_asked_to_verify_stops_nothing_when_a_chunk_is_corrupt(
    env: WorkflowEnvironment,
) -> None:
    from csbs.model import ChunkProblem

    def corrupt(inp: st.OfDisk) -> VerifyDiskResult:
        problem = ChunkProblem(
            disk_id=inp.disk_id, index=3, chunk_id="ab" * 16, problem="corrupt", message="bad"
        )
        return VerifyDiskResult(
            disk_id=inp.disk_id, chunks_checked=4, bytes_checked=4, problems=[problem]
        )

    fakes = Fakes(verify_disk=corrupt)
    inp = RestoreServerInput(backup_id="bk-1", verify=True)
    _, error = await outcome(env, fakes, "RestoreServer", inp)
    assert error is not None and error.type == "CorruptData"
    assert "no disk was touched" in error.message and "stop_server" not in fakes.names()


# -- DeleteBackups ------------------------------------------------------------------------------
async def test_a_delete_that_fails_for_one_backup_marks_it_and_still_reclaims(
    env: WorkflowEnvironment,
) -> None:
    def fail_second(inp: st.OfTask) -> None:
        if inp.backup_id == "bk-2":
            raise ApplicationError("S3 is read-only", type="StorageError", non_retryable=True)

    fakes = Fakes(delete_backup=fail_second)
    inp = DeleteBackupsInput(backup_ids=["bk-1", "bk-2"])
    _, error = await outcome(env, fakes, "DeleteBackups", inp)
    assert error is not None and error.type == "DeleteFailed"
    assert "delete of backup bk-2: S3 is read-only" in error.message
    assert [i.backup_id for i in fakes.inputs("fail_delete")] == ["bk-2"]
    assert "collect_garbage" in fakes.names()  # bk-1 was deleted: its chunks are swept


async def test_a_delete_whose_sweep_is_deferred_hands_it_to_a_waiting_collect_garbage(
    own_time_skipping_env: WorkflowEnvironment,
) -> None:
    env = own_time_skipping_env

    def deferred(_: Any) -> st.SweepResult:
        raise ApplicationError(
            "backups are running", type="GarbageCollectionDeferred", non_retryable=True
        )

    fakes = Fakes(collect_garbage=deferred)
    async with Run(env, fakes) as run:
        handle = await run.start("DeleteBackups", DeleteBackupsInput(backup_ids=["bk-1"]))
        result = await handle.result()
        handed = env.client.get_workflow_handle(result["reclaimed"]["handed_to"])
        desc = await handed.describe()
        assert desc.workflow_type == "CollectGarbage"
        assert desc.status == WorkflowExecutionStatus.RUNNING  # it waits for the backups
        await handed.terminate(reason="test over")
    assert handed.id == f"collect-garbage-after-delete.{run.queue}"
    assert "backups are running" in result["reclaimed"]["deferred"]
    assert result["deleted"] == ["bk-1"]


# -- VerifyBackup and VerifyBackups -------------------------------------------------------------
async def test_verify_fails_with_corrupt_data_naming_the_problems(
    env: WorkflowEnvironment,
) -> None:
    from csbs.model import ChunkProblem

    def missing(inp: st.OfDisk) -> VerifyDiskResult:
        problem = ChunkProblem(
            disk_id=inp.disk_id, index=1, chunk_id="cd" * 16, problem="missing", message="gone"
        )
        return VerifyDiskResult(
            disk_id=inp.disk_id, chunks_checked=2, bytes_checked=2, problems=[problem]
        )

    fakes = Fakes(verify_disk=missing)
    _, error = await outcome(env, fakes, "VerifyBackup", VerifyBackupInput(backup_id="bk-1"))
    assert error is not None and error.type == "CorruptData"
    assert fakes.inputs("finish_verify")[0].results[0].problems[0].problem == "missing"


# -- ReplicateBackup -----------------------------------------------------------------------------
async def test_a_replication_copies_then_records_its_result(env: WorkflowEnvironment) -> None:
    fakes = Fakes()
    result, error = await outcome(
        env, fakes, "ReplicateBackup", ReplicateBackupInput(backup_id="bk-1")
    )
    assert error is None and result["chunks_copied"] == 2
    assert fakes.names() == ["prepare_replicate", "replicate_backup", "finish_replicate"]
    assert fakes.inputs("finish_replicate")[0].result.chunks_copied == 2


async def test_a_failed_replication_records_the_reason_and_fails(env: WorkflowEnvironment) -> None:
    def broken(inp: st.ReplicatePlan) -> None:
        raise ApplicationError("chunk ab: digest mismatch", type="CorruptData", non_retryable=True)

    fakes = Fakes(replicate_backup=broken)
    _, error = await outcome(env, fakes, "ReplicateBackup", ReplicateBackupInput(backup_id="bk-1"))
    assert error is not None and "digest mismatch" in str(error)
    (finished,) = fakes.inputs("finish_replicate")
    assert finished.result is None and "digest mismatch" in (finished.error or "")


async def test_a_refused_replication_copies_nothing(env: WorkflowEnvironment) -> None:
    def refused(inp: st.OfTask) -> None:
        raise ApplicationError("no replica is configured", type="InvalidState", non_retryable=True)

    fakes = Fakes(prepare_replicate=refused)
    _, error = await outcome(env, fakes, "ReplicateBackup", ReplicateBackupInput(backup_id="bk-1"))
    assert error is not None and "no replica is configured" in str(error)
    assert fakes.names() == ["prepare_replicate"]


async def test_verify_backups_reports_each_failure_and_goes_on(env: WorkflowEnvironment) -> None:
    def two(_: Any) -> st.BackupIds:
        return st.BackupIds(backup_ids=["bk-good", "bk-bad"])

    def prepare(inp: st.OfTask) -> VerifyPlan:
        if inp.backup_id == "bk-bad":
            raise ApplicationError(
                "backup bk-bad is deleting", type="InvalidState", non_retryable=True
            )
        return VerifyPlan(
            backup_id=inp.backup_id,
            backup_name="b",
            server_id="srv-1",
            task_id=inp.task_id,
            disk_ids=["d1"],
        )

    fakes = Fakes(backups_to_verify=two, prepare_verify=prepare)
    from csbs.model import VerifyBackupsInput

    result, error = await outcome(env, fakes, "VerifyBackups", VerifyBackupsInput())
    assert error is None and result["verified"] == 2 and result["ok"] == 1
    assert "bk-bad is deleting" in result["failed"]["bk-bad"]


# -- RunPolicy and RetentionCleanup -------------------------------------------------------------
async def test_a_policy_run_records_skips_reports_each_backup_and_applies_retention(
    env: WorkflowEnvironment,
) -> None:
    def plan(inp: st.PlanPolicyRun) -> PolicyRunPlan:
        return PolicyRunPlan(
            policy_id=inp.policy_id,
            server_ids=["srv-1", "srv-2"],
            skipped={"srv-3": "a backup is running"},
        )

    def prepare(inp: st.PrepareBackup) -> PreparedBackup:
        if inp.request.server_id == "srv-2":
            raise ApplicationError(
                "server srv-2 is stopped", type="InvalidState", non_retryable=True
            )
        return PreparedBackup(
            backup_id=inp.backup_id,
            task_id=inp.task_id,
            name="b",
            server_id=inp.request.server_id,
            server_name="s",
            disk_ids=["d1"],
            parent_id=None,
        )

    fakes = Fakes(
        plan_policy_run=plan,
        prepare_backup=prepare,
        policy_expired_backups=lambda _: RetentionPlan(expired=["bk-old"]),
    )
    inp = RunPolicyInput(policy_id="pol-1", trigger="scheduled")
    result, error = await outcome(env, fakes, "RunPolicy", inp)
    assert error is None
    assert result["backups"]["srv-1"]["outcome"] == "available"
    assert "server srv-2 is stopped" in result["backups"]["srv-2"]["outcome"]
    assert fakes.inputs("record_policy_skips")[0].skipped == {"srv-3": "a backup is running"}
    assert all(i.request.kind == "scheduled" for i in fakes.inputs("prepare_backup"))
    assert result["retention"]["expired"] == ["bk-old"]
    assert [i.backup_id for i in fakes.inputs("delete_backup")] == ["bk-old"]


async def test_a_refused_policy_run_leaves_a_failed_task(env: WorkflowEnvironment) -> None:
    """T1, P8: run now refused at its start (a bound server is busy) records why."""
    fakes = Fakes(plan_policy_run=refuse("backups are running on srv-1", "Conflict"))
    inp = RunPolicyInput(policy_id="pol-1", trigger="manual")
    _, error = await outcome(env, fakes, "RunPolicy", inp)
    assert error is not None and error.message == "policy run: backups are running on srv-1"
    assert fakes.names() == ["plan_policy_run", "record_policy_refusal"]
    refusal = fakes.inputs("record_policy_refusal")[0]
    assert (refusal.policy_id, refusal.trigger, refusal.reason) == (
        "pol-1",
        "manual",
        "policy run: backups are running on srv-1",
    )


async def test_retention_cleanup_goes_through_every_policy(env: WorkflowEnvironment) -> None:
    expired = {"pol-a": ["bk-a"], "pol-b": []}
    fakes = Fakes(
        list_policy_ids=lambda _: st.PolicyIds(policy_ids=["pol-a", "pol-b"]),
        policy_expired_backups=lambda inp: RetentionPlan(expired=expired[inp.policy_id]),
    )
    from csbs.model import RetentionCleanupInput

    result, error = await outcome(env, fakes, "RetentionCleanup", RetentionCleanupInput())
    assert error is None and set(result) == {"pol-a", "pol-b"}
    assert result["pol-a"]["result"]["deleted"] == ["bk-a"]
    assert "result" not in result["pol-b"]


def test_no_activity_is_cancelled_by_an_exception_raised_into_its_thread() -> None:
    """The SDK can cancel a thread-pool activity by raising into its thread; that lands at
    any bytecode (inside a lock's ``with``, a thread pool starting a thread) and once
    wedged a whole worker after a backup was terminated. Every csbs activity opts out and
    sees cancellation at its next heartbeat instead."""
    from temporalio.activity import _Definition

    from activities import CsbsActivities

    methods = [
        getattr(CsbsActivities, name)
        for name in dir(CsbsActivities)
        if _Definition.from_callable(getattr(CsbsActivities, name)) is not None
    ]
    assert len(methods) == 32
    for method in methods:
        definition = _Definition.from_callable(method)
        assert definition is not None and definition.no_thread_cancel_exception, method
