"""Instant restore (issue 18, the guide's 即时恢复) on the libvirt driver, with the real
Linux guest of ../shared/guest in a domain defined by hand on a real libvirtd.

``csbs backup restore ID --instant`` returns once the domain runs from the backup: its
disks read through csbs's relay to csbs's NBD exports of the backup (chunks fetched from
S3 on demand) while libvirt's block pulls copy them in the background, slowed here so that
the guest boots and reads its files long before the copy ends. The worker is killed -9 in
the middle of the copy and started again: the relay holds the reads, the export comes back
on the same socket and the pulls go on. When the task has succeeded the images have no
backing file left, the raw data disk (now qcow2) is byte for byte the backup's, and the
guest boots again with csbs serving nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from csbs.config import Settings
from csbs.drivers.libvirt.domains import libvirt
from csbs.errors import InvalidState
from csbs.services import Services
from starter.stack import SeaweedS3
from tests.conftest import (
    MIB,
    Stack,
    backup,
    kill9,
    make_settings,
    max_attempt,
    running_stack,
    settings_env,
    start_worker,
)
from tests.e2e.test_instant_restore_e2e import system_image as summing_image
from tests.libvirt_support import Lab, LabServers, build_guest, restart_libvirtd

pytestmark = [pytest.mark.slow, pytest.mark.libvirt]

#: Bytes per second each disk's block pull may read: slow enough that the guest has booted
#: and read its files long before the 64 MiB system disk is copied.
STREAM_SPEED = 3 * MIB


def relays(settings: Settings) -> list[dict[str, Any]]:
    """The relays the driver recorded for the stack's domains."""
    root = settings.effective_servers_dir / "libvirt"
    return [json.loads(p.read_text()) for p in root.glob("*/relay.json")]


