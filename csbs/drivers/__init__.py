"""Compute drivers: how csbs reaches servers and their disks."""

from __future__ import annotations

from csbs.config import Settings
from csbs.drivers.base import ComputeDriver, DevServers, DiskWriter, SnapshotDisk, SnapshotReader
from csbs.drivers.fleet import DEFAULT_HOST, Fleet, InventoryReader
from csbs.errors import InvalidInput


def make_driver(settings: Settings) -> ComputeDriver:
    """The driver named by ``settings.compute_driver``."""
    if settings.compute_driver == "local":
        from csbs.drivers.local import LocalDriver

        return LocalDriver(
            settings.effective_servers_dir, project=settings.project, host=settings.host
        )
    if settings.compute_driver == "qemu":
        from csbs.drivers.qemu import QemuDriver

        return QemuDriver(
            settings.effective_servers_dir,
            project=settings.project,
            host=settings.host,
            qemu_binary=settings.qemu_binary,
            qemu_img=settings.qemu_img,
            shutdown_timeout=settings.shutdown_timeout,
            stream_speed=settings.instant_stream_speed,
        )
    if settings.compute_driver == "libvirt":
        from csbs.drivers.libvirt import LibvirtDriver

        return LibvirtDriver(
            settings.effective_servers_dir,
            uri=settings.libvirt_uri,
            project=settings.project,
            host=settings.host,
            qemu_img=settings.qemu_img,
            storage_daemon=settings.qemu_storage_daemon,
            shutdown_timeout=settings.shutdown_timeout,
            stream_speed=settings.instant_stream_speed,
        )
    raise ValueError(f"compute_driver {settings.compute_driver!r} is not known")


def make_fleet(settings: Settings, inventory: InventoryReader) -> Fleet:
    """This host's driver, with the servers that other hosts' agents reported."""
    return Fleet(make_driver(settings), inventory, settings.host)


def make_dev_servers(settings: Settings) -> DevServers:
    """The driver, for making servers and playing their guest (``csbs dev``, tests and
    benchmarks); a production driver refuses with the reason."""
    driver = make_driver(settings)
    if not isinstance(driver, DevServers):
        raise InvalidInput(
            f"compute_driver {settings.compute_driver!r} backs up existing servers only: "
            f"csbs dev makes servers with the local or qemu driver"
        )
    return driver


__all__ = [
    "DEFAULT_HOST",
    "ComputeDriver",
    "DevServers",
    "DiskWriter",
    "Fleet",
    "SnapshotDisk",
    "SnapshotReader",
    "make_dev_servers",
    "make_driver",
    "make_fleet",
]
