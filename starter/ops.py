"""Operations shared by the CLI and the REST API: start a workflow, wait until it has left
its record in the catalog (or report why it could not), keep policy schedules in step.

Everything here raises :class:`csbs.errors.CsbsError` (or pydantic's ``ValidationError``)
for a person to read; the CLI prints one line, the API answers with a problem document.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, FailureError

from csbs.catalog import BackupFilter, Catalog, backup_json, task_json
from csbs.config import Settings
from csbs.drivers import ComputeDriver, make_driver
from csbs.errors import CsbsError, InvalidInput
from csbs.model import (
    BackupServerInput,
    DeleteBackupsInput,
    RestoreServerInput,
    RunPolicyInput,
    TaskKind,
    TaskStatus,
    VerifyBackupInput,
)
from csbs.naming import default_name, numbered
from csbs.policy_service import PolicyService
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


def parse_time(value: str | None, field: str) -> datetime | None:
    """An ISO date or time (UTC unless it says otherwise), or InvalidInput naming the field."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{field} must be an ISO date or time like 2026-11-25 or 2026-11-25T08:00 "
            f"(got {value!r})"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def backup_inputs(
    server_ids: list[str], name: str | None, description: str | None, offline: bool
) -> list[BackupServerInput]:
    """One validated input per server; names numbered -0001, -0002, ... for several (B7)."""
    if not server_ids:
        raise InvalidInput("server_ids: give at least one server")
    if len(set(server_ids)) != len(server_ids):
        raise InvalidInput("server_ids: a server is listed twice")
    base = name or default_name("manual")
    return [
        BackupServerInput(
            server_id=sid,
            name=numbered(base, i, len(server_ids)),
            description=description,
            offline=offline,
        )
        for i, sid in enumerate(server_ids)
    ]


class Operations:
    """The tenant's servers, backups, tasks and policies, with workflows started through
    Temporal and records read from the catalog."""

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
        self.driver = driver or make_driver(settings)
        self.policies = PolicyService(self.catalog, self.driver)
        self._client = client

    async def client(self) -> Client:
        if self._client is None:
            self._client = await connect(self.settings, serve_metrics=self.serve_metrics)
        return self._client

    async def csbs(self) -> CsbsClient:
        return CsbsClient(await self.client(), self.settings)

    # -- backups ---------------------------------------------------------------------------
    def list_backups(
        self,
        status: str | None = None,
        server_id: str | None = None,
        server_name: str | None = None,
        server_type: str | None = None,
        name: str | None = None,
        id: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        """Backups, newest first, by every filter of ``backup list`` (B11); ``since`` and
        ``until`` are ISO dates or times, UTC unless they say otherwise."""
        flt = BackupFilter(
            status=status,
            server_id=server_id,
            server_name=server_name,
            server_type=server_type,
            name=name,
            id=id,
            since=parse_time(since, "since"),
            until=parse_time(until, "until"),
        )
        rows = self.catalog.list_backups(flt)
        return [backup_json(r, self.catalog.disk_backups(r.id)) for r in rows]

    def backup_view(self, backup_id: str) -> dict[str, Any]:
        return backup_json(self.catalog.get_backup(backup_id), self.catalog.disk_backups(backup_id))

    def backup_detail(self, backup_id: str) -> dict[str, Any]:
        """A backup with its task records (``backup show``)."""
        view = self.backup_view(backup_id)
        view["tasks"] = [task_json(t) for t in self.catalog.list_tasks(backup_id=backup_id)]
        return view

    async def create_backups(self, inputs: list[BackupServerInput]) -> list[str]:
        """Start one ``BackupServer`` per input; return the backup ids once each is recorded."""
        client = await self.csbs()
        ids = []
        for inp in inputs:
            try:
                server_name: str | None = self.driver.get_server(inp.server_id).name
            except CsbsError:
                server_name = None  # the workflow itself refuses it, with its reason
            backup_id, handle = await client.start_backup(inp, server_name)
            await await_start(handle, lambda b=backup_id: self.catalog.find_backup(b))  # type: ignore[misc]
            ids.append(backup_id)
        return ids

    async def delete_backups(self, backup_ids: list[str]) -> WorkflowHandle[Any, Any]:
        """Start ``DeleteBackups`` for backups that all exist; return once it is recorded."""
        inp = DeleteBackupsInput(backup_ids=backup_ids)
        for b in backup_ids:
            self.catalog.get_backup(b)
        handle = await (await self.csbs()).start_delete(inp)

        def started() -> str | None:
            tasks = self.catalog.list_tasks(kind=TaskKind.DELETE, backup_id=backup_ids[0])
            return next((t.id for t in tasks if t.workflow_id == handle.id), None)

        await await_start(handle, started)
        return handle

    async def restore(self, inp: RestoreServerInput) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start ``RestoreServer``; return its handle and task id once it is recorded."""
        self.catalog.get_backup(inp.backup_id)
        handle = await (await self.csbs()).start_restore(inp)

        def started() -> str | None:
            tasks = self.catalog.list_tasks(kind=TaskKind.RESTORE, backup_id=inp.backup_id)
            return next((t.id for t in tasks if t.workflow_id == handle.id), None)

        return handle, await await_start(handle, started)

    async def verify(self, backup_id: str) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start ``VerifyBackup``; return its handle and task id once it is recorded."""
        inp = VerifyBackupInput(backup_id=backup_id)
        self.catalog.get_backup(backup_id)
        handle = await (await self.csbs()).start_verify(inp)

        def started() -> str | None:
            tasks = self.catalog.list_tasks(kind=TaskKind.VERIFY, backup_id=backup_id)
            return next((t.id for t in tasks if t.workflow_id == handle.id), None)

        return handle, await await_start(handle, started)

    # -- tasks -----------------------------------------------------------------------------
    def deletable_tasks(self, task_ids: list[str] | None, all_failed: bool) -> list[str]:
        """The ids ``task delete`` removes: failed records only (T2)."""
        if bool(task_ids) == all_failed:
            raise InvalidInput("give task ids or all_failed (not both)")
        if all_failed:
            return [t.id for t in self.catalog.list_tasks(status=TaskStatus.FAILED)]
        rows = [self.catalog.get_task(t) for t in task_ids or []]
        not_failed = [f"{r.id} ({r.status})" for r in rows if r.status != TaskStatus.FAILED]
        if not_failed:
            raise InvalidInput(f"only failed task records can be deleted: {', '.join(not_failed)}")
        return [r.id for r in rows]

    # -- policies --------------------------------------------------------------------------
    async def sync_policy(self, policy_id: str) -> None:
        """Write the policy's Temporal Schedule from the catalog (the catalog is written
        first; ``policy reconcile`` repairs a schedule this could not write)."""
        from runtime.schedules import upsert_policy_schedule

        await upsert_policy_schedule(
            await self.client(), policy_id, self.policies.spec(policy_id), self.settings.queue
        )

    async def delete_policy(self, policy_id: str) -> None:
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

    async def run_policy(self, policy_id: str) -> WorkflowHandle[Any, Any]:
        """P8 run now: refused at once while a bound server has a backup running."""
        self.policies.plan_run(policy_id, "manual")
        return await (await self.csbs()).start_policy_run(
            RunPolicyInput(policy_id=policy_id, trigger="manual"),
            f"runpolicy-{policy_id}-{uuid.uuid4().hex[:8]}",
        )
