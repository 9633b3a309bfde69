"""Images from backups (the guide's 备份创建镜像, issue 18): ``csbs backup export`` writes
one disk of a backup as a standalone, sparse raw or qcow2 image, byte for byte the disk
at backup time, that ``qemu-img check`` accepts."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MIB, Stack

pytestmark = pytest.mark.slow

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="QEMU IS NOT INSTALLED (qemu-utils)"
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


@needs_qemu_img
async def test_export_writes_sparse_raw_and_qcow2_images_of_a_backup(
    stack: Stack, tmp_path: Path
) -> None:
    st = stack
    tmp_path = tmp_path / "images"
    tmp_path.mkdir()
    server = st.driver.create_server("img", [16 * MIB, 64 * MIB])
    system, data = server.disks
    st.driver.write(server.id, system.id, 0, os.urandom(2 * MIB))
    st.driver.write(server.id, data.id, 40 * MIB, os.urandom(3 * MIB + 11))
    sums = st.driver.checksum(server.id)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    st.driver.write(server.id, data.id, 0, os.urandom(MIB))  # later changes are not in it

    raw = tmp_path / "data.raw"
    out = (
        await st.cli(
            "backup", "export", made["id"], "--disk", data.id, "--format", "raw",
            "--output", str(raw), "--json",
        )
    ).json()  # fmt: skip
    assert (out["format"], out["size_bytes"], out["output"]) == ("raw", 64 * MIB, str(raw))
    assert raw.stat().st_size == 64 * MIB and sha256(raw) == sums[data.id]
    # Sparse: only the data (in whole chunks) takes room, not the 64 MiB.
    assert out["allocated_bytes"] <= 5 * MIB < 64 * MIB

    image = tmp_path / "data.qcow2"
    await st.cli(
        "backup", "export", made["id"], "--disk", data.id, "--output", str(image)
    )  # qcow2 is the default format
    info = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    back = tmp_path / "back.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(back)], check=True
    )
    assert sha256(back) == sums[data.id]
    assert image.stat().st_size < 8 * MIB  # the holes are not in the file

    # Refusals: one line, nothing written.
    for args, needle in [
        (("--output", str(tmp_path / "x.img")), "has 2 disks"),
        (("--disk", "disk-nope", "--output", str(tmp_path / "x.img")), "disk-nope"),
        (("--disk", data.id, "--output", str(raw)), "exists"),
        (("--disk", data.id, "--format", "vmdk", "--output", str(tmp_path / "x")), "format"),
        (("--disk", data.id, "--output", str(tmp_path / "no" / "x.img")), "does not exist"),
    ]:
        refused = await st.cli("backup", "export", made["id"], *args, check=False)
        assert refused.code != 0 and needle in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.raw", "data.qcow2", "data.raw"]
