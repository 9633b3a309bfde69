"""Domain vocabulary shared by every layer: states, kinds, servers, disks, workflow inputs."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from csbs.naming import check_description, check_name

#: Ids of servers, disks, backups and tasks become object keys and file names: keep them
#: to a safe alphabet so that no id can ever escape its directory or prefix.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)


def check_id(value: str, field: str = "id") -> str:
    """Return ``value`` if it is a well-formed id, else raise ValueError naming the field."""
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            f"{field} must be 1-64 characters of letters, digits, '_' or '-' "
            f"starting with a letter or digit (got {value!r})"
        )
    return value


def new_id(prefix: Literal["bk", "task"], source: uuid.UUID | None = None) -> str:
    """The one way backup and task ids are made: ``bk-`` or ``task-`` and 16 hex digits.
    Workflows pass ``workflow.uuid4()`` (replay makes the same id); others get a random one."""
    return f"{prefix}-{(source or uuid.uuid4()).hex[:16]}"


class ServerState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    FAULT = "fault"
    RESIZING = "resizing"
    RESIZE_VERIFYING = "resize_verifying"


class DiskRole(StrEnum):
    SYSTEM = "system"
    DATA = "data"


class BackupStatus(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    RESTORING = "restoring"
    DELETING = "deleting"
    ERROR = "error"
    DELETE_FAILED = "delete_failed"


class BackupKind(StrEnum):
    MANUAL = "manual"
    SCHEDULED = "scheduled"
    POLICY_MANUAL = "policy_manual"


class TaskKind(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    DELETE = "delete"
    VERIFY = "verify"
    REPLICATE = "replicate"


class TaskStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: A scheduled backup not made because the server was busy (P8).
    SKIPPED = "skipped"


class VerifyStatus(StrEnum):
    """The outcome of a backup's last verification (none yet: ``None``)."""

    OK = "ok"
    FAILED = "failed"


class Disk(BaseModel):
    """One disk of a server, as the compute driver reports it."""

    id: str
    name: str
    size_bytes: int
    role: DiskRole
    shared: bool = False
    #: Why csbs cannot back this disk up (network, CD-ROM, LUN, shareable ...); None: it can.
    unsupported: str | None = None


class Server(BaseModel):
    """A server (virtual machine) as the compute driver reports it."""

    id: str
    name: str
    type: str
    state: ServerState
    disks: list[Disk]
    project: str = "default"
    #: The hypervisor host that runs the server; its agent serves its data plane.
    host: str = "default"

    def disk(self, disk_id: str) -> Disk:
        for disk in self.disks:
            if disk.id == disk_id:
                return disk
        raise KeyError(disk_id)

    @property
    def size_bytes(self) -> int:
        return sum(d.size_bytes for d in self.disks)


class BackedUpDisk(BaseModel):
    """One disk as a backup holds it (what restore planning needs)."""

    disk_id: str
    name: str = ""
    role: DiskRole = DiskRole.DATA
    size_bytes: int


# --- workflow inputs (the public contract: one JSON object each) -----------------------


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackupServerInput(_Input):
    """Input of the ``BackupServer`` workflow."""

    server_id: str
    name: str | None = None
    description: str | None = None
    offline: bool = False
    #: Optional caller-chosen backup id (the CLI uses it to find the backup it started).
    backup_id: str | None = None
    kind: BackupKind = BackupKind.MANUAL
    policy_id: str | None = None

    @field_validator("server_id")
    @classmethod
    def _server_id(cls, v: str) -> str:
        return check_id(v, "server_id")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)

    @field_validator("description")
    @classmethod
    def _description(cls, v: str | None) -> str | None:
        return None if v is None else check_description(v)

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "backup_id")


