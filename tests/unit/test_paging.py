"""Pages and cursors (issue 16): what a caller may hand back, and what is refused."""

from __future__ import annotations

import pytest

from csbs.errors import InvalidInput
from csbs.paging import Cursor, check_limit, page_in_memory


def test_a_cursor_round_trips_and_is_tied_to_its_list() -> None:
    text = Cursor("backups", ["2026-11-01T08:00:00.000000+00:00", "bk-1"]).encode()
    assert "=" not in text and "/" not in text and "+" not in text  # fits a URL as it is
    back = Cursor.decode(text, "backups", 2)
    assert back is not None and back.key[1] == "bk-1"
    assert back.time(0).isoformat() == "2026-11-01T08:00:00+00:00"
    assert Cursor.decode(None, "backups", 2) is None and Cursor.decode("", "tasks", 2) is None
    with pytest.raises(InvalidInput, match=r"cursor: it belongs to another list \(backups\)"):
        Cursor.decode(text, "tasks", 2)
    for bad in ["%%%", "bm90IGpzb24", Cursor("backups", [True, "x"]).encode()]:
        with pytest.raises(InvalidInput, match="cursor: not a cursor this list gave out"):
            Cursor.decode(bad, "backups", 2)


def test_limits_are_checked_by_name() -> None:
    assert check_limit(None) is None and check_limit(1) == 1 and check_limit(1000) == 1000
    for bad in (0, -3, 1001):
        with pytest.raises(InvalidInput, match="limit: must be between 1 and 1000"):
            check_limit(bad)


def test_a_short_list_in_memory_pages_by_its_key() -> None:
    rows = ["srv-c", "srv-a", "srv-e", "srv-b", "srv-d"]
    first = page_in_memory(rows, 2, None, "servers", str)
    assert first.items == ["srv-a", "srv-b"] and first.next_cursor
    second = page_in_memory(rows, 2, first.next_cursor, "servers", str)
    assert second.items == ["srv-c", "srv-d"]
    last = page_in_memory(rows, 2, second.next_cursor, "servers", str)
    assert last.items == ["srv-e"] and last.next_cursor is None
    assert page_in_memory(rows, None, None, "servers", str).items == sorted(rows)
