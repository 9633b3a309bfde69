"""What each workflow step takes and gives back: one input model and one result model per
activity, so that no step is called with positional scalars or answers with a loose
``dict``. The workflows build these, the activities unpack them for the services."""

from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from csbs.model import (
    BackupServerInput,
    ChunkProblem,
    DeleteBackupsInput,
    RestoreItem,
    RestorePlan,
    RestoreServerInput,
    VerifyDiskResult,
)


class Step(BaseModel):
    """The shape every step model shares (extra fields are refused)."""

    model_config = ConfigDict(extra="forbid")


# -- backup -------------------------------------------------------------------------------------
class PrepareBackup(Step):
    """Validate the request and record the backup (``creating``) and its task."""

    request: BackupServerInput
    backup_id: str
    task_id: str


class RefuseBackup(Step):
    """Record a backup refused at validation: an ``error`` backup and a failed task."""

    request: BackupServerInput
    backup_id: str
    task_id: str
    reason: str


class RefuseRestore(Step):
    """Record a restore refused at validation: a failed restore task with the reason."""

    request: RestoreServerInput
    task_id: str
    reason: str


class OfBackup(Step):
    """A step on one backup (take its group snapshot)."""

    backup_id: str


class SnapshotTaken(Step):
    """The disks the group snapshot covers, in order."""

    disk_ids: list[str]


class OfDisk(Step):
    """A step on one disk of a backup (upload it, verify it: on the replica with
    ``replica``)."""

    backup_id: str
    disk_id: str
    replica: bool = False


class OfTask(Step):
    """A step that finishes a backup's or verification's task (commit, delete);
    ``replica``: a verification of the copy on the second site."""

    backup_id: str
    task_id: str
    replica: bool = False


class FailTask(Step):
    """Mark a backup's task (and the backup, if still its own) failed with the reason."""

    backup_id: str
    task_id: str
    reason: str


class ReleaseSnapshot(Step):
    """Drop a backup's snapshot; a committed one keeps its changed-block chain."""

    server_id: str
    backup_id: str
    committed: bool


class OfServer(Step):
    """Power a server off or on; a forced stop's warning goes on ``task_id``'s record."""

    server_id: str
    task_id: str | None = None


# -- restore ------------------------------------------------------------------------------------
class PrepareRestore(Step):
    """Validate the request, plan the disk mapping and record the restore's task."""

    request: RestoreServerInput
    task_id: str


class CheckRestore(Step):
    """Check every chunk of the disks to restore is in the store, before anything stops."""

    backup_id: str
    disk_ids: list[str]
    #: Read from the second site (issue 17).
    from_replica: bool = False


class RestoreDisk(Step):
    """Write one disk of a backup onto its target."""

    backup_id: str
    item: RestoreItem
    from_replica: bool = False


class InstantRestore(Step):
    """Run the server from the backup and copy its disks in the background."""

    plan: RestorePlan


class FinishRestore(Step):
    """Record how a restore ended (``reason`` when it failed)."""

    backup_id: str
    task_id: str
    ok: bool
    reason: str | None = None


# -- delete and garbage collection --------------------------------------------------------------
class PrepareDelete(Step):
    """Check every backup may go and mark them ``deleting``, one task each."""

    request: DeleteBackupsInput
    task_id: str


class DeleteTarget(NamedTuple):
    """One backup to delete and the task that records it."""

    backup_id: str
    task_id: str


class DeletePlan(Step):
    targets: list[DeleteTarget]


class SweepResult(Step):
    """What one garbage-collection sweep found and freed."""

    manifests: int
    chunks: int
    chunks_deleted: int
    bytes_freed: int
    #: How many shards of key directories it swept one after the other, and the most
    #: chunk ids it held in memory at once.
    shards: int = 1
    peak_ids: int = 0
    #: Unreferenced chunks left in place because S3 Object Lock still holds a version
    #: of them (issue 17): a later sweep deletes them once their lock runs out.
    chunks_locked: int = 0
    #: Which repository: the primary, or the replica (issue 17), where the sweep first
    #: deletes the copies of backups the primary deleted whose retention ran out.
    site: str = "primary"
    replicas_pruned: int = 0
    #: Why nothing was swept, or what was left in place and why.
    note: str = ""


class SweepSite(Step):
    """Which repository a sweep works on: "primary" or "replica"."""

    site: str = "primary"


class Reconciled(Step):
    """How many operations whose runs had closed were finished with the reason."""

    count: int


# -- policies -----------------------------------------------------------------------------------
class PlanPolicyRun(Step):
    policy_id: str
    trigger: str


class PolicySkips(Step):
    """Servers a scheduled run skipped, with why, and the run that skipped them."""

    policy_id: str
    skipped: dict[str, str]
    run_id: str


class PolicyRefusal(Step):
    """A policy run refused at its start (run now while a bound server is busy, or with
    none bound; a policy that is gone), with why, and the run it refused."""

    policy_id: str
    trigger: str
    reason: str
    run_id: str


class OfPolicy(Step):
    policy_id: str


class PolicyIds(Step):
    policy_ids: list[str]


# -- verify -------------------------------------------------------------------------------------
class FinishVerify(Step):
    """Record a verification's findings (or the error that stopped it)."""

    backup_id: str
    task_id: str
    results: list[VerifyDiskResult]
    error: str | None = None
    replica: bool = False


class VerifySummary(Step):
    """The outcome of verifying one backup."""

    backup_id: str
    ok: bool
    chunks_checked: int
    bytes_checked: int
    problems: list[ChunkProblem]
    reason: str | None


class BackupsToVerify(Step):
    max_age_days: int


class BackupIds(Step):
    backup_ids: list[str]


# -- replicate ----------------------------------------------------------------------------------
class ReplicatePlan(Step):
    """A replication under way: its task, and the parent already on the replica."""

    backup_id: str
    task_id: str
    server_id: str
    parent_id: str | None = None


class ReplicateResult(Step):
    """What one replication looked up and copied."""

    backup_id: str
    chunks_referenced: int
    chunks_checked: int
    chunks_copied: int
    bytes_copied: int
    manifests: int
    seconds: float
    #: Policy copies on the replica afterwards (they follow the primary's).
    policies: int = 0
    #: Reused chunks whose lock on the replica was extended (a locked backup).
    locks_extended: int = 0
    #: What the replica could not do as asked (a locked backup into a bucket without
    #: Object Lock is copied unlocked).
    note: str = ""


class FinishReplicate(Step):
    """Record a replication's outcome (or the error that stopped it)."""

    backup_id: str
    task_id: str
    result: ReplicateResult | None = None
    error: str | None = None
