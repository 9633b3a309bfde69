"""The ``csbs`` command line (Typer + Rich). Every command takes ``--json``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from temporalio.client import WorkflowFailureError

from csbs.catalog import Catalog, backup_json, task_json
from csbs.config import Settings
from csbs.drivers import ComputeDriver, make_driver
from csbs.errors import CsbsError
from csbs.model import (
    BackupStatus,
    DeleteBackupsInput,
    RestoreServerInput,
    Server,
    ServerState,
    TaskKind,
    TaskStatus,
)
from csbs.units import format_size, parse_size
from starter.ops import Operations, backup_inputs, workflow_error


def _policy_app() -> typer.Typer:
    from starter.policy_cli import policy_app

    return policy_app


app = typer.Typer(no_args_is_help=True, help="Cloud Server Backup Service")
server_app = typer.Typer(no_args_is_help=True, help="Servers the compute driver knows.")
backup_app = typer.Typer(no_args_is_help=True, help="Create, list, show, restore, delete backups.")
task_app = typer.Typer(no_args_is_help=True, help="Backup, restore and delete task records.")
dev_app = typer.Typer(no_args_is_help=True, help="Developer tools (driver servers, stack).")
dev_server_app = typer.Typer(no_args_is_help=True, help="Drive servers of the compute driver.")
db_app = typer.Typer(no_args_is_help=True, help="The catalog database and its migrations.")
api_app = typer.Typer(no_args_is_help=True, help="The REST API for services without Temporal.")
app.add_typer(server_app, name="server")
app.add_typer(backup_app, name="backup")
app.add_typer(task_app, name="task")
app.add_typer(dev_app, name="dev")
app.add_typer(db_app, name="db")
app.add_typer(api_app, name="api")
app.add_typer(_policy_app(), name="policy")
dev_app.add_typer(dev_server_app, name="server")


@app.callback()
def _global_options(
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            envvar="CSBS_PROJECT",
            help="The project (tenant) to act in; default CSBS_PROJECT or 'default'.",
        ),
    ] = None,
) -> None:
    """Cloud Server Backup Service"""
    if project is not None:
        os.environ["CSBS_PROJECT"] = project


#: Output never interprets markup: names, descriptions and reasons are user text, and
#: "[/x]" must print as it is, never crash or restyle the output. Colour comes from
#: ``Text`` styles instead (see ``say``).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


def say(label: str, style: str, message: str, to: Console | None = None) -> None:
    """Print ``label: message`` with the label coloured and the message literal."""
    (to or err_console).print(
        Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True
    )


T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until it finishes, with progress.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line and exit non-zero."""
    say("error:", "red", message)
    raise typer.Exit(code)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        fail(_validation_message(exc))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def catalog(s: Settings) -> Catalog:
    return Catalog(s.effective_database_url, s.project)


def driver(s: Settings) -> ComputeDriver:
    return make_driver(s)


def operations(s: Settings) -> Operations:
    return Operations(s)


async def guarded_async(coro: Awaitable[T]) -> T:
    """Await an operation, turning domain errors into one line and a non-zero exit."""
    try:
        return await coro
    except CsbsError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(_validation_message(exc))


def emit(data: Any, as_json: bool, render: Callable[[], None] | None = None) -> None:
    if as_json or render is None:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        render()