def relay_running(relay: dict[str, Any]) -> bool:
    try:
        cmdline = Path(f"/proc/{relay['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return str(relay["socket"]).encode() in cmdline


def kill_relays(settings: Settings) -> None:
    """A test that failed half-way leaves no relay behind."""
    for relay in relays(settings):
        if relay_running(relay):
            os.kill(int(relay["pid"]), signal.SIGKILL)
        shutil.rmtree(Path(relay["socket"]).parent, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def instant_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment, lab: Lab
) -> AsyncIterator[Stack]:
    """Like ``libvirt_stack``, but its worker is a real process (``st.env``) that the test
    starts and kills, a real guest has time to shut down, and the copy is slowed."""
    settings = make_settings(
        tmp_path,
        s3,
        compute_driver="libvirt",
        shutdown_timeout=12.0,
        heartbeat_timeout=3.0,
        instant_stream_speed=STREAM_SPEED,
    )
    service = Services(settings)
    env = settings_env(settings, temporal.client.service_client.config.target_host)
    env.update(
        CSBS_SHUTDOWN_TIMEOUT="12",
        CSBS_HEARTBEAT_TIMEOUT="3",
        CSBS_INSTANT_STREAM_SPEED=str(STREAM_SPEED),
    )
    try:
        yield Stack(settings, service, temporal.client, env)
    finally:
        kill_relays(settings)
        service.catalog.dispose()


def system_image(lab: Lab, data: bytes) -> Path:
    """A 64 MiB ext4 qcow2 (mkfs.ext4 -d, no mount) holding guest.sh and data.bin."""
    raw = summing_image(lab.dir, data)
    image = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def disk_attributes(xml: str, path: str, attribute: str) -> dict[str, str | None]:
    """Per disk target, ``attribute`` of the element at ``path`` inside its ``<disk>``
    (None: no such element)."""
    found: dict[str, str | None] = {}
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        target, element = disk.find("target"), disk.find(path)
        assert target is not None
        found[target.get("dev", "")] = element.get(attribute) if element is not None else None
    return found


def backing_stores(xml: str) -> dict[str, str | None]:
    """Per disk target, the socket its backing store is read from (None: no backing)."""
    return disk_attributes(xml, "./backingStore/source/host", "socket")


def formats(xml: str) -> dict[str, str | None]:
    return disk_attributes(xml, "driver", "type")


async def wait_said(lab: Lab, dom: Any, text: str, count: int, timeout: float = 120) -> None:
    """Until the guest has said ``text`` ``count`` times on its serial console."""
    deadline = time.monotonic() + timeout
    while (said := lab.serial(dom)).count(text) < count:
        assert time.monotonic() < deadline, f"the guest never said {text!r} again:\n{said}"
        await asyncio.sleep(0.2)


async def test_instant_restore_runs_a_real_guest_from_its_backup_and_survives_a_worker_kill(
    instant_stack: Stack, lab: Lab
) -> None:
    st = instant_stack
    g = LabServers(Path(st.settings.var_dir) / "lab", lab)  # plays the guest's writes
    kernel = build_guest(Path("/var/tmp/csbs-guest"))
    data = os.urandom(20 * MIB)
    summed = f"GUEST: sum {hashlib.sha256(data).hexdigest()}"
    system, spare = system_image(lab, data), lab.image("spare", 16 * MIB, "raw")
    dom = lab.define("instant", [(system, "qcow2"), (spare, "raw")], kernel=kernel)
    sid = dom.UUIDString()
    await wait_said(lab, dom, summed, 1)
    await asyncio.to_thread(g.write, sid, "vdb", 3 * MIB, os.urandom(2 * MIB))
    worker = start_worker(st.env)
    try:
        record = (await st.cli("backup", "create", sid, "--wait", "--json")).json()
        assert record["status"] == "available"
        backed = await asyncio.to_thread(g.checksum, sid)
        # Both disks are wrecked after the backup: only the restore brings them back.
        await asyncio.to_thread(g.write, sid, "vda", 0, b"\xee" * (4 * MIB))
        await asyncio.to_thread(g.write, sid, "vdb", 0, b"\xee" * (8 * MIB))
        sums = lab.serial(dom).count(summed)

        started = time.monotonic()
        said: dict[str, Any] = (
            await st.cli("backup", "restore", record["id"], "--instant", "--yes", "--json")
        ).json()
        assert said["status"] == "running" and said["server_id"] == sid, said
        task_id = said["task_id"]
        assert dom.isActive()
        relay = relays(st.settings)[0]["socket"]
        # Both disks read through the relay; the raw one is a qcow2 image now.
        assert backing_stores(dom.XMLDesc(0)) == {"vda": relay, "vdb": relay}
        assert formats(dom.XMLDesc(0)) == {"vda": "qcow2", "vdb": "qcow2"}
        assert str(image_info(system).get("backing-filename", "")).startswith("json:")

        # The guest boots from the backup and reads its 20 MiB file while the copy runs.
        await wait_said(lab, dom, summed, sums + 1)
        booted = time.monotonic() - started
        task = st.catalog.get_task(task_id)
        assert task.status == "running", (task.status, task.reason)
        assert dom.blockJobInfo("vda", 0), "the system disk's pull should still be running"
        # Listing the servers asks libvirt for the disks' sizes mid-pull: harmless.
        listed = {s["id"]: s for s in (await st.cli("server", "list", "--json")).json()}
        assert listed[sid]["state"] == "running"

        # The worker dies in the middle of the copy; the relay holds the reads (the pulls
        # wait instead of failing) until another worker serves the backup again.
        await asyncio.sleep(2)
        kill9(worker)
        await asyncio.sleep(1)
        stalled = dom.blockJobInfo("vda", 0)
        await asyncio.sleep(2)
        assert dom.isActive() and dom.blockJobInfo("vda", 0) == stalled, stalled
        assert stalled["cur"] < stalled["end"]
        worker = start_worker(st.env)
        deadline = time.monotonic() + 240
        while (task := st.catalog.get_task(task_id)).status == "running":
            assert time.monotonic() < deadline, f"the copy never finished: {task.progress}%"
            await asyncio.sleep(0.5)
        copied = time.monotonic() - started
        assert task.status == "succeeded", task.reason
        assert task.progress == 100
        detail = task.detail or ""
        assert "runs from the backup" in detail
        assert "the copy stopped" not in detail, detail  # no pull ever failed
        assert task.workflow_id is not None
        assert await max_attempt(st.client.get_workflow_handle(task.workflow_id)) >= 2
        assert st.catalog.get_backup(record["id"]).status == "available"
    finally:
        kill9(worker)
    print(f"guest read its file {booted:.1f} s after the restore began; copied in {copied:.1f} s")

    # The domain no longer depends on csbs: no backing file, no relay, the same bytes.
    assert backing_stores(dom.XMLDesc(0)) == {"vda": None, "vdb": None}
    for image in (system, spare):
        info = image_info(image)
        assert info["format"] == "qcow2" and "backing-filename" not in info, info
    assert relays(st.settings) == [] and not Path(relay).parent.exists()
    inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert formats(inactive) == {"vda": "qcow2", "vdb": "qcow2"}
    assert backing_stores(inactive) == {"vda": None, "vdb": None}
    sums = lab.serial(dom).count(summed)
    dom.shutdown()  # the guest syncs and powers off; then its images are at rest
    deadline = time.monotonic() + 60
    while dom.isActive():
        assert time.monotonic() < deadline, "the guest did not power off"
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(lab.image_sha, spare, "qcow2") == backed["vdb"]
    dom.create()
    await wait_said(lab, dom, summed, sums + 1)


@pytest_asyncio.fixture(loop_scope="session")
async def slow_copy_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment, lab: Lab
) -> AsyncIterator[Stack]:
    """``libvirt_stack`` (a worker in this process, guest-less domains powered off after
    2 s) with the copy slowed to 2 MiB/s per disk."""
    settings = make_settings(
        tmp_path,
        s3,
        compute_driver="libvirt",
        shutdown_timeout=2.0,
        instant_stream_speed=2 * MIB,
    )
    async with running_stack(temporal, settings) as st:
        st.env["CSBS_SHUTDOWN_TIMEOUT"] = "2"
        try:
            yield st
        finally:
            kill_relays(settings)


