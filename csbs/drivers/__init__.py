"""Compute drivers: how csbs reaches servers and their disks."""

from __future__ import annotations

from csbs.config import Settings
from csbs.drivers.base import ComputeDriver, DiskWriter, SnapshotDisk, SnapshotReader


def make_driver(settings: Settings) -> ComputeDriver:
    """The driver named by ``settings.compute_driver``."""
    if settings.compute_driver == "local":
        from csbs.drivers.local import LocalDriver

        return LocalDriver(settings.effective_servers_dir, project=settings.project)
    if settings.compute_driver == "qemu":
        from csbs.drivers.qemu import QemuDriver

        return QemuDriver(
            settings.effective_servers_dir,
            project=settings.project,
            qemu_binary=settings.qemu_binary,
            qemu_img=settings.qemu_img,
        )
    raise ValueError(f"compute_driver {settings.compute_driver!r} is not known")


__all__ = ["ComputeDriver", "DiskWriter", "SnapshotDisk", "SnapshotReader", "make_driver"]
