"""Quotas per tenant (B15, guide 4.2 Q4): what counts, where the limits come from, and
the refusal with the numbers.

The guide counts disk backups: a server backup of three disks is three. Bytes are the
tenant's real stored chunk bytes: a chunk that several backups share counts once, and
what a delete frees counts as soon as its sweep ran. A backup is refused before it starts
when its disks would pass the disk-backup limit, or when the tenant already stores its
byte limit (how much a backup will add is only known once it ran).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.errors import QuotaExceeded
from csbs.units import format_size, parse_size


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (None: no limit) and whether each is its own or the default."""

    disk_backups: int | None
    bytes: int | None
    disk_backups_source: str
    bytes_source: str


@dataclass(frozen=True)
class Usage:
    """What a tenant uses now."""

    disk_backups: int
    bytes: int


def quota_of(settings: Settings, catalog: Catalog) -> Quota:
    """The tenant's own limits where it has them, else the settings' defaults."""
    row = catalog.quota_row()
    default_disks = settings.quota_disk_backups or settings.quota_backups
    own_disks = row is not None and row.disk_backups is not None
    own_bytes = row is not None and row.bytes is not None
    return Quota(
        disk_backups=(row.disk_backups or None) if own_disks and row else default_disks,
        bytes=(row.bytes or None) if own_bytes and row else settings.quota_bytes,
        disk_backups_source="project" if own_disks else "default",
        bytes_source="project" if own_bytes else "default",
    )


#: What ``csbs quota set`` takes for a limit besides a number: the settings' default, or
#: no limit at all for this tenant (stored as None and 0).
DEFAULT, UNLIMITED = "default", "unlimited"


def parse_limit(text: str, field: str, size: bool = False) -> int | None:
    """A limit as ``csbs quota set`` takes it: a number (or a size like 500GiB for bytes),
    ``unlimited`` (0) or ``default`` (None); ValueError naming the field otherwise."""
    word = text.strip().lower()
    if word == DEFAULT:
        return None
    if word == UNLIMITED:
        return 0
    try:
        value = parse_size(word, field) if size else int(word)
    except ValueError:
        kind = "a size like 500GiB" if size else "a whole number"
        raise ValueError(
            f"{field} must be {kind}, 'unlimited' or 'default' (got {text!r})"
        ) from None
    if value < 1:
        raise ValueError(f"{field} must be at least 1, 'unlimited' or 'default' (got {text!r})")
    most = 2**63 - 1 if size else 2**31 - 1
    if value > most:
        raise ValueError(f"{field} must be at most {most}, 'unlimited' or 'default' (got {text!r})")
    return value


def stored_bytes(catalog: Catalog, store: ChunkStore) -> int:
    """The tenant's stored chunk bytes: the last measure plus what backups added since;
    measured now (by listing its chunks) the first time."""
    usage = catalog.usage()
    if usage is not None:
        return usage.stored_bytes
    total = sum(size for _, size in store.list_chunks())
    catalog.set_usage(total)
    return total


def usage_of(catalog: Catalog, store: ChunkStore) -> Usage:
    return Usage(disk_backups=catalog.disk_backups_used(), bytes=stored_bytes(catalog, store))


def check_quota(
    project: str, quota: Quota, disks: int, disk_backups_used: int, bytes_used: int | None
) -> None:
    """Refuse a backup of ``disks`` disks with the numbers, when it would pass a limit."""
    if quota.disk_backups is not None and disk_backups_used + disks > quota.disk_backups:
        raise QuotaExceeded(
            f"quota of project {project} exceeded: it keeps {disk_backups_used} disk "
            f"backups, this backup adds {disks} and the quota is {quota.disk_backups} disk "
            f"backups; delete backups or raise it (csbs quota set --disk-backups)"
        )
    if quota.bytes is not None and bytes_used is not None and bytes_used >= quota.bytes:
        raise QuotaExceeded(
            f"quota of project {project} exceeded: it stores {bytes_used} bytes "
            f"({format_size(bytes_used)}) and the quota is {quota.bytes} bytes "
            f"({format_size(quota.bytes)}); delete backups or raise it (csbs quota set --bytes)"
        )


def quota_json(project: str, quota: Quota, usage: Usage) -> dict[str, Any]:
    """``csbs quota show --json``."""
    return {
        "project": project,
        "disk_backups": {
            "used": usage.disk_backups,
            "limit": quota.disk_backups,
            "source": quota.disk_backups_source,
        },
        "bytes": {"used": usage.bytes, "limit": quota.bytes, "source": quota.bytes_source},
    }
