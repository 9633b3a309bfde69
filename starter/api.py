"""The csbs REST API (FastAPI) for services that don't speak Temporal.

The same operations as the CLI, on the same core: workflows are started through Temporal
with the same ids, search attributes and summaries, and records come from the catalog.
Errors are RFC 9457 problem documents (``application/problem+json``) whose ``detail`` is
the one line the CLI would print. Run it with ``csbs api serve``; it has no
authentication of its own, so bind it to loopback or put it behind a proxy that has.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from csbs.catalog import task_json
from csbs.config import Settings
from csbs.errors import CsbsError, InvalidInput, NotFound
from csbs.model import BackupStatus, RestoreServerInput, TaskKind, TaskStatus
from csbs.policy import PolicySpec
from starter.api_models import (
    ISO_TIME,
    STATUS,
    BackupCreate,
    BackupDetail,
    BackupOut,
    Bound,
    Deleted,
    DeleteRequest,
    Health,
    Id,
    PolicyCreate,
    PolicyOut,
    PolicyPatch,
    RestoreRequest,
    ServerIds,
    ServerOut,
    Started,
    TaskOut,
    _allowed,
    _problem_media_type,
    _responses,
    _validation_errors,
    problem,
)
from starter.ops import Operations, StartFailed, backup_inputs

log = logging.getLogger(__name__)


@contextlib.contextmanager
def body_references() -> Iterator[None]:
    """A server, disk or backup named in a request body that does not exist makes the
    request unprocessable (422); 404 is kept for the resource the URL names."""
    try:
        yield
    except NotFound as exc:
        raise InvalidInput(str(exc)) from exc
    except StartFailed as exc:
        if exc.cause_type == "NotFound":
            raise InvalidInput(str(exc)) from exc
        raise


# -- the application ------------------------------------------------------------------------
def create_app(settings: Settings | None = None, ops: Operations | None = None) -> FastAPI:
    """The API over one project's catalog, driver and Temporal namespace."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:  # connect now, so that the metrics endpoint is up; else at the first request
            await state.client()
        except RuntimeError as exc:
            log.warning("Temporal is not reachable yet: %s", exc)
        yield
        state.catalog.dispose()

    app = FastAPI(
        title="csbs",
        version="1",
        description="Cloud Server Backup Service: back up and restore whole servers.",
        lifespan=lifespan,
    )
    state = ops or Operations(settings or Settings(), serve_metrics=True)

    @app.exception_handler(CsbsError)
    async def _csbs_error(_: Request, exc: CsbsError) -> JSONResponse:
        name = getattr(exc, "cause_type", None) or exc.type_name
        return problem(STATUS.get(name, 409), name, str(exc))

    @app.exception_handler(ValidationError)
    async def _model_error(_: Request, exc: ValidationError) -> JSONResponse:
        detail, items = _validation_errors(exc.errors())
        return problem(422, "ValidationError", detail, items)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_errors(exc.errors())
        return problem(422, "ValidationError", detail, items)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        title = "NotFound" if exc.status_code == 404 else f"HTTP{exc.status_code}"
        response = problem(exc.status_code, title, detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed(app, request))
        return response

    @app.exception_handler(RuntimeError)
    async def _temporal_down(_: Request, exc: RuntimeError) -> JSONResponse:
        if "connect" in str(exc).lower():
            return problem(
                503, "Unavailable", f"cannot reach Temporal at {state.settings.temporal_address}"
            )
        raise exc

    # -- health
    @app.get("/v1/health", response_model=Health, tags=["health"])
    def health() -> dict[str, str]:
        """The API process is up (``csbs doctor`` checks what it depends on)."""
        return {"status": "ok"}

    # -- servers
    @app.get("/v1/servers", response_model=list[ServerOut], tags=["servers"])
    def list_servers() -> list[dict[str, Any]]:
        """The project's servers, as the compute driver reports them."""
        return [s.model_dump(mode="json", exclude={"project"}) for s in state.driver.list_servers()]

    # -- backups
    @app.get(
        "/v1/backups", response_model=list[BackupOut], tags=["backups"], responses=_responses(422)
    )
    def list_backups(
        status: BackupStatus | None = None,
        server_id: str | None = None,
        server_name: str | None = None,
        server_type: str | None = None,
        name: str | None = None,
        id: str | None = None,
        since: Annotated[str | None, Query(pattern=ISO_TIME, description="ISO time")] = None,
        until: Annotated[str | None, Query(pattern=ISO_TIME, description="ISO time")] = None,
    ) -> list[dict[str, Any]]:
        """Backups, newest first, with every filter of ``csbs backup list``."""
        return state.list_backups(
            status.value if status else None,
            server_id,
            server_name,
            server_type,
            name,
            id,
            since,
            until,
        )

    @app.post(
        "/v1/backups",
        status_code=202,
        response_model=list[BackupOut],
        tags=["backups"],
        responses=_responses(404, 409, 422, 503),
    )
    async def create_backups(body: BackupCreate) -> list[dict[str, Any]]:
        """Back up servers now (one backup each); returns the backups being created."""
        inputs = backup_inputs(body.server_ids, body.name, body.description, body.offline)
        with body_references():
            ids = await state.create_backups(inputs)
        return [state.backup_view(b) for b in ids]

    @app.get(
        "/v1/backups/{backup_id}",
        response_model=BackupDetail,
        tags=["backups"],
        responses=_responses(404, 422),
    )
    def get_backup(backup_id: Id) -> dict[str, Any]:
        """One backup: disks, sizes, parent, times, and its task records."""
        return state.backup_detail(backup_id)

    async def _delete(backup_ids: list[str]) -> dict[str, Any]:
        handle = await state.delete_backups(backup_ids)
        return {"workflow_id": handle.id, "status": "deleting"}

    @app.delete(
        "/v1/backups/{backup_id}",
        status_code=202,
        response_model=Started,
        tags=["backups"],
        responses=_responses(404, 409, 422, 503),
    )
    async def delete_backup(backup_id: Id) -> dict[str, Any]:
        """Delete a backup (available, error or delete_failed); chunks go to GC."""
        return await _delete([backup_id])

    @app.post(
        "/v1/backups:delete",
        status_code=202,
        response_model=Started,
        tags=["backups"],
        responses=_responses(404, 409, 422, 503),
    )
    async def delete_backups(body: DeleteRequest) -> dict[str, Any]:
        """Delete several backups in one workflow."""
        with body_references():
            return await _delete(body.backup_ids)

    @app.post(
        "/v1/backups/{backup_id}/restore",
        status_code=202,
        response_model=Started,
        tags=["backups"],
        responses=_responses(404, 409, 422, 503),
    )
    async def restore_backup(backup_id: Id, body: RestoreRequest) -> dict[str, Any]:
        """Restore the server's disks from this backup (overwrites them; stops the server).
        Follow the task (``GET /v1/tasks/{task_id}``) for its outcome."""
        inp = RestoreServerInput(backup_id=backup_id, **body.model_dump())
        state.catalog.get_backup(backup_id)
        with body_references():
            handle, task_id = await state.restore(inp)
        return {"workflow_id": handle.id, "task_id": task_id, "status": "restoring"}

    @app.post(
        "/v1/backups/{backup_id}/verify",
        status_code=202,
        response_model=Started,
        tags=["backups"],
        responses=_responses(404, 409, 422, 503),
    )
    async def verify_backup(backup_id: Id) -> dict[str, Any]:
        """Read every chunk of the backup and check its digest. The task (and the backup's
        ``verify_status`` and ``verify_error``) say what was found."""
        handle, task_id = await state.verify(backup_id)
        return {"workflow_id": handle.id, "task_id": task_id, "status": "verifying"}

    # -- tasks
    @app.get("/v1/tasks", response_model=list[TaskOut], tags=["tasks"], responses=_responses(422))
    def list_tasks(kind: TaskKind | None = None, status: TaskStatus | None = None) -> list[Any]:
        """Backup, restore and delete task records, newest first."""
        return [task_json(t) for t in state.catalog.list_tasks(kind=kind, status=status)]

    @app.get(
        "/v1/tasks/{task_id}",
        response_model=TaskOut,
        tags=["tasks"],
        responses=_responses(404, 422),
    )
    def get_task(task_id: Id) -> dict[str, Any]:
        """One task record, with its failure reason."""
        return task_json(state.catalog.get_task(task_id))

    @app.delete(
        "/v1/tasks/{task_id}",
        response_model=Deleted,
        tags=["tasks"],
        responses=_responses(404, 422),
    )
    def delete_task(task_id: Id) -> dict[str, Any]:
        """Delete a failed task record (T2)."""
        ids = state.deletable_tasks([task_id], False)
        state.catalog.delete_tasks(ids)
        return {"deleted": ids}

    @app.post("/v1/tasks:delete-failed", response_model=Deleted, tags=["tasks"])
    def delete_failed_tasks() -> dict[str, Any]:
        """Delete every failed task record (T2)."""
        ids = state.deletable_tasks(None, True)
        state.catalog.delete_tasks(ids)
        return {"deleted": ids}

    # -- policies
    def _policy(policy_id: str) -> dict[str, Any]:
        return state.policies.view(policy_id)

    @app.get("/v1/policies", response_model=list[PolicyOut], tags=["policies"])
    def list_policies() -> list[dict[str, Any]]:
        """The project's policies (at most 32)."""
        return [_policy(p.id) for p in state.policies.policies.all()]

    @app.post(
        "/v1/policies",
        status_code=201,
        response_model=PolicyOut,
        tags=["policies"],
        responses=_responses(409, 422, 503),
    )
    async def create_policy(body: PolicyCreate) -> dict[str, Any]:
        """Create a policy and its Temporal Schedule (P1-P3)."""
        row = state.policies.create(PolicySpec.model_validate(body.model_dump()))
        await state.sync_policy(row.id)
        return _policy(row.id)

    @app.get(
        "/v1/policies/{policy_id}",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_responses(404, 422, 503),
    )
    async def get_policy(policy_id: Id) -> dict[str, Any]:
        """A policy with its servers and next run times."""
        view = _policy(policy_id)
        view["next_runs"] = await state.next_runs(policy_id)
        return view

    @app.patch(
        "/v1/policies/{policy_id}",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_responses(404, 422, 503),
    )
    async def update_policy(policy_id: Id, body: PolicyPatch) -> dict[str, Any]:
        """Change a policy; its schedule is rewritten (P7)."""
        changes = body.model_dump(exclude_unset=True)
        if "weekdays" in changes and "every_days" not in changes:
            changes["every_days"] = None
        if "every_days" in changes and "weekdays" not in changes:
            changes["weekdays"] = None
        state.policies.update(policy_id, changes)
        await state.sync_policy(policy_id)
        return _policy(policy_id)

    @app.delete(
        "/v1/policies/{policy_id}",
        response_model=Deleted,
        tags=["policies"],
        responses=_responses(404, 422, 503),
    )
    async def delete_policy(policy_id: Id) -> dict[str, Any]:
        """Delete a policy and its schedule; its backups stay (P7)."""
        await state.delete_policy(policy_id)
        return {"deleted": [policy_id]}

    async def _enable(policy_id: str, enabled: bool) -> dict[str, Any]:
        state.policies.set_enabled(policy_id, enabled)
        await state.sync_policy(policy_id)
        return _policy(policy_id)

    @app.post(
        "/v1/policies/{policy_id}/enable",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_responses(404, 422, 503),
    )
    async def enable_policy(policy_id: Id) -> dict[str, Any]:
        """Enable a policy (its schedule is unpaused)."""
        return await _enable(policy_id, True)

    @app.post(
        "/v1/policies/{policy_id}/disable",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_responses(404, 422, 503),
    )
    async def disable_policy(policy_id: Id) -> dict[str, Any]:
        """Disable a policy: no future runs; runs in progress finish (P7)."""
        return await _enable(policy_id, False)

    @app.post(
        "/v1/policies/{policy_id}/run",
        status_code=202,
        response_model=Started,
        tags=["policies"],
        responses=_responses(404, 409, 422, 503),
    )
    async def run_policy(policy_id: Id) -> dict[str, Any]:
        """Run a policy now: back up every bound server (P8)."""
        handle = await state.run_policy(policy_id)
        return {"workflow_id": handle.id, "status": "running"}

    @app.post(
        "/v1/policies/{policy_id}/servers",
        response_model=Bound,
        tags=["policies"],
        responses=_responses(404, 409, 422),
    )
    def bind_servers(policy_id: Id, body: ServerIds) -> dict[str, Any]:
        """Bind servers (a server bound elsewhere moves here) (P6)."""
        state.policies.policies.get(policy_id)
        with body_references():
            bound = state.policies.bind(policy_id, body.server_ids)
        return {"policy_id": policy_id, "server_ids": bound}

    @app.post(
        "/v1/policies/{policy_id}/servers/unbind",
        response_model=Bound,
        tags=["policies"],
        responses=_responses(404, 422),
    )
    def unbind_servers(policy_id: Id, body: ServerIds) -> dict[str, Any]:
        """Unbind servers; their backups stay (P9)."""
        bound = state.policies.unbind(policy_id, body.server_ids)
        return {"policy_id": policy_id, "server_ids": bound}

    _problem_media_type(app)
    return app
