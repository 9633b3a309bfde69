"""Temporal workflows of csbs: deterministic orchestration only (no I/O)."""

from workflows.backup import BackupServer
from workflows.delete import DeleteBackups
from workflows.gc import CollectGarbage
from workflows.policy import RunPolicy
from workflows.replicate import ReplicateBackup
from workflows.restore import RestoreServer
from workflows.retention import RetentionCleanup
from workflows.verify import VerifyBackup, VerifyBackups

ALL_WORKFLOWS = [
    BackupServer,
    RestoreServer,
    DeleteBackups,
    CollectGarbage,
    RunPolicy,
    RetentionCleanup,
    VerifyBackup,
    VerifyBackups,
    ReplicateBackup,
]

__all__ = [
    "ALL_WORKFLOWS",
    "BackupServer",
    "CollectGarbage",
    "DeleteBackups",
    "ReplicateBackup",
    "RestoreServer",
    "RetentionCleanup",
    "RunPolicy",
    "VerifyBackup",
    "VerifyBackups",
]
