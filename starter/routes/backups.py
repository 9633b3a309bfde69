"""``/v1/backups``: list, create, show, delete, restore and verify backups."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from csbs.auth import Forbidden, Role
from csbs.catalog.views import DiskBackupListView
from csbs.model import RestoreServerInput
from csbs.rules import BackupQuery
from starter.api_models import (
    BackupCreate,
    BackupDetail,
    BackupOut,
    Bound,
    DeleteRequest,
    Id,
    RestoreRequest,
    _responses,
)
from starter.routes.common import (
    STARTS,
    FacadeDep,
    PageDep,
    PrincipalDep,
    body_references,
    page_responses,
    paged,
)

router = APIRouter(tags=["backups"])


@router.get("/v1/backups", response_model=list[BackupOut], responses=page_responses(422))
def list_backups(
    facade: FacadeDep,
    query: Annotated[BackupQuery, Query()],
    page: PageDep,
    request: Request,
    response: Response,
) -> list[dict[str, Any]]:
    """Backups, newest first, with every filter of ``csbs backup list``; a page of
    ``limit`` (the next one in the ``Link`` header)."""
    found = facade.backups_page(query, page.limit, page.cursor)
    return paged(request, response, found)


@router.get(
    "/v1/disk-backups", response_model=list[DiskBackupListView], responses=page_responses(422)
)
def list_disk_backups(
    facade: FacadeDep,
    query: Annotated[BackupQuery, Query()],
    page: PageDep,
    request: Request,
    response: Response,
) -> list[dict[str, Any]]:
    """Disk backups: one per disk of every backup the filters select, with that backup
    (guide 1.6); restore one with ``POST /v1/backups/{id}/restore`` and ``disk_ids``."""
    found = facade.disk_backups_page(query, page.limit, page.cursor)
    return paged(request, response, found)


@router.post(
    "/v1/backups",
    status_code=202,
    response_model=list[BackupOut] | Bound,
    responses=_responses(404, 409, 422, 503),
)
async def create_backups(
    body: BackupCreate, facade: FacadeDep, response: Response, who: PrincipalDep
) -> list[dict[str, Any]] | dict[str, Any]:
    """Back up servers now (one backup each); returns the backups being created. With
    ``policy_id``, bind them to that policy instead (guide 2.2: a server bound elsewhere
    moves here) and answer 200 with the policy's servers; nothing is backed up now."""
    if body.policy_id is not None:
        if Role.parse(who.role) < Role.admin:  # binding changes a policy: admins only
            raise Forbidden(f"token {who.id} has role {who.role}; binding to a policy needs admin")
        facade.check_policy(body.policy_id)  # a missing policy is 404; missing servers 422
        with body_references():
            bound = facade.bind(body.policy_id, body.server_ids)
        response.status_code = 200
        return {"policy_id": body.policy_id, "server_ids": bound}
    with body_references():
        ids = await facade.create_backups(
            body.server_ids, body.name, body.description, body.offline
        )
    return [facade.backup_view(b) for b in ids]


@router.get("/v1/backups/{backup_id}", response_model=BackupDetail, responses=_responses(404, 422))
def get_backup(backup_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """One backup: disks, sizes, parent, times, and its task records."""
    return facade.backup_detail(backup_id)


async def _delete(facade: FacadeDep, backup_ids: list[str]) -> dict[str, Any]:
    handle = await facade.delete_backups(backup_ids)
    return {"workflow_id": handle.id, "status": "deleting"}


@router.delete("/v1/backups/{backup_id}", **STARTS)
async def delete_backup(backup_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Delete a backup (available, error or delete_failed); chunks go to GC."""
    return await _delete(facade, [backup_id])


@router.post("/v1/backups:delete", **STARTS)
async def delete_backups(body: DeleteRequest, facade: FacadeDep) -> dict[str, Any]:
    """Delete several backups in one workflow."""
    with body_references():
        return await _delete(facade, body.backup_ids)


@router.post("/v1/backups/{backup_id}/restore", **STARTS)
async def restore_backup(backup_id: Id, body: RestoreRequest, facade: FacadeDep) -> dict[str, Any]:
    """Restore the server's disks from this backup (overwrites them; stops the server).
    Follow the task (``GET /v1/tasks/{task_id}``) for its outcome."""
    inp = RestoreServerInput(backup_id=backup_id, **body.model_dump())
    facade.check_backups([backup_id])
    with body_references():
        handle, task_id = await facade.restore(inp)
    return {"workflow_id": handle.id, "task_id": task_id, "status": "restoring"}


@router.post("/v1/backups/{backup_id}/verify", **STARTS)
async def verify_backup(backup_id: Id, facade: FacadeDep, replica: bool = False) -> dict[str, Any]:
    """Read every chunk of the backup and check its digest. The task (and the backup's
    ``verify_status`` and ``verify_error``) say what was found. ``?replica=true``: the
    copy on the second site (a failure goes to ``replica_error``)."""
    handle, task_id = await facade.verify(backup_id, replica)
    return {"workflow_id": handle.id, "task_id": task_id, "status": "verifying"}


@router.post("/v1/backups/{backup_id}/replicate", **STARTS)
async def replicate_backup(backup_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Copy the backup to the second site (``CSBS_REPLICA_*``): the chunks the replica
    lacks, then its manifests and descriptor. The backup's ``replica_status`` follows."""
    handle, task_id = await facade.replicate(backup_id)
    return {"workflow_id": handle.id, "task_id": task_id, "status": "replicating"}
