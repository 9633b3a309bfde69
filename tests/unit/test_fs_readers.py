"""The filesystem readers of file-level restore (issue 18) against real images built from a
folder without mounting: ext4 (4 KiB and 1 KiB blocks), ext2 (block maps), FAT12/16/32,
xfs (mkfs.xfs -p: short-form, block and leaf/node directories), NTFS (mkntfs + ntfscp:
a root directory of several index blocks), and MBR (with a logical partition) and GPT
partition tables. Every file read back is
byte for byte the source; listings match the folder; errors name the path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from csbs.fs import Filesystem, FsError, Reader
from csbs.fs.partitions import partitions
from csbs.fs.probe import open_filesystem, volumes

MIB = 1 << 20


def run(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, check=True, input=stdin, text=True, capture_output=True)


def file_reader(path: Path) -> tuple[Reader, int, list[int]]:
    """A reader over an image file, and a list that counts the bytes it read."""
    f = open(path, "rb")  # noqa: SIM115 - closed with the test's process
    count = [0]

    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        data = f.read(length)
        count[0] += len(data)
        return data

    return read, path.stat().st_size, count


def make_tree(root: Path, links: bool = True, many: int = 300) -> None:
    (root / "docs/deep/er").mkdir(parents=True)
    (root / "docs/deep/er/big.bin").write_bytes(os.urandom(3 * MIB + 123))
    (root / "docs/readme.txt").write_text("restore me\n" * 50)
    (root / "empty.dat").write_bytes(b"")
    (root / "many").mkdir()
    for i in range(many):
        (root / "many" / f"file number {i:03} with a long name é").write_text(str(i))
    if links:
        (root / "link").symlink_to("docs/readme.txt")
        (root / "longlink").symlink_to("x" * 100)
        with open(root / "sparse", "wb") as f:
            f.truncate(10 * MIB)
            f.seek(5 * MIB)
            f.write(b"middle")


def assert_same(fs: Filesystem, src: Path, path: str = "/") -> None:
    """Every entry of ``src`` is in the listing of ``path``, with the same bytes."""
    listed = {e.name: e for e in fs.listdir(path)}
    assert set(listed) - {"lost+found"} == {d.name for d in os.scandir(src)}
    for d in os.scandir(src):
        entry = listed[d.name]
        assert fs.stat(entry.path) == entry
        if d.is_symlink():
            assert entry.kind == "symlink" and fs.readlink(entry.path) == os.readlink(d.path)
        elif d.is_dir():
            assert entry.kind == "dir"
            assert_same(fs, Path(d.path), entry.path)
        else:
            assert entry.kind == "file" and entry.size == d.stat().st_size
            assert b"".join(fs.read_file(entry.path)) == Path(d.path).read_bytes()


def ext4(image: Path, tree: Path, *options: str, size: str = "64M") -> None:
    run("mkfs.ext4", "-q", "-F", *options, "-d", str(tree), str(image), size)


def fat(image: Path, tree: Path, bits: int, kib: int) -> None:
    run("mkfs.vfat", "-F", str(bits), "-C", str(image), str(kib))
    run("mcopy", "-s", "-i", str(image), *[str(p) for p in tree.iterdir()], "::")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param((), id="ext4"),
        pytest.param(("-b", "1024"), id="ext4-1k", marks=pytest.mark.slow),
        pytest.param(("-t", "ext2"), id="ext2", marks=pytest.mark.slow),
    ],
)
def test_ext_filesystems_read_back_byte_for_byte(tmp_path: Path, options: tuple[str, ...]) -> None:
    tree = tmp_path / "tree"
    make_tree(tree)
    image = tmp_path / "fs.img"
    ext4(image, tree, *options)
    read, size, _ = file_reader(image)
    fs = open_filesystem(read, size)
    assert fs.type_name == "ext4"
    assert_same(fs, tree)
    assert fs.stat("/docs").mode == (tree / "docs").stat().st_mode & 0o7777


@pytest.mark.parametrize(
    ("bits", "kib"),
    [
        (12, 8000),
        pytest.param(16, 16000, marks=pytest.mark.slow),
        pytest.param(32, 40000, marks=pytest.mark.slow),
    ],
)
def test_fat_filesystems_read_back_byte_for_byte(tmp_path: Path, bits: int, kib: int) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, links=False, many=0 if bits == 12 else 300)
    if bits == 12:
        (tree / "many").rmdir()
    image = tmp_path / "fs.img"
    fat(image, tree, bits, kib)
    read, size, _ = file_reader(image)
    fs = open_filesystem(read, size)
    assert fs.type_name == "fat"
    assert_same(fs, tree)
    # FAT names match case-insensitively, as on Windows.
    assert fs.stat("/DOCS/README.TXT").path == "/docs/readme.txt"


@pytest.mark.parametrize("make", ["ext4", "fat"])
def test_errors_name_the_path(tmp_path: Path, make: str) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, links=False, many=0)
    image = tmp_path / "fs.img"
    ext4(image, tree) if make == "ext4" else fat(image, tree, 16, 16000)
    read, size, _ = file_reader(image)
    fs = open_filesystem(read, size)
    with pytest.raises(FsError, match=r"/docs/nope\.txt: no such file or directory"):
        fs.stat("/docs/nope.txt")
    with pytest.raises(FsError, match="/docs: not a regular file"):
        list(fs.read_file("/docs"))
    with pytest.raises(FsError, match=r"/empty\.dat: not a directory"):
        fs.listdir("/empty.dat")
    with pytest.raises(FsError, match="must be absolute"):
        fs.stat("docs")


def test_mbr_with_a_logical_partition_and_gpt(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, links=False, many=10)
    fs_image = tmp_path / "fs.img"
    ext4(fs_image, tree, size="16M")
    fs_bytes = fs_image.read_bytes()
    layouts: dict[str, tuple[str, str]] = {
        # A primary FAT partition slot, an extended one, and a logical partition in it.
        "dos": (
            "start=2048, size=8192, type=c\nstart=12288, type=5\nstart=14336, size=32768\n",
            "5",
        ),
        "gpt": ("start=2048, size=8192\nstart=12288, size=32768\n", "2"),
    }
    for label, (table, number) in layouts.items():
        disk = tmp_path / f"{label}.img"
        with open(disk, "wb") as f:
            f.truncate(40 * MIB)
        run("sfdisk", "-q", str(disk), stdin=f"label: {label}\n{table}")
        read, size, _ = file_reader(disk)
        found = {p.number: p for p in partitions(read, size)}
        with open(disk, "r+b") as f:
            f.seek(found[int(number)].start)
            f.write(fs_bytes)
        read, size, _ = file_reader(disk)
        vols = {name: (sub, n) for name, sub, n in volumes(read, size)}
        assert set(vols) == ({"1", "5"} if label == "dos" else {"1", "2"})  # not the extended one
        sub, n = vols[number]
        assert n == 32768 * 512
        assert_same(open_filesystem(sub, n), tree)
        with pytest.raises(FsError, match="no ext4, xfs, NTFS or FAT filesystem"):
            open_filesystem(*vols["1"])


def test_a_damaged_gpt_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
    run("sfdisk", "-q", str(disk), stdin="label: gpt\nstart=2048, size=4096\n")
    with open(disk, "r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")
    read, size, _ = file_reader(disk)
    with pytest.raises(FsError, match="gpt: the header's CRC32 does not match"):
        partitions(read, size)


def test_one_file_reads_little_of_a_large_ext4(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/log").mkdir(parents=True)
    for i in range(8):
        (tree / "var" / f"blob{i}.bin").write_bytes(os.urandom(4 * MIB))
    wanted = os.urandom(MIB)
    (tree / "var/log/wanted.log").write_bytes(wanted)
    image = tmp_path / "big.img"
    ext4(image, tree, size="256M")
    read, size, count = file_reader(image)
    fs = open_filesystem(read, size)
    assert b"".join(fs.read_file("/var/log/wanted.log")) == wanted
    assert count[0] < 2 * MIB, count[0]


def xfs(image: Path, tree: Path, size_mib: int = 320) -> None:
    """mkfs.xfs -p: a protofile naming every folder, file and symlink of the tree."""
    lines = ["/dummy", "0 0", "d--755 0 0"]

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.is_symlink():
                lines.append(f"{child.name} l--777 0 0 {os.readlink(child)}")
            elif child.is_dir():
                lines.append(f"{child.name} d--755 0 0")
                walk(child)
                lines.append("$")
            else:
                lines.append(f"{child.name} ---644 0 0 {child}")

    walk(tree)
    lines.append("$")
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    with open(image, "wb") as f:
        f.truncate(size_mib * MIB)
    run("mkfs.xfs", "-q", "-f", "-p", str(proto), str(image))


@pytest.mark.slow
def test_xfs_reads_back_byte_for_byte(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, many=0)
    (tree / "many").rmdir()
    (tree / "block").mkdir()  # ~50 entries: a block directory
    for i in range(50):
        (tree / "block" / f"f{i}").write_text(str(i))
    (tree / "remote").symlink_to("y" * 500)  # too long to live in the inode
    (tree / "huge").mkdir()  # 2000 long names: leaf and node directories
    for i in range(2000):
        (tree / "huge" / f"a_fairly_long_file_name_number_{i:04}_to_fill_leaf_blocks").touch()
    image = tmp_path / "xfs.img"
    xfs(image, tree)
    read, size, count = file_reader(image)
    fs = open_filesystem(read, size)
    assert fs.type_name == "xfs"
    assert_same(fs, tree)
    read, size, count = file_reader(image)
    fs = open_filesystem(read, size)
    assert len(b"".join(fs.read_file("/docs/deep/er/big.bin"))) == 3 * MIB + 123
    assert count[0] < 4 * MIB


@pytest.mark.slow
def test_ntfs_reads_back_byte_for_byte(tmp_path: Path) -> None:
    """ntfscp adds files to the root (it makes no folders): 200 long unicode names need
    an $INDEX_ALLOCATION of several INDX blocks; small files stay resident in the MFT."""
    image = tmp_path / "ntfs.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    run("mkntfs", "-F", "-Q", "-q", str(image))
    src = tmp_path / "src"
    src.mkdir()
    files = {"big.bin": os.urandom(3 * MIB + 5), "tiny.txt": b"tiny\n", "empty.dat": b""}
    files.update({f"file {i:03} with a long name é.txt": str(i).encode() for i in range(200)})
    for name, data in files.items():
        (src / name).write_bytes(data)
        run("ntfscp", str(image), str(src / name), name)
    read, size, count = file_reader(image)
    fs = open_filesystem(read, size)
    assert fs.type_name == "ntfs"
    assert_same(fs, src)
    assert fs.stat("/BIG.BIN").path == "/big.bin"  # names match case-insensitively
    read, size, count = file_reader(image)
    fs = open_filesystem(read, size)
    assert b"".join(fs.read_file("/big.bin")) == files["big.bin"]
    assert count[0] < 4 * MIB
    with pytest.raises(FsError, match="no such file or directory"):
        fs.stat("/nope")
