"""Lists that scale (issue 16): the catalog on PostgreSQL with 100k backups over 1k servers
and 10 projects, and how long the queries behind each list and each new backup take.

Usage: .venv/bin/python bench/catalog_scale.py [--url URL] [--backups 100000] [--repeat 30]

It creates a fresh database ``csbs_bench_catalog`` on the server of ``--url`` (default: the
local PostgreSQL, trust auth), brings it to the newest schema with the same migrations as
csbs, and fills it like a year of daily backups: every server of a project has its
backups spread over 365 days (two disks each, a backup task each), 1 in 50 in error. Then,
for one project (a tenant of 10k backups), the median and the 95th percentile of:

- *first page*: ``GET /v1/backups`` without filters: the newest 100 backups of the
  project with their disks (``Facade.backups_page``: two queries);
- *page 50*: the same, 50 pages on (by cursor: the same cost as the first);
- *filtered page*: the first page of one server's backups, and of those in error;
- *parent lookup*: the parent of a new incremental backup (the newest available backup
  of its server that did not fail verification);
- *tasks page*: the newest 100 task records.

The targets (issue 16): the first page under 100 ms, the parent lookup under 50 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from csbs.catalog import BackupFilter, Catalog

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DB = "csbs_bench_catalog"


def fresh_database(url: str) -> str:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DB}"))
        conn.execute(sa.text(f"CREATE DATABASE {DB}"))
    admin.dispose()
    return str(sa.engine.make_url(url).set(database=DB).render_as_string(hide_password=False))


def fill(url: str, backups: int, projects: int, servers: int) -> None:
    """Insert the rows in bulk (COPY-like batches through SQLAlchemy core)."""
    Catalog(url, "p0").dispose()  # migrations to the newest schema
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine, only=["backups", "disk_backups", "tasks"])
    t_backups, t_disks, t_tasks = (meta.tables[n] for n in ("backups", "disk_backups", "tasks"))
    rnd = random.Random(16)
    now = datetime(2026, 11, 28, tzinfo=UTC)
    per_server = backups // servers
    rows_b: list[dict[str, Any]] = []
    rows_d: list[dict[str, Any]] = []
    rows_t: list[dict[str, Any]] = []

    def flush() -> None:
        if not rows_b:
            return
        with engine.begin() as conn:
            conn.execute(t_backups.insert(), rows_b)
            conn.execute(t_disks.insert(), rows_d)
            conn.execute(t_tasks.insert(), rows_t)
        rows_b.clear()
        rows_d.clear()
        rows_t.clear()

    n = 0
    for s in range(servers):
        project = f"p{s % projects}"
        server_id = f"srv-{s:012x}"
        for i in range(per_server):
            created = now - timedelta(days=365 * i / per_server, seconds=rnd.randint(0, 3600))
            backup_id = f"bk-{n:016x}"
            status = "error" if rnd.random() < 0.02 else "available"
            rows_b.append(
                {
                    "id": backup_id,
                    "project": project,
                    "name": f"autobk_{n:06d}",
                    "description": "",
                    "server_id": server_id,
                    "server_name": f"web-{s}",
                    "server_type": "libvirt",
                    "status": status,
                    "kind": "scheduled",
                    "policy_id": f"pol-{s % 32:012x}",
                    "parent_id": None,
                    "created_at": created,
                    "snapshot_at": created,
                    "finished_at": created,
                    "progress": 100,
                    "size_bytes": 40 << 30,
                    "data_bytes": 8 << 30,
                    "stored_bytes": 1 << 28,
                    "verify_status": "",
                    "replica_status": "",
                }
            )
            for d, role in enumerate(("system", "data")):
                rows_d.append(
                    {
                        "backup_id": backup_id,
                        "disk_id": f"disk-{s:08x}{d}",
                        "disk_name": role,
                        "role": role,
                        "size_bytes": 20 << 30,
                        "data_bytes": 4 << 30,
                        "stored_bytes": 1 << 27,
                        "bytes_read": 1 << 28,
                        "chunks_total": 5120,
                        "chunks_uploaded": 32,
                        "chunks_reused": 5088,
                        "chunks_zero": 0,
                        "read_mode": "dirty-bitmap",
                        "read_note": "",
                        "progress": 100,
                        "done": True,
                    }
                )
            rows_t.append(
                {
                    "id": f"task-{n:016x}",
                    "project": project,
                    "kind": "backup",
                    "status": "failed" if status == "error" else "succeeded",
                    "backup_id": backup_id,
                    "backup_name": f"autobk_{n:06d}",
                    "server_id": server_id,
                    "server_name": f"web-{s}",
                    "started_at": created,
                    "finished_at": created,
                    "progress": 100,
                }
            )
            n += 1
            if len(rows_b) >= 5000:
                flush()
    flush()
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    engine.dispose()


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and 95th percentile in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--backups", type=int, default=100_000)
    ap.add_argument("--projects", type=int, default=10)
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    url = fresh_database(args.url)
    start = time.perf_counter()
    fill(url, args.backups, args.projects, args.servers)
    print(f"filled {args.backups} backups ({2 * args.backups} disk backups, {args.backups} "
          f"tasks) over {args.servers} servers and {args.projects} projects in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip

    import tempfile

    from csbs.config import Settings
    from starter.facade import Facade

    var = Path(tempfile.mkdtemp(prefix="csbs-bench-"))
    facade = Facade(Settings(database_url=url, project="p3", var_dir=var))
    catalog = facade.catalog
    tenant = len(catalog.list_backups())
    cursor: str | None = None
    for _ in range(49):
        cursor = catalog.backups_page(None, 100, cursor).next_cursor
    server = catalog.list_backups()[0].server_id
    cases: list[tuple[str, Callable[[], object]]] = [
        ("first page (100 backups with their disks)", lambda: facade.backups_page(None, 100)),
        ("page 50, by cursor", lambda: facade.backups_page(None, 100, cursor)),
        (
            "first page of one server's backups",
            lambda: catalog.backups_page(BackupFilter(server_id=server), 100, None),
        ),
        (
            "first page of backups in error",
            lambda: catalog.backups_page(BackupFilter(status="error"), 100, None),
        ),
        ("parent lookup of a new backup", lambda: catalog.last_available_backup(server)),
        ("first page of tasks (100)", lambda: catalog.tasks_page(limit=100)),
    ]
    print(f"project p3: {tenant} backups; median and p95 of {args.repeat} runs, ms")
    print(f"{'query':45} {'median':>8} {'p95':>8}")
    for name, fn in cases:
        median, p95 = timed(fn, args.repeat)
        print(f"{name:45} {median:8.1f} {p95:8.1f}")
    with catalog.session() as s:
        plan = s.execute(
            sa.text(
                "EXPLAIN SELECT * FROM backups WHERE project = 'p3' "
                "ORDER BY created_at DESC, id DESC LIMIT 101"
            )
        ).all()
    print("plan of the first page:", " / ".join(str(r[0]).strip() for r in plan[:3]))
    catalog.dispose()


if __name__ == "__main__":
    main()
