"""What the libvirt driver reads from domain XML and writes for libvirt (issue 13): plain
functions, no libvirtd needed."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from csbs.drivers.libvirt.domain_xml import (
    BLOCKED,
    CRASHED,
    NOSTATE,
    PAUSED,
    PMSUSPENDED,
    RUNNING,
    SHUTDOWN,
    SHUTOFF,
    backup_socket,
    backup_xml,
    checkpoint_sizes,
    checkpoint_xml,
    dac_label,
    domain_disks,
    server_state,
)
from csbs.model import ServerState

DOMAIN = """<domain type='kvm'><name>web</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/>
    <source file='/data/web-data.img'/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/>
    <readonly/></disk>
</devices>
<seclabel type='dynamic' model='selinux'><label>system_u:system_r:svirt_t:s0</label></seclabel>
<seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>
</domain>"""


def test_disks_are_file_qcow2_and_raw_by_target_in_order() -> None:
    disks = domain_disks(DOMAIN)
    assert [(d.target, d.format, d.source, d.refused) for d in disks] == [
        ("vda", "qcow2", "/var/lib/libvirt/images/web.qcow2", None),
        ("vdb", "raw", "/data/web-data.img", None),
    ]  # the empty CD-ROM drive holds no data and is left out
    assert [d.tracked for d in disks] == [True, False]  # raw holds no bitmap


def test_disks_csbs_cannot_back_up_are_refused_with_the_reason() -> None:
    refused = {
        "<disk type='file' device='cdrom'><source file='/iso/os.iso'/><target dev='sda'/></disk>":
            "sda is a cdrom drive (/iso/os.iso)",
        "<disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdb'/></disk>":
            "sdb is a pass-through LUN",
        "<disk type='file' device='disk'><driver type='raw'/><source file='/s.img'/>"
        "<target dev='vdc'/><shareable/></disk>": "vdc is shareable",
        "<disk type='network' device='disk'><driver type='raw'/><source protocol='rbd' "
        "name='pool/img'/><target dev='vdd'/></disk>": "vdd is a network disk",
        "<disk type='file' device='disk'><driver type='vmdk'/><source file='/a.vmdk'/>"
        "<target dev='vde'/></disk>": "vde has format vmdk",
        "<disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/lv'/>"
        "<target dev='vdf'/></disk>": "vdf is a block disk",
    }  # fmt: skip
    for element, reason in refused.items():
        (disk,) = domain_disks(f"<domain><devices>{element}</devices></domain>")
        assert disk.refused is not None and reason in disk.refused, (element, disk.refused)
        assert not disk.tracked


def test_libvirt_states_map_onto_the_guides() -> None:
    assert {s: server_state(s) for s in range(8)} == {
        NOSTATE: ServerState.FAULT,
        RUNNING: ServerState.RUNNING,
        BLOCKED: ServerState.RUNNING,
        PAUSED: ServerState.RUNNING,
        SHUTDOWN: ServerState.RUNNING,
        SHUTOFF: ServerState.STOPPED,
        CRASHED: ServerState.FAULT,
        PMSUSPENDED: ServerState.STOPPED,
    }
    # Started paused by csbs only for a snapshot: still stopped to its owner.
    assert server_state(PAUSED, started_for_snapshot=True) == ServerState.STOPPED


def test_the_dac_label_tells_who_qemu_runs_as() -> None:
    assert dac_label(DOMAIN) == (64055, 994)
    assert dac_label("<domain/>") is None


def test_one_checkpoint_and_one_pull_backup_over_every_disk() -> None:
    disks = domain_disks(DOMAIN)
    checkpoint = ET.fromstring(checkpoint_xml("bk-1", disks))
    assert checkpoint.findtext("name") == "bk-1"
    assert [(d.get("name"), d.get("checkpoint")) for d in checkpoint.iter("disk")] == [
        ("vda", "bitmap"),
        ("vdb", "no"),
    ]
    text = backup_xml("/run/x/nbd.sock", "/run/x", {"vda": "bk-0", "vdb": None})
    backup = ET.fromstring(text)
    assert backup.get("mode") == "pull"
    assert backup_socket(text) == "/run/x/nbd.sock"
    modes = {
        d.get("name"): (d.get("backupmode"), d.get("incremental")) for d in backup.iter("disk")
    }
    assert modes == {"vda": ("incremental", "bk-0"), "vdb": ("full", None)}
    scratch = [d.find("scratch").get("file") for d in backup.iter("disk")]  # type: ignore[union-attr]
    assert scratch == ["/run/x/vda.scratch", "/run/x/vdb.scratch"]
    # Names with quotes cannot break out of the attribute.
    assert ET.fromstring(backup_xml("/s'\"<", "/d", {"v'a": None})) is not None


def test_a_bitmap_libvirt_cannot_size_is_untrusted() -> None:
    text = """<domaincheckpoint><name>bk-1</name><disks>
      <disk name='vda' checkpoint='bitmap' bitmap='bk-1' size='65536'/>
      <disk name='vdb' checkpoint='bitmap' bitmap='bk-1'/>
      <disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>"""
    assert checkpoint_sizes(text) == {"vda": 65536, "vdb": None}
