"""The one façade that the CLI, the REST API and the console call: read servers, backups,
tasks and policies; start a workflow and wait until it has left its record in the catalog
(or report why it could not); write a policy and then its schedule. Entry points only
parse and render: every rule lives in the core (``csbs.rules``, ``csbs.policy_service``).

Everything here raises :class:`csbs.errors.CsbsError` (or pydantic's ``ValidationError``)
for a person to read; the CLI prints one line, the API answers with a problem document.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, FailureError

if TYPE_CHECKING:
    from csbs.file_restore import Volume

from csbs import export, quota
from csbs import ids as id_prefix
from csbs.audit import AuditLog
from csbs.catalog import BackupFilter, Catalog, backup_json, task_json
from csbs.catalog.views import DiskBackupListView
from csbs.config import Settings
from csbs.drivers import ComputeDriver, make_fleet
from csbs.errors import CorruptData, CsbsError, InvalidInput, InvalidState
from csbs.format import Manifest
from csbs.model import (
    BackupStatus,
    DeleteBackupsInput,
    ReplicateBackupInput,
    RestoreServerInput,
    RunPolicyInput,
    Server,
    TaskKind,
    TaskStatus,
    VerifyBackupInput,
    check_id,
)
from csbs.nbd_server import BackupDiskReader, NbdServer
from csbs.paging import Cursor, Page, check_limit, cut, page_in_memory, time_key
from csbs.policy import PolicySpec
from csbs.policy_service import PolicyService
from csbs.rules import BackupQuery, backup_requests, deletable_tasks
from csbs.services import Services
from csbs.transfer import ProgressFn
from runtime.connection import connect
from starter.client import CsbsClient

T = TypeVar("T")


class StartFailed(CsbsError):
    """The workflow ended, or never started, before it recorded its task. ``cause_type`` is
    the type of the workflow's ApplicationError (NotFound, InvalidState, ...)."""

    def __init__(self, message: str, cause_type: str | None = None) -> None:
        super().__init__(message)
        self.cause_type = cause_type


def _root(exc: BaseException) -> BaseException:
    cause: BaseException = exc
    while isinstance(cause, (WorkflowFailureError, FailureError)) and cause.cause is not None:
        if isinstance(cause, ApplicationError):
            break
        cause = cause.cause
    return cause


def workflow_error(exc: BaseException) -> str:
    """The message a person reads from a failed workflow: its innermost application error."""
    cause = _root(exc)
    if isinstance(cause, FailureError):
        return cause.message
    return str(cause)


def workflow_error_type(exc: BaseException) -> str | None:
    cause = _root(exc)
    return cause.type if isinstance(cause, ApplicationError) else None


async def await_start(
    handle: WorkflowHandle[Any, Any], ready: Callable[[], T | None], timeout: float = 60.0
) -> T:
    """Wait until the workflow has recorded what ``ready`` looks for; raise StartFailed with
    the workflow's own reason if it ended first, or if no worker picked it up in time."""
    deadline = time.monotonic() + timeout
    while True:
        found = ready()
        if found is not None:
            return found
        desc = await handle.describe()
        if desc.status not in (None, WorkflowExecutionStatus.RUNNING):
            try:
                await handle.result()
            except WorkflowFailureError as exc:
                raise StartFailed(workflow_error(exc), workflow_error_type(exc)) from exc
            found = ready()
            if found is not None:
                return found
            raise StartFailed(
                f"workflow {handle.id} ended ({desc.status.name}) without a record", "Conflict"
            )
        if time.monotonic() > deadline:
            raise StartFailed(
                f"workflow {handle.id} has not started after {timeout:.0f}s: is a worker running?",
                "Unavailable",
            )
        await asyncio.sleep(0.2)


F = TypeVar("F", bound=Callable[..., Any])


