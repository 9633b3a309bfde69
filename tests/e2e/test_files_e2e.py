"""File-level restore (issue 18): ``csbs backup files ID --disk D ls|get PATH`` lists and
extracts files from a backed-up disk without restoring it, reading only the chunks the
filesystem's metadata and the chosen files occupy.

The disks are built from folders without mounting anything: a GPT disk with a FAT32
partition (mkfs.vfat + mcopy) and an ext4 partition (mkfs.ext4 -d), an MBR disk with an
xfs partition (mkfs.xfs -p protofile) and an NTFS one (mkntfs + ntfscp), and a 4 GiB disk
that is one whole ext4 filesystem (no partition table). Each is written onto a server's
disk and backed up; what ``get`` writes is byte for byte the source."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MIB, Stack
from tests.unit.test_fs_readers import xfs

pytestmark = pytest.mark.slow


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_tree(root: Path) -> dict[str, bytes]:
    """A folder with nested folders, a 3 MiB random file, a small one and an empty one."""
    files = {
        "docs/readme.txt": b"restore me\n" * 100,
        "docs/deep/er/big.bin": os.urandom(3 * MIB + 123),
        "empty.dat": b"",
        "photos/Pic_01.jpg": os.urandom(200_000),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def partitioned(image: Path, size_mib: int, table: str, parts: list[tuple[int, int]]) -> None:
    """An empty image with a partition table (``parts``: start and size in MiB)."""
    with open(image, "wb") as f:
        f.truncate(size_mib * MIB)
    lines = [f"label: {table}"]
    lines += [f"start={start * 2048}, size={size * 2048}" for start, size in parts]
    subprocess.run(
        ["sfdisk", "-q", str(image)], input="\n".join(lines) + "\n", text=True, check=True
    )


def splice(image: Path, fs_image: Path, start_mib: int) -> None:
    with open(image, "r+b") as out, open(fs_image, "rb") as src:
        out.seek(start_mib * MIB)
        while block := src.read(4 * MIB):
            out.write(block)


def fat_fs(path: Path, tree: Path, size_mib: int) -> None:
    run("mkfs.vfat", "-F", "32", "-C", str(path), str(size_mib * 1024))
    run("mcopy", "-s", "-i", str(path), *[str(p) for p in tree.iterdir()], "::")


def ext4_fs(path: Path, tree: Path, size: str) -> None:
    run("mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), size)


def ntfs_fs(path: Path, files: dict[str, bytes], tree: Path, size_mib: int) -> None:
    """mkntfs, then ntfscp for each top-level file (ntfscp makes no folders)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    run("mkntfs", "-F", "-Q", "-q", str(path))
    for rel in files:
        if "/" not in rel:
            run("ntfscp", str(path), str(tree / rel), rel)


async def backed_up(st: Stack, image: Path) -> tuple[str, str]:
    """A server whose only disk holds ``image``, backed up: (backup id, disk id)."""
    size = image.stat().st_size
    server = st.driver.create_server(image.stem, [size])
    disk = server.disks[0].id
    with open(image, "rb") as f:
        at = 0
        while block := f.read(4 * MIB):
            if block.count(0) != len(block):
                st.driver.write(server.id, disk, at, block)
            at += len(block)
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    return made["id"], disk


async def files(st: Stack, *args: str, check: bool = True) -> Any:
    result = await st.cli("backup", "files", *args, "--json", check=check)
    return result.json() if check else result


