"""``/v1/health`` and ``/v1/servers``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from starter.api_models import Health, ServerOut
from starter.routes.common import FacadeDep

router = APIRouter()


@router.get("/v1/health", response_model=Health, tags=["health"])
def health() -> dict[str, str]:
    """The API process is up (``csbs doctor`` checks what it depends on)."""
    return {"status": "ok"}


@router.get("/v1/servers", response_model=list[ServerOut], tags=["servers"])
def list_servers(facade: FacadeDep) -> list[dict[str, Any]]:
    """The project's servers, as the compute driver reports them."""
    return [s.model_dump(mode="json", exclude={"project"}) for s in facade.servers()]