def _audited(action: str, target: Callable[[dict[str, Any]], str]) -> Callable[[F], F]:
    """Record each call of a façade method that changes something in the operation log
    (issue 16): who (``csbs.audit.actor``), ``action``, ``target`` of the call's arguments
    by name, when, and whether it went through or why not. A log that cannot be written
    never hides the outcome of the change itself."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        def log(self: Facade, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Any) -> None:
            try:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                what = target(dict(bound.arguments))
                reason = None if exc is None else (str(exc) or type(exc).__name__)
                AuditLog(self.catalog).record(action, what, exc is None, reason)
            except Exception:  # pragma: no cover - the catalog is down as well
                logging.getLogger(__name__).exception("operation log not written")

        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(self: Facade, *args: Any, **kwargs: Any) -> Any:
                try:
                    result = await fn(self, *args, **kwargs)
                except Exception as exc:
                    log(self, args, kwargs, exc)
                    raise
                log(self, args, kwargs, None)
                return result

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(self: Facade, *args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(self, *args, **kwargs)
            except Exception as exc:
                log(self, args, kwargs, exc)
                raise
            log(self, args, kwargs, None)
            return result

        return run  # type: ignore[return-value]

    return wrap


def _ids(ids: list[str] | None) -> str:
    return ", ".join(ids or [])


def _arg(name: str) -> Callable[[dict[str, Any]], str]:
    """The target is one argument (a request's ``backup_id`` when it is a model)."""
    return lambda a: str(getattr(a[name], "backup_id", a[name]))


def backup_filter(query: BackupQuery | None) -> BackupFilter:
    """The catalog filter of a ``backup list`` query."""
    q = query or BackupQuery()
    return BackupFilter(
        **q.model_dump(exclude={"since", "until", "status"}),
        status=q.status.value if q.status else None,
        since=q.since_time(),
        until=q.until_time(),
    )


class Facade:
    """One project's servers, backups, tasks and policies: workflows started through
    Temporal, records read from the catalog, schedules kept in step with policies."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        driver: ComputeDriver | None = None,
        client: Client | None = None,
        serve_metrics: bool = False,
    ) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        self.catalog = catalog or Catalog(settings.effective_database_url, settings.project)
        self.driver = driver or make_fleet(settings, self.catalog)
        self._client = client
        self._services: Services | None = None

    @functools.cached_property
    def policies(self) -> PolicyService:
        """Policies of the project, written through to their copies in the bucket (built
        on first use: most commands never touch a policy)."""
        return PolicyService(self.catalog, self.driver, self.services.store)

    @property
    def services(self) -> Services:
        """The service layer over this facade's catalog and driver (for checks that must
        refuse a request before any workflow starts)."""
        if self._services is None:
            self._services = Services(self.settings, catalog=self.catalog, driver=self.driver)
        return self._services

    async def client(self) -> Client:
        if self._client is None:
            self._client = await connect(self.settings, serve_metrics=self.serve_metrics)
        return self._client

    async def csbs(self) -> CsbsClient:
        return CsbsClient(await self.client(), self.settings)

    # -- servers ---------------------------------------------------------------------------
    def servers(self) -> list[Server]:
        """The project's servers, as the compute driver reports them."""
        return self.driver.list_servers()

    def servers_page(self, limit: int | None = None, cursor: str | None = None) -> Page[Server]:
        """A page of the servers, by id."""
        return page_in_memory(self.servers(), limit, cursor, "servers", lambda s: s.id)

    # -- backups ---------------------------------------------------------------------------
    def list_backups(self, query: BackupQuery | None = None) -> list[dict[str, Any]]:
        """Backups, newest first, by every filter of ``backup list`` (B11)."""
        return self.backups_page(query).items

    def backups_page(
        self, query: BackupQuery | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[dict[str, Any]]:
        """A page of :meth:`list_backups` (``csbs.paging``; no limit: all of them)."""
        page = self.catalog.backups_page(backup_filter(query), check_limit(limit), cursor)
        disks = self.catalog.disk_backups_of([r.id for r in page.items])
        return page.map(lambda r: backup_json(r, disks[r.id]))

    def list_disk_backups(self, query: BackupQuery | None = None) -> list[dict[str, Any]]:
        """Disk backups (guide 1.6): one per disk of every server backup that the filters
        of ``backup list`` select, with that backup; newest first, system disk first."""
        return self.disk_backups_page(query).items

    def disk_backups_page(
        self, query: BackupQuery | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[dict[str, Any]]:
        """A page of :meth:`list_disk_backups`: at most ``limit`` disk backups. Its cursor
        names the backup it stopped in and how many of its disks were given."""
        limit = check_limit(limit)
        start = Cursor.decode(cursor, "disk-backups", 3)
        flt = backup_filter(query)
        skip = 0
        after = None
        if start is not None:
            # Resume at the cursor's backup: the page of backups after the one before it.
            skip = int(start.key[2])
            after = Cursor("backups", [start.key[0], start.key[1]])
        rows: list[dict[str, Any]] = []
        backups_cursor = after.encode() if after is not None else None
        first = True
        while limit is None or len(rows) <= limit:
            page = self.catalog.backups_page(flt, limit or None, backups_cursor, inclusive=first)
            first = False
            disks = self.catalog.disk_backups_of([r.id for r in page.items])
            for r in page.items:
                for i, d in enumerate(disks[r.id]):
                    if r.id == (after.key[1] if after else None) and i < skip:
                        continue
                    view = DiskBackupListView.of_backup(r, d).model_dump(mode="json")
                    rows.append({**view, "_key": [time_key(r.created_at), r.id, i + 1]})
            if page.next_cursor is None:
                break
            backups_cursor = page.next_cursor
        result = cut(rows, limit, "disk-backups", lambda v: v["_key"])
        for v in result.items:
            v.pop("_key")
        return result

    def backup_view(self, backup_id: str) -> dict[str, Any]:
        return backup_json(self.catalog.get_backup(backup_id), self.catalog.disk_backups(backup_id))

    def backup_detail(self, backup_id: str) -> dict[str, Any]:
        """A backup with its task records (``backup show``)."""
        view = self.backup_view(backup_id)
        view["tasks"] = self.tasks(backup_id=backup_id)
        return view

    def backup_progress(self, backup_id: str) -> tuple[int, BackupStatus]:
        """How far a backup is (percent) and its status, for a progress bar."""
        row = self.catalog.get_backup(backup_id)
        return row.progress, BackupStatus(row.status)

    @_audited("backup.create", lambda a: _ids(a["server_ids"]))
    async def create_backups(
        self,
        server_ids: list[str],
        name: str | None = None,
        description: str | None = None,
        offline: bool = False,
    ) -> list[str]:
        """Back servers up now (B7): one ``BackupServer`` each; the backup ids, once each is
        recorded. Bad input is refused before anything starts."""
        inputs = backup_requests(server_ids, name, description, offline)
        # Refused here, nothing starts and nothing is recorded; what only the workflow can
        # find (a race) leaves an error backup and a failed task (B10).
        names = [self.services.backup.check_request(inp).name for inp in inputs]
        client = await self.csbs()
        ids = []
        for inp, server_name in zip(inputs, names, strict=True):
            backup_id, handle = await client.start_backup(inp, server_name)
            await await_start(handle, lambda b=backup_id: self.catalog.find_backup(b))  # type: ignore[misc]
            ids.append(backup_id)
        return ids

    def resolve(self, kind: str, given: str) -> str:
        """The whole id of a ``kind`` (backup, task, policy, server) that ``given`` is or
        uniquely begins (issue 16); NotFound or an ambiguity naming a few."""
        try:
            check_id(given, f"{kind}_id")  # what no id can be is refused for what it is
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if kind == "server":
            candidates = [s.id for s in self.servers()]
        else:
            candidates = self.catalog.ids_beginning(kind, given)
        return id_prefix.resolve(kind, given, candidates)

    def short_ids(self, kind: str) -> dict[str, str]:
        """Every id of a ``kind`` of the project, shortened as tables show it."""
        if kind == "server":
            return id_prefix.short_ids(s.id for s in self.servers())
        return id_prefix.short_ids(self.catalog.ids_beginning(kind, ""))

    def check_backups(self, backup_ids: list[str]) -> None:
        """Raise (NotFound, or a validation error) unless every id names a backup."""
        DeleteBackupsInput(backup_ids=backup_ids)
        for b in backup_ids:
            self.catalog.get_backup(b)

    @_audited("backup.delete", lambda a: _ids(a["backup_ids"]))
    async def delete_backups(self, backup_ids: list[str]) -> WorkflowHandle[Any, Any]:
        """Start ``DeleteBackups`` for backups that all exist; return once it is recorded."""
        self.check_backups(backup_ids)
        handle = await (await self.csbs()).start_delete(DeleteBackupsInput(backup_ids=backup_ids))
        await self._task_recorded(handle, TaskKind.DELETE, backup_ids[0])
        return handle

    async def _task_recorded(
        self, handle: WorkflowHandle[Any, Any], kind: TaskKind, backup_id: str
    ) -> str:
        """The id of the task the started workflow recorded on the backup, once it has."""

        def started() -> str | None:
            tasks = self.catalog.list_tasks(kind=kind, backup_id=backup_id)
            return next((t.id for t in tasks if t.workflow_id == handle.id), None)

        return await await_start(handle, started)

    @_audited("backup.restore", _arg("inp"))
    async def restore(self, inp: RestoreServerInput) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start ``RestoreServer``; return its handle and task id once it is recorded.
        What can be refused before it starts is refused here, with nothing recorded."""
        self.services.restore.check_request(inp)
        handle = await (await self.csbs()).start_restore(inp)
        return handle, await self._task_recorded(handle, TaskKind.RESTORE, inp.backup_id)

    @_audited("backup.verify", _arg("backup_id"))
    async def verify(
        self, backup_id: str, replica: bool = False
    ) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start ``VerifyBackup``; return its handle and task id once it is recorded."""
        inp = VerifyBackupInput(backup_id=backup_id, replica=replica)
        backup = self.catalog.get_backup(backup_id)
        if replica:
            self.settings.replica()
            if backup.replica_status != "replicated":
                raise InvalidState(
                    f"backup {backup_id} is not on the replica (replication: "
                    f"{backup.replica_status or 'never'}): run csbs backup replicate "
                    f"{backup_id} first"
                )
        handle = await (await self.csbs()).start_verify(inp)
        return handle, await self._task_recorded(handle, TaskKind.VERIFY, backup_id)

    @_audited("backup.replicate", _arg("backup_id"))
    async def replicate(self, backup_id: str) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start ``ReplicateBackup``; return its handle and task id once it is recorded.
        No replica configured, or a backup that is not available, is refused here."""
        inp = ReplicateBackupInput(backup_id=backup_id)
        backup = self.catalog.get_backup(backup_id)  # another project's: as if it did not exist
        self.settings.replica()
        if backup.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
            raise InvalidState(
                f"backup {backup_id} is {backup.status}; only available backups are replicated"
            )
        handle = await (await self.csbs()).start_replicate(inp)
        return handle, await self._task_recorded(handle, TaskKind.REPLICATE, backup_id)

    # -- images and mounts ------------------------------------------------------------------
    def backup_disk(self, backup_id: str, disk_id: str | None, what: str) -> tuple[str, Manifest]:
        """One disk of an available backup and its manifest (the only disk when none is
        named); refused with the reason otherwise."""
        backup = self.catalog.get_backup(backup_id)
        if backup.status not in (BackupStatus.AVAILABLE, BackupStatus.RESTORING):
            raise InvalidState(
                f"backup {backup_id} is {backup.status}; only available backups can be {what}"
            )
        if backup.verify_status == "failed":
            raise CorruptData(
                f"backup {backup_id} failed verification ({backup.verify_error}); refused"
            )
        disks = self.catalog.disk_backups(backup_id)
        if disk_id is None:
            if len(disks) != 1:
                listing = ", ".join(d.disk_id for d in disks)
                raise InvalidInput(
                    f"disk: backup {backup_id} has {len(disks)} disks ({listing}); choose one "
                    f"with --disk"
                )
            disk_id = disks[0].disk_id
        row = next((d for d in disks if d.disk_id == disk_id), None)
        if row is None:
            raise InvalidInput(f"disk: {disk_id} is not a disk of backup {backup_id}")
        store = self.services.store
        store.ensure_config()
        manifest = store.get_manifest(backup_id, disk_id)
        if manifest.size_bytes != row.size_bytes:
            raise CorruptData(
                f"manifest of disk {disk_id} of backup {backup_id} says {manifest.size_bytes} "
                f"bytes, the catalog {row.size_bytes}; refused"
            )
        return disk_id, manifest

    def mount(
        self, backup_id: str, disk_id: str | None, socket_path: Path | None, tcp_port: int | None
    ) -> NbdServer:
        """A read-only NBD export of one disk of a backup, served from the object store."""
        disk_id, manifest = self.backup_disk(backup_id, disk_id, "mounted")
        reader = BackupDiskReader(self.services.store, manifest)
        path = socket_path or self.settings.var_dir / "mounts" / f"{backup_id}-{disk_id}.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return NbdServer(reader, f"{backup_id}/{disk_id}", path, tcp_port)

    def browse(
        self, backup_id: str, disk_id: str | None, partition: str | None
    ) -> tuple[Volume, BackupDiskReader]:
        """The filesystem of one disk of a backup (file-level restore), read from the
        object store; its reader counts the chunks fetched."""
        from csbs import file_restore  # the filesystem readers load only when needed

        disk_id, manifest = self.backup_disk(backup_id, disk_id, "browsed")
        # No read-ahead: a filesystem's metadata is scattered, and a file's chunks are
        # asked for in order anyway.
        reader = BackupDiskReader(self.services.store, manifest, readahead=0)
        volume = file_restore.choose_volume(
            file_restore.find_volumes(reader.read, manifest.size_bytes), partition
        )
        return volume, reader

    # -- images ----------------------------------------------------------------------------
    def export_image(
        self,
        backup_id: str,
        disk_id: str | None,
        fmt: str,
        output: Path,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Write one disk of a backup as a standalone sparse raw or qcow2 image (the
        guide's 备份创建镜像), here, from the object store."""
        export.check_output(output, fmt)
        disk_id, manifest = self.backup_disk(backup_id, disk_id, "exported")
        store = self.services.store
        done = export.export_disk(
            store,
            manifest,
            output,
            cast(export.ImageFormat, fmt),
            qemu_img=self.settings.qemu_img,
            concurrency=self.settings.transfer_concurrency,
            progress=progress,
        )
        return {
            "backup_id": backup_id,
            "disk_id": disk_id,
            "format": done.format,
            "output": str(done.path),
            "size_bytes": done.size_bytes,
            "allocated_bytes": done.allocated_bytes,
            "data_bytes": done.stats.data_bytes,
            "bytes_fetched": done.stats.bytes_fetched,
            "seconds": round(done.stats.seconds, 3),
        }

    # -- quotas ----------------------------------------------------------------------------
    def quota_view(self) -> dict[str, Any]:
        """The project's limits, where each comes from, and what it uses (B15)."""
        limits = quota.quota_of(self.settings, self.catalog)
        usage = quota.usage_of(self.catalog, self.services.store)
        return quota.quota_json(self.settings.project, limits, usage)

    @_audited("quota.set", lambda a: f"disk_backups={a['disk_backups']} bytes={a['bytes_']}")
    def set_quota(self, disk_backups: str | None, bytes_: str | None) -> dict[str, Any]:
        """Set the project's own limits: a number, ``unlimited`` or ``default`` each; one
        left out keeps what it is."""
        if disk_backups is None and bytes_ is None:
            raise InvalidInput("give --disk-backups or --bytes (a number, unlimited or default)")
        row = self.catalog.quota_row()
        disks = row.disk_backups if row else None
        size = row.bytes if row else None
        try:
            if disk_backups is not None:
                disks = quota.parse_limit(disk_backups, "disk_backups")
            if bytes_ is not None:
                size = quota.parse_limit(bytes_, "bytes", size=True)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        self.catalog.set_quota(disks, size)
        return self.quota_view()

    # -- tasks -----------------------------------------------------------------------------
    def tasks(
        self,
        kind: TaskKind | None = None,
        status: TaskStatus | None = None,
        backup_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Task records, newest first."""
        return self.tasks_page(kind, status, backup_id).items

    def tasks_page(
        self,
        kind: TaskKind | None = None,
        status: TaskStatus | None = None,
        backup_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[dict[str, Any]]:
        """A page of :meth:`tasks`."""
        page = self.catalog.tasks_page(
            kind, status, backup_id, limit=check_limit(limit), cursor=cursor
        )
        return page.map(task_json)

    def task(self, task_id: str) -> dict[str, Any]:
        return task_json(self.catalog.get_task(task_id))

    def deletable_tasks(self, task_ids: list[str] | None, all_failed: bool) -> list[str]:
        """The ids ``task delete`` removes: failed records only (T2)."""
        if bool(task_ids) == all_failed:
            raise InvalidInput("give task ids or all_failed (not both)")
        if all_failed:
            return [t.id for t in self.catalog.list_tasks(status=TaskStatus.FAILED)]
        rows = [self.catalog.get_task(t) for t in task_ids or []]
        return deletable_tasks([(r.id, r.status) for r in rows])

    @_audited("task.delete", lambda a: "all failed" if a["all_failed"] else _ids(a["task_ids"]))
    def delete_tasks(self, task_ids: list[str] | None, all_failed: bool = False) -> list[str]:
        """Delete failed task records (T2), by id or all of them; the ids deleted."""
        ids = self.deletable_tasks(task_ids, all_failed)
        self.catalog.delete_tasks(ids)
        return ids

    # -- policies --------------------------------------------------------------------------
    def policy_views(self) -> list[dict[str, Any]]:
        """The project's policies (at most 32), each with its servers."""
        return [self.policies.view(p.id) for p in self.policies.policies.all()]

    def policies_page(
        self, limit: int | None = None, cursor: str | None = None
    ) -> Page[dict[str, Any]]:
        """A page of :meth:`policy_views`, by id."""
        rows = self.policies.policies.all()
        page = page_in_memory(rows, limit, cursor, "policies", lambda p: p.id)
        return page.map(lambda p: self.policies.view(p.id))

    async def policy_view(self, policy_id: str, next_runs: bool = False) -> dict[str, Any]:
        """A policy with its servers and, when asked, its next run times."""
        view = self.policies.view(policy_id)
        if next_runs:
            view["next_runs"] = await self.next_runs(policy_id)
        return view

    @_audited("policy.create", lambda a: a["spec"].name)
    async def create_policy(self, spec: PolicySpec) -> dict[str, Any]:
        """Create a policy (P1-P3), then its Temporal Schedule."""
        if spec.replicate:
            self._replica_for("replicate")
        row = self.policies.create(spec)
        await self.sync_policy(row.id)
        return self.policies.view(row.id)

    @_audited("policy.update", lambda a: f"{a['policy_id']}: {', '.join(sorted(a['changes']))}")
    async def update_policy(self, policy_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a policy, then rewrite its schedule (P7)."""
        if changes.get("replicate"):
            self._replica_for("replicate")
        self.policies.update(policy_id, changes)
        await self.sync_policy(policy_id)
        return self.policies.view(policy_id)

    @_audited("policy.enable", lambda a: f"{a['policy_id']} enabled={a['enabled']}")
    async def set_policy_enabled(self, policy_id: str, enabled: bool) -> dict[str, Any]:
        """Enable or disable a policy; its schedule is unpaused or paused (P7)."""
        self.policies.set_enabled(policy_id, enabled)
        await self.sync_policy(policy_id)
        return self.policies.view(policy_id)

    def _replica_for(self, field: str) -> None:
        """Refuse a policy that replicates while no replica is configured."""
        if not self.settings.has_replica:
            raise InvalidInput(
                f"{field}: no replica is configured (set CSBS_REPLICA_ENDPOINT and "
                f"CSBS_REPLICA_BUCKET on the workers and here)"
            )

    def check_policy(self, policy_id: str) -> None:
        """Raise NotFound unless the policy exists."""
        self.policies.policies.get(policy_id)

    @_audited("policy.bind", lambda a: f"{a['policy_id']}: {_ids(a['server_ids'])}")
    def bind(self, policy_id: str, server_ids: list[str]) -> list[str]:
        """Bind servers (P6); the policy's servers afterwards."""
        return self.policies.bind(policy_id, server_ids)

    @_audited("policy.unbind", lambda a: f"{a['policy_id']}: {_ids(a['server_ids'])}")
    def unbind(self, policy_id: str, server_ids: list[str]) -> list[str]:
        """Unbind servers; their backups stay (P9)."""
        return self.policies.unbind(policy_id, server_ids)

    async def reconcile_schedules(self) -> dict[str, list[str]]:
        """Write every policy's schedule and the daily ones from the catalog."""
        from runtime.schedules import reconcile_schedules

        return await reconcile_schedules(await self.client(), self.policies, self.settings)

    async def sync_policy(self, policy_id: str) -> None:
        """Write the policy's Temporal Schedule from the catalog (the catalog is written
        first; ``policy reconcile`` repairs a schedule this could not write)."""
        from runtime.schedules import upsert_policy_schedule

        await upsert_policy_schedule(
            await self.client(), policy_id, self.policies.spec(policy_id), self.settings.queue
        )

    @_audited("policy.delete", _arg("policy_id"))
    async def delete_policy(self, policy_id: str) -> None:
        """Delete a policy and its schedule; its backups stay (P7)."""
        from temporalio.service import RPCError

        from runtime.schedules import schedule_id

        self.policies.delete(policy_id)
        with contextlib.suppress(RPCError):  # already gone is fine
            await (await self.client()).get_schedule_handle(schedule_id(policy_id)).delete()

    async def next_runs(self, policy_id: str) -> list[str]:
        from runtime.schedules import schedule_id

        handle = (await self.client()).get_schedule_handle(schedule_id(policy_id))
        desc = await handle.describe()
        return [t.isoformat() for t in desc.info.next_action_times]

    @_audited("policy.run", _arg("policy_id"))
    async def run_policy(self, policy_id: str) -> WorkflowHandle[Any, Any]:
        """P8 run now: refused at once while a bound server has a backup running."""
        self.policies.plan_run(policy_id, "manual")
        return await (await self.csbs()).start_policy_run(
            RunPolicyInput(policy_id=policy_id, trigger="manual"),
            f"runpolicy-{policy_id}-{uuid.uuid4().hex[:8]}",
        )
