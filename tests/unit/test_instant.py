"""Instant restore's plain parts (issue 18): the request's rule, the drivers that refuse
it with the reason, and the backing file an instantly restored image reads through to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from csbs.drivers.local import LocalDriver
from csbs.drivers.qemu.instant import RECONNECT_DELAY, backing_spec
from csbs.errors import InvalidState
from csbs.model import RestoreServerInput


def test_an_instant_restore_cannot_leave_the_server_powered_off() -> None:
    with pytest.raises(ValidationError, match="instant: an instant restore runs the server"):
        RestoreServerInput(backup_id="bk-1", instant=True, power_on=False)
    assert RestoreServerInput(backup_id="bk-1", instant=True).power_on


def test_the_local_driver_refuses_an_instant_restore_with_the_reason(tmp_path: Path) -> None:
    drv = LocalDriver(tmp_path)
    reason = drv.instant_support()
    assert reason is not None and "qemu or libvirt driver" in reason
    with pytest.raises(InvalidState, match="no hypervisor"):
        drv.instant_attach("srv-1", "bk-1", [])
    assert drv.instant_backup("srv-1") is None


def test_the_backing_file_reads_the_export_and_waits_for_it_to_come_back() -> None:
    spec = backing_spec("/run/x/instant.sock", "bk-1/disk-1")
    assert spec.startswith("json:")
    parsed = json.loads(spec[len("json:") :])
    assert parsed["driver"] == "raw"
    assert parsed["file"] == {
        "driver": "nbd",
        "server": {"type": "unix", "path": "/run/x/instant.sock"},
        "export": "bk-1/disk-1",
        "reconnect-delay": RECONNECT_DELAY,
    }


# -- the libvirt driver's relay and definitions (pure XML and command lines) ---------------
def test_the_libvirt_relay_reads_csbs_exports_with_a_reconnect_delay() -> None:
    from csbs.drivers.libvirt.instant import RECONNECT_DELAY as LV_DELAY
    from csbs.drivers.libvirt.instant import relay_backing, relay_command

    cmd = relay_command(
        "qemu-storage-daemon",
        "/run/csbs-libvirt/i-1/relay.sock",
        {"vda": {"socket": "/run/c/vda.sock", "export": "bk-1/disk-1"}},
    )
    assert cmd[0] == "qemu-storage-daemon"
    blockdev = json.loads(cmd[cmd.index("--blockdev") + 1])
    assert blockdev["server"]["path"] == "/run/c/vda.sock"
    assert blockdev["reconnect-delay"] == LV_DELAY and blockdev["read-only"]
    export = json.loads(cmd[cmd.index("--export") + 1])
    assert export["name"] == "vda" and export["writable"] is False
    server = json.loads(cmd[cmd.index("--nbd-server") + 1])
    assert server["addr"]["path"] == "/run/csbs-libvirt/i-1/relay.sock"
    backing = json.loads(relay_backing("/run/x.sock", "vda")[len("json:") :])
    assert backing["file"]["export"] == "vda"


DOMAIN = """<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/i/b.raw'/><target dev='vdb'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/i/a.qcow2'/><backingStore type='network'><source protocol='nbd'/>
  </backingStore><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/i/c.qcow2'/><target dev='vdc'/></disk>
</devices></domain>"""


def test_a_raw_disk_is_redefined_as_qcow2_and_backed_disks_are_found() -> None:
    from csbs.drivers.libvirt.instant import backed_targets, qcow2_definition

    raw = qcow2_definition(DOMAIN, "vdb")
    assert raw is not None and 'type="qcow2"' in raw and "vdb" in raw
    backed = qcow2_definition(DOMAIN, "vda")
    assert backed is not None and "backingStore" not in backed
    assert qcow2_definition(DOMAIN, "vdc") is None  # already a plain qcow2
    assert backed_targets(DOMAIN) == {"vda"}


def test_qemus_user_comes_from_libvirts_dac_baselabel() -> None:
    from csbs.drivers.libvirt.instant import qemu_baselabel

    caps = (
        "<capabilities><host><secmodel><model>dac</model><doi>0</doi>"
        "<baselabel type='kvm'>+64055:+994</baselabel>"
        "<baselabel type='qemu'>+64055:+993</baselabel></secmodel></host></capabilities>"
    )
    assert qemu_baselabel(caps, "qemu") == (64055, 993)
    assert qemu_baselabel(caps, "xen") is None
