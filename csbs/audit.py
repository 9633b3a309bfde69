"""The operation log (issue 16): every change made through the API, the console or the
CLI, with who made it, what, on what, when, and how it ended.

Who: ``ACTOR`` holds the caller of the request being served (the API sets it from the
token); the CLI, which has no token, is ``local <user>@<host>``.
"""

from __future__ import annotations

import contextvars
import getpass
import socket
from datetime import datetime

from sqlmodel import col, select

from csbs.catalog import Catalog
from csbs.catalog.rows import AuditRow, _aware, utcnow
from csbs.errors import InvalidInput
from csbs.paging import Cursor, Page, after_key, cut, time_key

#: Who is making the change being served now (None: the local user of the CLI).
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("csbs_actor", default=None)


def local_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"local {user}@{socket.gethostname()}"


def actor() -> str:
    return ACTOR.get() or local_actor()


class AuditLog:
    """One project's operation log."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def record(
        self,
        action: str,
        target: str,
        ok: bool,
        reason: str | None = None,
        who: str | None = None,
        project: str | None = None,
    ) -> AuditRow:
        """Log one change (in ``project``, by default the catalog's)."""
        row = AuditRow(
            project=project or self.catalog.project,
            at=utcnow(),
            actor=(who or actor())[:300],
            action=action,
            target=target[:1000],
            result="ok" if ok else "failed",
            reason=reason,
        )
        with self.catalog.session() as s:
            s.add(row)
        return row

    def list(self, since: datetime | None = None, limit: int | None = None) -> list[AuditRow]:
        """Newest first."""
        return self.page(since, limit, None).items

    def page(self, since: datetime | None, limit: int | None, cursor: str | None) -> Page[AuditRow]:
        """A page of entries, newest first (by time, then id), after ``cursor``."""
        q = select(AuditRow).where(AuditRow.project == self.catalog.project)
        if since is not None:
            q = q.where(col(AuditRow.at) >= since)
        start = Cursor.decode(cursor, "audit", 2)
        columns = (col(AuditRow.at), col(AuditRow.id))
        if start is not None:
            if not isinstance(start.key[1], int):
                raise InvalidInput("cursor: not a cursor this list gave out; start without one")
            q = q.where(after_key(columns, [start.time(0), start.key[1]]))
        q = q.order_by(*(c.desc() for c in columns))
        if limit is not None:
            q = q.limit(limit + 1)
        with self.catalog.session() as s:
            rows = list(s.exec(q).all())
        for r in rows:
            r.at = _aware(r.at) or r.at
        return cut(rows, limit, "audit", lambda r: [time_key(r.at), r.id])
