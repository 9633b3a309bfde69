"""Instant restore (issue 18, the guide's 即时恢复) on the qemu driver, with the real
Linux guest of ../shared/guest.

``csbs backup restore ID --instant`` returns once the server runs from the backup: its
disks read through to csbs's NBD exports of the backup (chunks fetched from S3 on demand)
while ``block-stream`` copies them in the background, slowed here so that the guest boots
and reads its files long before the copy ends. The worker is killed -9 in the middle of
the copy and started again: the guest's reads wait, the export comes back on the same
socket and the copy goes on. When the task has succeeded the images have no backing file
left, the data disk is byte for byte the backup's, and the guest boots again with csbs
serving nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from csbs.drivers.qemu import DEFAULT_CMDLINE, QemuBoot, QemuDriver
from csbs.model import Server, ServerState
from csbs.services import Services
from starter.stack import SeaweedS3
from tests.conftest import (
    MIB,
    Stack,
    backup,
    dev_servers,
    kill9,
    kill_qemu,
    make_settings,
    max_attempt,
    settings_env,
    start_worker,
)
from tests.e2e.test_qemu_guest_e2e import wait_serial, write_image
from tests.libvirt_support import build_guest
from tests.qemu_support import QEMU_AVAILABLE, SKIP_REASON

pytestmark = pytest.mark.slow

#: The guest reads its data file, prints its digest, then idles.
SUMMING = (
    "#!/bin/sh\n"
    "echo \"GUEST: sum $(sha256sum /mnt/data.bin | cut -d' ' -f1)\"\n"
    "echo 'GUEST: ready'\n"
    "while true; do sleep 1; done\n"
)
#: Bytes per second the background copy may read per disk: slow enough that the guest
#: has booted and read its files long before the 64 MiB system disk is copied.
STREAM_SPEED = 3 * MIB


@pytest_asyncio.fixture(loop_scope="session")
async def instant_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A qemu stack whose worker is a real process (``st.env``), started by the test."""
    if not QEMU_AVAILABLE:
        pytest.skip(SKIP_REASON)
    settings = make_settings(
        tmp_path,
        s3,
        compute_driver="qemu",
        shutdown_timeout=12.0,
        heartbeat_timeout=3.0,
        instant_stream_speed=STREAM_SPEED,
    )
    service = Services(settings)
    address = temporal.client.service_client.config.target_host
    env = settings_env(settings, address)
    env.update(
        CSBS_SHUTDOWN_TIMEOUT="12",
        CSBS_HEARTBEAT_TIMEOUT="3",
        CSBS_INSTANT_STREAM_SPEED=str(STREAM_SPEED),
    )
    st = Stack(settings, service, temporal.client, env)
    try:
        yield st
    finally:
        drv = dev_servers(service.driver)
        assert isinstance(drv, QemuDriver)
        kill_qemu(drv)
        service.catalog.dispose()


def system_image(folder: Path, data: bytes) -> Path:
    """A 64 MiB ext4 (mkfs.ext4 -d, no mount) holding guest.sh and data.bin."""
    src = folder / "rootfs"
    src.mkdir()
    (src / "guest.sh").write_text(SUMMING)
    os.chmod(src / "guest.sh", 0o755)
    (src / "data.bin").write_bytes(data)
    raw = folder / "system.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(raw), "64M"], check=True)
    shutil.rmtree(src)
    return raw


def summing_guest(drv: QemuDriver, folder: Path, kernel: Path, data: bytes) -> Server:
    """A running guest whose vda holds ``data.bin`` and whose vdb is a 16 MiB data disk."""
    boot = QemuBoot(kernel=kernel / "vmlinuz", initrd=kernel / "initrd.gz", cmdline=DEFAULT_CMDLINE)
    server = drv.create_server("instant", [64 * MIB, 16 * MIB], boot=boot)
    wait_serial(drv, server.id, "vda holds no ext4 filesystem")
    write_image(drv, server.id, server.disks[0].id, system_image(folder, data))
    drv.set_state(server.id, ServerState.STOPPED)
    drv.start(server.id)
    wait_serial(drv, server.id, "GUEST: ready")
    return drv.get_server(server.id)


def backing_file(path: Path) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    found: str | None = info.get("backing-filename")
    return found


