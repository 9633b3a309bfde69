"""Partition tables and volume detection against disks made by ``sfdisk`` on image files,
with filesystems built apart (``mkfs.ext4 -d``, ``mkfs.vfat`` + ``mcopy``) and spliced in
at their partitions' offsets: MBR with primaries, an extended partition and logical ones,
GPT (with a gap in its slots, names and type GUIDs, and rewritten for 4096-byte sectors),
disks without a table, and damaged tables. What ``partitions`` finds is what ``sfdisk
--json`` says; ``volumes`` and ``open_filesystem`` find the filesystems in them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

from csbs.fs import FsError, Reader
from csbs.fs.partitions import Partition, partitions, sub_reader
from csbs.fs.probe import open_filesystem, volumes
from tests.unit.test_fs_ext4 import ImageReader, run

MIB = 1 << 20
SECTOR = 512
EXTENDED = {"5", "f", "85"}

MBR_SCRIPT = """label: dos
start=2048, size=16384, type=c
start=18432, size=8192, type=83, bootable
start=26624, type=f
start=28672, size=8192, type=82
start=38912, size=40960, type=83
"""
GPT_SCRIPT = """label: gpt
{disk}1 : start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System"
{disk}3 : start=18432, size=40960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root ✓"
"""


@pytest.fixture(scope="module")
def filesystems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An 8 MiB FAT16 and a 20 MiB ext4 image, each of a small folder."""
    root = tmp_path_factory.mktemp("part-src")
    (root / "hello.txt").write_text("hello\n")
    (root / "sub").mkdir()
    (root / "sub/data.bin").write_bytes(os.urandom(100_000))
    ext = root.parent / "ext.img"
    run("mkfs.ext4", "-q", "-F", "-d", str(root), str(ext), "20M")
    fat = root.parent / "fat.img"
    run("mkfs.vfat", "-F", "16", "-s", "1", "-C", str(fat), str(8 * 1024))
    run("mcopy", "-s", "-i", str(fat), str(root / "hello.txt"), str(root / "sub"), "::")
    return {"ext4": ext.read_bytes(), "fat": fat.read_bytes()}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64 MiB disk with each table, made once (sfdisk waits a quarter second for udev)."""
    made = {}
    for label, script in (("dos", MBR_SCRIPT), ("gpt", GPT_SCRIPT)):
        path = tmp_path_factory.mktemp("tables") / f"{label}.img"
        with open(path, "wb") as f:
            f.truncate(64 * MIB)
        sfdisk = ["sfdisk", "-q", str(path)]
        subprocess.run(
            sfdisk, input=script.format(disk=path), text=True, check=True, capture_output=True
        )
        made[label] = path
    return made


def make_disk(path: Path, template: Path) -> Path:
    run("cp", "--sparse=always", str(template), str(path))
    return path


def sfdisk_partitions(path: Path) -> list[Partition]:
    """What sfdisk says the partitions are, as ``Partition``s (the extended one left out,
    as it holds no filesystem)."""
    table = json.loads(run("sfdisk", "-J", str(path)))["partitiontable"]
    found = []
    for p in table["partitions"]:
        if table["label"] == "dos" and p["type"] in EXTENDED:
            continue
        gpt = table["label"] == "gpt"
        found.append(
            Partition(
                number=int(p["node"].rsplit(".img", 1)[1]),
                start=p["start"] * SECTOR,
                size=p["size"] * SECTOR,
                type=p["type"].lower() if gpt else f"0x{int(p['type'], 16):02x}",
                name=p.get("name", ""),
            )
        )
    return found


def splice(disk: Path, start: int, image: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(start)
        f.write(image)


def opened(disk: Path) -> dict[str, str]:
    """Each volume of a disk and what opening it gives: the filesystem type and its root
    listing, or the error."""
    reader = ImageReader(disk)
    found = {}
    for name, read, size in volumes(reader, reader.size):
        try:
            fs = open_filesystem(read, size)
        except FsError as exc:
            found[name] = str(exc)
            continue
        listing = sorted(e.name for e in fs.listdir("/") if e.name != "lost+found")
        found[name] = f"{fs.type_name}: {' '.join(listing)}"
    return found


def test_mbr_primaries_and_logical_partitions(
    tmp_path: Path, templates: dict[str, Path], filesystems: dict[str, bytes]
) -> None:
    disk = make_disk(tmp_path / "mbr.img", templates["dos"])
    reader = ImageReader(disk)
    found = partitions(reader, reader.size)
    assert found == sfdisk_partitions(disk)
    assert [(p.number, p.type) for p in found] == [
        (1, "0x0c"),
        (2, "0x83"),
        (5, "0x82"),
        (6, "0x83"),
    ]
    splice(disk, found[0].start, filesystems["fat"])
    splice(disk, found[3].start, filesystems["ext4"])
    volumes_found = opened(disk)
    assert volumes_found["1"] == "fat: hello.txt sub"
    assert volumes_found["6"] == "ext4: hello.txt sub"
    assert "no ext4, xfs, NTFS or FAT filesystem found" in volumes_found["2"]
    assert "are zeros" in volumes_found["5"]


def test_gpt_names_types_and_slot_numbers(
    tmp_path: Path, templates: dict[str, Path], filesystems: dict[str, bytes]
) -> None:
    disk = make_disk(tmp_path / "gpt.img", templates["gpt"])
    reader = ImageReader(disk)
    found = partitions(reader, reader.size)
    assert found == sfdisk_partitions(disk)
    assert [(p.number, p.name) for p in found] == [(1, "EFI System"), (3, "root ✓")]
    assert found[0].type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    splice(disk, found[0].start, filesystems["fat"])
    splice(disk, found[1].start, filesystems["ext4"])
    assert opened(disk) == {"1": "fat: hello.txt sub", "3": "ext4: hello.txt sub"}


def to_4k_sectors(disk: Path) -> None:
    """Rewrite a 512-byte-sector GPT as a 4Kn disk's: header at byte 4096, entries at
    LBA 2, every LBA divided by 8, CRCs made again."""
    with open(disk, "rb") as f:
        head = f.read(MIB)
    header = bytearray(head[SECTOR : 2 * SECTOR])
    (size,) = struct.unpack_from("<I", header, 12)
    count, entry_size = struct.unpack_from("<II", header, 80)
    entries = bytearray(head[2 * SECTOR : 2 * SECTOR + count * entry_size])
    for at in range(0, len(entries), entry_size):
        first, last = struct.unpack_from("<QQ", entries, at + 32)
        if first:
            struct.pack_into("<QQ", entries, at + 32, first // 8, (last + 1) // 8 - 1)
    _, alt_lba, _, last_usable = struct.unpack_from("<QQQQ", header, 24)
    first_usable = 2 + len(entries) // 4096  # after the MBR, the header and the entries
    struct.pack_into("<QQQQ", header, 24, 1, alt_lba // 8, first_usable, last_usable // 8)
    struct.pack_into("<QI", header, 72, 2, count)
    struct.pack_into("<I", header, 88, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(header[:size]))
    splice(disk, SECTOR, bytes(2 * 4096 + len(entries) - SECTOR))
    splice(disk, 4096, bytes(header))
    splice(disk, 2 * 4096, bytes(entries))


def test_gpt_on_a_disk_of_4096_byte_sectors(
    tmp_path: Path, templates: dict[str, Path], filesystems: dict[str, bytes]
) -> None:
    disk = make_disk(tmp_path / "gpt4k.img", templates["gpt"])
    expected = sfdisk_partitions(disk)
    to_4k_sectors(disk)
    reader = ImageReader(disk)
    assert partitions(reader, reader.size) == expected
    splice(disk, expected[1].start, filesystems["ext4"])
    assert opened(disk)["3"] == "ext4: hello.txt sub"


@pytest.mark.parametrize(
    ("offset", "damage", "error"),
    [
        (SECTOR + 40, b"\xff", "gpt: the header's CRC32 does not match"),
        (2 * SECTOR + 60, b"\xff", "gpt: the partition entries' CRC32 does not match"),
        (SECTOR, bytes(8), "gpt: the protective MBR points at no GPT header"),
    ],
    ids=["header", "entries", "no-header"],
)
def test_a_damaged_gpt_is_refused(
    tmp_path: Path, templates: dict[str, Path], offset: int, damage: bytes, error: str
) -> None:
    disk = make_disk(tmp_path / "gpt.img", templates["gpt"])
    splice(disk, offset, damage)
    reader = ImageReader(disk)
    with pytest.raises(FsError, match=error):
        partitions(reader, reader.size)


def test_a_looping_chain_of_ebrs_is_refused(tmp_path: Path, templates: dict[str, Path]) -> None:
    disk = make_disk(tmp_path / "mbr.img", templates["dos"])
    last_ebr = 38912 - 2048  # the EBR of partition 6 sits 2048 sectors before it
    link = struct.pack("<B3xB3xII", 0, 0x05, 0, 1)  # back to the first EBR
    splice(disk, last_ebr * SECTOR + 446 + 16, link)
    reader = ImageReader(disk)
    with pytest.raises(FsError, match="mbr: the chain of EBRs from sector 26624 loops"):
        partitions(reader, reader.size)


def test_volumes_without_a_partition_table(tmp_path: Path, filesystems: dict[str, bytes]) -> None:
    """A filesystem straight on the disk: its boot sector also ends in 55 AA (FAT), or
    the disk starts with zeros (ext4); nothing at all is "whole" with no filesystem."""
    for name, image in filesystems.items():
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(image)
        reader = ImageReader(disk)
        assert partitions(reader, reader.size) == []
        assert opened(disk) == {"whole": f"{name}: hello.txt sub"}
    empty = tmp_path / "empty.img"
    empty.write_bytes(bytes(MIB))
    message = opened(empty)["whole"]
    assert message.startswith("no ext4, xfs, NTFS or FAT filesystem found") and "zeros" in message


def test_a_whole_disk_ntfs_boot_sector_is_no_partition_table(tmp_path: Path) -> None:
    disk = tmp_path / "ntfs.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
    run("mkntfs", "-F", "-Q", "-q", str(disk))
    reader = ImageReader(disk)
    assert partitions(reader, reader.size) == []


def fake_reader_module(monkeypatch: pytest.MonkeyPatch, module: str, cls: str) -> None:
    """Stand in for a reader module that probe imports lazily."""

    class Stub:
        type_name = f"stub-{cls}"

        def __init__(self, read: Reader) -> None:
            self.read = read

    fake = types.ModuleType(module)
    setattr(fake, cls, Stub)
    monkeypatch.setitem(sys.modules, module, fake)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"XFSB" + bytes(508), "stub-Xfs"),
        (b"\xebR\x90NTFS    " + bytes(499) + b"\x55\xaa", "stub-Ntfs"),
    ],
    ids=["xfs", "ntfs"],
)
def test_xfs_and_ntfs_are_handed_to_their_readers(
    monkeypatch: pytest.MonkeyPatch, head: bytes, expected: str
) -> None:
    fake_reader_module(monkeypatch, "csbs.fs.xfs", "Xfs")
    fake_reader_module(monkeypatch, "csbs.fs.ntfs", "Ntfs")
    volume = head.ljust(MIB, b"\0")
    fs = open_filesystem(lambda offset, length: volume[offset : offset + length], len(volume))
    assert fs.type_name == expected


@pytest.mark.parametrize(
    ("offset", "signature", "what"),
    [
        (0, b"LUKS\xba\xbe", "LUKS"),
        (536, b"LVM2 001", "LVM physical volume"),
        (3, b"EXFAT   ", "exFAT"),
        (4086, b"SWAPSPACE2", "Linux swap"),
        (65600, b"_BHRfS_M", "btrfs"),
    ],
)
def test_what_is_not_read_is_named(offset: int, signature: bytes, what: str) -> None:
    volume = bytearray(MIB)
    volume[offset : offset + len(signature)] = signature
    with pytest.raises(FsError, match=f"no ext4, xfs, NTFS or FAT filesystem found .*{what}"):
        open_filesystem(lambda o, n: bytes(volume[o : o + n]), len(volume))


def test_sub_reader_stays_inside_its_partition() -> None:
    disk = bytes(range(256)) * 16

    def read(offset: int, length: int) -> bytes:
        return disk[offset : offset + length]

    part = sub_reader(read, 1000, 100)
    assert part(0, 4) == disk[1000:1004]
    assert part(90, 50) == disk[1090:1100]
    assert part(100, 10) == part(-1, 10) == part(5, 0) == b""
