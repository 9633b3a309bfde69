"""A read-only FAT12/FAT16/FAT32 reader.

Written from Microsoft's FAT specification ("FAT: General Overview of On-Disk Format").
The boot sector's BPB gives the geometry: reserved sectors, the FATs, the fixed root
directory region (FAT12/16 only) and the data region of clusters. A volume whose BPB has
no 16-bit FAT size is FAT32; otherwise the cluster count tells FAT12 (under 4085) from
FAT16, as the specification says and Linux does (the type label is not trusted).

Directories are the fixed root region or cluster chains, read until their end marker.
Long names (VFAT LFN entries: a complete, ordered run whose checksum matches the short
entry after it) are preferred; otherwise the 8.3 name, lower-cased as the NT case flags
say. Deleted entries, volume labels and ``.``/``..`` are skipped. Names match
case-insensitively, as on Windows. Times are the DOS modification date and time, read as
UTC (FAT keeps local time without a zone). FAT keeps no permissions: ``mode`` is None.

Only what is needed is read: the boot sector, the FAT sectors of the chains followed
(cached), the directories walked and the files' own clusters.
"""

from __future__ import annotations

import calendar
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from csbs.fs import Entry, FsError, Reader, join_path, split_path

BOOT_SIGNATURE = b"\x55\xaa"
SECTOR_SIZES = (512, 1024, 2048, 4096)
SLOT = 32
ATTR_VOLUME, ATTR_DIR, ATTR_LFN = 0x08, 0x10, 0x0F
#: The attribute bits an LFN entry is recognised by (the top two are reserved).
ATTR_LFN_MASK = 0x3F
DELETED, END_OF_DIR, KANJI_E5 = 0xE5, 0x00, 0x05
LFN_LAST, LFN_ORDER = 0x40, 0x1F
#: NT case flags in byte 12 of a short entry: the base or the extension is lower case.
CASE_BASE, CASE_EXT = 0x08, 0x10
#: Fewer clusters than these make FAT12, then FAT16 (the specification's boundaries).
FAT12_LIMIT, FAT16_LIMIT = 4085, 65525
#: Chain values from which a FAT entry means "end of chain", and the "bad cluster" mark.
END = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}
BAD = {12: 0xFF7, 16: 0xFFF7, 32: 0x0FFFFFF7}
FIRST_CLUSTER = 2
#: FAT32 BPB_ExtFlags: mirroring off, and then bits 0-3 name the one active FAT.
EXT_NO_MIRROR, EXT_ACTIVE = 0x80, 0x0F
FAT_CACHE = 256
DIRECTORY_CACHE = 16


@dataclass(frozen=True)
class Record:
    """One live directory entry, before it is given a path."""

    name: str
    is_dir: bool
    cluster: int
    size: int
    mtime: float | None