async def test_instant_restore_boots_a_real_guest_from_the_backup_and_survives_a_worker_kill(
    instant_stack: Stack, tmp_path: Path
) -> None:
    st = instant_stack
    kernel = build_guest(Path("/var/tmp/csbs-guest"))
    drv = dev_servers(st.service.driver)
    assert isinstance(drv, QemuDriver)
    data = os.urandom(24 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    server = await asyncio.to_thread(summing_guest, drv, tmp_path, kernel, data)
    sid, system, spare = server.id, server.disks[0].id, server.disks[1].id
    assert f"GUEST: sum {digest}" in drv.serial(sid)
    await asyncio.to_thread(drv.write, sid, spare, 3 * MIB, os.urandom(2 * MIB))
    worker = start_worker(st.env)
    try:
        record = await backup(st, sid)
        assert record["status"] == "available"
        backed = await asyncio.to_thread(drv.checksum, sid)
        # Both disks are wrecked after the backup: only the restore brings them back.
        await asyncio.to_thread(drv.write, sid, system, 0, b"\xee" * (4 * MIB))
        await asyncio.to_thread(drv.write, sid, spare, 0, b"\xee" * (8 * MIB))
        sums_before = drv.serial(sid).count(f"GUEST: sum {digest}")

        said: dict[str, Any] = (
            await st.cli("backup", "restore", record["id"], "--instant", "--yes", "--json")
        ).json()
        assert said["status"] == "running" and said["server_id"] == sid, said
        assert drv.get_server(sid).state == ServerState.RUNNING
        task_id = said["task_id"]
        # The guest boots from the backup and reads its 24 MiB file while the copy runs.
        await asyncio.to_thread(wait_serial, drv, sid, f"GUEST: sum {digest}", sums_before + 1, 120)
        task = st.catalog.get_task(task_id)
        assert task.status == "running", (task.status, task.reason)
        assert backing_file(drv._disk_path(sid, system)) is not None

        # The worker dies in the middle of the copy; another one takes it over.
        await asyncio.sleep(2)
        kill9(worker)
        await asyncio.sleep(3)
        worker = start_worker(st.env)
        deadline = time.monotonic() + 180
        while (task := st.catalog.get_task(task_id)).status == "running":
            assert time.monotonic() < deadline, f"the copy never finished: {task.progress}%"
            await asyncio.sleep(0.5)
        assert task.status == "succeeded", task.reason
        assert task.progress == 100
        assert "runs from the backup" in (task.detail or "")
        # The step serving the disks was cut short by the kill and tried again.
        assert task.workflow_id is not None
        assert await max_attempt(st.client.get_workflow_handle(task.workflow_id)) >= 2
        backup_row = st.catalog.get_backup(record["id"])
        assert backup_row.status == "available"
    finally:
        kill9(worker)

    # The server no longer depends on csbs: no backing file, no export, same bytes.
    for disk in (system, spare):
        assert backing_file(drv._disk_path(sid, disk)) is None
    after = await asyncio.to_thread(drv.checksum, sid)
    assert after[spare] == backed[spare]
    sums = drv.serial(sid).count(f"GUEST: sum {digest}")
    await asyncio.to_thread(drv.stop, sid)
    await asyncio.to_thread(drv.start, sid)
    await asyncio.to_thread(wait_serial, drv, sid, f"GUEST: sum {digest}", sums + 1, 120)


async def test_instant_restore_is_refused_with_the_reason_where_no_hypervisor_runs(
    stack: Stack,
) -> None:
    """The local driver cannot run a server: one line naming the field, nothing recorded,
    the server and its backup untouched."""
    st = stack
    server = st.driver.create_server("plain", [4 * MIB])
    st.driver.write(server.id, server.disks[0].id, 0, b"\x01" * MIB)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    tasks = len(st.catalog.list_tasks())
    refused = await st.cli("backup", "restore", made["id"], "--instant", "--yes", check=False)
    assert refused.code != 0
    assert refused.stderr.strip().splitlines() == [
        "error: instant: the local driver has no hypervisor to run a server from its backup; "
        "instant restore needs the qemu or libvirt driver"
    ]
    both = await st.cli(
        "backup", "restore", made["id"], "--instant", "--no-power-on", "--yes", check=False
    )
    assert both.code != 0 and "instant: an instant restore runs the server" in both.stderr
    assert len(st.catalog.list_tasks()) == tasks
    assert st.catalog.get_backup(made["id"]).status == "available"
    assert st.driver.get_server(server.id).state == ServerState.RUNNING
