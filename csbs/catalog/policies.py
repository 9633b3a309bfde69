"""Policies and bindings of one project, over the same engine as the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import col, select

from csbs.catalog.repository import Catalog
from csbs.catalog.rows import BindingRow, PolicyRow, utcnow
from csbs.errors import (
    NotFound,
)


class PolicyCatalog:
    """Policies and bindings of one project, over the same engine as :class:`Catalog`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.project = catalog.project

    def add(self, row: PolicyRow) -> PolicyRow:
        with self.catalog.session() as s:
            s.add(row)
        return row

    def get(self, policy_id: str) -> PolicyRow:
        with self.catalog.session() as s:
            row = s.get(PolicyRow, policy_id)
            if row is None or row.project != self.project:
                raise NotFound(f"policy {policy_id} does not exist")
            return row

    def all(self) -> list[PolicyRow]:
        q = select(PolicyRow).where(PolicyRow.project == self.project)
        with self.catalog.session() as s:
            return list(s.exec(q.order_by(col(PolicyRow.created_at), col(PolicyRow.id))).all())

    def update(self, policy_id: str, **fields: Any) -> PolicyRow:
        fields["updated_at"] = utcnow()
        return self.catalog.update_row(PolicyRow, policy_id, f"policy {policy_id}", fields)

    def delete(self, policy_id: str) -> None:
        with self.catalog.session() as s:
            for binding in s.exec(select(BindingRow).where(BindingRow.policy_id == policy_id)):
                s.delete(binding)
            s.flush()
            row = s.get(PolicyRow, policy_id)
            if row is not None:
                s.delete(row)

    def exists_in_any_project(self, policy_id: str) -> bool:
        """Whether any project has this policy (reconcile never drops another's schedule)."""
        with self.catalog.session() as s:
            return s.get(PolicyRow, policy_id) is not None

    def bindings(self, policy_id: str | None = None) -> list[BindingRow]:
        q = select(BindingRow).where(BindingRow.project == self.project)
        if policy_id is not None:
            q = q.where(BindingRow.policy_id == policy_id)
        with self.catalog.session() as s:
            return list(s.exec(q.order_by(col(BindingRow.bound_at), col(BindingRow.server_id))))

    def bind(self, policy_id: str, server_ids: Sequence[str]) -> None:
        """Bind servers in one transaction; a server bound elsewhere moves here (P6)."""
        with self.catalog.session() as s:
            for server_id in server_ids:
                row = s.get(BindingRow, server_id)
                if row is None:
                    row = BindingRow(
                        server_id=server_id,
                        policy_id=policy_id,
                        project=self.project,
                        bound_at=utcnow(),
                    )
                elif row.policy_id != policy_id:
                    row.policy_id, row.bound_at = policy_id, utcnow()
                s.add(row)

    def unbind(self, policy_id: str, server_ids: Sequence[str]) -> int:
        with self.catalog.session() as s:
            rows = s.exec(
                select(BindingRow)
                .where(BindingRow.policy_id == policy_id)
                .where(col(BindingRow.server_id).in_(list(server_ids)))
            ).all()
            for row in rows:
                s.delete(row)
            return len(rows)
