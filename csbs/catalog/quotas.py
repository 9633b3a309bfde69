"""A tenant's quota and usage (B15): its own limits, the disk backups it keeps and the
chunk bytes it stores."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import col, func, select

from csbs.catalog.base import CatalogBase
from csbs.catalog.rows import BackupRow, DiskBackupRow, QuotaRow, UsageRow, utcnow
from csbs.model import BackupStatus


class Quotas(CatalogBase):
    """The quota row, the disk-backup count and the stored-bytes figure of one project."""

    def quota_row(self) -> QuotaRow | None:
        with self.session() as s:
            return s.get(QuotaRow, self.project)

    def set_quota(self, disk_backups: int | None, bytes_: int | None) -> QuotaRow:
        """Set the project's own limits (None: the settings' default applies)."""
        row = QuotaRow(
            project=self.project, disk_backups=disk_backups, bytes=bytes_, updated_at=utcnow()
        )
        with self.session() as s:
            s.merge(row)
        return row

    def disk_backups_used(self) -> int:
        """Disk backups the project keeps: one per disk of every server backup that is not
        in ``error`` (an error backup holds no data and can only be deleted)."""
        with self.session() as s:
            count = s.exec(
                select(func.count())
                .select_from(DiskBackupRow)
                .join(BackupRow, col(BackupRow.id) == col(DiskBackupRow.backup_id))
                .where(
                    col(BackupRow.project) == self.project,
                    col(BackupRow.status) != BackupStatus.ERROR.value,
                )
            ).one()
        return int(count)

    def usage(self) -> UsageRow | None:
        with self.session() as s:
            return s.get(UsageRow, self.project)

    def set_usage(self, stored_bytes: int) -> None:
        """Record a measured figure (a sweep listed every chunk)."""
        with self.session() as s:
            s.merge(UsageRow(project=self.project, stored_bytes=stored_bytes, measured_at=utcnow()))

    def add_usage(self, stored_bytes: int) -> None:
        """Add what a committed backup uploaded anew (nothing before the first measure)."""
        if stored_bytes <= 0:
            return
        with self.session() as s:
            s.exec(
                sa.update(UsageRow)
                .where(col(UsageRow.project) == self.project)
                .values(stored_bytes=col(UsageRow.stored_bytes) + stored_bytes)
            )
