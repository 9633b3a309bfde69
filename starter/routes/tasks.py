"""``/v1/tasks``: task records (T1, T2)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from csbs.model import TaskKind, TaskStatus
from starter.api_models import Deleted, Id, TaskOut, _responses
from starter.routes.common import FacadeDep, PageDep, page_responses, paged

router = APIRouter(tags=["tasks"])


@router.get("/v1/tasks", response_model=list[TaskOut], responses=page_responses(422))
def list_tasks(
    facade: FacadeDep,
    page: PageDep,
    request: Request,
    response: Response,
    kind: TaskKind | None = None,
    status: TaskStatus | None = None,
) -> list[Any]:
    """Backup, restore and delete task records, newest first, a page at a time."""
    found = facade.tasks_page(kind, status, limit=page.limit, cursor=page.cursor)
    return paged(request, response, found)


@router.get("/v1/tasks/{task_id}", response_model=TaskOut, responses=_responses(404, 422))
def get_task(task_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """One task record, with its failure reason."""
    return facade.task(task_id)


@router.delete("/v1/tasks/{task_id}", response_model=Deleted, responses=_responses(404, 422))
def delete_task(task_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Delete a failed task record (T2)."""
    return {"deleted": facade.delete_tasks([task_id])}


@router.post("/v1/tasks:delete-failed", response_model=Deleted)
def delete_failed_tasks(facade: FacadeDep) -> dict[str, Any]:
    """Delete every failed task record (T2)."""
    return {"deleted": facade.delete_tasks(None, all_failed=True)}
