"""What the ``libvirt`` driver reads from and writes for libvirt, as plain functions over
XML text: a domain's disks and whether csbs can back each up, the state a person sees, the
DAC label QEMU runs with, and the pull-mode backup and checkpoint documents."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from csbs.model import ServerState

#: libvirt's virDomainState numbers (libvirt.VIR_DOMAIN_*), so this module needs no binding.
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)

#: Formats whose images csbs reads and writes; only qcow2 holds changed-block bitmaps.
FORMATS = ("qcow2", "raw")

REASON_RAW = "a raw image holds no changed-block bitmap"


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk>`` of a domain, and why csbs cannot back it up (None: it can)."""

    target: str
    device: str
    source: str
    format: str
    refused: str | None

    @property
    def tracked(self) -> bool:
        """Whether libvirt can keep a checkpoint bitmap on it."""
        return self.refused is None and self.format == "qcow2"


def _disk(element: ET.Element) -> DomainDisk | None:
    device = element.get("device", "disk")
    kind = element.get("type", "file")
    target_el = element.find("target")
    target = target_el.get("dev", "") if target_el is not None else ""
    source_el = element.find("source")
    source = ""
    if source_el is not None:
        source = source_el.get("file") or source_el.get("dev") or source_el.get("name") or ""
    driver_el = element.find("driver")
    fmt = driver_el.get("type", "raw") if driver_el is not None else "raw"
    refused = None
    if device in ("cdrom", "floppy"):
        if not source:
            return None  # an empty drive holds no data
        refused = f"{target} is a {device} drive ({source})"
    elif device == "lun":
        refused = f"{target} is a pass-through LUN"
    elif element.find("shareable") is not None:
        refused = f"{target} is shareable (attached to several servers)"
    elif kind != "file":
        refused = f"{target} is a {kind} disk; only file-backed disks are backed up"
    elif element.find("readonly") is not None:
        refused = f"{target} is read-only"
    elif fmt not in FORMATS:
        refused = f"{target} has format {fmt}; only qcow2 and raw images are backed up"
    return DomainDisk(target=target, device=device, source=source, format=fmt, refused=refused)


def domain_disks(xml: str) -> list[DomainDisk]:
    """The domain's disks in the order of its definition (the first is the system disk);
    empty CD-ROM and floppy drives are left out."""
    root = ET.fromstring(xml)
    disks = []
    for element in root.findall("./devices/disk"):
        disk = _disk(element)
        if disk is not None:
            disks.append(disk)
    return disks


def server_state(state: int, started_for_snapshot: bool = False) -> ServerState:
    """The guide's state of a domain in libvirt state ``state``. A domain that csbs started
    paused only to snapshot it is still ``stopped`` to its owner."""
    if state == PAUSED and started_for_snapshot:
        return ServerState.STOPPED
    if state in (RUNNING, BLOCKED, PAUSED, SHUTDOWN):
        return ServerState.RUNNING
    if state in (SHUTOFF, PMSUSPENDED):
        return ServerState.STOPPED
    return ServerState.FAULT  # crashed, or libvirt does not know


def dac_label(live_xml: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as (the domain's DAC seclabel, ``+64055:+64055``)."""
    root = ET.fromstring(live_xml)
    for seclabel in root.findall("./seclabel"):
        if seclabel.get("model") != "dac":
            continue
        label = seclabel.findtext("label") or ""
        user, _, group = label.partition(":")
        try:
            return int(user.lstrip("+")), int(group.lstrip("+"))
        except ValueError:
            return None
    return None


def checkpoint_xml(name: str, disks: list[DomainDisk]) -> str:
    """A checkpoint named ``name`` with a bitmap on every disk that can hold one."""
    parts = [f"<domaincheckpoint><name>{name}</name><disks>"]
    for disk in disks:
        mode = "bitmap" if disk.tracked else "no"
        parts.append(f"<disk name={quoteattr(disk.target)} checkpoint='{mode}'/>")
    parts.append("</disks></domaincheckpoint>")
    return "".join(parts)


def backup_xml(socket: str, scratch_dir: str, disks: dict[str, str | None]) -> str:
    """A pull-mode backup over a Unix socket: per disk target, the checkpoint it is
    incremental from, or None for a full export."""
    parts = [
        "<domainbackup mode='pull'>",
        f"<server transport='unix' socket={quoteattr(socket)}/><disks>",
    ]
    for target, since in disks.items():
        mode = (
            f"backupmode='incremental' incremental={quoteattr(since)}"
            if since
            else "backupmode='full'"
        )
        scratch = os.path.join(scratch_dir, f"{target}.scratch")
        parts.append(
            f"<disk name={quoteattr(target)} backup='yes' type='file' {mode}>"
            f"<scratch file={quoteattr(scratch)}/></disk>"
        )
    parts.append("</disks></domainbackup>")
    return "".join(parts)


def backup_socket(backup_xml_text: str) -> str | None:
    """The socket of a running pull-mode backup job (to tell ours from another tool's)."""
    server = ET.fromstring(backup_xml_text).find("server")
    return server.get("socket") if server is not None else None


def checkpoint_sizes(checkpoint_xml_text: str) -> dict[str, int | None]:
    """Per disk with a bitmap: the bytes changed since the checkpoint, from its XML with
    ``VIR_DOMAIN_CHECKPOINT_XML_SIZE``; None where libvirt could not size it, because the
    bitmap is missing or inconsistent (QEMU or the host stopped uncleanly)."""
    sizes: dict[str, int | None] = {}
    for disk in ET.fromstring(checkpoint_xml_text).findall("./disks/disk"):
        if disk.get("checkpoint") != "bitmap":
            continue
        size = disk.get("size")
        sizes[disk.get("name", "")] = int(size) if size is not None else None
    return sizes


def disk_xml(target: str, source: str) -> str:
    """A qcow2 file disk on the virtio bus (R5: a removed disk re-created for restore)."""
    return (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file={quoteattr(source)}/><target dev={quoteattr(target)} bus='virtio'/>"
        "</disk>"
    )
