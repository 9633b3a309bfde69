"""``/v1/quota``: the tenant's quota and usage (B15), as ``csbs quota show|set``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from csbs.errors import InvalidInput
from starter.api_models import QuotaOut, QuotaPatch, _responses
from starter.routes.common import FacadeDep

router = APIRouter(tags=["quota"])


@router.get("/v1/quota", response_model=QuotaOut, responses=_responses(503))
def get_quota(facade: FacadeDep) -> dict[str, Any]:
    """The project's limits, where each comes from, and what it uses: disk backups (one
    per disk of each backup not in error) and stored chunk bytes (shared chunks once)."""
    return facade.quota_view()


@router.patch("/v1/quota", response_model=QuotaOut, responses=_responses(422, 503))
def set_quota(body: QuotaPatch, facade: FacadeDep) -> dict[str, Any]:
    """Set the project's own limits: a number, "unlimited" or "default" (back to
    CSBS_QUOTA_DISK_BACKUPS or CSBS_QUOTA_BYTES)."""
    if body.disk_backups is None and body.bytes is None:
        raise InvalidInput("give disk_backups or bytes (a number, unlimited or default)")
    disks = None if body.disk_backups is None else str(body.disk_backups)
    size = None if body.bytes is None else str(body.bytes)
    return facade.set_quota(disks, size)
