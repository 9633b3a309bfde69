"""Servers on every host, as the central worker and the CLI see them.

The default host's servers come from its driver (the one ``python worker.py`` serves, as
before agents existed). The servers of other hosts come from the inventory that each
host's agent keeps in the catalog (``python worker.py --host NAME``); their data-plane
steps (snapshot, reads, restore writes, power) run on that agent, never here."""

from __future__ import annotations

import logging
from typing import Protocol

from csbs.drivers.base import (
    ComputeDriver,
    DiskWriter,
    InstantSource,
    RestoreBaseline,
    Snapshot,
    SnapshotReader,
    StreamState,
)
from csbs.errors import DiskUnavailable, DriverError, NotFound
from csbs.model import Disk, Server

log = logging.getLogger(__name__)

DEFAULT_HOST = "default"


class InventoryReader(Protocol):
    def inventory_servers(self, exclude_host: str | None = None) -> list[Server]: ...

    def inventory_server(self, server_id: str) -> Server | None: ...


class Fleet:
    """A ``ComputeDriver`` over the default host's driver and the other hosts' inventory."""

    def __init__(self, local: ComputeDriver, inventory: InventoryReader, host: str) -> None:
        self.local = local
        self.inventory = inventory
        self.host = host
        self.name = local.name

    def list_servers(self) -> list[Server]:
        try:
            servers = self.local.list_servers()
        except DiskUnavailable as exc:  # no hypervisor here: only the agents' servers
            log.warning("the %s host's driver is unavailable: %s", self.host, exc)
            servers = []
        mine = {s.id for s in servers}
        others = [s for s in self.inventory.inventory_servers(self.host) if s.id not in mine]
        return servers + sorted(others, key=lambda s: (s.host, s.name, s.id))

    def get_server(self, server_id: str) -> Server:
        try:
            return self.local.get_server(server_id)
        except (NotFound, DiskUnavailable):
            server = self.inventory.inventory_server(server_id)
            if server is None or server.host == self.host:
                raise
            return server

    def _remote(self, server_id: str) -> str | None:
        """The host of a server that is not on this one, else None."""
        try:
            self.local.get_server(server_id)
            return None
        except (NotFound, DiskUnavailable):
            server = self.inventory.inventory_server(server_id)
            return None if server is None or server.host == self.host else server.host

    def _local_only(self, server_id: str, what: str) -> None:
        host = self._remote(server_id)
        if host is not None:
            raise DriverError(
                f"server {server_id} is on host {host}: {what} runs on that host's agent "
                f"(python worker.py --host {host}), not here"
            )

    # -- the data plane: this host's servers only -------------------------------------------
    def stop(self, server_id: str) -> str | None:
        self._local_only(server_id, "stopping it")
        return self.local.stop(server_id)

    def start(self, server_id: str) -> Server:
        self._local_only(server_id, "starting it")
        return self.local.start(server_id)

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        self._local_only(server_id, "its snapshot")
        return self.local.group_snapshot(server_id, snapshot_id)

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> SnapshotReader:
        self._local_only(server_id, "reading its snapshot")
        return self.local.open_snapshot(server_id, snapshot_id, disk_id)

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        if self._remote(server_id) is not None:
            # Its agent releases what no backup owns before the host's next snapshot.
            return
        self.local.release_snapshot(server_id, snapshot_id, committed)

    def snapshots(self, server_id: str) -> list[str]:
        if self._remote(server_id) is not None:
            return []
        return self.local.snapshots(server_id)

    def recreate_disk(self, server_id: str, like: Disk, size_bytes: int) -> Disk:
        self._local_only(server_id, "re-creating its disk")
        return self.local.recreate_disk(server_id, like, size_bytes)

    def open_disk_writer(self, server_id: str, disk_id: str, size_bytes: int) -> DiskWriter:
        self._local_only(server_id, "writing its disks")
        return self.local.open_disk_writer(server_id, disk_id, size_bytes)

    def restore_baseline(self, server_id: str, disk_id: str) -> RestoreBaseline:
        self._local_only(server_id, "reading its changed blocks")
        return self.local.restore_baseline(server_id, disk_id)

    def instant_support(self) -> str | None:
        return self.local.instant_support()

    def instant_socket(self, server_id: str, disk_id: str) -> str:
        self._local_only(server_id, "its instant restore")
        return self.local.instant_socket(server_id, disk_id)

    def instant_backup(self, server_id: str) -> str | None:
        if self._remote(server_id) is not None:
            return None
        return self.local.instant_backup(server_id)

    def instant_attach(self, server_id: str, backup_id: str, sources: list[InstantSource]) -> None:
        self._local_only(server_id, "its instant restore")
        self.local.instant_attach(server_id, backup_id, sources)

    def instant_stream(self, server_id: str) -> list[StreamState]:
        self._local_only(server_id, "its instant restore")
        return self.local.instant_stream(server_id)
