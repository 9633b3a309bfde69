"""``csbs backup …``: create, list, show, delete, restore and verify backups."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.table import Table
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError

from csbs.model import (
    BackupStatus,
    RestoreServerInput,
    TaskKind,
    TaskStatus,
)
from csbs.rules import BackupQuery
from csbs.units import format_size
from starter import summaries
from starter.cli_common import (
    BackupId,
    BackupIds,
    JsonOpt,
    LimitOpt,
    ServerIds,
    WaitOpt,
    YesOpt,
    _progress_bar,
    _task_table,
    confirm,
    console,
    emit,
    facade,
    fail,
    guarded,
    guarded_async,
    keep_whole,
    local_time,
    note_more,
    rows_for,
    run_async,
    say,
    say_lines,
    settings,
)
from starter.facade import workflow_error

backup_app = typer.Typer(no_args_is_help=True, help="Create, list, show, restore, delete backups.")


# -- backups --------------------------------------------------------------------------------
def _status(b: dict[str, Any]) -> str:
    """A backup's state, with its progress while it changes (B9)."""
    status = str(b["status"])
    if status in (BackupStatus.CREATING, BackupStatus.RESTORING, BackupStatus.DELETING):
        return f"{status} {b['progress']}%"
    return status


def _backup_table(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "name", "server", "status", "kind", "created", "size", "stored")
    f = facade(settings())
    short, servers = f.short_ids("backup"), f.short_ids("server")
    keep_whole(table, 0, [short.get(b["id"], b["id"]) for b in rows])
    for b in rows:
        table.add_row(
            short.get(b["id"], b["id"]),
            b["name"],
            f"{b['server_name']} ({servers.get(b['server_id'], b['server_id'])})",
            _status(b),
            b["kind"],
            local_time(b["created_at"]) or "",
            format_size(b["size_bytes"]),
            format_size(b["stored_bytes"]),
        )
    console.print(table)


@backup_app.command("create")
def backup_create(
    server_ids: ServerIds,
    name: Annotated[str | None, typer.Option(help="Backup name (default manualbk_xxxx).")] = None,
    description: Annotated[str | None, typer.Option(help="At most 255 characters.")] = None,
    offline: Annotated[bool, typer.Option(help="Stop the server for the snapshot.")] = False,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Bind the servers to this policy (automatic backup) instead of backing up "
            "now; a server bound to another policy moves here.",
        ),
    ] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Back up one or more servers now (one backup per server), or with --policy bind
    them to a policy that backs them up on its schedule (guide 2.2)."""
    f = facade(settings())
    if policy is not None:
        given = [o for o, v in (("--name", name), ("--description", description)) if v]
        given += [o for o, v in (("--offline", offline), ("--wait", wait)) if v]
        if given:
            fail(f"--policy binds the servers and backs up nothing now: drop {', '.join(given)}")
        guarded(lambda: f.check_policy(policy))
        bound = guarded(lambda: f.bind(policy, server_ids))
        emit(
            {"policy_id": policy, "server_ids": bound},
            as_json,
            lambda: console.print(f"{policy}: {len(bound)} server(s) bound"),
        )
        return
    ids = run_async(guarded_async(f.create_backups(server_ids, name, description, offline)))
    if wait:
        for backup_id in ids:

            def poll(b: str = backup_id) -> tuple[int, bool]:
                progress, status = f.backup_progress(b)
                return progress, status != BackupStatus.CREATING

            if not as_json:
                _progress_bar(f"backup {f.backup_view(backup_id)['name']}", poll)
            else:
                while not poll()[1]:
                    time.sleep(0.5)
    for backup_id in ids:
        for task in f.tasks(kind=TaskKind.BACKUP, backup_id=backup_id):
            if task["detail"]:
                say("warning:", "yellow", task["detail"])
    views = [f.backup_view(b) for b in ids]
    emit(views if len(views) > 1 else views[0], as_json, lambda: _backup_table(views))
    failed = [v for v in views if v["status"] == BackupStatus.ERROR]
    if failed:
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
    disks: Annotated[
        bool,
        typer.Option("--disks", help="List disk backups (one per disk of each backup) instead."),
    ] = False,
    limit: LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List backups, newest first; with --disks, their disk backups (restore one with
    ``backup restore BACKUP_ID --disk DISK_ID``)."""
    options = {k: v for k, v in locals().items() if k not in ("disks", "limit")}  # filters
    f = facade(settings())
    query = guarded(lambda: BackupQuery.model_validate(options))
    rows_wanted = rows_for(limit, as_json)
    if disks:
        disk_page = guarded(lambda: f.disk_backups_page(query, rows_wanted))
        emit(disk_page.items, as_json, lambda: _disk_backup_table(disk_page.items))
        note_more(disk_page, as_json)
        return
    page = guarded(lambda: f.backups_page(query, rows_wanted))
    emit(page.items, as_json, lambda: _backup_table(page.items))
    note_more(page, as_json)