class RestoreServerInput(_Input):
    """Input of the ``RestoreServer`` workflow."""

    backup_id: str
    disk_mapping: dict[str, str] = Field(default_factory=dict)
    power_on: bool = True
    #: Restore only these backed-up disks (R7); empty means every disk of the backup.
    disk_ids: list[str] = Field(default_factory=list)
    #: Read and check every chunk before touching any disk (a flipped byte in S3 then
    #: fails the restore before the server is stopped). Missing chunks are always checked.
    verify: bool = False
    #: Write every chunk, even where the disk is known to hold the backup's data already.
    full: bool = False
    #: Run the server from the backup at once and copy its disks in the background
    #: (the guide's instant restore; qemu driver).
    instant: bool = False
    #: Read the backup from the second site (issue 17): while the primary is down.
    from_replica: bool = False

    @field_validator("disk_ids")
    @classmethod
    def _disk_ids(cls, v: list[str]) -> list[str]:
        for disk_id in v:
            check_id(disk_id, "disk_ids")
        return v

    @model_validator(mode="after")
    def _instant_runs(self) -> RestoreServerInput:
        if self.instant and not self.power_on:
            raise ValueError(
                "instant: an instant restore runs the server from the backup at once; it "
                "cannot leave it powered off (drop --no-power-on or --instant)"
            )
        return self

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, v: str) -> str:
        return check_id(v, "backup_id")

    @field_validator("disk_mapping")
    @classmethod
    def _mapping(cls, v: dict[str, str]) -> dict[str, str]:
        for src, dst in v.items():
            check_id(src, "disk_mapping source disk id")
            check_id(dst, "disk_mapping target disk id")
        return v


class RunPolicyInput(_Input):
    """Input of the ``RunPolicy`` workflow (started by the policy's schedule or by hand)."""

    policy_id: str
    trigger: Literal["manual", "scheduled"] = "manual"
    #: Servers backed up at the same time.
    concurrency: int = Field(default=16, ge=1, le=64)

    @field_validator("policy_id")
    @classmethod
    def _policy_id(cls, v: str) -> str:
        return check_id(v, "policy_id")


class VerifyBackupInput(_Input):
    """Input of the ``VerifyBackup`` workflow: read every chunk, check every digest
    (``replica``: of the copy on the second site, issue 17)."""

    backup_id: str
    replica: bool = False

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, v: str) -> str:
        return check_id(v, "backup_id")


class ReplicateBackupInput(_Input):
    """Input of the ``ReplicateBackup`` workflow: copy a backup to the second site (the
    chunks the replica lacks, then its manifests and descriptor)."""

    backup_id: str

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, v: str) -> str:
        return check_id(v, "backup_id")


class VerifyBackupsInput(_Input):
    """Input of ``VerifyBackups`` (the verify schedule): every available backup not
    verified in the last ``max_age_days`` days, ``concurrency`` at a time."""

    max_age_days: int = Field(default=7, ge=0, le=3650)
    concurrency: int = Field(default=4, ge=1, le=32)


class PolicyRunPlan(BaseModel):
    """Which bound servers a policy run backs up, and which it skips with why."""

    policy_id: str
    server_ids: list[str]
    skipped: dict[str, str] = {}
    #: Replicate each backup made to the second site (the policy's ``replicate``).
    replicate: bool = False


class CollectGarbageInput(_Input):
    """Input of ``CollectGarbage`` (the worker's project is swept)."""

    #: While backups run, try again after this many seconds...
    retry_seconds: int = Field(default=300, ge=1, le=86400)
    #: ...for at most this long; then the run fails with the reason, and the next daily
    #: run sweeps.
    max_wait_seconds: int = Field(default=12 * 3600, ge=0, le=7 * 86400)


class RetentionCleanupInput(_Input):
    """Input of ``RetentionCleanup`` (every policy of the worker's project)."""


class RetentionPlan(BaseModel):
    """What one policy's retention deletes now, and what it kept past its rule and why."""

    expired: list[str] = []
    kept: dict[str, str] = {}


