"""The FAT reader against real FAT12, FAT16 and FAT32 images made without mounting:
``mkfs.vfat -C`` makes the volume (with a label) and mtools copies a folder in (``mcopy
-s -m`` in UTC, so DOS times are the files' UTC times) and deletes from it (``mdel``,
``mdeltree``), leaving deleted entries behind.

The folder has long and unicode names (VFAT LFN entries), 8.3 names in lower case (the
NT case flags, no LFN), a 300-file directory over many clusters, and a root of 40 long
names (the fixed root region on FAT12/16, a cluster chain on FAT32). Every file reads
back byte for byte; listings match the folder; an LFN run whose checksum does not match
gives way to the 8.3 name; FAT32's active-FAT flag is followed; errors name the path."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from csbs.fs import FsError
from csbs.fs.fat import Fat, _short_name
from csbs.fs.probe import open_filesystem
from tests.unit.test_fs_ext4 import ImageReader, assert_errors_name_the_path, run, sha256

MIB = 1 << 20
#: FAT bits -> image size in KiB (FAT12 needs fewer than 4085 clusters).
SIZES = {12: 8000, 16: 16000, 32: 40000}
LONG_NAME = "a long file name that needs several LFN entries, " * 3 + "end.txt"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fat-src")
    (root / "docs/deep/er").mkdir(parents=True)
    (root / "docs/deep/er/big.bin").write_bytes(os.urandom(3 * MIB // 2 + 123))
    (root / "docs/readme.txt").write_text("restore me\n" * 50)
    (root / "empty.dat").write_bytes(b"")
    (root / "many").mkdir()
    for i in range(300):
        (root / "many" / f"file number {i:03} with a long name é.txt").write_text(str(i))
    for i in range(40):
        (root / f"root file {i:02} with a long name.txt").write_text(str(i) * i)
    (root / "Ünïcødé ✓ 日本語.txt").write_text("unicode\n")
    (root / LONG_NAME).write_text("long\n")
    (root / "lower.txt").write_text("8.3 in lower case\n")  # NT case flags, no LFN
    (root / "UPPER.TXT").write_text("8.3 as it is\n")
    (root / "Mixed.Txt").write_text("mixed case needs an LFN\n")
    return root


def mtools(*args: str) -> None:
    """An mtools command in UTC (DOS times are local times)."""
    env = {**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args}: {done.stderr}"


def make_fat(path: Path, tree: Path, bits: int, kib: int | None = None) -> Path:
    """A FAT image of ``tree``, plus a file and a folder copied in and deleted again."""
    run("mkfs.vfat", "-F", str(bits), "-n", "CSBS VOL", "-C", str(path), str(kib or SIZES[bits]))
    image = str(path)
    mtools("mcopy", "-s", "-m", "-i", image, *[str(p) for p in sorted(tree.iterdir())], "::")
    scratch = path.parent / f"{path.name}-scratch"
    (scratch / "gone").mkdir(parents=True, exist_ok=True)
    (scratch / "gone/inside.txt").write_text("deleted\n")
    (scratch / "deleted file with a long name.txt").write_text("deleted\n")
    mtools("mcopy", "-s", "-i", image, *[str(p) for p in scratch.iterdir()], "::")
    mtools("mdel", "-i", image, "::/deleted file with a long name.txt")
    mtools("mdeltree", "-i", image, "::/gone")
    return path


@pytest.fixture(scope="module", params=sorted(SIZES))
def image(
    request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    bits: int = request.param
    return make_fat(tmp_path_factory.mktemp("fat-img") / f"fat{bits}.img", tree, bits)


def assert_same(fs: Fat, src: Path, path: str) -> None:
    """The listing of ``path`` is the folder ``src``: names, kinds, sizes, times and
    bytes; and ``stat`` agrees with the listing."""
    listed = {e.name: e for e in fs.listdir(path)}
    assert [e.name for e in fs.listdir(path)] == sorted(listed)
    assert set(listed) == {d.name for d in os.scandir(src)}
    for d in os.scandir(src):
        entry = listed[d.name]
        assert fs.stat(entry.path) == entry and entry.mode is None
        if d.is_dir():
            assert (entry.kind, entry.size) == ("dir", 0)
            assert_same(fs, Path(d.path), entry.path)
            continue
        st = d.stat()
        assert (entry.kind, entry.size) == ("file", st.st_size)
        assert entry.mtime is not None and 0 <= st.st_mtime - entry.mtime < 2  # DOS: 2 s
        assert sha256(fs.read_file(entry.path, 100_000)) == sha256([Path(d.path).read_bytes()])


def test_every_fat_type_reads_back_the_folder(image: Path, tree: Path) -> None:
    fs = open_filesystem(ImageReader(image), image.stat().st_size)
    assert isinstance(fs, Fat) and fs.type_name == "fat"
    assert fs.bits == int(image.stem[3:])
    assert_same(fs, tree, "/")
    # Names match case-insensitively, as on Windows; the listing keeps the stored case.
    assert fs.stat("/DOCS/README.TXT").path == "/docs/readme.txt"
    assert fs.stat("/mixed.txt").name == "Mixed.Txt"


def test_the_images_hold_the_structures_under_test(image: Path) -> None:
    """A 300-entry directory and the FAT32 root span several clusters; lower.txt is a
    lone 8.3 entry with case flags; the deleted entries and the label are on disk."""
    fs = Fat(ImageReader(image))
    many = fs._lookup("/many")[1]
    assert many is not None and len(list(fs._chain(many))) > 1
    if fs.bits == 32:
        assert len(list(fs._chain(fs.root_cluster))) > 1
    slots = list(fs._slots(None if fs.bits != 32 else fs.root_cluster))
    assert any(s[:11] == b"LOWER   TXT" and s[12] == 0x18 for s in slots)
    assert any(s[0] == 0xE5 for s in slots)
    assert any(s[:11] == b"CSBS VOL   " and s[11] == 0x08 for s in slots)


def lfn_slot_offset(image: Path, name: str) -> int:
    """Where the LFN entry holding the first 5 characters of ``name`` is in the image."""
    data = image.read_bytes()
    at = data.find(name[:5].encode("utf-16-le")) - 1
    assert at >= 0 and data[at] & 0x1F == 1 and data[at + 11] == 0x0F
    return at


def test_a_long_name_with_a_wrong_checksum_gives_way_to_the_8_3_name(
    tmp_path: Path, tree: Path
) -> None:
    """An LFN run whose checksum does not match its short entry is an orphan (left by a
    system unaware of long names): the 8.3 name is used."""
    path = make_fat(tmp_path / "fat16.img", tree, 16)
    at = lfn_slot_offset(path, "Mixed.Txt")
    with open(path, "r+b") as f:
        f.seek(at + 13)
        checksum = f.read(1)[0]
        f.seek(at + 13)
        f.write(bytes([checksum ^ 0xFF]))
    fs = Fat(ImageReader(path))
    names = {e.name for e in fs.listdir("/")}
    assert "Mixed.Txt" not in names and "MIXED.TXT" in names
    assert b"".join(fs.read_file("/MIXED.TXT")) == (tree / "Mixed.Txt").read_bytes()


def test_fat32_follows_the_active_fat_when_mirroring_is_off(tmp_path: Path, tree: Path) -> None:
    path = make_fat(tmp_path / "fat32.img", tree, 32)
    boot = path.read_bytes()[:512]
    bps, _, reserved = struct.unpack_from("<HBH", boot, 11)
    (fat_sectors,) = struct.unpack_from("<I", boot, 36)
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(struct.pack("<H", 0x80 | 1))  # mirroring off, FAT 1 active
        f.seek(reserved * bps + 8)  # FAT 0 beyond its two reserved entries
        f.write(b"\xff" * (fat_sectors * bps - 8))
    fs = Fat(ImageReader(path))
    assert_same(fs, tree, "/")


def test_errors_name_the_path(image: Path) -> None:
    assert_errors_name_the_path(Fat(ImageReader(image)))


def test_damaged_or_foreign_volumes_are_refused(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MIB))
    with pytest.raises(FsError, match="fat: no boot sector signature"):
        Fat(ImageReader(zeros))
    path = tmp_path / "fat.img"
    run("mkfs.vfat", "-F", "16", "-C", str(path), "16000")
    with open(path, "r+b") as f:
        f.seek(11)
        f.write(struct.pack("<H", 500))  # bytes per sector
    with pytest.raises(FsError, match="fat: the BPB is not valid"):
        Fat(ImageReader(path))


def test_a_short_name_starting_with_0xe5_is_kept() -> None:
    """0xE5 marks a deleted entry, so a name starting with it is stored with 0x05."""
    slot = b"\x05BC     TXT" + bytes(21)
    assert _short_name(slot) == "σBC.TXT"


def test_one_file_reads_little_of_a_large_volume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "var/log").mkdir(parents=True)
    for i in range(3):
        (src / "var" / f"blob{i}.bin").write_bytes(os.urandom(8 * MIB))
    wanted = os.urandom(MIB)
    (src / "var/log/wanted.log").write_bytes(wanted)
    path = tmp_path / "big.img"
    run("mkfs.vfat", "-F", "32", "-C", str(path), str(128 * 1024))
    mtools("mcopy", "-s", "-i", str(path), str(src / "var"), "::")
    reader = ImageReader(path)
    assert b"".join(Fat(reader).read_file("/var/log/wanted.log")) == wanted
    assert reader.bytes_read < 3 * MIB // 2, reader.bytes_read
