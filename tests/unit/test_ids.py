"""Ids as people type them (issue 16, part 5): tables show the shortest unique prefix of
at least 8 characters, as git and restic do, and a unique prefix names its id."""

from __future__ import annotations

import pytest

from csbs.errors import InvalidInput, NotFound
from csbs.ids import resolve, short_ids


def test_each_id_is_shown_by_its_shortest_unique_prefix_of_at_least_eight() -> None:
    ids = ["bk-0a1b2c3d4e5f6071", "bk-0a1b2c3d9999aaaa", "bk-ffff000011112222", "pol-1"]
    short = short_ids(ids)
    assert short == {
        "bk-0a1b2c3d4e5f6071": "bk-0a1b2c3d4",
        "bk-0a1b2c3d9999aaaa": "bk-0a1b2c3d9",
        "bk-ffff000011112222": "bk-ffff0",
        "pol-1": "pol-1",
    }
    for full, prefix in short.items():
        assert full.startswith(prefix) and (len(prefix) >= 8 or prefix == full)
        assert [i for i in ids if i.startswith(prefix)] == [full]  # it names one id
    # An id that begins another stays whole; no ids, no prefixes.
    assert short_ids(["task-12345678", "task-123456789"]) == {
        "task-12345678": "task-12345678",
        "task-123456789": "task-123456789",
    }
    assert short_ids([]) == {}


def test_a_unique_prefix_names_its_id_and_anything_else_is_refused_in_one_line() -> None:
    ids = ["bk-0a1b2c3d4e5f6071", "bk-0a1b2c3d9999aaaa", "bk-ffff000011112222"]
    assert resolve("backup", "bk-ffff", ids) == "bk-ffff000011112222"
    assert resolve("backup", "bk-0a1b2c3d4", ids) == "bk-0a1b2c3d4e5f6071"
    assert resolve("backup", "bk-0a1b2c3d9999aaaa", ids) == "bk-0a1b2c3d9999aaaa"
    with pytest.raises(InvalidInput, match=r"backup id bk-0a1b is ambiguous: 2 ids begin with it"):
        resolve("backup", "bk-0a1b", ids)
    with pytest.raises(NotFound, match="backup bk-9 does not exist"):
        resolve("backup", "bk-9", ids)
    with pytest.raises(NotFound):
        resolve("backup", "", ids)
