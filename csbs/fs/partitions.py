"""Partition tables: MBR (with extended and logical partitions) and GPT.

Written from the MBR layout (four 16-byte slots at byte 446, signature 55 AA) and the
UEFI specification's GPT (header at LBA 1, entry array, CRC32s). A protective MBR (a slot
of type 0xEE) means the disk is GPT: its primary header and entry array are checked
against their CRC32s and a damaged table is refused rather than guessed at. GPT is looked
for with 512-byte sectors, then 4096-byte ones (4Kn disks); MBR sectors are 512 bytes.

Partitions are numbered as Linux names them: MBR primaries 1-4 by slot, logical
partitions from 5 in the order of their EBR chain; GPT entries by their slot, from 1.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from csbs.fs import FsError, Reader

SECTOR = 512
#: Logical sector sizes a GPT header is looked for with (512e/512n first, then 4Kn).
GPT_SECTORS = (512, 4096)
MBR_SIGNATURE = b"\x55\xaa"
SLOTS_AT = 446
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE = 0xEE
BOOT_FLAGS = frozenset({0x00, 0x80})
GPT_MAGIC = b"EFI PART"
GPT_HEADER_MIN = 92
GPT_ENTRY_MIN = 128
#: More GPT entries than any tool writes (128 is the norm): a damaged count.
GPT_MAX_ENTRIES = 16384
#: The most logical partitions followed in a chain of EBRs (a loop guard).
MAX_LOGICAL = 256
#: Boot sectors of filesystems on an unpartitioned disk also end in 55 AA.
FS_BOOT_IDS = (b"NTFS    ", b"EXFAT   ")


@dataclass(frozen=True)
class Partition:
    """One partition: where it is on the disk (in bytes) and what its table calls it."""

    number: int
    start: int
    size: int
    #: "0x83" for an MBR type; the type GUID (lower case) for GPT.
    type: str
    #: The GPT partition name; "" for MBR.
    name: str = ""


@dataclass(frozen=True)
class _Slot:
    """One 16-byte MBR/EBR slot: boot flag, type, first sector, sector count."""

    index: int
    boot: int
    type: int
    lba: int
    count: int


def sub_reader(read: Reader, start: int, size: int) -> Reader:
    """A reader of ``size`` bytes from ``start`` of ``read``: offsets are relative to
    ``start`` and reads stop at ``size``, so a filesystem never reads its neighbour."""

    def part(offset: int, length: int) -> bytes:
        if offset < 0 or offset >= size or length <= 0:
            return b""
        return read(start + offset, min(length, size - offset))

    return part


def partitions(read: Reader, disk_size: int) -> list[Partition]:
    """The partitions of a disk, or [] when it has no partition table (a filesystem
    straight on the disk, or nothing). FsError when the table is damaged."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE or mbr[3:11] in FS_BOOT_IDS:
        return []
    slots = list(_slots(mbr))
    if not slots or not _plausible(slots, disk_size):
        return []
    if any(slot.type == PROTECTIVE for slot in slots):
        return _gpt(read, disk_size)
    found: list[Partition] = []
    for slot in slots:
        if slot.type in EXTENDED_TYPES:
            found += _logical(read, slot.lba, disk_size)
        else:
            found.append(_mbr_partition(slot.index + 1, slot.lba, slot, disk_size))
    return found


def _slots(sector: bytes) -> Iterator[_Slot]:
    """The used slots of an MBR or EBR (type and sector count both non-zero)."""
    for index in range(4):
        boot, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, SLOTS_AT + 16 * index)
        if ptype and count:
            yield _Slot(index, boot, ptype, lba, count)


def _plausible(slots: list[_Slot], disk_size: int) -> bool:
    """Whether the slots are a partition table rather than boot code that happens to end
    in 55 AA: valid boot flags, and partitions that start on the disk past sector 0."""
    sectors = disk_size // SECTOR
    for slot in slots:
        if slot.boot not in BOOT_FLAGS:
            return False
        if slot.type != PROTECTIVE and not 0 < slot.lba < sectors:
            return False
    return True


def _mbr_partition(number: int, lba: int, slot: _Slot, disk_size: int) -> Partition:
    start, size = lba * SECTOR, slot.count * SECTOR
    if start + size > disk_size:
        raise FsError(
            f"mbr: partition {number} ({size} bytes at {start}) ends past the disk "
            f"({disk_size} bytes)"
        )
    return Partition(number, start, size, f"0x{slot.type:02x}")


def _logical(read: Reader, extended: int, disk_size: int) -> list[Partition]:
    """Logical partitions: a chain of EBRs from the extended partition's first sector.
    An EBR's data slot is relative to the EBR itself; its link to the next EBR is
    relative to the extended partition. Numbers go up by one per data slot found."""
    found: list[Partition] = []
    ebr = extended
    visited: set[int] = set()
    while ebr not in visited and len(visited) < MAX_LOGICAL:
        visited.add(ebr)
        sector = read(ebr * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
            if ebr == extended:
                return found  # an extended partition with no logical ones yet
            raise FsError(f"mbr: the EBR at sector {ebr} has no 55 AA signature")
        slots = list(_slots(sector))
        for slot in slots:
            if slot.type not in EXTENDED_TYPES:
                found.append(_mbr_partition(5 + len(found), ebr + slot.lba, slot, disk_size))
        links = [slot for slot in slots if slot.type in EXTENDED_TYPES]
        if not links:
            return found
        ebr = extended + links[0].lba
    raise FsError(f"mbr: the chain of EBRs from sector {extended} loops")


def _gpt(read: Reader, disk_size: int) -> list[Partition]:
    for sector in GPT_SECTORS:
        header = read(sector, sector)
        if header[:8] == GPT_MAGIC:
            return _gpt_entries(read, header, sector, disk_size)
    raise FsError("gpt: the protective MBR points at no GPT header (no 'EFI PART' at LBA 1)")


def _gpt_entries(read: Reader, header: bytes, sector: int, disk_size: int) -> list[Partition]:
    """The used entries of a GPT whose header and entry array check out."""
    (size,) = struct.unpack_from("<I", header, 12)
    if not GPT_HEADER_MIN <= size <= sector:
        raise FsError(f"gpt: header size {size} is not valid")
    (crc,) = struct.unpack_from("<I", header, 16)
    if zlib.crc32(header[:16] + bytes(4) + header[20:size]) != crc:
        raise FsError("gpt: the header's CRC32 does not match (damaged partition table)")
    first_usable, last_usable = struct.unpack_from("<QQ", header, 40)
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < GPT_ENTRY_MIN or entry_size % 8 or count > GPT_MAX_ENTRIES:
        raise FsError(f"gpt: {count} entries of {entry_size} bytes is not valid")
    table = read(entries_lba * sector, count * entry_size)
    if zlib.crc32(table) != entries_crc:
        raise FsError("gpt: the partition entries' CRC32 does not match (damaged table)")
    disk_sectors = disk_size // sector
    found = []
    for i in range(count):
        raw = table[i * entry_size : (i + 1) * entry_size]
        if raw[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        if last < first or first < first_usable or last > min(last_usable, disk_sectors - 1):
            raise FsError(
                f"gpt: partition {i + 1} (sectors {first}-{last}) is outside the usable "
                f"sectors {first_usable}-{last_usable} of the disk"
            )
        found.append(
            Partition(
                number=i + 1,
                start=first * sector,
                size=(last - first + 1) * sector,
                type=str(uuid.UUID(bytes_le=raw[:16])),
                name=raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0],
            )
        )
    return found
