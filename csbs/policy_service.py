"""Policy CRUD and bindings with the guide's limits (P1-P3, P6, P7, P9).

Schedules are not touched here: the caller (CLI, workflows) keeps the Temporal Schedule
of each policy in step with what these methods return.
"""

from __future__ import annotations

import uuid
from typing import Any

from csbs.catalog import BindingRow, Catalog, PolicyCatalog, PolicyRow, utcnow
from csbs.drivers import ComputeDriver
from csbs.errors import InvalidInput, NotFound, QuotaExceeded
from csbs.policy import MAX_POLICIES_PER_TENANT, MAX_SERVERS_PER_POLICY, PolicySpec
from csbs.services import BACKUP_STATES


def policy_json(row: PolicyRow, bindings: list[BindingRow]) -> dict[str, Any]:
    """A policy as ``csbs policy show --json`` prints it."""
    spec = PolicySpec.model_validate_json(row.spec)
    return {
        "id": row.id,
        "name": row.name,
        "enabled": row.enabled,
        **spec.model_dump(mode="json", exclude={"name", "enabled"}),
        "server_ids": [b.server_id for b in bindings],
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
    }


class PolicyService:
    """Create, change, delete, bind and unbind policies of one tenant."""

    def __init__(self, catalog: Catalog, driver: ComputeDriver) -> None:
        self.policies = PolicyCatalog(catalog)
        self.driver = driver

    def create(self, spec: PolicySpec) -> PolicyRow:
        if len(self.policies.all()) >= MAX_POLICIES_PER_TENANT:
            raise QuotaExceeded(
                f"a project has at most {MAX_POLICIES_PER_TENANT} policies; delete one first"
            )
        now = utcnow()
        return self.policies.add(
            PolicyRow(
                id=f"pol-{uuid.uuid4().hex[:12]}",
                project=self.policies.project,
                name=spec.name,
                enabled=spec.enabled,
                spec=spec.model_dump_json(),
                created_at=now,
                updated_at=now,
            )
        )

    def spec(self, policy_id: str) -> PolicySpec:
        return PolicySpec.model_validate_json(self.policies.get(policy_id).spec)

    def update(self, policy_id: str, changes: dict[str, Any]) -> PolicyRow:
        """Apply changes to a policy's spec; the whole result is validated again (P7)."""
        merged = {**self.spec(policy_id).model_dump(), **changes}
        spec = PolicySpec.model_validate(merged)
        return self.policies.update(
            policy_id, name=spec.name, enabled=spec.enabled, spec=spec.model_dump_json()
        )

    def set_enabled(self, policy_id: str, enabled: bool) -> PolicyRow:
        return self.update(policy_id, {"enabled": enabled})

    def delete(self, policy_id: str) -> None:
        """Delete a policy and its bindings; its backups stay (P7)."""
        self.policies.get(policy_id)
        self.policies.delete(policy_id)

    def bind(self, policy_id: str, server_ids: list[str]) -> list[str]:
        """Bind servers (P6): running or stopped, no shared disks, at most 64 per policy.

        A server bound to another policy moves here. Nothing changes if any server is
        refused. Returns the policy's servers afterwards.
        """
        self.policies.get(policy_id)
        if len(set(server_ids)) != len(server_ids):
            raise InvalidInput("server ids must not repeat")
        for server_id in server_ids:
            try:
                server = self.driver.get_server(server_id)
            except NotFound:
                raise NotFound(f"server {server_id} does not exist") from None
            if server.state not in BACKUP_STATES:
                raise InvalidInput(
                    f"server {server_id} is {server.state.value}; only running or stopped "
                    f"servers can be bound to a policy"
                )
            if any(d.shared for d in server.disks):
                raise InvalidInput(
                    f"server {server_id} has a shared disk; it cannot be bound to a policy"
                )
        bound = {b.server_id for b in self.policies.bindings(policy_id)}
        after = bound | set(server_ids)
        if len(after) > MAX_SERVERS_PER_POLICY:
            raise QuotaExceeded(
                f"a policy binds at most {MAX_SERVERS_PER_POLICY} servers "
                f"({len(bound)} bound, {len(after - bound)} more asked)"
            )
        self.policies.bind(policy_id, server_ids)
        return [b.server_id for b in self.policies.bindings(policy_id)]

    def unbind(self, policy_id: str, server_ids: list[str]) -> list[str]:
        """Unbind servers (P9): their backups stay, a running backup finishes."""
        self.policies.get(policy_id)
        bound = {b.server_id for b in self.policies.bindings(policy_id)}
        missing = [s for s in server_ids if s not in bound]
        if missing:
            raise InvalidInput(f"server(s) {', '.join(missing)} are not bound to {policy_id}")
        self.policies.unbind(policy_id, server_ids)
        return [b.server_id for b in self.policies.bindings(policy_id)]

    def view(self, policy_id: str) -> dict[str, Any]:
        return policy_json(self.policies.get(policy_id), self.policies.bindings(policy_id))