def _disk_backup_table(rows: list[dict[str, Any]]) -> None:
    table = Table("backup", "disk", "role", "server", "status", "created", "size", "stored")
    for d in rows:
        table.add_row(
            f"{d['backup_name']} ({d['backup_id']})",
            f"{d['name']} ({d['disk_id']})",
            d["role"],
            f"{d['server_name']} ({d['server_id']})",
            _status(d),
            (d["created_at"] or "")[:19],
            format_size(d["size_bytes"]),
            format_size(d["stored_bytes"]),
        )
    console.print(table)


@backup_app.command("show")
def backup_show(backup_id: BackupId, as_json: JsonOpt = False) -> None:
    """Show one backup: disks, sizes, parent, times, tasks."""
    f = facade(settings())
    view = guarded(lambda: f.backup_detail(backup_id))

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
    backup_ids: BackupIds, yes: YesOpt = False, wait: WaitOpt = False, as_json: JsonOpt = False
) -> None:
    """Delete backups (available, error or delete_failed)."""
    f = facade(settings())
    guarded(lambda: f.check_backups(backup_ids))
    confirm(f"Delete {len(backup_ids)} backup(s)? This cannot be undone.", yes)

    async def delete() -> dict[str, Any]:
        handle = await guarded_async(f.delete_backups(backup_ids))
        if wait:
            try:
                result = cast(dict[str, Any], await handle.result())
            except WorkflowFailureError as exc:
                fail(workflow_error(exc))
            return result
        return {"workflow_id": handle.id, "backup_ids": backup_ids, "status": "deleting"}

    result = run_async(delete())
    emit(result, as_json, lambda: say_lines(summaries.deleted(result)))


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
    backup_id: BackupId,
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
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="Write every chunk (by default only what differs, when known)."
        ),
    ] = False,
    instant: Annotated[
        bool,
        typer.Option(
            "--instant",
            help="Run the server from the backup at once; copy its disks in the background "
            "(qemu and libvirt drivers).",
        ),
    ] = False,
    from_replica: Annotated[
        bool,
        typer.Option(
            "--from-replica",
            help="Read the backup from the second site (CSBS_REPLICA_*), e.g. while the "
            "primary is down.",
        ),
    ] = False,
    yes: YesOpt = False,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore a server's disks from a backup (overwrites them; stops the server).

    With --instant the command returns as soon as the server runs from the backup; the
    restore task goes on until its disks are copied (--wait waits for that too)."""
    s = settings()
    inp = guarded(
        lambda: RestoreServerInput(
            backup_id=backup_id,
            disk_mapping=_parse_map(map_ or []),
            power_on=power_on,
            disk_ids=disk or [],
            verify=verify,
            full=full,
            instant=instant,
            from_replica=from_replica,
        )
    )
    f = facade(s)
    backup = guarded(lambda: f.backup_view(backup_id))
    confirm(
        f"Restore server {backup['server_id']} from backup {backup['name']}? Its disks will "
        f"be overwritten.",
        yes,
    )

    async def restore() -> dict[str, Any]:
        handle, task_id = await guarded_async(f.restore(inp))
        if instant and not wait:
            return await _instant_running(handle, task_id, backup_id)
        if not wait:
            return {
                "workflow_id": handle.id,
                "task_id": task_id,
                "backup_id": backup_id,
                "status": "restoring",
            }
        if not as_json:

            def poll() -> tuple[int, bool]:
                done = f.task(task_id)["status"] != TaskStatus.RUNNING
                return f.backup_progress(backup_id)[0], done

            await asyncio.to_thread(_progress_bar, f"restore {backup['name']}", poll)
        try:
            result = cast(dict[str, Any], await handle.result())
        except WorkflowFailureError as exc:
            fail(workflow_error(exc))
        return result

    result = run_async(restore())
    for warning in result.get("warnings", []):
        say("warning:", "yellow", warning)
    if result.get("status") == "running":
        emit(
            result,
            as_json,
            lambda: console.print(
                f"server {result['server_id']} runs from backup {backup['name']}; its disks "
                f"are copied in the background (task {result['task_id']}: csbs task show "
                f"{result['task_id']})"
            ),
        )
        return
    emit(result, as_json, lambda: _restore_summary(result, backup["name"]))


def _restore_summary(result: dict[str, Any], backup_name: str) -> None:
    """What a restore did, in words (``--json`` has every field)."""
    if result.get("status") == "restoring":
        console.print(
            f"restoring from backup {backup_name} (task {result['task_id']}: csbs task show "
            f"{result['task_id']})",
            highlight=False,
        )
        return
    disks = result.get("disks", [])
    console.print(
        f"server {result.get('server_id')} restored from backup {backup_name}: "
        f"{len(disks)} disk(s)"
        + ("" if result.get("powered_on", True) else "; left powered off")
        + (", running from the backup" if result.get("instant") else ""),
        highlight=False,
    )
    for d in disks:
        onto = d.get("target_disk_id")
        how = "full" if not d.get("delta") else "only what differs"
        console.print(f"  {d.get('source_disk_id')} -> {onto} ({how})", highlight=False)


async def _instant_running(handle: Any, task_id: str, backup_id: str) -> dict[str, Any]:
    """Wait until an instant restore's server runs from the backup (or the run ends)."""
    while True:
        try:
            progress = await handle.query("progress")
        except RPCError:
            progress = {}
        step = progress.get("step")
        if step in ("copying disks", "done"):
            return {
                "workflow_id": handle.id,
                "task_id": task_id,
                "backup_id": backup_id,
                "server_id": progress.get("server_id"),
                "status": "running" if step == "copying disks" else "restored",
            }
        if step == "failed" or (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            try:
                await handle.result()
            except WorkflowFailureError as exc:
                fail(workflow_error(exc))
            fail("the instant restore ended before the server ran")
        await asyncio.sleep(0.1)


@backup_app.command("export")
def backup_export(
    backup_id: BackupId,
    output: Annotated[Path, typer.Option("--output", "-o", help="The image file to write.")],
    disk: Annotated[
        str | None, typer.Option("--disk", help="The backed-up disk (needed with several).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="qcow2 or raw (sparse).")] = "qcow2",
    as_json: JsonOpt = False,
) -> None:
    """Write one disk of a backup as a standalone, sparse qcow2 or raw image (the guide's
    "create an image from a backup"), fetched here from the object store."""
    f = facade(settings())
    result = guarded(lambda: f.export_image(backup_id, disk, fmt, output))
    emit(
        result,
        as_json,
        lambda: console.print(
            f"{result['output']}: {result['format']} image of disk {result['disk_id']}, "
            f"{format_size(result['size_bytes'])} ({format_size(result['allocated_bytes'])} "
            f"allocated), in {result['seconds']} s"
        ),
    )


@backup_app.command("mount")
def backup_mount(
    backup_id: BackupId,
    disk: Annotated[
        str | None, typer.Option("--disk", help="The backed-up disk (needed with several).")
    ] = None,
    socket_path: Annotated[
        Path | None,
        typer.Option("--socket", help="Unix socket to serve on (default under CSBS_VAR_DIR)."),
    ] = None,
    tcp_port: Annotated[
        int | None,
        typer.Option("--tcp-port", help="Also serve on 127.0.0.1:PORT (0: any free port)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve one disk of a backup read-only over NBD until interrupted, and print its URI:
    qemu-img, nbdfuse or a VM reads the disk as it was at backup time, and only the chunks
    it reads are fetched from the object store."""
    f = facade(settings())
    server = guarded(lambda: f.mount(backup_id, disk, socket_path, tcp_port))

    def stop(_signum: int, _frame: Any) -> None:
        server.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    info = {"backup_id": backup_id, "export": server.name, "uris": server.uris()}
    # One line, printed at once: a caller reads it while the export keeps serving.
    sys.stdout.write((json.dumps(info) if as_json else "\n".join(server.uris())) + "\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.close()
        say(
            "unmounted:",
            "green",
            f"{server.reader.chunks_fetched} chunks fetched "
            f"({format_size(server.reader.bytes_fetched)})",
        )


@backup_app.command("files")
def backup_files(
    backup_id: BackupId,
    action: Annotated[str, typer.Argument(help="ls (list a folder) or get (extract).")],
    path: Annotated[str, typer.Argument(help="Absolute path inside the filesystem.")] = "/",
    disk: Annotated[
        str | None, typer.Option("--disk", help="The backed-up disk (needed with several).")
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option("--partition", help="Partition number (needed when several hold one)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="get: where to write (default: the name, here)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List or extract files of a backed-up disk (ext4, xfs, NTFS, FAT; MBR or GPT
    partitions) without restoring it: only the chunks they occupy are fetched."""
    if action not in ("ls", "get"):
        fail(f"action: {action!r} is not ls or get")
    from csbs import file_restore  # the filesystem readers load only when needed

    f = facade(settings())
    volume, reader = guarded(lambda: f.browse(backup_id, disk, partition))
    fs = volume.fs
    assert fs is not None
    if action == "ls":
        entry = guarded(lambda: fs.stat(path))
        entries = guarded(lambda: fs.listdir(path)) if entry.kind == "dir" else [entry]
        rows = [file_restore.entry_json(e) for e in entries]

        def render() -> None:
            table = Table("name", "kind", "size", "modified", "mode")
            for e in entries:
                when = (
                    "" if e.mtime is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime))
                )
                mode = "" if e.mode is None else oct(e.mode)
                table.add_row(e.name, e.kind, format_size(e.size), when, mode)
            console.print(table)

        emit(
            {"volume": volume.name, "filesystem": fs.type_name, "path": path, "entries": rows},
            as_json,
            render,
        )
        return
    name = path.rstrip("/").rsplit("/", 1)[-1] or volume.name
    target = output or Path(name)
    done = guarded(lambda: file_restore.extract(fs, path, target))
    result = {
        "output": str(target),
        "files": done.files,
        "dirs": done.dirs,
        "symlinks": done.symlinks,
        "bytes": done.bytes,
        "skipped": done.skipped,
        "chunks_fetched": reader.chunks_fetched,
        "chunks_total": reader.manifest.chunk_count,
    }
    emit(
        result,
        as_json,
        lambda: console.print(
            f"{target}: {done.files} files, {done.dirs} folders, {done.symlinks} links "
            f"({format_size(done.bytes)}); {reader.chunks_fetched} of "
            f"{reader.manifest.chunk_count} chunks fetched"
        ),
    )


@backup_app.command("replicate")
def backup_replicate(backup_id: BackupId, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Copy a backup to the second site (CSBS_REPLICA_*): the chunks the replica lacks,
    then its manifests and descriptor. Resumes after a crash; copies nothing twice."""
    f = facade(settings())

    async def replicate() -> dict[str, Any]:
        handle, task_id = await guarded_async(f.replicate(backup_id))
        if not wait:
            return {"workflow_id": handle.id, "task_id": task_id, "status": "replicating"}
        try:
            result = cast(dict[str, Any], await handle.result())
        except WorkflowFailureError as exc:
            fail(workflow_error(exc))
        return {"workflow_id": handle.id, "task_id": task_id, "status": "replicated", **result}

    result = run_async(replicate())
    emit(
        result,
        as_json,
        lambda: console.print(
            f"backup {backup_id}: "
            + (
                f"replicated, {result['chunks_copied']} of {result['chunks_referenced']} chunks "
                f"copied ({format_size(result['bytes_copied'])}) in {result['seconds']:.1f} s"
                if result["status"] == "replicated"
                else f"replicating (task {result['task_id']})"
            ),
            highlight=False,
        ),
    )


@backup_app.command("verify")
def backup_verify(
    backup_id: BackupId,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    replica: Annotated[
        bool,
        typer.Option("--replica", help="Verify the copy on the second site (CSBS_REPLICA_*)."),
    ] = False,
) -> None:
    """Read every chunk of a backup from S3 and check its digest; problems are reported by
    disk and chunk, and a backup that fails is never restored."""
    f = facade(settings())

    async def verify() -> dict[str, Any]:
        handle, task_id = await guarded_async(f.verify(backup_id, replica))
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

    result = run_async(verify())

    def render() -> None:
        if "ok" not in result:
            say_lines(
                summaries.started(f"verifying backup {backup_id}", result, "csbs task show {task}")
            )
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
