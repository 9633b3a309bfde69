"""Delta restore (issue 18): which chunks of a disk a restore must write, known from
metadata alone, with no read of the disk.

A disk whose changed-block tracking started at backup Y's snapshot holds Y's data except
in the ranges written since. To make it backup X again, it is enough to write the chunks
whose ids differ between X's and Y's manifests, and every chunk that a write since Y
touched. Anything that makes this unsure (no tracking, another size, another chunk size,
Y's manifest unreadable) means a full restore, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csbs.format import DIGEST_SIZE, Manifest


@dataclass(frozen=True)
class DeltaPlan:
    """The chunk positions to write (None: all of them) and why, for the task's record."""

    positions: list[int] | None
    note: str
    baseline: str | None = None
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def changed_positions(ranges: list[tuple[int, int]], size_bytes: int, chunk_size: int) -> set[int]:
    """Chunk positions that any of the byte ranges touches."""
    positions: set[int] = set()
    for offset, length in ranges:
        if length <= 0 or offset >= size_bytes:
            continue
        end = min(offset + length, size_bytes)
        positions.update(range(offset // chunk_size, (end - 1) // chunk_size + 1))
    return positions


def plan_delta(
    target: Manifest,
    baseline: Manifest | None,
    baseline_id: str | None,
    changed: list[tuple[int, int]],
    disk_size: int,
    why_not: str = "",
) -> DeltaPlan:
    """What to write to make a disk (now ``disk_size`` bytes, tracked since backup
    ``baseline_id`` whose manifest is ``baseline``) equal to ``target``."""
    if baseline_id is None or baseline is None:
        return DeltaPlan(None, f"full restore: {why_not or 'no changed-block baseline'}")
    if disk_size != target.size_bytes or baseline.size_bytes != target.size_bytes:
        return DeltaPlan(
            None,
            f"full restore: the disk is {disk_size} bytes, backup {baseline_id} "
            f"{baseline.size_bytes} and the restored backup {target.size_bytes}",
        )
    if baseline.chunk_size != target.chunk_size:
        return DeltaPlan(None, f"full restore: backup {baseline_id} has another chunk size")
    count = target.chunk_count
    differ = {
        i
        for i in range(count)
        if target.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        != baseline.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
    }
    touched = changed_positions(changed, target.size_bytes, target.chunk_size)
    positions = sorted(differ | touched)
    return DeltaPlan(
        positions,
        f"delta restore from backup {baseline_id}: {len(positions)} of {count} chunks "
        f"written ({len(differ)} differ between the backups, {len(touched)} written since "
        f"{baseline_id})",
        baseline=baseline_id,
        skipped=count - len(positions),
    )
