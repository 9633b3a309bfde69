"""Sparse files and changed-block bitmaps for the ``local`` driver: punching holes, finding
the allocated ranges (SEEK_DATA/SEEK_HOLE), and 64 KiB block bitmaps."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

#: Why a disk without a checkpoint is read whole.


#: Granularity of changed-block tracking and copy-before-write.
BLOCK_SIZE = 64 * 1024

_FALLOC_FL_KEEP_SIZE = 0x01

_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a byte range so it reads as zeros (falls back to writing zeros)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        os.pwrite(fd, bytes(length), offset)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Allocated (offset, length) ranges of a file up to ``size`` via SEEK_DATA/SEEK_HOLE."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end - start))
        offset = end
    return ranges


def _blocks(offset: int, length: int) -> range:
    return range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)


class _Bitmap:
    """A bitmap of blocks in a file; callers hold the server lock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _fd(self, write: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
        return os.open(self.path, flags, 0o644)

    def test(self, blocks: range) -> list[bool]:
        if not blocks or not self.path.exists():
            return [False] * len(blocks)
        first, last = blocks.start // 8, (blocks.stop - 1) // 8
        fd = self._fd(False)
        try:
            raw = os.pread(fd, last - first + 1, first)
        finally:
            os.close(fd)
        raw = raw.ljust(last - first + 1, b"\0")
        return [bool(raw[b // 8 - first] & (1 << (b % 8))) for b in blocks]

    def set(self, blocks: list[int] | range) -> None:
        if not blocks:
            return
        first, last = min(blocks) // 8, max(blocks) // 8
        fd = self._fd(True)
        try:
            raw = bytearray(os.pread(fd, last - first + 1, first).ljust(last - first + 1, b"\0"))
            for b in blocks:
                raw[b // 8 - first] |= 1 << (b % 8)
            os.pwrite(fd, bytes(raw), first)
        finally:
            os.close(fd)

    def all_set(self) -> list[int]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        out: list[int] = []
        for i, byte in enumerate(data):
            if byte:
                out.extend(i * 8 + bit for bit in range(8) if byte & (1 << bit))
        return out


def _blocks_to_ranges(blocks: list[int], size: int) -> list[tuple[int, int]]:
    """Merge sorted block numbers into (offset, length) byte ranges clipped to ``size``."""
    ranges: list[tuple[int, int]] = []
    for b in sorted(blocks):
        start, end = b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, size)
        if start >= size:
            break
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, end - start))
    return ranges
