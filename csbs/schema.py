"""Catalog schema migrations (Alembic, scripts in ``csbs/migrations``).

Every process that opens a catalog brings it to the newest revision first. A catalog
created before migrations existed (tables, no ``alembic_version``) is stamped with the
baseline and upgraded from there. Two processes opening one catalog at once take turns:
a transaction-scoped advisory lock on PostgreSQL, a file lock beside a SQLite file.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

#: The newest revision in ``csbs/migrations/versions`` (a test keeps the two in step).
SCHEMA_HEAD = "0010"
BASELINE = "0001"
_PG_LOCK_KEY = 0x63736273  # "csbs"


def alembic_config(connection: Connection | None = None) -> object:
    """The Alembic configuration of the catalog, bound to ``connection`` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "csbs:migrations")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def current_revision(conn: Connection) -> str | None:
    """The catalog's revision: None for an empty database, BASELINE for a catalog made
    before migrations existed."""
    tables = set(sa.inspect(conn).get_table_names())
    if "alembic_version" in tables:
        row = conn.execute(sa.text("SELECT version_num FROM alembic_version")).first()
        return None if row is None else str(row[0])
    return BASELINE if "backups" in tables else None


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    path = engine.url.database
    if not path or path == ":memory:":
        yield
        return
    lock = Path(f"{path}.migrate.lock")
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def upgrade_catalog(engine: Engine) -> str | None:
    """Bring the catalog to SCHEMA_HEAD; return the revision it was at (None: new)."""
    with engine.connect() as conn:
        before = current_revision(conn)
    if before == SCHEMA_HEAD:
        return before
    from alembic import command

    if engine.dialect.name == "sqlite":
        with _sqlite_file_lock(engine), engine.connect() as conn:
            before = current_revision(conn)
            if before != SCHEMA_HEAD:
                _migrate(command, conn, before)
            conn.commit()
        return before
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        before = current_revision(conn)
        if before != SCHEMA_HEAD:
            _migrate(command, conn, before)
        conn.commit()
    return before


def _migrate(command: object, conn: Connection, before: str | None) -> None:
    cfg = alembic_config(conn)
    tables = set(sa.inspect(conn).get_table_names())
    if before == BASELINE and "alembic_version" not in tables:
        command.stamp(cfg, BASELINE)  # type: ignore[attr-defined]
    command.upgrade(cfg, "head")  # type: ignore[attr-defined]
