"""csbs's own counters, recorded through the Temporal SDK's metric meter so that they are
served on the same Prometheus endpoint as the SDK's metrics (``CSBS_METRICS_BIND``).

With no metrics endpoint configured the meter is a no-op. Outside an activity (unit
tests) nothing is recorded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from temporalio import activity

from csbs.catalog import BackupView
from csbs.model import TransferStats


def _meter() -> Any:
    try:
        return activity.metric_meter()
    except RuntimeError:  # not in an activity
        return None


def transfer(operation: str, stats: TransferStats) -> None:
    """Bytes and chunks of one disk's backup or restore."""
    meter = _meter()
    if meter is None:
        return
    attrs = {"operation": operation, "read_mode": stats.read_mode}
    counters = {
        "csbs_bytes_read": ("Bytes read from disks (backup) or fetched from S3 (restore)", "By"),
        "csbs_bytes_uploaded": ("Bytes uploaded to S3, after compression", "By"),
        "csbs_bytes_deduplicated": ("Bytes read whose chunk S3 already held", "By"),
        "csbs_bytes_written": ("Bytes written to disks by restores", "By"),
        "csbs_chunks_uploaded": ("Chunks uploaded to S3", "1"),
        "csbs_chunks_reused": ("Chunks referenced, not uploaded again", "1"),
        "csbs_chunks_zero": ("All-zero chunks, never stored", "1"),
        "csbs_chunks_fetched": ("Chunks fetched from S3 by restores", "1"),
    }
    values = {
        "csbs_bytes_read": stats.bytes_read if operation == "backup" else stats.bytes_fetched,
        "csbs_bytes_uploaded": stats.bytes_uploaded,
        "csbs_bytes_deduplicated": stats.bytes_reused,
        "csbs_bytes_written": stats.bytes_written,
        "csbs_chunks_uploaded": stats.chunks_uploaded,
        "csbs_chunks_reused": stats.chunks_reused,
        "csbs_chunks_zero": stats.chunks_zero,
        "csbs_chunks_fetched": stats.chunks_fetched,
    }
    for name, (description, unit) in counters.items():
        if values[name]:
            meter.create_counter(name, description, unit).add(values[name], attrs)
    meter.create_histogram_float(
        "csbs_disk_transfer_seconds", "Time to back up or restore one disk", "s"
    ).record(stats.seconds, attrs)


def backup_committed(record: BackupView) -> None:
    """One more available backup, and how long it took from request to commit."""
    meter = _meter()
    if meter is None:
        return
    attrs = {"kind": record.kind.value}
    meter.create_counter("csbs_backups_committed", "Backups that became available", "1").add(
        1, attrs
    )
    created, finished = record.created_at, record.finished_at
    if created and finished:
        seconds = (
            datetime.fromisoformat(finished) - datetime.fromisoformat(created)
        ).total_seconds()
        meter.create_histogram_float(
            "csbs_backup_duration_seconds", "Time from backup request to commit", "s"
        ).record(seconds, attrs)
