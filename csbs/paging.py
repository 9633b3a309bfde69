"""Pages of long lists (issue 16): a page of at most ``limit`` rows and an opaque cursor to
the next one.

Lists in the catalog are paged by key, never by offset: a cursor holds the sort key of the
last row given (for backups, their creation time and id), and the next page is the rows
that sort after it. A page is then as fast at row 100 000 as at row 1, and rows written
or deleted between two pages neither repeat nor vanish from the rows still to come.

A cursor is base64url of ``{"k": list kind, "v": [key values]}``: a cursor of one list
handed to another is refused, as is one that was altered.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from csbs.errors import InvalidInput

T = TypeVar("T")
U = TypeVar("U")

#: Rows in a page when the caller does not say (the API; the CLI's tables show as many).
DEFAULT_LIMIT = 100
#: The most rows one page may hold.
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Page(Generic[T]):
    """Rows of one page, newest (or first) first, and the cursor of the next page (None:
    this is the last)."""

    items: list[T]
    next_cursor: str | None = None

    def map(self, fn: Callable[[T], U]) -> Page[U]:
        return Page([fn(i) for i in self.items], self.next_cursor)


@dataclass(frozen=True)
class Cursor:
    """Where a page of the list ``kind`` begins: after the row whose key is ``key``."""

    kind: str
    key: list[Any] = field(default_factory=list)

    def encode(self) -> str:
        raw = json.dumps({"k": self.kind, "v": self.key}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str | None, kind: str, arity: int) -> Cursor | None:
        """The cursor of list ``kind`` with ``arity`` key values, or None for the first
        page; anything else is refused as ``cursor``."""
        if text is None or text == "":
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            doc = json.loads(raw)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("v"), list):
            raise InvalidInput("cursor: not a cursor this list gave out; start without one")
        if doc.get("k") != kind or len(doc["v"]) != arity:
            raise InvalidInput(
                f"cursor: it belongs to another list ({doc.get('k')}), not to {kind}"
            )
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in doc["v"]):
            raise InvalidInput("cursor: not a cursor this list gave out; start without one")
        return cls(kind, list(doc["v"]))

    def time(self, index: int = 0) -> datetime:
        """Key value ``index`` as a time (it was written by :func:`time_key`)."""
        try:
            return datetime.fromisoformat(str(self.key[index]))
        except ValueError:
            raise InvalidInput(
                "cursor: not a cursor this list gave out; start without one"
            ) from None


def check_limit(limit: int | None, most: int = MAX_LIMIT) -> int | None:
    """``limit`` if it is a page size (1 to ``most``), None for no limit; else refused."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not 1 <= limit <= most:
        raise InvalidInput(f"limit: must be between 1 and {most}, got {limit}")
    return limit


def time_key(value: datetime) -> str:
    """A time as a cursor holds it (ISO 8601, to the microsecond)."""
    return value.isoformat(timespec="microseconds")


def after_key(
    columns: Sequence[Any], values: Sequence[Any], inclusive: bool = False
) -> sa.ColumnElement[bool]:
    """The SQL condition "sorts after (``values``)" for rows ordered by ``columns``, all
    descending: the row value ``(a, b) < (x, y)`` (``inclusive``: or is that row), which
    PostgreSQL and SQLite both answer from an index on those columns."""
    typed = [sa.literal(v, c.type) for c, v in zip(columns, values, strict=True)]
    row, key = sa.tuple_(*columns), sa.tuple_(*typed)
    return row <= key if inclusive else row < key


def cut(rows: list[T], limit: int | None, kind: str, key: Callable[[T], list[Any]]) -> Page[T]:
    """The page of ``rows`` (read with one more than ``limit``, to know whether more
    follow), with the cursor after its last row."""
    if limit is None or len(rows) <= limit:
        return Page(rows[:limit] if limit is not None else rows)
    items = rows[:limit]
    return Page(items, Cursor(kind, key(items[-1])).encode())


def page_in_memory(
    rows: Sequence[T], limit: int | None, cursor: str | None, kind: str, key: Callable[[T], str]
) -> Page[T]:
    """A page of a short list held in memory (servers, policies), in the order of the
    string ``key``: the rows after the cursor's key."""
    ordered = sorted(rows, key=key)
    start = Cursor.decode(cursor, kind, 1)
    if start is not None:
        ordered = [r for r in ordered if key(r) > str(start.key[0])]
    return cut(ordered, check_limit(limit), kind, lambda r: [key(r)])
