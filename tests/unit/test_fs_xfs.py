"""The XFS reader against real images made without mounting: ``mkfs.xfs -p`` copies a
folder in (v5 with 4 KiB blocks as mkfs makes it by default, v5 with 1 KiB blocks, 4 KiB
directory blocks and large extent counts, and v4 with 8 KiB directory blocks), then
``xfs_db -x`` makes what a protofile cannot: a file of 20 one-block extents with holes and
an unwritten one, pushed into a bmap btree by an extended attribute, and a long symlink
with the v5 block header (mkfs.xfs 6.1 writes remote symlinks without it).

Every file read back is byte for byte what it should be; listings match the folder; the
shortform, block and node directories are checked to be in those formats; errors name the
path; and reading one file reads little of the volume."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from csbs.fs import FsError, Reader
from csbs.fs.xfs import Xfs

MIB = 1 << 20
#: mkfs.xfs refuses filesystems under 300 MiB; the image file stays sparse.
IMAGE_MIB = 300
FRAG_EXTENTS = 20
#: The one extent of the fragmented file that is marked unwritten (it reads as zeros).
UNWRITTEN = 3
#: Longer than an inode's data fork (so in a block of its own) and than fits a 1 KiB
#: block with a header: the mkfs-written form only.
RAW_TARGET = "raw/" * 250
#: Fits one 1 KiB block after the 56-byte v5 header.
LONG_TARGET = "segment/" * 110 + "end"

VARIANTS: dict[str, tuple[str, ...]] = {
    "v5": (),
    "v5-1k-nrext64": ("-b", "size=1024", "-i", "nrext64=1"),
    "v4-8k-dirs": ("-m", "crc=0", "-i", "size=512", "-n", "size=8192"),
}


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return done.stdout


def xfs_db(image: Path, *commands: str, write: bool = False) -> str:
    args = [arg for command in commands for arg in ("-c", command)]
    return run("xfs_db", "-x" if write else "-r", *args, str(image))


def number(pattern: str, text: str) -> int:
    """The number that ``pattern``'s group catches in xfs_db's output."""
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return int(found[1])


def file_reader(path: Path) -> tuple[Reader, list[int]]:
    """A reader over an image file, and a list that counts the bytes it read."""
    f = open(path, "rb")  # noqa: SIM115 - closed with the test's process
    count = [0]

    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        data = f.read(length)
        count[0] += len(data)
        return data

    return read, count


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nested folders, files big, small and empty, directories of 3, 50 and 2000 entries
    (shortform, block and node form) and symlinks short and long."""
    root = tmp_path_factory.mktemp("xfs-src")
    (root / "docs/deep/er").mkdir(parents=True)
    (root / "docs/deep/er/big.bin").write_bytes(os.urandom(3 * MIB // 2 + 123))
    (root / "docs/readme.txt").write_text("restore me\n" * 50)
    (root / "empty.dat").write_bytes(b"")
    (root / "one.bin").write_bytes(os.urandom(MIB))
    (root / "frag.bin").write_bytes(os.urandom(2 * FRAG_EXTENTS * 4096))
    for name, count in (("few", 3), ("fifty", 50)):
        (root / name).mkdir()
        for i in range(count):
            (root / name / f"entry-{i:02}.txt").write_text(f"{name} {i}\n" * i)
    (root / "many").mkdir()
    for i in range(2000):
        (
            root / "many" / f"{i:04}-a-long-name-so-that-the-directory-needs-node-form.txt"
        ).write_text(str(i))
    (root / "link").symlink_to("docs/readme.txt")
    (root / "longlink").symlink_to(LONG_TARGET)
    (root / "rawlink").symlink_to(RAW_TARGET)
    return root


def protofile(root: Path) -> str:
    """The mkfs.xfs prototype of a folder: one line per entry, ``$`` closing a folder."""
    lines = ["csbs-test", "0 0", "d--755 0 0"]

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

    walk(root)
    lines.append("$")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Image:
    path: Path
    block_size: int
    #: What /frag.bin reads as after its extents were rewritten.
    frag: bytes


def fragment(image: Path, source: bytes, block_size: int, v5: bool) -> bytes:
    """Rewrite /frag.bin as 20 one-block extents at every other block (the blocks between
    become holes), mark one unwritten, then add an attribute big enough to leave the data
    fork too small for 20 extents, so that XFS moves them into a bmap btree. Returns the
    content the file then has."""
    out = xfs_db(image, "path /frag.bin", "inode", "bmap")
    ino = number(r"current inode number is (\d+)", out)
    extents = re.findall(r"startblock (\d+) \(\d+/\d+\) count (\d+)", out)
    assert len(extents) == 1 and int(extents[0][1]) * block_size >= len(source)
    start = int(extents[0][0])
    fork = "u3" if v5 else "u"
    commands = ["path /frag.bin", f"write core.nextents {FRAG_EXTENTS}", f"inode {ino}"]
    for i in range(FRAG_EXTENTS):
        commands += [
            f"write {fork}.bmx[{i}].startoff {2 * i}",
            f"write {fork}.bmx[{i}].startblock {start + 2 * i}",
            f"write {fork}.bmx[{i}].blockcount 1",
            f"write {fork}.bmx[{i}].extentflag {int(i == UNWRITTEN)}",
        ]
    xfs_db(image, *commands, write=True)
    xfs_db(image, f"inode {ino}", "attr_set -v 100 user.pad", write=True)
    expected = bytearray(len(source))
    for i in range(FRAG_EXTENTS):
        if i != UNWRITTEN:
            at = 2 * i * block_size
            expected[at : at + block_size] = source[at : at + block_size]
    return bytes(expected)


def add_symlink_header(image: Path, name: str, target: str) -> None:
    """Give a remote symlink the v5 block header mkfs.xfs 6.1 leaves out: magic, offset,
    bytes, CRC (recomputed by xfs_db), filesystem UUID, owner inode, sector, LSN."""
    magic = xfs_db(image, f"path /{name}", "dblock 0", "type symlink", "print magic")
    if "0x58534c4d" in magic:
        return  # a newer mkfs.xfs wrote it already
    fs_uuid = uuid.UUID(xfs_db(image, "sb 0", "print uuid").split("=")[1].strip())
    out = xfs_db(image, f"path /{name}", "inode", "dblock 0", "daddr")
    ino = number(r"current inode number is (\d+)", out)
    sector = number(r"current daddr is (\d+)", out)
    header = struct.pack(">4sIII16sQQQ", b"XSLM", 0, len(target), 0, fs_uuid.bytes, ino, sector, 0)
    with open(image, "r+b") as f:
        f.seek(sector * 512)
        f.write(header + target.encode())
    xfs_db(image, f"path /{name}", "dblock 0", "type symlink", "crc -r", write=True)


@pytest.fixture(scope="module", params=list(VARIANTS))
def image(
    request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Image:
    folder = tmp_path_factory.mktemp(f"xfs-{request.param}")
    proto = folder / "proto"
    proto.write_text(protofile(tree))
    path = folder / "xfs.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_MIB * MIB)
    run("mkfs.xfs", "-q", "-f", *VARIANTS[request.param], "-p", str(proto), str(path))
    block_size = int(xfs_db(path, "sb 0", "print blocksize").split("=")[1])
    v5 = request.param.startswith("v5")
    frag = fragment(path, (tree / "frag.bin").read_bytes(), block_size, v5)
    if v5:
        add_symlink_header(path, "longlink", LONG_TARGET)
    return Image(path, block_size, frag)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_tree_reads_back_byte_for_byte(image: Image, tree: Path) -> None:
    read, _ = file_reader(image.path)
    fs = Xfs(read)
    assert fs.type_name == "xfs"
    now = time.time()
    folders = [tree, *(p for p in sorted(tree.rglob("*")) if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        path = "/" + str(folder.relative_to(tree)).removeprefix(".")
        listed = fs.listdir(path)
        assert [e.name for e in listed] == sorted(os.listdir(folder)), path
        for entry in listed:
            source = folder / entry.name
            assert entry.path == f"{path.rstrip('/')}/{entry.name}"
            assert entry.mtime is not None and abs(entry.mtime - now) < 3600
            if source.is_symlink():
                assert (entry.kind, entry.mode) == ("symlink", 0o777)
                assert entry.size == len(os.readlink(source))
                assert fs.readlink(entry.path) == os.readlink(source)
            elif source.is_dir():
                assert (entry.kind, entry.mode) == ("dir", 0o755)
            else:
                assert (entry.kind, entry.mode, entry.size) == (
                    "file",
                    0o644,
                    source.stat().st_size,
                )
                data = b"".join(fs.read_file(entry.path, block=256 * 1024))
                want = image.frag if entry.path == "/frag.bin" else source.read_bytes()
                assert sha(data) == sha(want), entry.path
    assert fs.stat("/").kind == "dir"
    assert fs.stat("/docs/deep/er/big.bin").size == 3 * MIB // 2 + 123
    assert fs.readlink("/rawlink") == RAW_TARGET


def test_the_structures_are_the_ones_meant(image: Image) -> None:
    """The image really has what the reader was asked to read: a shortform, a block and a
    node directory, a file in btree form, local and remote symlinks."""
    out = xfs_db(
        image.path,
        *(
            f"{command}"
            for name in ("few", "fifty", "many", "frag.bin", "link", "longlink")
            for command in (f"path /{name}", "print core.format core.size core.nblocks")
        ),
    )
    rows = re.findall(r"core.format = (\d).*?\ncore.size = (\d+)\ncore.nblocks = (\d+)", out)
    (few, fifty, many, frag, link, longlink) = [tuple(map(int, r)) for r in rows]
    dir_block = int(xfs_db(image.path, "sb 0", "print dirblklog").split("=")[1])
    dir_block = image.block_size << dir_block
    assert few[0] == 1  # local: shortform
    assert fifty[0] == 2 and fifty[1] == dir_block  # one directory block
    assert many[1] > 2 * dir_block and many[2] * image.block_size > many[1] + dir_block  # node
    assert frag[0] == 3  # btree
    assert link[0] == 1 and longlink[0] == 2


def test_errors_name_the_path(image: Image) -> None:
    fs = Xfs(file_reader(image.path)[0])
    with pytest.raises(FsError, match=r"^/docs/nothing: no such file or directory"):
        fs.stat("/docs/nothing")
    with pytest.raises(FsError, match=r"^/docs: not a regular file"):
        fs.read_file("/docs")
    with pytest.raises(FsError, match=r"^/one\.bin: not a directory"):
        fs.listdir("/one.bin")
    with pytest.raises(FsError, match=r"^/one\.bin: not a directory"):
        fs.stat("/one.bin/below")
    with pytest.raises(FsError, match=r"^/one\.bin: not a symbolic link"):
        fs.readlink("/one.bin")


def test_one_file_reads_little(image: Image, tree: Path) -> None:
    read, count = file_reader(image.path)
    fs = Xfs(read)
    data = b"".join(fs.read_file("/one.bin"))
    assert sha(data) == sha((tree / "one.bin").read_bytes())
    assert MIB <= count[0] < 4 * MIB


def test_a_volume_without_xfs_is_refused() -> None:
    with pytest.raises(FsError, match="xfs: no superblock"):
        Xfs(lambda offset, length: bytes(length))
