"""The inventory of servers on other hosts: each host agent writes what its driver sees,
the central worker and the CLI read it (``csbs server list``, backups of those servers)."""

from __future__ import annotations

from sqlmodel import col, delete, select

from csbs.catalog.base import CatalogBase
from csbs.catalog.rows import HostRow, HostServerRow, utcnow
from csbs.model import Server


class Inventory(CatalogBase):
    """Hosts and the servers their agents last reported."""

    def record_inventory(self, host: str, driver: str, servers: list[Server]) -> None:
        """Replace what ``host`` reported: its servers now, and when it was seen."""
        now = utcnow()
        with self.session() as s:
            s.exec(
                delete(HostServerRow).where(
                    col(HostServerRow.project) == self.project, col(HostServerRow.host) == host
                )
            )
            for server in servers:
                s.merge(
                    HostServerRow(
                        project=self.project,
                        id=server.id,
                        host=host,
                        server=server.model_dump_json(),
                        seen_at=now,
                    )
                )
            s.merge(
                HostRow(
                    project=self.project,
                    name=host,
                    driver=driver,
                    servers=len(servers),
                    seen_at=now,
                )
            )

    def inventory_servers(self, exclude_host: str | None = None) -> list[Server]:
        with self.session() as s:
            query = select(HostServerRow).where(col(HostServerRow.project) == self.project)
            if exclude_host is not None:
                query = query.where(col(HostServerRow.host) != exclude_host)
            rows = s.exec(query).all()
        return [Server.model_validate_json(r.server) for r in rows]

    def inventory_server(self, server_id: str) -> Server | None:
        with self.session() as s:
            row = s.get(HostServerRow, (self.project, server_id))
        return None if row is None else Server.model_validate_json(row.server)

    def hosts(self) -> list[HostRow]:
        with self.session() as s:
            rows = s.exec(
                select(HostRow)
                .where(col(HostRow.project) == self.project)
                .order_by(col(HostRow.name))
            ).all()
        return list(rows)
