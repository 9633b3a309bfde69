"""Partition tables: MBR (with extended and logical partitions) and GPT.

A disk with a protective MBR (type 0xEE) is read as GPT; its primary header and entry
array are checked against their CRC32s. Partitions are numbered as Linux names them:
MBR primaries 1-4, logical partitions from 5; GPT entries by their slot, from 1.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from csbs.fs import FsError, Reader

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
EXTENDED_TYPES = {0x05, 0x0F, 0x85}
PROTECTIVE = 0xEE
GPT_MAGIC = b"EFI PART"
#: The most logical partitions followed in a chain of EBRs (a loop guard).
MAX_LOGICAL = 128


@dataclass(frozen=True)
class Partition:
    number: int
    start: int
    size: int
    #: "0x83" for an MBR type; the type GUID for GPT.
    type: str
    name: str = ""


def sub_reader(read: Reader, start: int, size: int) -> Reader:
    """A reader of ``size`` bytes from ``start`` of ``read``, clamped to its end."""

    def part(offset: int, length: int) -> bytes:
        if offset < 0 or offset >= size or length <= 0:
            return b""
        return read(start + offset, min(length, size - offset))

    return part


def _entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sector count) of the 4 slots of an MBR or EBR; empty ones left out."""
    out = []
    for i in range(4):
        raw = sector[446 + 16 * i : 462 + 16 * i]
        ptype = raw[4]
        lba, count = struct.unpack_from("<II", raw, 8)
        if ptype and count:
            out.append((ptype, lba, count))
    return out


def partitions(read: Reader, disk_size: int) -> list[Partition]:
    """The partitions of a disk, or [] when it has no partition table."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != MBR_SIGNATURE:
        return []
    slots = _entries(mbr)
    if not slots or not _plausible(slots, disk_size):
        # A filesystem's boot sector (FAT, NTFS) also ends in 55 AA: no table then.
        return []
    if any(ptype == PROTECTIVE for ptype, _, _ in slots):
        return _gpt(read, disk_size)
    found: list[Partition] = []
    for i, raw in enumerate(mbr[446:510][n : n + 16] for n in range(0, 64, 16)):
        ptype = raw[4]
        lba, count = struct.unpack_from("<II", raw, 8)
        if not ptype or not count:
            continue
        if ptype in EXTENDED_TYPES:
            found += _logical(read, lba, disk_size)
        else:
            found.append(Partition(i + 1, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
    return found


def _plausible(slots: list[tuple[int, int, int]], disk_size: int) -> bool:
    """Whether MBR slots describe partitions inside the disk (boot code of a filesystem
    does not: its bytes at 446..510 are code or zeros)."""
    sectors = disk_size // SECTOR
    for ptype, lba, count in slots:
        if ptype == PROTECTIVE:
            continue
        if lba == 0 or lba + count > sectors + 1:
            return False
    return True


def _logical(read: Reader, extended: int, disk_size: int) -> list[Partition]:
    """Logical partitions: a chain of EBRs, each holding one partition (relative to it)
    and a link to the next (relative to the extended partition)."""
    found: list[Partition] = []
    ebr_lba = extended
    for number in range(5, 5 + MAX_LOGICAL):
        sector = read(ebr_lba * SECTOR, SECTOR)
        if len(sector) < SECTOR or sector[510:512] != MBR_SIGNATURE:
            break
        slots = _entries(sector)
        if not slots:
            break
        ptype, lba, count = slots[0]
        start = (ebr_lba + lba) * SECTOR
        if start + count * SECTOR > disk_size:
            raise FsError(f"mbr: logical partition {number} ends past the disk")
        found.append(Partition(number, start, count * SECTOR, f"0x{ptype:02x}"))
        links = [s for s in slots[1:] if s[0] in EXTENDED_TYPES]
        if not links:
            break
        ebr_lba = extended + links[0][1]
    return found


def _gpt(read: Reader, disk_size: int) -> list[Partition]:
    header = read(SECTOR, SECTOR)
    if header[:8] != GPT_MAGIC:
        raise FsError("gpt: the protective MBR points at no GPT header (bad signature at LBA 1)")
    (size,) = struct.unpack_from("<I", header, 12)
    if not 92 <= size <= SECTOR:
        raise FsError(f"gpt: header size {size} is not valid")
    (crc,) = struct.unpack_from("<I", header, 16)
    check = header[:16] + b"\0\0\0\0" + header[20:size]
    if zlib.crc32(check) & 0xFFFFFFFF != crc:
        raise FsError("gpt: the header's CRC32 does not match (damaged partition table)")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if entry_size < 128 or count > 4096:
        raise FsError(f"gpt: {count} entries of {entry_size} bytes is not valid")
    table = read(entries_lba * SECTOR, count * entry_size)
    if zlib.crc32(table) & 0xFFFFFFFF != entries_crc:
        raise FsError("gpt: the partition entries' CRC32 does not match (damaged table)")
    found = []
    for i in range(count):
        raw = table[i * entry_size : (i + 1) * entry_size]
        type_guid = raw[:16]
        if type_guid == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        if last < first or (last + 1) * SECTOR > disk_size:
            raise FsError(f"gpt: partition {i + 1} ends past the disk")
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        found.append(
            Partition(
                i + 1,
                first * SECTOR,
                (last - first + 1) * SECTOR,
                str(uuid.UUID(bytes_le=type_guid)),
                name,
            )
        )
    return found
