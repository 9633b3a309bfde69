"""``csbs backup mount`` (issue 18): one disk of a backup served read-only over NBD, from
the object store, fetching only the chunks a client reads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from csbs.drivers.nbd import NbdClient
from tests.conftest import MIB, ROOT, Stack

pytestmark = pytest.mark.slow

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="QEMU IS NOT INSTALLED (qemu-utils)"
)


@needs_qemu_img
async def test_mount_serves_a_backup_disk_over_nbd(stack: Stack, tmp_path: Path) -> None:
    st = stack
    server = st.driver.create_server("mnt", [8 * MIB, 64 * MIB])
    data = server.disks[1].id
    st.driver.write(server.id, data, 0, os.urandom(8 * MIB))
    st.driver.write(server.id, data, 40 * MIB, os.urandom(2 * MIB))
    sums = st.driver.checksum(server.id)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    st.driver.write(server.id, data, 0, os.urandom(MIB))  # later: not in the backup

    refused = await st.cli("backup", "mount", made["id"], check=False)
    assert refused.code != 0 and "has 2 disks" in refused.stderr

    sock = tmp_path / "m.sock"

    async def mount() -> tuple[asyncio.subprocess.Process, list[str]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "starter.cli", "backup", "mount", made["id"], "--disk", data,
            "--socket", str(sock), "--tcp-port", "0", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=st.env, cwd=str(ROOT),
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        return proc, json.loads(line)["uris"]

    async def unmount(proc: asyncio.subprocess.Process) -> str:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert not sock.exists()
        return err.decode()

    # A client that reads 1 MiB makes csbs fetch that chunk (and what it reads ahead),
    # not the disk's 10 data chunks.
    proc, (unix_uri, tcp_uri) = await mount()
    try:
        assert unix_uri == f"nbd+unix:///{made['id']}/{data}?socket={sock}"
        with NbdClient(str(sock), f"{made['id']}/{data}") as nbd:
            assert nbd.info.size == 64 * MIB and nbd.info.read_only
            piece = nbd.read(40 * MIB, MIB)
    finally:
        said = await unmount(proc)
    fetched = int(said.split("unmounted:")[1].split()[0])
    assert 1 <= fetched <= 2, said

    # qemu-img copies the whole disk over TCP: byte for byte the disk at backup time.
    proc, (unix_uri, tcp_uri) = await mount()
    try:
        image = tmp_path / "copy.raw"
        copy = subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", tcp_uri, str(image)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert copy.returncode == 0, copy.stderr
        assert hashlib.sha256(image.read_bytes()).hexdigest() == sums[data]
        assert image.read_bytes()[40 * MIB : 41 * MIB] == piece
        write = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", unix_uri], capture_output=True, text=True
        )
        # The export says it is read-only: a client opening it to write is refused.
        assert write.returncode != 0 and "Permission denied" in write.stderr, write.stderr
    finally:
        await unmount(proc)
