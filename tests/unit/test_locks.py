"""S3 Object Lock generations (issue 17): which chunks a backup must extend, and to when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from csbs.locks import chunks_to_extend, generation, lock_until


def test_a_generation_is_the_next_boundary_every_slack_days() -> None:
    need = datetime(2026, 12, 28, 11, 30, tzinfo=UTC)
    gen = generation(need, 10)
    assert need <= gen < need + timedelta(days=10)
    assert (gen - datetime(1970, 1, 1, tzinfo=UTC)).days % 10 == 0 and gen.hour == 0
    assert generation(gen, 10) == gen  # a boundary is its own generation
    # Daily backups locked 30 days share a generation for up to 10 days: the reused chunks
    # of a disk are extended at most once in that time.
    dates = [generation(need + timedelta(days=d), 10) for d in range(30)]
    assert len(set(dates)) <= 4 and dates == sorted(dates)
    assert lock_until(need, 0) is None and lock_until(need, 7) == need + timedelta(days=7)


def test_only_chunks_the_parents_generation_does_not_cover_are_extended() -> None:
    need = datetime(2026, 12, 28, tzinfo=UTC)
    parent = {b"a", b"b", b"c"}
    ids = {b"a", b"b", b"d", b"e"}  # d uploaded now, e found in the store (another disk's)
    covered = chunks_to_extend(ids, {b"d"}, parent, need + timedelta(days=1), need)
    assert covered == {b"e"}
    short = chunks_to_extend(ids, {b"d"}, parent, need - timedelta(days=1), need)
    assert short == {b"a", b"b", b"e"}
    assert chunks_to_extend(ids, set(), None, None, need) == ids  # a first backup
    naive = chunks_to_extend(ids, {b"d"}, parent, datetime(2027, 1, 1), need)  # SQLite's
    assert naive == {b"e"}