class Fat:
    """A FAT12, FAT16 or FAT32 filesystem on a volume."""

    type_name = "fat"

    def __init__(self, read: Reader) -> None:
        self._read = read
        self._parse_boot(read(0, 512))
        self._fat_sector = lru_cache(maxsize=FAT_CACHE)(self._load_fat_sector)
        self._listing = lru_cache(maxsize=DIRECTORY_CACHE)(self._load_listing)

    def _parse_boot(self, boot: bytes) -> None:
        if len(boot) < 512 or boot[510:512] != BOOT_SIGNATURE:
            raise FsError("fat: no boot sector signature (55 AA at byte 510)")
        bps, spc, reserved, fats, root_entries, total16, _, fat16 = struct.unpack_from(
            "<HBHBHHBH", boot, 11
        )
        total32, fat32, ext_flags = struct.unpack_from("<IIH", boot, 32)
        if bps not in SECTOR_SIZES or not spc or spc & (spc - 1) or not reserved or not fats:
            raise FsError(
                f"fat: the BPB is not valid ({bps} bytes per sector, {spc} sectors per "
                f"cluster, {reserved} reserved sectors, {fats} FATs)"
            )
        self.bits = 32 if fat16 == 0 else 0
        fat_sectors, total = fat16 or fat32, total16 or total32
        root_sectors = (root_entries * SLOT + bps - 1) // bps
        data_sector = reserved + fats * fat_sectors + root_sectors
        if not fat_sectors or total <= data_sector or (self.bits == 32) == bool(root_entries):
            raise FsError(
                f"fat: the BPB is not valid ({total} sectors, {fat_sectors} per FAT, "
                f"{root_entries} root entries)"
            )
        self.sector, self.cluster = int(bps), int(bps * spc)
        self.clusters = (total - data_sector) // spc
        if self.bits != 32:
            self.bits = 12 if self.clusters < FAT12_LIMIT else 16
        if fat_sectors * bps * 8 // self.bits < self.clusters + FIRST_CLUSTER:
            raise FsError(
                f"fat: a FAT of {fat_sectors} sectors cannot map {self.clusters} clusters"
            )
        active = ext_flags & EXT_ACTIVE if self.bits == 32 and ext_flags & EXT_NO_MIRROR else 0
        if active >= fats:
            raise FsError(f"fat: the active FAT {active} is not one of the {fats}")
        self.fat_start = (reserved + active * fat_sectors) * bps
        self.root_start = (reserved + fats * fat_sectors) * bps
        self.root_size = root_sectors * bps
        self.data_start = int(data_sector * bps)
        self.root_cluster = struct.unpack_from("<I", boot, 44)[0] if self.bits == 32 else 0
        if self.bits == 32:
            self._check_cluster(self.root_cluster, "the root directory")

    # -- the FAT and cluster chains -------------------------------------------------------
    def _load_fat_sector(self, index: int) -> bytes:
        data = self._read(self.fat_start + index * self.sector, self.sector)
        if len(data) < self.sector:
            raise FsError(f"fat: FAT sector {index} is past the end of the volume")
        return data

    def _fat_bytes(self, offset: int, count: int) -> bytes:
        """Bytes of the FAT (a FAT12 entry may straddle two sectors)."""
        out = b""
        while len(out) < count:
            index, at = divmod(offset + len(out), self.sector)
            out += self._fat_sector(index)[at : at + count - len(out)]
        return out

    def _check_cluster(self, cluster: int, what: str) -> None:
        if not FIRST_CLUSTER <= cluster < self.clusters + FIRST_CLUSTER:
            raise FsError(f"fat: {what} starts at cluster {cluster}, outside the volume")

    def _next(self, cluster: int) -> int | None:
        """The cluster after ``cluster`` in its chain, or None at the chain's end."""
        if self.bits == 12:
            (pair,) = struct.unpack("<H", self._fat_bytes(cluster + cluster // 2, 2))
            value = pair >> 4 if cluster & 1 else pair & 0xFFF
        elif self.bits == 16:
            (value,) = struct.unpack("<H", self._fat_bytes(cluster * 2, 2))
        else:
            (value,) = struct.unpack("<I", self._fat_bytes(cluster * 4, 4))
            value &= 0x0FFFFFFF
        if value >= END[self.bits]:
            return None
        if value == BAD[self.bits] or not FIRST_CLUSTER <= value < self.clusters + FIRST_CLUSTER:
            raise FsError(f"fat: cluster {cluster} links to cluster {value:#x}, not a data cluster")
        return int(value)

    def _chain(self, first: int) -> Iterator[int]:
        """The clusters of the chain from ``first``; FsError if it loops."""
        cluster: int | None = first
        for _ in range(self.clusters):
            if cluster is None:
                return
            yield cluster
            cluster = self._next(cluster)
        if cluster is not None:
            raise FsError(f"fat: the cluster chain from cluster {first} loops")

    def _cluster_offset(self, cluster: int) -> int:
        return self.data_start + (cluster - FIRST_CLUSTER) * self.cluster

    def _runs(self, first: int, needed: int) -> Iterator[tuple[int, int]]:
        """(first cluster, count) of the contiguous runs of the first ``needed`` clusters
        of a chain, found as they are read."""
        start, count = first, 0
        for cluster in self._chain(first):
            if count and cluster == start + count:
                count += 1
            else:
                if count:
                    yield start, count
                start, count = cluster, 1
            needed -= 1
            if not needed:
                break
        if count:
            yield start, count
        if needed:
            raise FsError(f"fat: the cluster chain from cluster {first} ends before the data")

    # -- directories ------------------------------------------------------------------------
    def _dir_pieces(self, first: int | None) -> Iterator[bytes]:
        """A directory's bytes a cluster at a time: the fixed root region when ``first``
        is None (FAT12/16), else the cluster chain."""
        if first is None:
            for at in range(0, self.root_size, self.cluster):
                yield self._read(self.root_start + at, min(self.cluster, self.root_size - at))
            return
        self._check_cluster(first, "a directory")
        for cluster in self._chain(first):
            yield self._read(self._cluster_offset(cluster), self.cluster)

    def _slots(self, first: int | None) -> Iterator[bytes]:
        """A directory's 32-byte entries up to its end marker."""
        for piece in self._dir_pieces(first):
            for pos in range(0, len(piece) - SLOT + 1, SLOT):
                if piece[pos] == END_OF_DIR:
                    return
                yield piece[pos : pos + SLOT]

    def _load_listing(self, first: int | None) -> tuple[Record, ...]:
        found: list[Record] = []
        pending: list[bytes] = []  # the LFN entries since the last short entry
        for slot in self._slots(first):
            if slot[0] == DELETED:
                pending = []
                continue
            attr = slot[11]
            if attr & ATTR_LFN_MASK == ATTR_LFN:
                pending.append(slot)
                continue
            long_name, pending = _long_name(pending, slot[:11]), []
            if attr & ATTR_VOLUME:
                continue
            short = _short_name(slot)
            if short in (".", ".."):
                continue
            hi, time_, date, lo, size = struct.unpack_from("<HHHHI", slot, 20)
            is_dir = bool(attr & ATTR_DIR)
            found.append(
                Record(
                    name=long_name or short,
                    is_dir=is_dir,
                    cluster=lo | (hi << 16 if self.bits == 32 else 0),
                    size=0 if is_dir else size,
                    mtime=_dos_time(date, time_),
                )
            )
        return tuple(found)

    def _lookup(self, path: str) -> tuple[Entry, int | None]:
        """The entry at ``path`` and its first cluster (None for the root)."""
        entry = Entry(name="", path="/", kind="dir", size=0)
        first: int | None = None
        for part in split_path(path):
            if entry.kind != "dir":
                raise FsError(f"{entry.path}: not a directory")
            wanted = part.casefold()
            record = next((r for r in self._records(first) if r.name.casefold() == wanted), None)
            if record is None:
                raise FsError(f"{join_path(entry.path, part)}: no such file or directory")
            entry = _entry(record, entry.path)
            first = record.cluster
        return entry, first

    def _records(self, first: int | None) -> tuple[Record, ...]:
        # A subdirectory's ".." points at cluster 0 for the root; FAT32's root is a chain.
        if not first:
            first = self.root_cluster if self.bits == 32 else None
        return self._listing(first)

    # -- the Filesystem protocol --------------------------------------------------------------
    def stat(self, path: str) -> Entry:
        return self._lookup(path)[0]

    def listdir(self, path: str) -> list[Entry]:
        entry, first = self._lookup(path)
        if entry.kind != "dir":
            raise FsError(f"{entry.path}: not a directory")
        seen = {r.name: _entry(r, entry.path) for r in reversed(self._records(first))}
        return sorted(seen.values(), key=lambda e: e.name)

    def read_file(self, path: str, block: int = 1 << 20) -> Iterator[bytes]:
        entry, first = self._lookup(path)
        if entry.kind != "file":
            raise FsError(f"{entry.path}: not a regular file (it is a {entry.kind})")
        if block < 1:
            raise ValueError(f"block must be positive, not {block}")
        if entry.size:
            self._check_cluster(first or 0, entry.path)
        return self._content(entry, first or 0, block)

    def _content(self, entry: Entry, first: int, block: int) -> Iterator[bytes]:
        left = entry.size
        if not left:
            return
        for cluster, count in self._runs(first, -(-left // self.cluster)):
            offset = self._cluster_offset(cluster)
            length = min(left, count * self.cluster)
            for at in range(offset, offset + length, block):
                want = min(block, offset + length - at)
                piece = self._read(at, want)
                if len(piece) < want:
                    raise FsError(f"fat: {entry.path}: cluster {cluster} is past the volume")
                yield piece
            left -= length

    def readlink(self, path: str) -> str:
        entry = self.stat(path)
        raise FsError(f"{entry.path}: not a symbolic link (FAT has none)")


def is_fat_boot_sector(boot: bytes) -> bool:
    """Whether ``boot`` looks like a FAT boot sector: the 55 AA signature, a BPB whose
    geometry makes sense, and the type label (at 54, or 82 on FAT32) or else an x86 jump
    and a valid media byte, as every formatter writes."""
    if len(boot) < 512 or boot[510:512] != BOOT_SIGNATURE:
        return False
    bps, spc, reserved, fats, _, total16, media, fat16 = struct.unpack_from("<HBHBHHBH", boot, 11)
    total32, fat32 = struct.unpack_from("<II", boot, 32)
    sane = (
        bps in SECTOR_SIZES
        and spc > 0
        and not spc & (spc - 1)
        and reserved > 0
        and 0 < fats <= 4
        and (total16 or total32) > 0
        and (fat16 or fat32) > 0
    )
    labelled = boot[54:57] == b"FAT" if fat16 else boot[82:87] == b"FAT32"
    jump = boot[0] == 0xE9 or (boot[0] == 0xEB and boot[2] == 0x90)
    return sane and (labelled or (jump and (media == 0xF0 or media >= 0xF8)))


def _entry(record: Record, parent: str) -> Entry:
    return Entry(
        name=record.name,
        path=join_path(parent, record.name),
        kind="dir" if record.is_dir else "file",
        size=record.size,
        mtime=record.mtime,
    )


def _long_name(pending: list[bytes], short: bytes) -> str | None:
    """The long name the LFN entries before a short entry spell, or None when they are
    not a complete run in order (last part first) with the short entry's checksum: an
    orphan left by a system that does not know long names."""
    if not pending:
        return None
    count = pending[0][0] & LFN_ORDER
    checksum = _checksum(short)
    if not pending[0][0] & LFN_LAST or len(pending) != count:
        return None
    for i, slot in enumerate(pending):
        if slot[0] & LFN_ORDER != count - i or slot[13] != checksum or slot[26:28] != b"\0\0":
            return None
    units = b"".join(slot[1:11] + slot[14:26] + slot[28:32] for slot in reversed(pending))
    name = units.decode("utf-16-le", errors="replace").split("\0", 1)[0].rstrip("\uffff")
    return name or None


def _short_name(slot: bytes) -> str:
    """The 8.3 name of a short entry, in the OEM code page (437)."""
    raw = bytearray(slot[:11])
    if raw[0] == KANJI_E5:
        raw[0] = DELETED  # a name that really starts with 0xE5 is stored as 0x05
    base = raw[:8].decode("cp437").rstrip(" ")
    ext = raw[8:11].decode("cp437").rstrip(" ")
    if slot[12] & CASE_BASE:
        base = base.lower()
    if slot[12] & CASE_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def _checksum(short: bytes) -> int:
    """The LFN checksum of an 11-byte short name: rotate right, add, per byte."""
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _dos_time(date: int, time_: int) -> float | None:
    """A DOS date and time as seconds since the epoch, read as UTC; None when unset."""
    if date == 0:
        return None
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, second = time_ >> 11, (time_ >> 5) & 0x3F, (time_ & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
