"""The catalog's engine and sessions: SQLite (WAL, waits on locks) or PostgreSQL, the
schema brought to the newest revision on open, one transaction per call, or one for a
whole step (``unit_of_work``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from csbs.errors import (
    NotFound,
)
from csbs.schema import upgrade_catalog

_Row = TypeVar("_Row", bound=SQLModel)


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, waits on locks) or PostgreSQL (pre-ping)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class CatalogBase:
    """One project's view of the catalog database."""

    def __init__(self, url: str, project: str = "default") -> None:
        self.url = url
        self.project = project
        self.engine = make_engine(url)
        self._unit = threading.local()
        upgrade_catalog(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction that commits when the block ends, or the transaction of the unit
        of work this thread is in (which commits when the unit ends)."""
        current: Session | None = getattr(self._unit, "session", None)
        if current is not None:
            yield current
            return
        with Session(self.engine, expire_on_commit=False) as session:
            yield session
            session.commit()

    @contextmanager
    def unit_of_work(self) -> Iterator[None]:
        """Every catalog call this thread makes inside the block is one transaction: it
        commits when the block ends, or changes nothing if the block raises. For steps that
        write several rows (a backup committed, its task finished, its server freed)."""
        with self.session() as session:  # the outer unit's, when nested: it commits
            outer = getattr(self._unit, "session", None)
            self._unit.session = session
            try:
                yield
            finally:
                self._unit.session = outer

    def dispose(self) -> None:
        self.engine.dispose()

    def update_row(self, model: type[_Row], key: Any, what: str, fields: dict[str, Any]) -> _Row:
        """Set ``fields`` on the row of ``model`` with primary key ``key`` in one transaction."""
        with self.session() as s:
            row = s.get(model, key)
            if row is None or getattr(row, "project", self.project) != self.project:
                raise NotFound(f"{what} does not exist")
            for name, value in fields.items():
                setattr(row, name, value)
            s.add(row)
            return row
