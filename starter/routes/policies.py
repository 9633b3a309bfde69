"""``/v1/policies``: backup policies on Temporal Schedules, their servers, run now."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from csbs.policy import PolicySpec
from starter.api_models import (
    Bound,
    Deleted,
    Id,
    PolicyCreate,
    PolicyOut,
    PolicyPatch,
    ServerIds,
    _responses,
)
from starter.routes.common import (
    ONE_POLICY,
    STARTS,
    FacadeDep,
    PageDep,
    body_references,
    page_responses,
    paged,
)

router = APIRouter(tags=["policies"])


@router.get("/v1/policies", response_model=list[PolicyOut], responses=page_responses(422))
def list_policies(
    facade: FacadeDep, page: PageDep, request: Request, response: Response
) -> list[dict[str, Any]]:
    """The project's policies (at most 32), by id."""
    return paged(request, response, facade.policies_page(page.limit, page.cursor))


@router.post(
    "/v1/policies",
    status_code=201,
    response_model=PolicyOut,
    responses=_responses(409, 422, 503),
)
async def create_policy(body: PolicyCreate, facade: FacadeDep) -> dict[str, Any]:
    """Create a policy and its Temporal Schedule (P1-P3)."""
    return await facade.create_policy(PolicySpec.model_validate(body.model_dump()))


@router.get("/v1/policies/{policy_id}", **ONE_POLICY)
async def get_policy(policy_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """A policy with its servers and next run times."""
    return await facade.policy_view(policy_id, next_runs=True)


@router.patch("/v1/policies/{policy_id}", **ONE_POLICY)
async def update_policy(policy_id: Id, body: PolicyPatch, facade: FacadeDep) -> dict[str, Any]:
    """Change a policy; its schedule is rewritten (P7)."""
    return await facade.update_policy(policy_id, body.model_dump(exclude_unset=True))


@router.delete(
    "/v1/policies/{policy_id}", response_model=Deleted, responses=_responses(404, 422, 503)
)
async def delete_policy(policy_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Delete a policy and its schedule; its backups stay (P7)."""
    await facade.delete_policy(policy_id)
    return {"deleted": [policy_id]}


@router.post("/v1/policies/{policy_id}/enable", **ONE_POLICY)
async def enable_policy(policy_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Enable a policy (its schedule is unpaused)."""
    return await facade.set_policy_enabled(policy_id, True)


@router.post("/v1/policies/{policy_id}/disable", **ONE_POLICY)
async def disable_policy(policy_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Disable a policy: no future runs; runs in progress finish (P7)."""
    return await facade.set_policy_enabled(policy_id, False)


@router.post("/v1/policies/{policy_id}/run", **STARTS)
async def run_policy(policy_id: Id, facade: FacadeDep) -> dict[str, Any]:
    """Run a policy now: back up every bound server (P8)."""
    handle = await facade.run_policy(policy_id)
    return {"workflow_id": handle.id, "status": "running"}


@router.post(
    "/v1/policies/{policy_id}/servers",
    response_model=Bound,
    responses=_responses(404, 409, 422),
)
def bind_servers(policy_id: Id, body: ServerIds, facade: FacadeDep) -> dict[str, Any]:
    """Bind servers (a server bound elsewhere moves here) (P6)."""
    facade.check_policy(policy_id)  # a missing policy is 404; missing servers are 422
    with body_references():
        bound = facade.bind(policy_id, body.server_ids)
    return {"policy_id": policy_id, "server_ids": bound}


@router.post(
    "/v1/policies/{policy_id}/servers/unbind",
    response_model=Bound,
    responses=_responses(404, 422),
)
def unbind_servers(policy_id: Id, body: ServerIds, facade: FacadeDep) -> dict[str, Any]:
    """Unbind servers; their backups stay (P9)."""
    return {"policy_id": policy_id, "server_ids": facade.unbind(policy_id, body.server_ids)}
