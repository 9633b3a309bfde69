"""End to end with ``CSBS_COMPUTE_DRIVER=libvirt``: domains defined by hand from XML on a
real libvirtd, never seen by csbs before, backed up through libvirt's pull-mode backup with
checkpoints, through Temporal, SeaweedFS and the CLI, and restored bit-identical.

Covers issue 13's "done when", B1/B2/B3 (one instant, incrementals that read only the
changed ranges), the chain that never breaks (checkpoint lost, disk added, QEMU killed,
libvirtd restarted: a full read with the reason, never a wrong incremental), B12 and R3
(graceful shutdown, then power-off with a warning), and R1 (restore bit-identical, qcow2
stays qcow2, a delta from the checkpoint's bitmap, the chain goes on)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from csbs.model import ServerState
from starter.stack import SeaweedS3
from tests.conftest import MIB, Stack, backup, make_settings, restore, running_stack
from tests.libvirt_support import (
    Lab,
    LabServers,
    build_guest,
    guest_disk,
    restart_libvirtd,
)

pytestmark = [pytest.mark.slow, pytest.mark.libvirt]


def guest(st: Stack, lab: Lab) -> LabServers:
    """Plays the guest (writes with qemu-io) and checksums images: test-only."""
    return LabServers(Path(st.settings.var_dir) / "lab", lab)


def notes(record: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
    return {
        d["disk_id"]: (d["read_mode"], d["read_note"], d["bytes_read"]) for d in record["disks"]
    }


async def test_a_domain_defined_by_hand_is_listed_backed_up_and_restored(
    libvirt_stack: Stack, lab: Lab
) -> None:
    st, g = libvirt_stack, guest(libvirt_stack, lab)
    system, data = lab.image("web", 64 * MIB), lab.image("web-data", 32 * MIB, "raw")
    dom = lab.define("web", [(system, "qcow2"), (data, "raw")])  # as with virsh define
    sid = dom.UUIDString()
    g.write(sid, "vda", 0, os.urandom(8 * MIB))
    g.write(sid, "vdb", 4 * MIB, os.urandom(2 * MIB))

    listed = {s["name"]: s for s in (await st.cli("server", "list", "--json")).json()}
    me = listed[dom.name()]
    assert (me["id"], me["type"], me["host"], me["state"]) == (sid, "libvirt", "default", "running")
    assert [(d["id"], d["role"], d["size_bytes"]) for d in me["disks"]] == [
        ("vda", "system", 64 * MIB),
        ("vdb", "data", 32 * MIB),
    ]
    table = (await st.cli("server", "list")).stdout
    assert dom.name() in table and "HOST" in table.upper()

    first = (await st.cli("backup", "create", sid, "--wait", "--json")).json()
    assert first["status"] == "available"
    mode, note, read = notes(first)["vda"]
    assert (mode, read) == ("full", 8 * MIB)  # only the allocated ranges of vda
    assert "first backup" in note

    # 1% of vda changes: the incremental reads only those ranges.
    for offset in (1 * MIB, 20 * MIB, 40 * MIB):
        g.write(sid, "vda", offset + 4096, os.urandom(200 * 1024))
    g.write(sid, "vdb", 0, b"raw disk changed")
    dom.destroy()  # the images now hold exactly what the next backup must restore
    expected = g.checksum(sid)
    dom.create()
    second = (await st.cli("backup", "create", sid, "--wait", "--json")).json()
    assert second["parent_id"] == first["id"]
    vda, vdb = notes(second)["vda"], notes(second)["vdb"]
    assert vda == ("cbt", "", 3 * MIB)  # three changed ranges, one 1 MiB chunk each
    assert vdb[0] == "full" and "raw image holds no changed-block bitmap" in vdb[1]

    g.write(sid, "vda", 0, os.urandom(MIB))  # damage to undo
    done = (await st.cli("backup", "restore", second["id"], "--yes", "--wait", "--json")).json()
    assert g.get_server(sid).state == ServerState.RUNNING  # started again after restore
    dom.destroy()
    assert g.checksum(sid) == expected
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(system)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"  # restored through QEMU's block layer
    task = st.catalog.get_task(done["task_id"])
    assert "powered off (libvirt destroy)" in (task.detail or "")  # R3's stop, forced
    dom.create()

    # The restore wrote only the damaged chunk (a delta from the checkpoint's bitmap),
    # and its writes went into that bitmap: the chain goes on, the next backup reads
    # only that chunk.
    assert "vda: delta restore from backup" in (task.detail or "")
    assert "1 of 64 chunks written" in (task.detail or "")
    third = await backup(st, sid)
    assert notes(third)["vda"] == ("cbt", "", MIB)
    assert [c.getName() for c in dom.listAllCheckpoints(0)] == [
        third["id"]
    ]  # only the one the next one needs


async def test_the_chain_never_breaks(libvirt_stack: Stack, lab: Lab) -> None:
    """Checkpoint deleted, disk added, QEMU killed, libvirtd restarted: each next backup
    is right (restored bit-identical), and a full read says why."""
    st, g = libvirt_stack, guest(libvirt_stack, lab)
    dom = lab.define("db", [(lab.image("db", 32 * MIB), "qcow2")])
    sid = dom.UUIDString()
    g.write(sid, "vda", 0, os.urandom(4 * MIB))
    first = await backup(st, sid)

    # 1. The checkpoint is deleted behind csbs's back.
    dom.checkpointLookupByName(first["id"]).delete(0)
    g.write(sid, "vda", 2 * MIB, os.urandom(MIB))
    lost = await backup(st, sid)
    assert "is gone from libvirt" in notes(lost)["vda"][1]

    # 2. A disk is added (hot-plugged into the running domain, and to its definition).
    g.add_disk(sid, 16 * MIB)
    g.write(sid, "vdb", 0, os.urandom(MIB))
    g.write(sid, "vda", 0, b"x" * 4096)
    added = await backup(st, sid)
    assert notes(added)["vda"][0] == "cbt"
    assert notes(added)["vdb"][0] == "full"

    # 3. QEMU dies (as in a host crash): its bitmaps are never written back.
    g.write(sid, "vda", 8 * MIB, os.urandom(MIB))
    pid = int(Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # libvirt notices the monitor hang up
        if not dom.isActive():
            break
        time.sleep(0.1)
    dom.create()
    g.write(sid, "vda", 12 * MIB, os.urandom(MIB))
    crashed = await backup(st, sid)
    assert "missing or inconsistent" in notes(crashed)["vda"][1]

    # 4. libvirtd restarts between two backups: the next one is still exact.
    restart_libvirtd()
    lab.reconnect()
    dom = lab.conn.lookupByUUIDString(sid)
    g.write(sid, "vda", 16 * MIB, os.urandom(MIB))
    after_restart = await backup(st, sid)
    # libvirt keeps checkpoints and QEMU its bitmaps across a restart of libvirtd: the
    # incremental goes on, and the restore below proves it exact.
    assert notes(after_restart)["vda"][0] == "cbt"
    dom.destroy()
    expected = g.checksum(sid)
    dom.create()
    g.write(sid, "vda", 0, os.urandom(20 * MIB))
    await restore(st, after_restart["id"])
    dom.destroy()
    assert g.checksum(sid) == expected


# -- a real Linux guest (../shared/guest) ------------------------------------------------
IDLE = "#!/bin/sh\necho 'GUEST: ready'\nwhile true; do sleep 1; done\n"

#: Every boot: check every file earlier boots wrote, then write more, one synced file at a
#: time, each holding its own number 64 KiB over.
WRITER = """#!/bin/sh
mkdir -p /mnt/data
n=0; bad=0
for f in /mnt/data/*; do
  [ -f "$f" ] || continue
  i=$(basename "$f"); n=$((n+1))
  [ "$(md5sum < "$f")" = "$(yes "file $i" | head -c 65536 | md5sum)" ] || bad=$((bad+1))
done
echo "GUEST: verified $n files, $bad bad"
i=$((n+1))
while true; do
  yes "file $i" | head -c 65536 > /mnt/data/$i.tmp && sync && mv /mnt/data/$i.tmp /mnt/data/$i && sync
  echo "GUEST: wrote $i"
  i=$((i+1)); sleep 0.2
done
"""


@pytest.fixture(scope="session")
def guest_kernel(libvirt_host: None) -> Path:
    return build_guest(Path("/var/tmp/csbs-guest"))


@pytest_asyncio.fixture(loop_scope="session")
async def guest_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment, lab: Lab
) -> AsyncIterator[Stack]:
    """The libvirt stack with time for a real guest to shut down (12 s)."""
    settings = make_settings(tmp_path, s3, compute_driver="libvirt", shutdown_timeout=12.0)
    async with running_stack(temporal, settings) as st:
        yield st


def task_of(st: Stack, backup_id: str, kind: str) -> Any:
    return next(t for t in st.catalog.list_tasks(kind=kind) if t.backup_id == backup_id)


async def test_offline_backup_shuts_a_real_guest_down_or_powers_it_off(
    guest_stack: Stack, lab: Lab, guest_kernel: Path
) -> None:
    """B12: the power button first, so the guest flushes its caches; a guest that ignores
    it is powered off after the timeout, with a warning on the task. Either way the
    server runs again afterwards."""
    st = guest_stack
    for ignores in (False, True):
        dom = lab.define(
            "ignores" if ignores else "clean",
            [(guest_disk(lab, IDLE), "qcow2")],
            kernel=guest_kernel,
            cmdline="guest.ignore_power" if ignores else "",
        )
        lab.wait_serial(dom, "GUEST: ready")
        record = await backup(st, dom.UUIDString(), offline=True)
        assert record["status"] == "available"
        detail = task_of(st, record["id"], "backup").detail or ""
        said = lab.serial(dom)
        if ignores:
            assert "powered off (libvirt destroy)" in detail
            assert "clean shutdown" not in said
        else:
            assert "GUEST: clean shutdown" in said and "powered off" not in detail
        assert dom.isActive() and said.count("GUEST: up") >= 1
        lab.wait_serial(dom, "GUEST: ready")


async def test_a_real_guest_comes_back_with_what_it_wrote_up_to_the_snapshot(
    guest_stack: Stack, lab: Lab, guest_kernel: Path
) -> None:
    """Crash consistency: back up while the guest writes, restore, boot: it mounts its
    filesystem and reads every file it had synced before the snapshot, none damaged."""
    st = guest_stack
    dom = lab.define("writer", [(guest_disk(lab, WRITER), "qcow2")], kernel=guest_kernel)
    lab.wait_serial(dom, "GUEST: wrote 3")
    before = int(lab.serial(dom).rsplit("GUEST: wrote ", 1)[1].split()[0])
    record = await backup(st, dom.UUIDString())
    lab.wait_serial(dom, f"GUEST: wrote {before + 10}")  # it goes on writing after
    done = await restore(st, record["id"])  # stops it, writes the disk, starts it again
    assert done
    deadline = time.monotonic() + 90
    while (said := lab.serial(dom)).count("GUEST: verified") < 2:  # the second boot's
        assert time.monotonic() < deadline, f"the restored guest never checked its files:\n{said}"
        await asyncio.sleep(0.2)
    verified = said.rsplit("GUEST: verified ", 1)[1].split("\n")[0]
    count, bad = int(verified.split()[0]), int(verified.split(",")[1].split()[0])
    assert bad == 0
    assert before <= count < before + 10  # up to the snapshot, not what came after