def run_async(coro: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await coro

    try:
        return asyncio.run(wrapped())
    except RuntimeError as exc:
        if "Failed client connect" in str(exc) or "connection" in str(exc).lower():
            fail(f"cannot reach Temporal at {Settings().temporal_address}: {exc}")
        raise


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning domain errors into one line and a non-zero exit."""
    try:
        return fn()
    except CsbsError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ValueError as exc:
        fail(str(exc))


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question} needs confirmation: pass --yes")
    if not typer.confirm(question):
        fail("cancelled", code=2)


def _progress_bar(label: str, get: Callable[[], tuple[int, bool]], interval: float = 0.5) -> None:
    """Show a progress bar fed by ``get() -> (percent, finished)`` until finished."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=100)
        while True:
            pct, finished = get()
            bar.update(task, completed=pct)
            if finished:
                return
            time.sleep(interval)


# -- servers --------------------------------------------------------------------------------
def _server_table(servers: list[Server]) -> None:
    table = Table("id", "name", "type", "state", "disks")
    for s in servers:
        disks = ", ".join(
            f"{d.id} ({d.role.value}{', shared' if d.shared else ''}, {format_size(d.size_bytes)})"
            for d in s.disks
        )
        table.add_row(s.id, s.name, s.type, s.state.value, disks)
    console.print(table)


def _server_json(s: Server) -> dict[str, Any]:
    return s.model_dump(mode="json", exclude={"project"})


@server_app.command("list")
def server_list(as_json: JsonOpt = False) -> None:
    """List the servers of the project."""
    servers = guarded(lambda: driver(settings()).list_servers())
    emit([_server_json(s) for s in servers], as_json, lambda: _server_table(servers))


# -- backups --------------------------------------------------------------------------------
def _backup_table(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "name", "server", "status", "kind", "created", "size", "stored")
    for b in rows:
        status = b["status"]
        if status in (BackupStatus.CREATING, BackupStatus.RESTORING, BackupStatus.DELETING):
            status = f"{status} {b['progress']}%"
        table.add_row(
            b["id"],
            b["name"],
            f"{b['server_name']} ({b['server_id']})",
            status,
            b["kind"],
            (b["created_at"] or "")[:19],
            format_size(b["size_bytes"]),
            format_size(b["stored_bytes"]),
        )
    console.print(table)


def _backup_view(cat: Catalog, backup_id: str) -> dict[str, Any]:
    return backup_json(cat.get_backup(backup_id), cat.disk_backups(backup_id))


@backup_app.command("create")
def backup_create(
    server_ids: Annotated[list[str], typer.Argument(help="Servers to back up.")],
    name: Annotated[str | None, typer.Option(help="Backup name (default manualbk_xxxx).")] = None,
    description: Annotated[str | None, typer.Option(help="At most 255 characters.")] = None,
    offline: Annotated[bool, typer.Option(help="Stop the server for the snapshot.")] = False,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Back up one or more servers now (one backup per server)."""
    s = settings()
    inputs = guarded(lambda: backup_inputs(server_ids, name, description, offline))
    ops = operations(s)
    cat = ops.catalog

    async def start() -> list[str]:
        return await guarded_async(ops.create_backups(inputs))

    ids = run_async(start())
    if wait:
        for backup_id in ids:

            def poll(b: str = backup_id) -> tuple[int, bool]:
                row = cat.get_backup(b)
                return row.progress, row.status != BackupStatus.CREATING

            if not as_json:
                _progress_bar(f"backup {cat.get_backup(backup_id).name}", poll)
            else:
                while not poll()[1]:
                    time.sleep(0.5)
    for backup_id in ids:
        for task in cat.list_tasks(kind=TaskKind.BACKUP, backup_id=backup_id):
            if task.detail:
                say("warning:", "yellow", task.detail)
    views = [_backup_view(cat, b) for b in ids]
    emit(views if len(views) > 1 else views[0], as_json, lambda: _backup_table(views))
    failed = [v for v in views if v["status"] == BackupStatus.ERROR]
    if wait and failed:
        fail("; ".join(f"backup {v['id']} failed: {v['error']}" for v in failed))


@backup_app.command("list")
def backup_list(
    status: Annotated[BackupStatus | None, typer.Option(help="Only backups in this state.")] = None,
    server_id: Annotated[str | None, typer.Option(help="Only backups of this server.")] = None,
    server_name: Annotated[str | None, typer.Option(help="Server name contains this.")] = None,
    server_type: Annotated[str | None, typer.Option(help="Only servers of this type.")] = None,
    name: Annotated[str | None, typer.Option(help="Backup name contains this.")] = None,
    id: Annotated[str | None, typer.Option("--id", help="This backup id.")] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO time).")] = None,
    until: Annotated[str | None, typer.Option(help="Created at or before (ISO time).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List backups, newest first."""
    ops = operations(settings())
    rows = guarded(
        lambda: ops.list_backups(
            status.value if status else None,
            server_id,
            server_name,
            server_type,
            name,
            id,
            since,
            until,
        )
    )
    emit(rows, as_json, lambda: _backup_table(rows))


@backup_app.command("show")
def backup_show(backup_id: str, as_json: JsonOpt = False) -> None:
    """Show one backup: disks, sizes, parent, times, tasks."""
    view = guarded(lambda: operations(settings()).backup_detail(backup_id))

    def render() -> None:
        table = Table(show_header=False)
        for key in (
            "id",
            "name",
            "description",
            "status",
            "progress",
            "kind",
            "server_id",
            "server_name",
            "server_type",
            "parent_id",
            "policy_id",
            "created_at",
            "snapshot_at",
            "finished_at",
            "size_bytes",
            "data_bytes",
            "stored_bytes",
            "error",
        ):
            table.add_row(key, "" if view[key] is None else str(view[key]))
        console.print(table)
        disks = Table("disk", "name", "role", "size", "data", "stored", "read", "mode")
        for d in view["disks"]:
            disks.add_row(
                d["disk_id"],
                d["name"],
                d["role"],
                format_size(d["size_bytes"]),
                format_size(d["data_bytes"]),
                format_size(d["stored_bytes"]),
                format_size(d["bytes_read"]),
                d["read_mode"],
            )
        console.print(disks)
        _task_table(view["tasks"])

    emit(view, as_json, render)


@backup_app.command("delete")
def backup_delete(
    backup_ids: list[str], yes: YesOpt = False, wait: WaitOpt = False, as_json: JsonOpt = False
) -> None:
    """Delete backups (available, error or delete_failed)."""
    ops = operations(settings())
    guarded(lambda: DeleteBackupsInput(backup_ids=backup_ids))
    for b in backup_ids:
        guarded(lambda b=b: ops.catalog.get_backup(b))  # type: ignore[misc]
    confirm(f"Delete {len(backup_ids)} backup(s)? This cannot be undone.", yes)

    async def go() -> dict[str, Any]:
        handle = await guarded_async(ops.delete_backups(backup_ids))
        if wait:
            try:
                result = cast(dict[str, Any], await handle.result())
            except WorkflowFailureError as exc:
                fail(workflow_error(exc))
            return result
        return {"workflow_id": handle.id, "backup_ids": backup_ids, "status": "deleting"}

    result = run_async(go())
    emit(result, as_json, lambda: console.print(result))


def _parse_map(pairs: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            fail(f"--map must be SRC_DISK=DST_DISK (got {pair!r})")
        if src in mapping:
            fail(f"--map: disk {src} is mapped twice")
        mapping[src] = dst
    return mapping


@backup_app.command("restore")
def backup_restore(
    backup_id: str,
    map_: Annotated[list[str] | None, typer.Option("--map", help="SRC_DISK=DST_DISK")] = None,
    disk: Annotated[
        list[str] | None, typer.Option("--disk", help="Restore only this backed-up disk (R7).")
    ] = None,
    power_on: Annotated[
        bool, typer.Option("--power-on/--no-power-on", help="Start the server afterwards.")
    ] = True,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Read and check every chunk before touching any disk."),
    ] = False,
    yes: YesOpt = False,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore a server's disks from a backup (overwrites them; stops the server)."""
    s = settings()
    inp = guarded(
        lambda: RestoreServerInput(
            backup_id=backup_id,
            disk_mapping=_parse_map(map_ or []),
            power_on=power_on,
            disk_ids=disk or [],
            verify=verify,
        )
    )
    ops = operations(s)
    cat = ops.catalog
    backup = guarded(lambda: cat.get_backup(backup_id))
    confirm(
        f"Restore server {backup.server_id} from backup {backup.name}? Its disks will be "
        f"overwritten.",
        yes,
    )

    async def go() -> dict[str, Any]:
        handle, task_id = await guarded_async(ops.restore(inp))
        if not wait:
            return {
                "workflow_id": handle.id,
                "task_id": task_id,
                "backup_id": backup_id,
                "status": "restoring",
            }
        if not as_json:

            def poll() -> tuple[int, bool]:
                task = cat.get_task(task_id)
                row = cat.get_backup(backup_id)
                return row.progress, task.status != TaskStatus.RUNNING

            await asyncio.to_thread(_progress_bar, f"restore {backup.name}", poll)
        try:
            result = cast(dict[str, Any], await handle.result())
        except WorkflowFailureError as exc:
            fail(workflow_error(exc))
        return result

    result = run_async(go())
    for warning in result.get("warnings", []):
        say("warning:", "yellow", warning)
    emit(result, as_json, lambda: console.print(result))


@backup_app.command("verify")
def backup_verify(backup_id: str, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Read every chunk of a backup from S3 and check its digest; problems are reported by
    disk and chunk, and a backup that fails is never restored."""
    ops = operations(settings())

    async def go() -> dict[str, Any]:
        handle, task_id = await guarded_async(ops.verify(backup_id))
        if not wait:
            return {"workflow_id": handle.id, "task_id": task_id, "status": "verifying"}
        try:
            return cast(dict[str, Any], await handle.result())
        except WorkflowFailureError as exc:
            cause = exc.cause
            details = getattr(cause, "details", None)
            if details and isinstance(details[0], dict):
                return dict(details[0])
            fail(workflow_error(exc))

    result = run_async(go())

    def render() -> None:
        if "ok" not in result:
            console.print(result)
            return
        console.print(
            f"backup {backup_id}: {result['chunks_checked']} chunks, "
            f"{format_size(result['bytes_checked'])} checked",
            highlight=False,
        )
        for p in result["problems"]:
            where = (
                f"chunk {p['index']} ({(p['chunk_id'] or '')[:16]})"
                if p["index"] is not None
                else ""
            )
            console.print(
                f"  disk {p['disk_id']} {where}: {p['problem']}: {p['message']}", highlight=False
            )

    emit(result, as_json, render)
    if result.get("ok") is False:
        fail(result["reason"])


# -- tasks ----------------------------------------------------------------------------------
def _task_table(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "kind", "status", "backup", "server", "started", "finished", "reason")
    for t in rows:
        table.add_row(
            t["id"],
            t["kind"],
            t["status"],
            t["backup_name"] or t["backup_id"] or "",
            t["server_name"] or t["server_id"] or "",
            (t["started_at"] or "")[:19],
            (t["finished_at"] or "")[:19],
            t["reason"] or "",
        )
    console.print(table)


@task_app.command("list")
def task_list(
    kind: Annotated[TaskKind | None, typer.Option(help="backup, restore, delete or verify")] = None,
    status: Annotated[TaskStatus | None, typer.Option(help="running, succeeded or failed")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List task records, newest first."""
    cat = catalog(settings())
    rows = [task_json(t) for t in cat.list_tasks(kind=kind, status=status)]
    emit(rows, as_json, lambda: _task_table(rows))


@task_app.command("show")
def task_show(task_id: str, as_json: JsonOpt = False) -> None:
    """Show one task, with its failure reason."""
    cat = catalog(settings())
    row = task_json(guarded(lambda: cat.get_task(task_id)))
    emit(row, as_json, lambda: _task_table([row]))


@task_app.command("delete")
def task_delete(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Failed tasks to delete.")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed task.")] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete failed task records (T2): some by id, or all failed ones."""
    ops = operations(settings())
    cat = ops.catalog
    if bool(task_ids) == all_failed:
        fail("give task ids or --all-failed (not both)")
    ids = guarded(lambda: ops.deletable_tasks(task_ids, all_failed))
    if ids:
        confirm(f"Delete {len(ids)} failed task record(s)?", yes)
    deleted = cat.delete_tasks(ids)
    emit({"deleted": ids}, as_json, lambda: console.print(f"deleted {deleted} task record(s)"))


# -- catalog database -----------------------------------------------------------------------
def _db_state(url: str) -> dict[str, Any]:
    import sqlalchemy as sa

    from csbs.catalog import make_engine
    from csbs.schema import SCHEMA_HEAD, current_revision

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
    except sa.exc.OperationalError as exc:
        fail(f"cannot open the catalog at {_safe_url(url)}: {exc.orig}")
    finally:
        engine.dispose()
    return {
        "url": _safe_url(url),
        "revision": rev,
        "head": SCHEMA_HEAD,
        "current": rev == SCHEMA_HEAD,
    }


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """Show the catalog's schema revision and the newest one (changes nothing)."""
    state = _db_state(settings().effective_database_url)
    emit(
        state,
        as_json,
        lambda: console.print(
            f"{state['url']}: revision {state['revision'] or 'none (empty)'}, newest "
            f"{state['head']}" + ("" if state["current"] else " (run csbs db upgrade)"),
            highlight=False,
        ),
    )


@db_app.command("upgrade")
def db_upgrade(as_json: JsonOpt = False) -> None:
    """Migrate the catalog to the newest schema (every csbs process also does this when it
    opens the catalog; this does it now, and says what it did)."""
    from csbs.catalog import make_engine
    from csbs.schema import upgrade_catalog

    url = settings().effective_database_url
    engine = make_engine(url)
    try:
        before = upgrade_catalog(engine)
    finally:
        engine.dispose()
    state = {**_db_state(url), "before": before}
    emit(
        state,
        as_json,
        lambda: console.print(
            f"{state['url']}: {state['before'] or 'empty'} -> {state['revision']}", highlight=False
        ),
    )


# -- REST API --------------------------------------------------------------------------------
@api_app.command("serve")
def api_serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless proxied).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
) -> None:
    """Serve the REST API (OpenAPI at /openapi.json, docs at /docs) until interrupted."""
    import uvicorn

    from starter.api import create_app

    uvicorn.run(create_app(settings()), host=host, port=port, log_level="info")


# -- dev: driver servers ---------------------------------------------------------------------
@app.command("doctor")
def doctor(as_json: JsonOpt = False) -> None:
    """Check Temporal (search attributes, a worker), S3, the catalog and the hypervisor,
    and say what is wrong. Exits 1 when a check fails; changes nothing."""
    from starter.doctor import run_checks

    checks = asyncio.run(run_checks(settings()))

    def render() -> None:
        for c in checks:
            mark = ("ok  ", "green") if c.ok else ("FAIL", "red")
            console.print(Text.assemble(mark, f" {c.name:18} {c.detail}"), highlight=False)

    emit([c.as_dict() for c in checks], as_json, render)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@dev_server_app.command("create")
def dev_server_create(
    name: Annotated[str, typer.Option(help="Server name.")],
    disk: Annotated[list[str], typer.Option(help="Disk size (first = system disk), e.g. 1GiB.")],
    shared_disk: Annotated[
        list[str] | None, typer.Option(help="Shared (multi-attach) disk size.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a server with the configured driver (running, disks empty and sparse)."""
    sizes = guarded(lambda: [parse_size(d, "disk") for d in disk])
    shared = guarded(lambda: [parse_size(d, "shared-disk") for d in shared_disk or []])
    server = guarded(lambda: driver(settings()).create_server(name, sizes, shared))
    emit(_server_json(server), as_json, lambda: _server_table([server]))


@dev_server_app.command("write")
def dev_server_write(
    server_id: str,
    disk: Annotated[str, typer.Option(help="Disk id.")],
    offset: Annotated[str, typer.Option(help="Byte offset (units allowed).")],
    length: Annotated[str | None, typer.Option(help="Bytes to write (units allowed).")] = None,
    pattern: Annotated[str, typer.Option(help="random, text or zero.")] = "random",
    from_file: Annotated[Path | None, typer.Option(help="Write this file's bytes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random pattern.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write to a disk as the guest would (goes through COW and changed-block tracking)."""
    off = guarded(lambda: parse_size(offset, "offset"))
    if (length is None) == (from_file is None):
        fail("give exactly one of --length or --from-file")
    if from_file is not None:
        try:
            data = from_file.read_bytes()
        except OSError as exc:
            fail(f"from-file: cannot read {from_file} ({exc.strerror})")
    else:
        n = guarded(lambda: parse_size(length or "0", "length"))
        data = guarded(lambda: make_pattern(pattern, n, seed))
    guarded(lambda: driver(settings()).write(server_id, disk, off, data))
    emit(
        {"server_id": server_id, "disk_id": disk, "offset": off, "length": len(data)},
        as_json,
        lambda: console.print(f"wrote {len(data)} bytes at {off} on {disk}"),
    )


def make_pattern(pattern: str, n: int, seed: int | None = None) -> bytes:
    """Bytes for ``dev server write``: random (incompressible), text (compressible) or zero."""
    if pattern == "random":
        import random

        return random.Random(seed).randbytes(n) if seed is not None else _urandom(n)
    if pattern == "text":
        line = b"csbs test data: the quick brown fox jumps over the lazy dog 0123456789\n"
        stamp = str(seed if seed is not None else time.time_ns()).encode() + b" "
        unit = stamp + line
        return (unit * (n // len(unit) + 1))[:n]
    if pattern == "zero":
        return bytes(n)
    raise ValueError(f"pattern must be random, text or zero (got {pattern!r})")


def _urandom(n: int) -> bytes:
    return os.urandom(n)


@dev_server_app.command("add-disk")
def dev_server_add_disk(
    server_id: str,
    size: Annotated[str, typer.Option(help="Size of the new data disk.")],
    as_json: JsonOpt = False,
) -> None:
    """Attach a new empty data disk."""
    n = guarded(lambda: parse_size(size, "size"))
    disk = guarded(lambda: driver(settings()).add_disk(server_id, n))
    emit(disk.model_dump(mode="json"), as_json, lambda: console.print(f"added {disk.id}"))


@dev_server_app.command("resize-disk")
def dev_server_resize_disk(
    server_id: str,
    disk: Annotated[str, typer.Option(help="Disk id.")],
    size: Annotated[str, typer.Option(help="New, larger size.")],
    as_json: JsonOpt = False,
) -> None:
    """Grow a disk."""
    n = guarded(lambda: parse_size(size, "size"))
    grown = guarded(lambda: driver(settings()).resize_disk(server_id, disk, n))
    emit(grown.model_dump(mode="json"), as_json, lambda: console.print(f"resized {disk}"))


@dev_server_app.command("remove-disk")
def dev_server_remove_disk(
    server_id: str, disk: Annotated[str, typer.Option(help="Disk id.")], as_json: JsonOpt = False
) -> None:
    """Detach and delete a data disk."""
    guarded(lambda: driver(settings()).remove_disk(server_id, disk))
    emit(
        {"server_id": server_id, "removed": disk}, as_json, lambda: console.print(f"removed {disk}")
    )


@dev_server_app.command("checksum")
def dev_server_checksum(server_id: str, as_json: JsonOpt = True) -> None:
    """sha256 of every disk of a server, as a JSON object {disk_id: hex}."""
    sums = guarded(lambda: driver(settings()).checksum(server_id))
    emit(sums, True)


@dev_server_app.command("set-state")
def dev_server_set_state(server_id: str, state: ServerState, as_json: JsonOpt = False) -> None:
    """Force a server into a state (to try preconditions: fault, resizing, ...)."""
    server = guarded(lambda: driver(settings()).set_state(server_id, state))
    emit(_server_json(server), as_json, lambda: _server_table([server]))


@dev_app.command("up")
def dev_up(
    demo: Annotated[bool, typer.Option(help="Create the demo server if missing.")] = True,
) -> None:
    """Start the embedded stack: Temporal dev server + Web UI, SeaweedFS S3, worker, demo."""
    from starter import stack

    stack.up(settings(), demo=demo)


@dev_app.command("down")
def dev_down() -> None:
    """Stop everything ``csbs dev up`` started (state under var/ stays)."""
    from starter import stack

    stack.down(settings())


def main() -> None:
    """Run the CLI, then leave without interpreter teardown: the Temporal SDK's threads can
    abort a normal exit ("PyGILState_Release", sdk-python #300)."""
    from csbs.telemetry import TelemetryConfigError, setup_tracing, shutdown_tracing

    code: int = 0
    try:
        setup_tracing("csbs-api" if sys.argv[1:3] == ["api", "serve"] else "csbs-cli")
        app()
    except TelemetryConfigError as exc:
        say("error:", "red", str(exc))
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    shutdown_tracing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
