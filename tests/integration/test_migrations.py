"""Catalog migrations (Alembic) on SQLite and PostgreSQL: a new catalog, one made before
migrations existed, one made by ``create_all`` after issue 5, and several processes
opening one catalog at once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

from csbs.catalog import Catalog, make_engine
from csbs.schema import BASELINE, SCHEMA_HEAD, alembic_config, current_revision

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def revision(url: str) -> str | None:
    engine = make_engine(url)
    with engine.connect() as conn:
        rev = current_revision(conn)
    engine.dispose()
    return rev


def test_schema_head_is_the_newest_script() -> None:
    script = ScriptDirectory.from_config(alembic_config())  # type: ignore[arg-type]
    assert script.get_current_head() == SCHEMA_HEAD


def test_a_new_catalog_is_migrated_to_exactly_the_models(url: str) -> None:
    cat = Catalog(url)
    with cat.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata
        )
    cat.dispose()
    assert diff == []
    assert revision(url) == SCHEMA_HEAD


def _pre_migration_catalog(url: str) -> None:
    """The catalog as csbs 0.1 before issue 5 left it: baseline tables, no version table,
    one backup with one disk, a task and a policy with a binding."""
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), BASELINE)  # type: ignore[arg-type]
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(
            sa.text(
                "INSERT INTO backups (id, project, name, description, server_id, server_name,"
                " server_type, status, kind, created_at, progress, size_bytes, data_bytes,"
                " stored_bytes) VALUES ('bk-old', 'default', 'manualbk_0001', 'before', 'srv-1',"
                " 'web-1', 'local', 'available', 'manual', :t, 100, 4096, 4096, 100)"
            ),
            {"t": "2026-11-01 08:00:00"},
        )
        conn.execute(
            sa.text(
                "INSERT INTO disk_backups (backup_id, disk_id, disk_name, role, size_bytes,"
                " data_bytes, stored_bytes, bytes_read, chunks_total, chunks_uploaded,"
                " chunks_reused, chunks_zero, read_mode, progress, done) VALUES"
                " ('bk-old', 'd1', 'system', 'system', 4096, 4096, 100, 4096, 1, 1, 0, 0,"
                " 'full', 100, :done)"
            ),
            {"done": True},
        )
        conn.execute(
            sa.text(
                "INSERT INTO tasks (id, project, kind, status, backup_id, backup_name,"
                " server_id, server_name, started_at, progress) VALUES ('task-old', 'default',"
                " 'backup', 'succeeded', 'bk-old', 'manualbk_0001', 'srv-1', 'web-1', :t, 100)"
            ),
            {"t": "2026-11-01 08:00:00"},
        )
    engine.dispose()


def test_a_catalog_from_before_migrations_is_upgraded_keeping_its_rows(url: str) -> None:
    _pre_migration_catalog(url)
    assert revision(url) == BASELINE
    cat = Catalog(url)
    assert revision(url) == SCHEMA_HEAD
    backup = cat.get_backup("bk-old")
    assert (backup.name, backup.description, backup.stored_bytes) == (
        "manualbk_0001",
        "before",
        100,
    )
    (disk,) = cat.disk_backups("bk-old")
    assert (disk.disk_id, disk.read_mode, disk.read_note) == ("d1", "full", "")
    assert cat.get_task("task-old").status == "succeeded"
    # The upgraded catalog takes new rows with the new column.
    cat.update_row(type(disk), ("bk-old", "d1"), "disk", {"read_note": "resized"})
    assert cat.disk_backups("bk-old")[0].read_note == "resized"
    cat.dispose()


def test_a_catalog_made_by_create_all_after_issue_5_is_stamped_and_upgraded(url: str) -> None:
    """Issues 5 and 6 created read_note with ``create_all``, before migrations existed."""
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")  # type: ignore[arg-type]
        conn.execute(sa.text("DROP TABLE alembic_version"))  # create_all left none
    engine.dispose()
    assert revision(url) == BASELINE
    cat = Catalog(url)
    assert revision(url) == SCHEMA_HEAD
    with cat.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    cat.dispose()
    assert diff == []


@pytest.mark.slow
def test_processes_opening_one_new_catalog_at_once_all_succeed(url: str) -> None:
    code = "import sys; from csbs.catalog import Catalog; Catalog(sys.argv[1]).dispose()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert revision(url) == SCHEMA_HEAD


@pytest.mark.slow
def test_db_status_and_upgrade_commands(tmp_path: Path) -> None:
    import json
    import os

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    _pre_migration_catalog(url)
    env = {**os.environ, "CSBS_DATABASE_URL": url, "CSBS_VAR_DIR": str(tmp_path / "var")}

    def csbs(*args: str) -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-m", "starter.cli", *args, "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            check=True,
        )
        return dict(json.loads(out.stdout))

    status = csbs("db", "status")
    assert (status["revision"], status["head"], status["current"]) == (BASELINE, SCHEMA_HEAD, False)
    assert revision(url) == BASELINE  # status changed nothing
    upgraded = csbs("db", "upgrade")
    assert (upgraded["before"], upgraded["revision"], upgraded["current"]) == (
        BASELINE,
        SCHEMA_HEAD,
        True,
    )