async def test_a_domain_that_stops_mid_copy_is_finished_paused_and_nothing_breaks_it(
    slow_copy_stack: Stack, lab: Lab
) -> None:
    """While the disks are copied, a snapshot or a restore write of the domain is refused;
    a domain that stops (its guest powered off, QEMU died) is started again paused, shows
    as stopped, the copy survives a restart of libvirtd and ends, and the domain is left
    shut off with the backup's bytes."""
    st, g = slow_copy_stack, LabServers(Path(slow_copy_stack.settings.var_dir) / "lab", lab)
    drv = st.service.driver  # the worker's driver, on the same state directory
    image = lab.image("db", 32 * MIB)
    dom = lab.define("db", [(image, "qcow2")])
    sid = dom.UUIDString()
    await asyncio.to_thread(g.write, sid, "vda", 0, os.urandom(4 * MIB))
    record = await backup(st, sid)
    dom.destroy()
    backed = await asyncio.to_thread(g.checksum, sid)
    dom.create()
    await asyncio.to_thread(g.write, sid, "vda", 0, os.urandom(8 * MIB))

    said = (await st.cli("backup", "restore", record["id"], "--instant", "--yes", "--json")).json()
    assert said["status"] == "running"
    with pytest.raises(InvalidState, match="being restored instantly"):
        drv.group_snapshot(sid, "bk-meanwhile")
    with pytest.raises(InvalidState, match="being restored instantly"):
        drv.open_disk_writer(sid, "vda", 32 * MIB)
    assert dom.blockJobInfo("vda", 0)

    dom.destroy()  # as if the guest powered off: QEMU, and the pull with it, end
    deadline = time.monotonic() + 30
    while dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED or not dom.blockJobInfo("vda", 0):
        assert time.monotonic() < deadline, "the copy did not go on with the domain paused"
        await asyncio.sleep(0.2)
    assert drv.get_server(sid).state.value == "stopped"
    assert drv.stop(sid) is None and dom.isActive()  # stopped already: the copy goes on
    restart_libvirtd()  # its block jobs and domains are found again
    lab.reconnect()
    dom = lab.conn.lookupByUUIDString(sid)

    task_id = said["task_id"]
    deadline = time.monotonic() + 120
    while (task := st.catalog.get_task(task_id)).status == "running":
        assert time.monotonic() < deadline, f"the copy never finished: {task.progress}%"
        await asyncio.sleep(0.5)
    assert task.status == "succeeded", task.reason
    assert "the block pull ended before the disk was copied" in (task.detail or "")
    assert not dom.isActive()  # stopped, as its guest left it
    assert "backing-filename" not in image_info(image)
    assert await asyncio.to_thread(lab.image_sha, image) == backed["vda"]
    assert relays(st.settings) == []
