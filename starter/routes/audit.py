"""``/v1/audit``: the operation log (issue 16), for admins."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from csbs.audit import AuditLog
from csbs.errors import InvalidInput
from csbs.rules import parse_time
from starter.api_models import AuditOut
from starter.routes.common import FacadeDep, page_responses, paged

router = APIRouter(tags=["audit"])


@router.get("/v1/audit", response_model=list[AuditOut], responses=page_responses(422))
def list_audit(
    facade: FacadeDep,
    request: Request,
    response: Response,
    since: Annotated[
        str | None, Query(description="Only entries at or after this ISO date or time (UTC).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: Annotated[
        str | None,
        Query(max_length=1000, description="The `X-Next-Cursor` of the page before."),
    ] = None,
) -> list[dict[str, Any]]:
    """Every change made in the project through the API, the console or the CLI, newest
    first: who, what, on what, when, and how it ended."""
    try:
        when = parse_time(since, "since")
    except InvalidInput as exc:
        raise InvalidInput(str(exc)) from None  # 422, as every bad parameter
    found = AuditLog(facade.catalog).page(when, limit, cursor)
    return paged(request, response, found.map(audit_json))


def audit_json(row: Any) -> dict[str, Any]:
    return {
        "at": row.at.isoformat(),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "result": row.result,
        "reason": row.reason,
    }