class DeleteBackupsInput(_Input):
    """Input of the ``DeleteBackups`` workflow."""

    backup_ids: list[str] = Field(min_length=1)

    @field_validator("backup_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for backup_id in v:
            check_id(backup_id, "backup_ids")
        if len(set(v)) != len(v):
            raise ValueError("backup_ids must not repeat an id")
        return v


class HostRoute(BaseModel):
    """Where a server's data-plane steps run (snapshot, reads, restore writes, power).
    ``queue`` None: on the run's own worker, which serves the server's host; otherwise on
    that host's agent queue, waiting at most ``wait_seconds`` for an agent to take each."""

    host: str = "default"
    queue: str | None = None
    wait_seconds: int = 300


class PreparedBackup(BaseModel):
    backup_id: str
    task_id: str
    name: str
    server_id: str
    server_name: str
    disk_ids: list[str]
    parent_id: str | None
    #: The server's state when the backup was prepared (offline backups restart it).
    server_state: str = "running"
    route: HostRoute = HostRoute()


class RestoreItem(BaseModel):
    source_disk_id: str
    target_disk_id: str
    size_bytes: int
    #: The original disk was removed since the backup: re-create it (R5).
    create: bool = False
    name: str = ""
    role: DiskRole = DiskRole.DATA
    #: Write only what differs, when the disk's changed blocks since a backup are known
    #: (onto its own disk, unless a full restore was asked); ``why_full`` says why not.
    delta: bool = False
    why_full: str = ""


class InstantResult(BaseModel):
    """What an instant restore's background copy fetched from the object store."""

    disks: int
    chunks_fetched: int
    bytes_fetched: int


class RestorePlan(BaseModel):
    backup_id: str
    backup_name: str
    task_id: str
    server_id: str
    items: list[RestoreItem]
    warnings: list[str] = []
    route: HostRoute = HostRoute()
    #: Read from the second site (issue 17).
    from_replica: bool = False


class VerifyPlan(BaseModel):
    backup_id: str
    backup_name: str
    server_id: str
    task_id: str
    disk_ids: list[str]


# --- results --------------------------------------------------------------------------


class ChunkProblem(BaseModel):
    """A chunk of a backup that is missing from the object store or does not verify."""

    disk_id: str
    #: Position of the chunk in the disk (the first, when the same chunk is used again).
    index: int | None
    chunk_id: str | None
    problem: Literal["missing", "corrupt", "manifest"]
    message: str

    def line(self) -> str:
        where = f"disk {self.disk_id}"
        if self.index is not None:
            where += f" chunk {self.index} ({(self.chunk_id or '')[:16]})"
        return f"{where}: {self.message}"


#: Problems listed in a reason; the count says how many there were in all.
MAX_LISTED = 10


def describe(problems: list[ChunkProblem]) -> str:
    """One line for a task reason: how many problems, then the first few by disk and chunk."""
    listed = "; ".join(p.line() for p in problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    disks = len({p.disk_id for p in problems})
    noun = "problem" if len(problems) == 1 else "problems"
    return f"{len(problems)} {noun} in {disks} disk(s): {listed}{more}"


class VerifyDiskResult(BaseModel):
    disk_id: str
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[ChunkProblem] = []


class TransferStats(BaseModel):
    """What one disk's backup or restore did, for records, progress and benchmarks."""

    chunks_total: int = 0
    chunks_read: int = 0
    chunks_zero: int = 0
    chunks_reused: int = 0
    chunks_uploaded: int = 0
    chunks_fetched: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    #: Bytes read whose chunk the store already had (deduplicated, not uploaded again).
    bytes_reused: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    data_bytes: int = 0
    read_mode: str = "full"
    seconds: float = 0.0
    #: A restore's chunk GETs in flight at its end (adapted to their latency) and their
    #: mean latency in milliseconds.
    concurrency: int = 0
    get_ms: float = 0.0
    #: A locked backup's reused chunks whose Object Lock it extended (issue 17).
    locks_extended: int = 0
