"""``/v1/health`` and ``/v1/servers``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from starter.api_models import Health, ServerOut
from starter.routes.common import FacadeDep, PageDep, page_responses, paged

router = APIRouter()


@router.get("/v1/health", response_model=Health, tags=["health"])
def health() -> dict[str, str]:
    """The API process is up (``csbs doctor`` checks what it depends on)."""
    return {"status": "ok"}


@router.get(
    "/v1/servers",
    response_model=list[ServerOut],
    tags=["servers"],
    responses=page_responses(422),
)
def list_servers(
    facade: FacadeDep, page: PageDep, request: Request, response: Response
) -> list[dict[str, Any]]:
    """The project's servers, as the compute driver reports them, by id."""
    found = facade.servers_page(page.limit, page.cursor)
    return paged(
        request, response, found.map(lambda s: s.model_dump(mode="json", exclude={"project"}))
    )
