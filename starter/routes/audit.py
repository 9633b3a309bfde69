"""``/v1/audit``: the operation log (issue 16), for admins."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from csbs.audit import AuditLog
from csbs.errors import InvalidInput
from csbs.rules import parse_time
from starter.api_models import AuditOut, _responses
from starter.routes.common import FacadeDep

router = APIRouter(tags=["audit"])


@router.get("/v1/audit", response_model=list[AuditOut], responses=_responses(422))
def list_audit(
    facade: FacadeDep,
    since: Annotated[
        str | None, Query(description="Only entries at or after this ISO date or time (UTC).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[dict[str, Any]]:
    """Every change made in the project through the API, the console or the CLI, newest
    first: who, what, on what, when, and how it ended."""
    try:
        when = parse_time(since, "since")
    except InvalidInput as exc:
        raise InvalidInput(str(exc)) from None  # 422, as every bad parameter
    return [audit_json(r) for r in AuditLog(facade.catalog).list(when, limit)]


def audit_json(row: Any) -> dict[str, Any]:
    return {
        "at": row.at.isoformat(),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "result": row.result,
        "reason": row.reason,
    }
