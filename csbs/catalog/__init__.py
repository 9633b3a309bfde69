"""The catalog (SQLModel over SQLite or PostgreSQL): an index of backups, per-disk
backups, tasks, policies and locks. Everything needed to restore also lives in the object
store (backup descriptors and manifests).

``rows`` holds the tables, ``repository`` the catalog of one project, ``policies`` its
policies and bindings, ``views`` the JSON shapes the CLI and API print."""

from csbs.catalog.base import make_engine
from csbs.catalog.policies import PolicyCatalog
from csbs.catalog.repository import Catalog
from csbs.catalog.rows import (
    BackupFilter,
    BackupRow,
    BindingRow,
    DiskBackupRow,
    PolicyRow,
    ServerLockRow,
    SuspectChunkRow,
    TaskRow,
    _fix_backup,
    utcnow,
)
from csbs.catalog.views import (
    BackupDetailView,
    BackupView,
    DiskBackupView,
    TaskView,
    backup_json,
    task_json,
)

__all__ = [
    "BackupDetailView",
    "BackupFilter",
    "BackupRow",
    "BackupView",
    "BindingRow",
    "Catalog",
    "DiskBackupRow",
    "DiskBackupView",
    "PolicyCatalog",
    "PolicyRow",
    "ServerLockRow",
    "SuspectChunkRow",
    "TaskRow",
    "TaskView",
    "_fix_backup",
    "backup_json",
    "make_engine",
    "task_json",
    "utcnow",
]