async def test_files_are_listed_and_extracted_from_gpt_and_mbr_disks(
    stack: Stack, tmp_path: Path
) -> None:
    st = stack
    tree = tmp_path / "tree"
    tree.mkdir()
    content = source_tree(tree)
    (tree / "link").symlink_to("docs/readme.txt")

    gpt = tmp_path / "gpt.img"
    partitioned(gpt, 112, "gpt", [(1, 40), (41, 64)])
    fat_fs(tmp_path / "fat.img", tree, 40)
    ext4_fs(tmp_path / "ext4.img", tree, "64M")
    splice(gpt, tmp_path / "fat.img", 1)
    splice(gpt, tmp_path / "ext4.img", 41)
    backup_id, disk = await backed_up(st, gpt)

    # Two partitions hold a filesystem: the command says which and refuses to guess.
    refused = await files(st, backup_id, "ls", "/", check=False)
    assert refused.code != 0
    assert "partition: the disk has 1 (fat), 2 (ext4)" in refused.stderr
    for part, kind in (("1", "fat"), ("2", "ext4")):
        listing = await files(st, backup_id, "ls", "/", "--disk", disk, "--partition", part)
        assert listing["filesystem"] == kind
        names = {e["name"]: e for e in listing["entries"]}
        assert {"docs", "photos", "empty.dat"} <= set(names)
        assert names["docs"]["kind"] == "dir" and names["empty.dat"]["size"] == 0
        deep = await files(st, backup_id, "ls", "/docs/deep/er", "--partition", part)
        assert [(e["name"], e["size"]) for e in deep["entries"]] == [
            ("big.bin", len(content["docs/deep/er/big.bin"]))
        ]
        out = tmp_path / f"big-{part}.bin"
        got = await files(
            st, backup_id, "get", "/docs/deep/er/big.bin", "--partition", part, "-o", str(out)
        )
        assert sha256(out) == hashlib.sha256(content["docs/deep/er/big.bin"]).hexdigest()
        assert got["files"] == 1 and got["bytes"] == out.stat().st_size
        # A whole folder comes back as a tree.
        folder = tmp_path / f"docs-{part}"
        await files(st, backup_id, "get", "/docs", "--partition", part, "-o", str(folder))
        assert (folder / "readme.txt").read_bytes() == content["docs/readme.txt"]
        assert sha256(folder / "deep/er/big.bin") == sha256(out)
    link = await files(st, backup_id, "ls", "/link", "--partition", "2")
    assert link["entries"][0]["kind"] == "symlink"

    # Clear one-line refusals, nothing written.
    missing = await files(st, backup_id, "get", "/nope.txt", "--partition", "2", check=False)
    assert missing.code != 0 and "/nope.txt" in missing.stderr
    bad = await files(st, backup_id, "ls", "/", "--partition", "9", check=False)
    assert bad.code != 0 and "partition: 9 is not on the disk" in bad.stderr
    exists = await files(
        st, backup_id, "get", "/empty.dat", "--partition", "2", "-o", str(out), check=False
    )
    assert exists.code != 0 and "exists" in exists.stderr

    mbr = tmp_path / "mbr.img"
    partitioned(mbr, 400, "dos", [(1, 320), (321, 64)])
    xfs(tmp_path / "xfs.img", tree, 320)
    ntfs_fs(tmp_path / "ntfs.img", content, tree, 64)
    splice(mbr, tmp_path / "xfs.img", 1)
    splice(mbr, tmp_path / "ntfs.img", 321)
    backup_id, disk = await backed_up(st, mbr)
    for part, kind, wanted in (
        ("1", "xfs", "/docs/deep/er/big.bin"),
        ("2", "ntfs", "/empty.dat"),
    ):
        listing = await files(st, backup_id, "ls", "/", "--partition", part)
        assert listing["filesystem"] == kind
        assert "empty.dat" in {e["name"] for e in listing["entries"]}
        out = tmp_path / f"{kind}.out"
        await files(st, backup_id, "get", wanted, "--partition", part, "-o", str(out))
        assert out.read_bytes() == content[wanted.lstrip("/")]


async def test_one_file_from_a_4_gib_ext4_disk_fetches_under_1_percent_of_its_chunks(
    stack: Stack, tmp_path: Path
) -> None:
    """The issue's goal: a 1 MiB file out of a 4 GiB ext4 disk (no partition table) that
    holds 96 MiB of other files fetches fewer than 1 % of the disk's chunks."""
    st = stack
    tree = tmp_path / "tree"
    (tree / "var/log").mkdir(parents=True)
    for i in range(24):
        (tree / "var" / f"blob{i:02}.bin").write_bytes(os.urandom(4 * MIB))
    wanted = os.urandom(MIB)
    (tree / "var/log/wanted.log").write_bytes(wanted)
    image = tmp_path / "big.img"
    ext4_fs(image, tree, "4G")
    backup_id, _ = await backed_up(st, image)
    out = tmp_path / "wanted.log"
    got = await files(st, backup_id, "get", "/var/log/wanted.log", "-o", str(out))
    assert out.read_bytes() == wanted
    assert got["chunks_total"] == 4096  # 1 MiB chunks in the test stack
    assert got["chunks_fetched"] < got["chunks_total"] // 100, got
