"""Policy CRUD and bindings with the guide's limits (P1-P3, P6, P7, P9).

Schedules are not touched here: the caller (CLI, workflows) keeps the Temporal Schedule
of each policy in step with what these methods return.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from csbs.catalog import (
    BackupFilter,
    BindingRow,
    Catalog,
    PolicyCatalog,
    PolicyRow,
    TaskRow,
    utcnow,
)
from csbs.chunkstore import ChunkStore
from csbs.drivers import ComputeDriver
from csbs.errors import Conflict, InvalidInput, InvalidState, NotFound, QuotaExceeded
from csbs.format import PolicyCopy
from csbs.locks import as_utc
from csbs.model import BackupStatus, PolicyRunPlan, RetentionPlan, TaskKind, TaskStatus
from csbs.policy import (
    MAX_POLICIES_PER_PROJECT,
    MAX_SERVERS_PER_POLICY,
    PolicySpec,
    RetainedBackup,
    retention_notes,
    select_expired,
)
from csbs.rules import BACKUP_STATES


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
    """Create, change, delete, bind and unbind policies of one project."""

    def __init__(
        self, catalog: Catalog, driver: ComputeDriver, store: ChunkStore | None = None
    ) -> None:
        self.policies = PolicyCatalog(catalog)
        self.driver = driver
        #: Where a copy of every policy is kept for ``csbs catalog rebuild`` (issue 17);
        #: None: nowhere (tests of the rules alone).
        self.store = store

    def publish(self) -> int:
        """Write a copy of every policy of the project, with its servers, to the
        repository and remove the copies of deleted policies; returns how many there are.
        Called after every change (a bind may move servers from other policies)."""
        if self.store is None:
            return 0
        rows = self.policies.all()
        bound: dict[str, list[str]] = {}
        for b in self.policies.bindings():
            bound.setdefault(b.policy_id, []).append(b.server_id)
        for row in rows:
            self.store.put_policy(
                PolicyCopy(
                    id=row.id,
                    project=row.project,
                    name=row.name,
                    enabled=row.enabled,
                    spec=PolicySpec.model_validate_json(row.spec).model_dump(mode="json"),
                    server_ids=bound.get(row.id, []),
                    created_at=as_utc(row.created_at),
                    updated_at=as_utc(row.updated_at),
                )
            )
        live = {r.id for r in rows}
        self.store.delete_policies([p for p in self.store.policy_ids() if p not in live])
        return len(rows)

    def create(self, spec: PolicySpec) -> PolicyRow:
        if len(self.policies.all()) >= MAX_POLICIES_PER_PROJECT:
            raise QuotaExceeded(
                f"a project has at most {MAX_POLICIES_PER_PROJECT} policies; delete one first"
            )
        now = utcnow()
        row = self.policies.add(
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
        self.publish()
        return row

    def spec(self, policy_id: str) -> PolicySpec:
        return PolicySpec.model_validate_json(self.policies.get(policy_id).spec)

    def update(self, policy_id: str, changes: dict[str, Any]) -> PolicyRow:
        """Apply changes to a policy's spec; the whole result is validated again (P7). A
        policy runs weekly or every N days: giving one period drops the other."""
        changes = dict(changes)
        if "weekdays" in changes and "every_days" not in changes:
            changes["every_days"] = None
        if "every_days" in changes and "weekdays" not in changes:
            changes["weekdays"] = None
        merged = {**self.spec(policy_id).model_dump(), **changes}
        spec = PolicySpec.model_validate(merged)
        row = self.policies.update(
            policy_id, name=spec.name, enabled=spec.enabled, spec=spec.model_dump_json()
        )
        self.publish()
        return row

    def set_enabled(self, policy_id: str, enabled: bool) -> PolicyRow:
        return self.update(policy_id, {"enabled": enabled})

    def delete(self, policy_id: str) -> None:
        """Delete a policy and its bindings; its backups stay (P7)."""
        self.policies.get(policy_id)
        self.policies.delete(policy_id)
        self.publish()

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
        self.publish()
        return [b.server_id for b in self.policies.bindings(policy_id)]

    def unbind(self, policy_id: str, server_ids: list[str]) -> list[str]:
        """Unbind servers (P9): their backups stay, a running backup finishes."""
        self.policies.get(policy_id)
        bound = {b.server_id for b in self.policies.bindings(policy_id)}
        missing = [s for s in server_ids if s not in bound]
        if missing:
            raise InvalidInput(f"server(s) {', '.join(missing)} are not bound to {policy_id}")
        self.policies.unbind(policy_id, server_ids)
        self.publish()
        return [b.server_id for b in self.policies.bindings(policy_id)]

    def plan_run(self, policy_id: str, trigger: str) -> PolicyRunPlan:
        """P8: run now is refused while a bound server has a backup running, and (P7) when
        no server is bound; a scheduled run skips busy servers (the caller records the
        skips) and does nothing without servers."""
        policy = self.policies.get(policy_id)
        server_ids = [b.server_id for b in self.policies.bindings(policy_id)]
        if not server_ids and trigger == "manual":
            # P7, guide 3.2.4: back up now needs at least one bound server.
            raise InvalidState(
                f"policy {policy_id} has no servers bound: bind at least one server "
                f"(csbs policy bind {policy_id} SERVER_ID) before backing up now"
            )
        running = {
            b.server_id: b
            for b in self.policies.catalog.list_backups(
                BackupFilter(status=BackupStatus.CREATING.value)
            )
        }
        busy = {s: running[s] for s in server_ids if s in running}
        if busy and trigger == "manual":
            listing = ", ".join(f"{s} ({b.name})" for s, b in busy.items())
            raise Conflict(f"policy {policy_id} cannot run now: backups are running on {listing}")
        return PolicyRunPlan(
            policy_id=policy_id,
            replicate=PolicySpec.model_validate_json(policy.spec).replicate,
            server_ids=[s for s in server_ids if s not in busy],
            skipped={
                s: f"skipped: server {s} had backup {b.name} ({b.id}) running"
                for s, b in busy.items()
            },
        )

    def record_skips(self, policy_id: str, skipped: dict[str, str], run_id: str) -> None:
        """Leave a ``skipped`` backup task per skipped server (P8)."""
        now = utcnow()
        for i, (server_id, reason) in enumerate(sorted(skipped.items())):
            self.policies.catalog.add_task(
                TaskRow(
                    id=f"{run_id}-skip-{i}",
                    project=self.policies.project,
                    kind=TaskKind.BACKUP.value,
                    status=TaskStatus.SKIPPED.value,
                    server_id=server_id,
                    workflow_id=run_id,
                    started_at=now,
                    finished_at=now,
                    reason=reason,
                    detail=f"policy {policy_id}",
                )
            )

    def record_refusal(self, policy_id: str, trigger: str, reason: str, run_id: str) -> None:
        """Leave a failed backup task for a policy run that was started and then refused
        (T1, guide 3.3): whoever started it (a schedule, the Temporal CLI, the REST API,
        another service) finds why in ``csbs task list --status failed``."""
        now = utcnow()
        self.policies.catalog.add_task(  # a retry finds the row there and adds nothing
            TaskRow(
                id=f"{run_id}-refused",
                project=self.policies.project,
                kind=TaskKind.BACKUP.value,
                status=TaskStatus.FAILED.value,
                workflow_id=run_id,
                started_at=now,
                finished_at=now,
                reason=reason,
                detail=f"policy {policy_id} ({trigger} run)",
            )
        )

    def expired(self, policy_id: str, now: datetime | None = None) -> list[str]:
        """Backups of this policy's schedule that retention deletes now (P4)."""
        return self.retention(policy_id, now).expired

    def retention(self, policy_id: str, now: datetime | None = None) -> RetentionPlan:
        """What this policy's retention deletes now (P4, P5, P9): nothing while the policy
        is disabled, and only backups of the servers bound to it; and what it keeps past
        its rule (a server's last available backup) with why."""
        spec = self.spec(policy_id)
        if not spec.enabled:
            # Guide 3.2.5: a disabled policy no longer runs, and neither does its cleanup.
            return RetentionPlan(expired=[], kept={})
        # Guide 3.2.6 (P9): the backups of an unbound server are no longer the policy's to
        # delete; they stay until a person deletes them.
        bound = {b.server_id for b in self.policies.bindings(policy_id)}
        rows = [
            r
            for r in self.policies.catalog.list_backups(BackupFilter(policy_id=policy_id))
            if r.server_id in bound
        ]
        backups = [
            RetainedBackup(r.id, r.server_id, r.kind, r.status, r.created_at)  # type: ignore[arg-type]
            for r in rows
        ]
        mine = {r.id for r in rows}
        covered = frozenset(
            server_id
            for server_id in {r.server_id for r in rows}
            if any(
                o.id not in mine and o.verify_status != "failed"
                for o in self.policies.catalog.list_backups(
                    BackupFilter(server_id=server_id, status=BackupStatus.AVAILABLE.value)
                )
            )
        )
        when = now or utcnow()
        args = (backups, spec.retention, spec.retention_value, when, covered)
        expired, kept = select_expired(*args), retention_notes(*args)
        # Issue 17: a backup under S3 Object Lock cannot be deleted before its lock date;
        # retention leaves it and says so, and a later cleanup deletes it.
        for row in rows:
            if row.id in expired and row.locked_until and as_utc(row.locked_until) > as_utc(when):
                expired.discard(row.id)
                kept[row.id] = (
                    f"expired, but locked until {as_utc(row.locked_until):%Y-%m-%d %H:%M} UTC "
                    f"(S3 Object Lock): a later cleanup deletes it"
                )
        return RetentionPlan(expired=sorted(expired), kept=kept)

    def view(self, policy_id: str) -> dict[str, Any]:
        return policy_json(self.policies.get(policy_id), self.policies.bindings(policy_id))
