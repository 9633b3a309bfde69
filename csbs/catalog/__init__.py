"""The catalog (SQLModel over SQLite or PostgreSQL): an index of backups, per-disk
backups, tasks, policies and locks. Everything needed to restore also lives in the object
store (backup descriptors and manifests).

``rows`` holds the tables, ``repository`` the catalog of one tenant, ``policies`` its
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
    new_id,
    utcnow,
)
from csbs.catalog.views import backup_json, task_json

__all__ = [
    "BackupFilter",
    "BackupRow",
    "BindingRow",
    "Catalog",
    "DiskBackupRow",
    "PolicyCatalog",
    "PolicyRow",
    "ServerLockRow",
    "SuspectChunkRow",
    "TaskRow",
    "_fix_backup",
    "backup_json",
    "make_engine",
    "new_id",
    "task_json",
    "utcnow",
]
