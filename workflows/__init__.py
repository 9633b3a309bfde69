"""Temporal workflows of csbs: deterministic orchestration only (no I/O)."""

from workflows.backup import BackupServer
from workflows.delete import DeleteBackups
from workflows.gc import CollectGarbage
from workflows.restore import RestoreServer

ALL_WORKFLOWS = [BackupServer, RestoreServer, DeleteBackups, CollectGarbage]

__all__ = ["ALL_WORKFLOWS", "BackupServer", "CollectGarbage", "DeleteBackups", "RestoreServer"]
