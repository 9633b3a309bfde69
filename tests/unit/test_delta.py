"""Delta restore plans (issue 18): which chunks a restore writes, from metadata alone."""

from __future__ import annotations

from csbs.delta import changed_positions, plan_delta
from csbs.format import Manifest

MIB = 1024 * 1024


def manifest(backup_id: str, ids: list[int | None], size: int | None = None) -> Manifest:
    m = Manifest(backup_id, "d1", size if size is not None else len(ids) * MIB, MIB)
    for i, v in enumerate(ids):
        m.set_entry(i, None if v is None else bytes([v]) * 32)
    return m


def test_changed_ranges_touch_every_chunk_they_overlap() -> None:
    assert changed_positions([(0, 1)], 8 * MIB, MIB) == {0}
    assert changed_positions([(MIB - 1, 2)], 8 * MIB, MIB) == {0, 1}
    assert changed_positions([(3 * MIB, MIB)], 8 * MIB, MIB) == {3}
    assert changed_positions([(7 * MIB + 5, 10 * MIB)], 8 * MIB, MIB) == {7}  # clipped
    assert changed_positions([(9 * MIB, 1), (2 * MIB, 0)], 8 * MIB, MIB) == set()


def test_a_delta_writes_what_differs_and_what_was_written_since() -> None:
    x = manifest("bk-x", [1, 2, 3, None, 5, 6, 7, 8])
    y = manifest("bk-y", [1, 2, 9, 4, 5, 6, 7, 8])  # chunks 2 and 3 differ
    plan = plan_delta(x, y, "bk-y", [(6 * MIB + 10, 100)], 8 * MIB)
    assert plan.positions == [2, 3, 6] and plan.skipped == 5
    assert plan.note.startswith("delta restore from backup bk-y: 3 of 8 chunks written")
    # The restored backup is the baseline itself: only what was written since.
    same = plan_delta(x, x, "bk-x", [(0, 1)], 8 * MIB)
    assert same.positions == [0]


def test_any_doubt_is_a_full_restore_with_the_reason() -> None:
    x = manifest("bk-x", [1, 2])
    y = manifest("bk-y", [1, 2])
    assert plan_delta(x, None, None, [], 2 * MIB, "no checkpoint").positions is None
    assert "no checkpoint" in plan_delta(x, None, None, [], 2 * MIB, "no checkpoint").note
    grown = plan_delta(x, y, "bk-y", [], 3 * MIB)
    assert grown.positions is None and "3145728 bytes" in grown.note
    other = Manifest("bk-y", "d1", 2 * MIB, 512 * 1024)
    assert "chunk size" in plan_delta(x, other, "bk-y", [], 2 * MIB).note
