"""The servers of every host (issue 13): the default host's from its driver, the others'
from the inventory their agents keep in the catalog; their data plane never runs here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csbs.catalog import Catalog
from csbs.config import Settings
from csbs.drivers import Fleet
from csbs.drivers.local import LocalDriver
from csbs.errors import DiskUnavailable, DriverError, NotFound
from csbs.model import Disk, DiskRole
from csbs.services import Services

MIB = 1024 * 1024


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    yield cat
    cat.dispose()


def test_the_fleet_lists_every_hosts_servers_and_runs_only_its_own(
    tmp_path: Path, catalog: Catalog
) -> None:
    here = LocalDriver(tmp_path / "here")
    mine = here.create_server("mine", [MIB])
    there = LocalDriver(tmp_path / "h1", host="h1")
    remote = there.create_server("remote", [MIB])
    gone = there.create_server("gone", [MIB])
    catalog.record_inventory("h1", "local", there.list_servers())
    catalog.record_inventory("default", "local", here.list_servers())  # not listed twice
    fleet = Fleet(here, catalog, "default")

    assert [(s.name, s.host) for s in fleet.list_servers()] == [
        ("mine", "default"),
        ("gone", "h1"),
        ("remote", "h1"),
    ]
    assert fleet.get_server(remote.id).host == "h1"
    assert fleet.get_server(mine.id).host == "default"
    with pytest.raises(NotFound):
        fleet.get_server("srv-nowhere")
    # The data plane of h1's servers is its agent's.
    for call in (
        lambda: fleet.group_snapshot(remote.id, "s1"),
        lambda: fleet.open_snapshot(remote.id, "s1", remote.disks[0].id),
        lambda: fleet.stop(remote.id),
        lambda: fleet.start(remote.id),
        lambda: fleet.open_disk_writer(remote.id, remote.disks[0].id, MIB),
        lambda: fleet.recreate_disk(remote.id, Disk(id="d", name="d", size_bytes=MIB,
                                                    role=DiskRole.DATA), MIB),
    ):  # fmt: skip
        with pytest.raises(DriverError, match=r"is on host h1: .*python worker.py --host h1"):
            call()
    assert fleet.snapshots(remote.id) == []
    fleet.release_snapshot(remote.id, "s1", committed=False)  # its agent releases it
    assert fleet.group_snapshot(mine.id, "s2").id == "s2"  # this host's: here
    fleet.release_snapshot(mine.id, "s2", committed=True)

    # A new report replaces the old one: a server the agent no longer sees is gone.
    (tmp_path / "h1" / gone.id / "server.json").unlink()
    catalog.record_inventory("h1", "local", there.list_servers())
    assert [s.name for s in fleet.list_servers()] == ["mine", "remote"]
    assert [(h.name, h.servers) for h in catalog.hosts()] == [("default", 1), ("h1", 1)]


def test_no_local_hypervisor_still_lists_the_agents_servers(
    tmp_path: Path, catalog: Catalog
) -> None:
    class Unreachable(LocalDriver):
        def list_servers(self) -> list:  # type: ignore[type-arg]
            raise DiskUnavailable("cannot reach libvirt")

    there = LocalDriver(tmp_path / "h2", host="h2")
    there.create_server("far", [MIB])
    catalog.record_inventory("h2", "local", there.list_servers())
    fleet = Fleet(Unreachable(tmp_path / "none"), catalog, "default")
    assert [(s.name, s.host) for s in fleet.list_servers()] == [("far", "h2")]


def test_steps_of_another_hosts_server_are_routed_to_its_agent(tmp_path: Path) -> None:
    settings = Settings(
        var_dir=tmp_path / "var", servers_dir=tmp_path / "here", host_wait_seconds=42
    )
    svc = Services(settings)
    try:
        there = LocalDriver(tmp_path / "h1", host="h1")
        remote = there.create_server("remote", [MIB])
        svc.catalog.record_inventory("h1", "local", [remote])
        route = svc.backup.route(svc.driver.get_server(remote.id))
        assert (route.host, route.queue, route.wait_seconds) == ("h1", "csbs@h1", 42)
        local = LocalDriver(tmp_path / "here").create_server("here", [MIB])
        assert svc.backup.route(svc.driver.get_server(local.id)).queue is None
    finally:
        svc.catalog.dispose()
