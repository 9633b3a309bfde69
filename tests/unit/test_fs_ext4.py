"""The ext2/3/4 reader against real images made without mounting: ``mkfs.ext4 -d`` copies
a folder in, ``e2fsck -fD`` turns every directory of more than one block into an htree,
and ``debugfs -w`` makes what mke2fs does not (unwritten extents).

The variants cover extents (with an index node) and block maps (up to the triple
indirect block), 1 KiB and 4 KiB blocks, 32- and 64-bit group descriptors, meta_bg,
128- and 256-byte inodes, inline data, fast and slow symlinks, holes, and a file over
4 GiB. Every file reads back byte for byte; listings match the folder; errors name the
path; and reading one file reads little of the volume."""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from csbs.fs import Filesystem, FsError
from csbs.fs.ext4 import FLAG_EXTENTS, FLAG_INLINE_DATA, Ext4

MIB = 1 << 20
KIB = 1 << 10
FLAG_INDEX = 0x1000  # an htree directory
#: The 1 KiB-block sparse file reaches the triple indirect block (from block 65804).
SPARSE_DATA_AT = (0, 100 * KIB, 3 * MIB, 65 * MIB)
SPARSE_SIZE = 65 * MIB + 4 * KIB
FRAGMENTS = 24  # extents of /fragmented: more than the inode's 4, so an index node

VARIANTS: dict[str, tuple[str, ...]] = {
    # extents, 64-bit descriptors, flex_bg, metadata_csum: mkfs.ext4's defaults
    "ext4": ("-b", "4096"),
    "ext4-1k": ("-b", "1024"),
    "ext4-inline": ("-b", "4096", "-O", "inline_data"),
    # 64 groups of 1024 blocks and 16 inodes: descriptors in 4 meta groups, inodes in many
    "ext4-meta-bg": ("-b", "1024", "-g", "1024", "-N", "1024", "-O", "meta_bg,^resize_inode"),
    "ext3": ("-t", "ext3", "-b", "4096"),
    "ext2-1k-128": ("-t", "ext2", "-b", "1024", "-I", "128"),
}


