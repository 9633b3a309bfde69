"""A read-only FAT12/FAT16/FAT32 reader.

The boot sector's BPB gives the geometry; the FAT type follows from the cluster count
(as the specification says, not from the label). Directories are the fixed root region
(FAT12/16) or cluster chains; long names (VFAT LFN entries, checked against the short
name's checksum) are preferred, else the 8.3 name (with the NT lower-case flags).
Deleted entries, volume labels and ``.``/``..`` are skipped. Times are DOS local times,
read as UTC. FAT sectors are read as needed and cached.
"""

from __future__ import annotations

import calendar
import struct
from collections.abc import Iterator
from functools import lru_cache

from csbs.fs import Entry, FsError, Reader, join_path, split_path

ATTR_DIR, ATTR_VOLUME, ATTR_LFN = 0x10, 0x08, 0x0F
DELETED = 0xE5
#: A chain longer than the clusters of the volume loops.
NAME_CASE_BASE, NAME_CASE_EXT = 0x08, 0x10


class Fat:
    type_name = "fat"

    def __init__(self, read: Reader) -> None:
        self._read = read
        boot = read(0, 512)
        if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
            raise FsError("fat: no boot sector signature (55 AA)")
        bps, spc, reserved, fats, root_entries, total16, _, fat16 = struct.unpack_from(
            "<HBHBHHBH", boot, 11
        )
        total32, fat32 = struct.unpack_from("<II", boot, 32)
        if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or fats == 0:
            raise FsError("fat: the BPB is not valid (bytes per sector, sectors per cluster)")
        self.sector = bps
        self.cluster = bps * spc
        fat_sectors = fat16 or fat32
        total = total16 or total32
        root_sectors = (root_entries * 32 + bps - 1) // bps
        self.fat_start = reserved * bps
        self.root_start = (reserved + fats * fat_sectors) * bps
        self.root_size = root_sectors * bps
        self.data_start = self.root_start + self.root_size
        clusters = (total - (reserved + fats * fat_sectors + root_sectors)) // spc
        self.bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        self.clusters = clusters
        self.root_cluster = struct.unpack_from("<I", boot, 44)[0] if self.bits == 32 else 0
        self._fat_sector = lru_cache(maxsize=256)(self._load_fat_sector)

    # -- clusters ------------------------------------------------------------------------
    def _load_fat_sector(self, index: int) -> bytes:
        return self._read(self.fat_start + index * self.sector, self.sector)

    def _fat_bytes(self, offset: int, count: int) -> bytes:
        out = b""
        while count > 0:
            index, at = divmod(offset, self.sector)
            piece = self._fat_sector(index)[at : at + count]
            out += piece
            offset += len(piece)
            count -= len(piece)
        return out

    def _next(self, cluster: int) -> int | None:
        if self.bits == 12:
            (value,) = struct.unpack("<H", self._fat_bytes(cluster * 3 // 2, 2))
            value = value >> 4 if cluster & 1 else value & 0xFFF
            end = value >= 0xFF8
        elif self.bits == 16:
            (value,) = struct.unpack("<H", self._fat_bytes(cluster * 2, 2))
            end = value >= 0xFFF8
        else:
            (value,) = struct.unpack("<I", self._fat_bytes(cluster * 4, 4))
            value &= 0x0FFFFFFF
            end = value >= 0x0FFFFFF8
        if end:
            return None
        if value < 2 or value >= self.clusters + 2:
            raise FsError(f"fat: cluster {cluster} links to cluster {value}, outside the volume")
        return int(value)

    def _chain(self, first: int) -> Iterator[int]:
        cluster: int | None = first
        seen = 0
        while cluster is not None:
            if cluster < 2 or seen > self.clusters:
                raise FsError(f"fat: the chain from cluster {first} is broken or loops")
            yield cluster
            seen += 1
            cluster = self._next(cluster)

    def _cluster_offset(self, cluster: int) -> int:
        return int(self.data_start + (cluster - 2) * self.cluster)

    # -- directories -----------------------------------------------------------------------
    def _dir_data(self, first: int | None) -> bytes:
        if first is None or first == 0:
            if self.bits == 32:
                first = self.root_cluster
            else:
                return self._read(self.root_start, self.root_size)
        return b"".join(
            self._read(self._cluster_offset(c), self.cluster) for c in self._chain(first)
        )

    def _entries(self, first: int | None, parent: str) -> list[tuple[Entry, int]]:
        """(entry, first cluster) of a directory's live entries."""
        data = self._dir_data(first)
        out: list[tuple[Entry, int]] = []
        lfn: dict[int, str] = {}
        lfn_sum = -1
        for pos in range(0, len(data) - 31, 32):
            raw = data[pos : pos + 32]
            if raw[0] == 0:
                break
            if raw[0] == DELETED:
                lfn, lfn_sum = {}, -1
                continue
            attr = raw[11]
            if attr == ATTR_LFN:
                order = raw[0] & 0x1F
                if raw[0] & 0x40:
                    lfn, lfn_sum = {}, raw[13]
                part = raw[1:11] + raw[14:26] + raw[28:32]
                lfn[order] = part.decode("utf-16-le", errors="replace")
                continue
            if attr & ATTR_VOLUME:
                lfn, lfn_sum = {}, -1
                continue
            short = _short_name(raw)
            name = short
            if lfn and lfn_sum == _checksum(raw[:11]):
                joined = "".join(lfn[k] for k in sorted(lfn))
                name = joined.split("\0", 1)[0].rstrip("\uffff") or short
            lfn, lfn_sum = {}, -1
            if name in (".", ".."):
                continue
            hi, time_, date, lo, size = struct.unpack_from("<HHHHI", raw, 20)
            cluster = lo | (hi << 16 if self.bits == 32 else 0)
            is_dir = bool(attr & ATTR_DIR)
            entry = Entry(
                name=name,
                path=join_path(parent, name),
                kind="dir" if is_dir else "file",
                size=0 if is_dir else size,
                mtime=_dos_time(date, time_),
            )
            out.append((entry, cluster))
        return out

    def _lookup(self, path: str) -> tuple[Entry, int | None]:
        current = "/"
        first: int | None = None
        entry = Entry(name="", path="/", kind="dir", size=0)
        for part in split_path(path):
            if entry.kind != "dir":
                raise FsError(f"{current}: not a directory")
            wanted = part.casefold()
            match = next(
                ((e, c) for e, c in self._entries(first, current) if e.name.casefold() == wanted),
                None,
            )
            if match is None:
                raise FsError(f"{join_path(current, part)}: no such file or directory")
            entry, first = match
            current = entry.path
        return entry, first

    # -- the Filesystem protocol ------------------------------------------------------------
    def stat(self, path: str) -> Entry:
        return self._lookup(path)[0]

    def listdir(self, path: str) -> list[Entry]:
        entry, first = self._lookup(path)
        if entry.kind != "dir":
            raise FsError(f"{entry.path}: not a directory")
        return sorted((e for e, _ in self._entries(first, entry.path)), key=lambda e: e.name)

    def read_file(self, path: str, block: int = 1 << 20) -> Iterator[bytes]:
        entry, first = self._lookup(path)
        if entry.kind != "file":
            raise FsError(f"{entry.path}: not a regular file (it is a {entry.kind})")
        return self._content(entry.size, first or 0, block)

    def _content(self, size: int, first: int, block: int) -> Iterator[bytes]:
        if size == 0:
            return
        needed = -(-size // self.cluster)
        runs: list[list[int]] = []  # [first cluster, count] of contiguous clusters
        for n, cluster in enumerate(self._chain(first)):
            if n >= needed:
                break
            if runs and runs[-1][0] + runs[-1][1] == cluster:
                runs[-1][1] += 1
            else:
                runs.append([cluster, 1])
        if sum(count for _, count in runs) < needed:
            raise FsError(f"fat: the file's cluster chain from {first} is shorter than its size")
        left = size
        for cluster, count in runs:
            length = min(left, count * self.cluster)
            offset = self._cluster_offset(cluster)
            for done in range(0, length, block):
                yield self._read(offset + done, min(block, length - done))
            left -= length

    def readlink(self, path: str) -> str:
        entry = self.stat(path)
        raise FsError(f"{entry.path}: not a symbolic link (FAT has none)")


def _short_name(raw: bytes) -> str:
    base = raw[:8].decode("cp437").rstrip()
    ext = raw[8:11].decode("cp437").rstrip()
    if raw[0] == 0x05:
        base = "\u00e5" + base[1:]
    case = raw[12]
    if case & NAME_CASE_BASE:
        base = base.lower()
    if case & NAME_CASE_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def _checksum(short: bytes) -> int:
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def _dos_time(date: int, time_: int) -> float | None:
    if date == 0:
        return None
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0xF, date & 0x1F
    hour, minute, second = time_ >> 11, (time_ >> 5) & 0x3F, (time_ & 0x1F) * 2
    try:
        return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None