def run(*cmd: str, ok: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode in ok, f"{cmd}: {done.returncode} {done.stderr}"
    return done.stdout


class ImageReader:
    """A ``Reader`` over an image file that counts the bytes it hands out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.bytes_read = 0

    def __call__(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        self.bytes_read += len(data)
        return data


def sha256(pieces: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def write_sparse(path: Path, size: int, at: tuple[int, ...], piece: int = 4 * KIB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in at:
            f.seek(offset)
            f.write(os.urandom(min(piece, size - offset)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nested folders; a big, a tiny, an empty, a sparse and a fragmented file; 300 long
    names (an htree); unicode names; fast and slow symlinks; a fifo."""
    root = tmp_path_factory.mktemp("ext4-src")
    (root / "docs/deep/er").mkdir(parents=True)
    (root / "docs/deep/er/big.bin").write_bytes(os.urandom(3 * MIB // 2 + 123))
    (root / "docs/readme.txt").write_text("restore me\n" * 50)
    (root / "tiny.txt").write_bytes(os.urandom(100))  # inline: 60 in i_block, 40 beyond
    (root / "empty.dat").write_bytes(b"")
    write_sparse(root / "sparse", SPARSE_SIZE, (*SPARSE_DATA_AT, SPARSE_SIZE - 4 * KIB))
    # Ends with data: mke2fs 1.47 drops a trailing hole on inline_data filesystems.
    fragments = tuple(range(0, FRAGMENTS * 64 * KIB, 64 * KIB))
    write_sparse(root / "fragmented", fragments[-1] + 4 * KIB, fragments)
    (root / "few").mkdir()  # an inline directory (in i_block)
    for i in range(2):
        (root / "few" / f"entry-{i}.txt").write_text(str(i))
    (root / "many").mkdir()
    for i in range(300):
        (root / "many" / f"file number {i:03} with a long name é").write_text(str(i))
    (root / "ünïcødé ✓ 日本語").mkdir()
    (root / "ünïcødé ✓ 日本語" / ("ß" * 125 + "x.txt")).write_text("a name of 255 bytes\n")
    (root / "link").symlink_to("docs/readme.txt")
    (root / "link59").symlink_to("a" * 59)  # the longest fast symlink
    (root / "link60").symlink_to("b" * 60)  # the shortest slow one
    (root / "longlink").symlink_to("../" + "segment/" * 30 + "target")
    os.mkfifo(root / "fifo")
    return root


def make_ext(
    path: Path, tree: Path, options: tuple[str, ...], size: str = "64M", index: bool = True
) -> Path:
    run("mkfs.ext4", "-q", "-F", *options, "-d", str(tree), str(path), size)
    if index:  # e2fsck -D: htree-index every directory of more than one block
        run("e2fsck", "-f", "-y", "-D", str(path), ok=(0, 1))
    return path


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    options: tuple[str, ...]


@pytest.fixture(scope="module", params=list(VARIANTS))
def image(
    request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Image:
    name = request.param
    path = tmp_path_factory.mktemp("ext4-img") / f"{name}.img"
    return Image(name, make_ext(path, tree, VARIANTS[name]), VARIANTS[name])


def assert_same(fs: Ext4, src: Path, path: str) -> None:
    """The listing of ``path`` is the folder ``src``: names, kinds, sizes, modes, times,
    bytes and link targets; and ``stat`` agrees with the listing."""
    listed = {e.name: e for e in fs.listdir(path)}
    assert [e.name for e in fs.listdir(path)] == sorted(listed)
    assert set(listed) - {"lost+found"} == {d.name for d in os.scandir(src)}
    for d in os.scandir(src):
        entry, st = listed[d.name], d.stat(follow_symlinks=False)
        assert fs.stat(entry.path) == entry
        assert entry.mode == st.st_mode & 0o7777
        assert entry.mtime == int(st.st_mtime), entry  # mke2fs -d keeps whole seconds
        if d.is_symlink():
            assert entry.kind == "symlink" and fs.readlink(entry.path) == os.readlink(d.path)
        elif d.is_dir():
            assert entry.kind == "dir"
            assert_same(fs, Path(d.path), entry.path)
        elif d.is_file():
            assert (entry.kind, entry.size) == ("file", st.st_size)
            assert sha256(fs.read_file(entry.path)) == sha256([Path(d.path).read_bytes()])
        else:
            assert (entry.kind, entry.size) == ("other", 0)


def test_every_variant_reads_back_the_folder(image: Image, tree: Path) -> None:
    fs = Ext4(ImageReader(image.path))
    assert fs.type_name == "ext4"
    assert_same(fs, tree, "/")


def inode_of(fs: Ext4, path: str) -> int:
    return fs._lookup(path)[0]


def test_the_images_hold_the_structures_under_test(image: Image) -> None:
    """What the variants claim to cover is really in them: htrees, an extent index node,
    the triple indirect block, inline files and directories, fast and slow symlinks,
    inodes beyond the first meta group, 32- or 64-bit descriptors."""
    fs = Ext4(ImageReader(image.path))
    many = fs._inode(inode_of(fs, "/many"))
    assert many.flags & FLAG_INDEX
    fragmented = fs._inode(inode_of(fs, "/fragmented"))
    sparse = fs._inode(inode_of(fs, "/sparse"))
    if fragmented.flags & FLAG_EXTENTS:
        assert struct.unpack_from("<H", fragmented.i_block, 6)[0] >= 1  # extent tree depth
    else:
        assert struct.unpack("<15I", sparse.i_block)[14 if fs.block_size == 1024 else 13]
    assert image.name.startswith("ext4") == bool(sparse.flags & FLAG_EXTENTS)
    assert fs.sb.desc_size == (64 if image.name.startswith("ext4") else 32)
    if image.name == "ext4-inline":
        for path in ("/few", "/tiny.txt", "/link60"):
            inode = fs._inode(inode_of(fs, path))
            assert inode.flags & FLAG_INLINE_DATA, path
            assert bool(fs._system_data(inode)) == (inode.size > 60), path
    else:
        assert fs._is_fast_symlink(fs._inode(inode_of(fs, "/link59")))
        assert not fs._is_fast_symlink(fs._inode(inode_of(fs, "/link60")))
    if image.name == "ext4-meta-bg":
        groups_per_meta = fs.block_size // fs.sb.desc_size
        deepest = max(inode_of(fs, e.path) for e in fs.listdir("/many"))
        assert (deepest - 1) // fs.sb.inodes_per_group >= groups_per_meta


@pytest.mark.parametrize(
    "options", [("-b", "4096"), ("-t", "ext2", "-b", "4096")], ids=["extents", "block-map"]
)
def test_a_sparse_file_over_4_gib(tmp_path: Path, options: tuple[str, ...]) -> None:
    """i_size_high, and with 4 KiB blocks the triple indirect block (from 4 GiB + 4 MiB):
    the holes read as zeros without reading the disk."""
    src = tmp_path / "src"
    src.mkdir()
    data_at, size = 4 * 1024 * MIB + 64 * MIB, 4 * 1024 * MIB + 65 * MIB
    write_sparse(src / "huge", size, (data_at,))
    reader = ImageReader(make_ext(tmp_path / "huge.img", src, options, size="32M", index=False))
    fs = Ext4(reader)
    assert fs.stat("/huge").size == size
    with open(src / "huge", "rb") as f:
        f.seek(data_at)
        data = f.read(4 * KIB)
    pos, zeros = 0, bytes(64 * MIB)
    for piece in fs.read_file("/huge", 64 * MIB):
        if pos == data_at:
            assert piece[: len(data)] == data
            piece = piece[len(data) :]
            pos += len(data)
        assert piece == zeros[: len(piece)] and not pos < data_at < pos + len(piece)
        pos += len(piece)
    assert pos == size
    assert reader.bytes_read < MIB


def test_unwritten_extents_read_as_zeros(tmp_path: Path) -> None:
    """debugfs fallocates the hole at the start of a file as unwritten extents; the
    blocks under them hold old garbage, which must not be read back."""
    src = tmp_path / "src"
    src.mkdir()
    write_sparse(src / "prealloc", MIB, (MIB - 4 * KIB,))
    path = make_ext(tmp_path / "ua.img", src, ("-b", "4096"), size="16M", index=False)
    run("debugfs", "-w", "-R", "fallocate /prealloc 0 200", str(path))
    extents = run("debugfs", "-R", "ex /prealloc", str(path))
    assert "Uninit" in extents, extents
    physical = int(run("debugfs", "-R", "bmap /prealloc 0", str(path)).split()[0])
    with open(path, "r+b") as f:
        f.seek(physical * 4096)
        f.write(os.urandom(64 * KIB))
    fs = Ext4(ImageReader(path))
    assert b"".join(fs.read_file("/prealloc", 100_000)) == (src / "prealloc").read_bytes()


def test_an_inline_directory_continued_in_system_data(tmp_path: Path) -> None:
    """The kernel continues a full inline directory in the system.data attribute (mke2fs
    converts it to a block instead): debugfs adds an entry there by hand."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir/first").write_text("1")
    path = make_ext(tmp_path / "in.img", src, ("-O", "inline_data"), size="16M", index=False)
    fs = Ext4(ImageReader(path))
    target = inode_of(fs, "/dir/first")
    name = b"spilled over into the attribute"
    entry = struct.pack("<IHBB", target, 40 + len(name) // 4 * 4, len(name), 1) + name
    (tmp_path / "value").write_bytes(entry.ljust(40 + len(name) // 4 * 4, b"\0"))
    run("debugfs", "-w", "-R", f"ea_set -f {tmp_path / 'value'} /dir system.data", str(path))
    run("debugfs", "-w", "-R", f"sif /dir size {60 + 40 + len(name) // 4 * 4}", str(path))
    run("debugfs", "-w", "-R", "sif /dir/first links_count 2", str(path))
    fs = Ext4(ImageReader(path))
    assert [(e.name, e.size) for e in fs.listdir("/dir")] == [
        ("first", 1),
        (name.decode(), 1),
    ]
    assert b"".join(fs.read_file("/dir/" + name.decode())) == b"1"


def test_times_past_2038_and_their_nanoseconds(tmp_path: Path) -> None:
    """i_mtime is signed 32-bit; i_mtime_extra adds two epoch bits and nanoseconds."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "future").write_text("from 2040")
    path = make_ext(tmp_path / "t.img", src, ("-b", "4096"), size="16M", index=False)
    seconds = calendar.timegm((2040, 1, 1, 0, 0, 0))
    low = seconds - (1 << 32)  # what the signed 32 bits hold
    run("debugfs", "-w", "-R", f"sif /future mtime_extra {123456789 << 2 | 1:#x}", str(path))
    run("debugfs", "-w", "-R", f"sif /future mtime {low & 0xFFFFFFFF:#x}", str(path))
    mtime = Ext4(ImageReader(path)).stat("/future").mtime
    assert mtime == pytest.approx(seconds + 0.123456789, abs=1e-6)


def assert_errors_name_the_path(fs: Filesystem) -> None:
    """A missing path, a file walked through, a directory read, a file listed, a file
    read as a link and a relative path: each one FsError naming the path."""
    with pytest.raises(FsError, match=r"/docs/nope\.txt: no such file or directory"):
        fs.stat("/docs/nope.txt")
    with pytest.raises(FsError, match=r"/docs/readme\.txt: not a directory"):
        fs.stat("/docs/readme.txt/x")
    with pytest.raises(FsError, match="/docs: not a regular file"):
        fs.read_file("/docs")
    with pytest.raises(FsError, match=r"/empty\.dat: not a directory"):
        fs.listdir("/empty.dat")
    with pytest.raises(FsError, match=r"/empty\.dat: not a symbolic link"):
        fs.readlink("/empty.dat")
    with pytest.raises(FsError, match="must be absolute"):
        fs.stat("docs")
    root = fs.stat("/")
    assert (root.name, root.path, root.kind) == ("", "/", "dir")


def test_errors_name_the_path(tmp_path: Path, tree: Path) -> None:
    assert_errors_name_the_path(
        Ext4(ImageReader(make_ext(tmp_path / "fs.img", tree, ("-b", "4096"), index=False)))
    )


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_or_foreign_volumes_are_refused(tmp_path: Path, tree: Path) -> None:
    path = make_ext(tmp_path / "fs.img", tree, ("-b", "4096"), index=False)
    where = run("debugfs", "-R", "imap /docs/readme.txt", str(path))
    found = re.search(r"block (\d+), offset (0x[0-9a-f]+)", where)
    assert found, where
    i_block = int(found[1]) * 4096 + int(found[2], 16) + 40
    patch(path, i_block, struct.pack("<H", 0x1234))
    fs = Ext4(ImageReader(path))
    with pytest.raises(
        FsError, match=r"ext4: inode \d+ has an extent header with bad magic 0x1234"
    ):
        list(fs.read_file("/docs/readme.txt"))
    patch(path, 1024 + 0x60, struct.pack("<I", 0x1 | 0x2 | 0x40 | 0x80))
    with pytest.raises(FsError, match="compression feature"):
        Ext4(ImageReader(path))
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MIB))
    with pytest.raises(FsError, match="ext4: no superblock"):
        Ext4(ImageReader(zeros))


def test_one_file_reads_little_of_a_large_volume(tmp_path: Path) -> None:
    """A 1 MiB file out of a 256 MiB volume holding 32 MiB of other files: the superblock,
    a descriptor block, a few inode table and directory blocks, and the file."""
    src = tmp_path / "src"
    (src / "var/log").mkdir(parents=True)
    for i in range(4):
        (src / "var" / f"blob{i}.bin").write_bytes(os.urandom(8 * MIB))
    wanted = os.urandom(MIB)
    (src / "var/log/wanted.log").write_bytes(wanted)
    reader = ImageReader(
        make_ext(tmp_path / "big.img", src, ("-b", "4096"), size="256M", index=False)
    )
    fs = Ext4(reader)
    assert b"".join(fs.read_file("/var/log/wanted.log")) == wanted
    assert reader.bytes_read < 3 * MIB // 2, reader.bytes_read
