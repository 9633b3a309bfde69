"""A read-only XFS reader (v5 with CRCs, as mkfs.xfs makes it, and v4).

Inode numbers map to (allocation group, block, slot); an inode's data fork is local
(short-form directories, inline symlinks), a list of extents (unwritten ones read as
zeros) or a B+tree of extents. Directories in block, leaf or node form are read from
their data blocks (below the 32 GiB leaf offset), skipping unused space; remote
symlinks skip their v5 block headers. Big-endian throughout. Only the blocks needed are
read: the superblock, the inodes looked up, their extent trees and their data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
VERSION_NUMBITS = 0xF
FEAT2_FTYPE = 0x200
INCOMPAT_FTYPE = 0x1
DIFLAG2_BIGTIME = 1 << 3
LEAF_OFFSET = 32 << 30
FREE_TAG = 0xFFFF
DATA_MAGICS = {b"XDB3": 64, b"XDD3": 64, b"XD2B": 16, b"XD2D": 16}
BTREE_MAGICS = {b"BMA3": 72, b"BMAP": 24}
SYMLINK_MAGIC = b"XSLM"
SYMLINK_HEADER = 56
#: (file offset in blocks, first fs block or -1 for zeros, block count)
Run = tuple[int, int, int]


class Xfs(InodeTree):
    type_name = "xfs"

    def __init__(self, read: Reader) -> None:
        self._read = read
        sb = read(0, 512)
        if sb[:4] != b"XFSB":
            raise FsError("xfs: no superblock (magic XFSB at byte 0)")
        self.block_size = struct.unpack_from(">I", sb, 4)[0]
        (self.root,) = struct.unpack_from(">Q", sb, 56)
        self.ag_blocks = struct.unpack_from(">I", sb, 84)[0]
        version = struct.unpack_from(">H", sb, 100)[0] & VERSION_NUMBITS
        self.inode_size = struct.unpack_from(">H", sb, 104)[0]
        self.blocklog, _, _, self.inopblog, self.agblklog = struct.unpack_from(">5B", sb, 120)
        self.dir_block = self.block_size << sb[192]
        features2 = struct.unpack_from(">I", sb, 200)[0]
        incompat = struct.unpack_from(">I", sb, 216)[0] if version >= 5 else 0
        self.v5 = version >= 5
        self.ftype = bool(incompat & INCOMPAT_FTYPE) if self.v5 else bool(features2 & FEAT2_FTYPE)
        if not self.block_size or not self.ag_blocks or not self.inode_size:
            raise FsError("xfs: the superblock's geometry is not valid")
        self._inode = lru_cache(maxsize=1024)(self._load_inode)

    # -- addresses, inodes -----------------------------------------------------------------
    def _fsb_offset(self, fsb: int) -> int:
        ag, block = fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1)
        return int((ag * self.ag_blocks + block) * self.block_size)

    def _load_inode(self, number: int) -> bytes:
        ag = number >> (self.agblklog + self.inopblog)
        block = (number >> self.inopblog) & ((1 << self.agblklog) - 1)
        slot = number & ((1 << self.inopblog) - 1)
        at = (ag * self.ag_blocks + block) * self.block_size + slot * self.inode_size
        raw = self._read(at, self.inode_size)
        if raw[:2] != b"IN":
            raise FsError(f"xfs: inode {number} has bad magic {raw[:2]!r}")
        return raw

    def _core(self, number: int) -> tuple[int, int, int, bytes]:
        """(mode, format, size, data fork) of an inode."""
        raw = self._inode(number)
        mode, _, fmt = struct.unpack_from(">HBB", raw, 2)
        (size,) = struct.unpack_from(">Q", raw, 56)
        version = raw[4]
        core = 176 if version >= 3 else 100
        forkoff = raw[82]
        end = core + forkoff * 8 if forkoff else self.inode_size
        return mode, fmt, size, raw[core:end]

    def _entry(self, number: int, name: str, path: str) -> Entry:
        raw = self._inode(number)
        mode, _, size, _ = self._core(number)
        kinds: dict[int, Kind] = {S_IFDIR: "dir", S_IFREG: "file", S_IFLNK: "symlink"}
        kind = kinds.get(mode & S_IFMT, "other")
        flags2 = struct.unpack_from(">Q", raw, 120)[0] if raw[4] >= 3 else 0
        if flags2 & DIFLAG2_BIGTIME:
            mtime = struct.unpack_from(">Q", raw, 40)[0] / 1e9 - (1 << 31)
        else:
            seconds, nanos = struct.unpack_from(">iI", raw, 40)
            mtime = seconds + nanos / 1e9
        return Entry(
            name=name,
            path=path,
            kind=kind,
            size=0 if kind == "dir" else size,
            mtime=mtime,
            mode=mode & 0o7777,
        )

    # -- extents ---------------------------------------------------------------------------
    def _runs(self, number: int) -> list[Run]:
        raw = self._inode(number)
        _, fmt, _, fork = self._core(number)
        if fmt == FMT_EXTENTS:
            (count,) = struct.unpack_from(">I", raw, 76)
            return [_extent(fork, 16 * i) for i in range(count)]
        if fmt == FMT_BTREE:
            level, numrecs = struct.unpack_from(">HH", fork, 0)
            maxrecs = (len(fork) - 4) // 16
            ptrs = struct.unpack_from(f">{numrecs}Q", fork, 4 + maxrecs * 8)
            runs: list[Run] = []
            for ptr in ptrs:
                self._btree(number, ptr, level - 1, runs)
            return runs
        raise FsError(f"xfs: inode {number} has data fork format {fmt}, not extents or btree")

    def _btree(self, number: int, fsb: int, level: int, runs: list[Run]) -> None:
        block = self._read(self._fsb_offset(fsb), self.block_size)
        header = BTREE_MAGICS.get(block[:4])
        if header is None:
            raise FsError(f"xfs: inode {number}'s extent btree block {fsb} has bad magic")
        block_level, numrecs = struct.unpack_from(">HH", block, 4)
        if block_level != level:
            raise FsError(f"xfs: inode {number}'s extent btree block {fsb} is at a wrong level")
        if level == 0:
            runs += [_extent(block, header + 16 * i) for i in range(numrecs)]
            return
        maxrecs = (self.block_size - header) // 16
        for ptr in struct.unpack_from(f">{numrecs}Q", block, header + maxrecs * 8):
            self._btree(number, ptr, level - 1, runs)

    def _content(self, number: int, size: int, block: int) -> Iterator[bytes]:
        bs = self.block_size
        pos = 0
        for offset, fsb, count in sorted(self._runs(number)):
            start = offset * bs
            if start >= size:
                break
            while pos < start:
                step = min(block, start - pos)
                yield bytes(step)
                pos += step
            end = min(size, (offset + count) * bs)
            while pos < end:
                step = min(block, end - pos)
                if fsb < 0:
                    yield bytes(step)
                else:
                    yield self._read(self._fsb_offset(fsb) + pos - start, step)
                pos += step
        while pos < size:
            step = min(block, size - pos)
            yield bytes(step)
            pos += step

    # -- directories -----------------------------------------------------------------------
    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        _, fmt, _, fork = self._core(number)
        if fmt == FMT_LOCAL:
            yield from self._shortform(fork)
            return
        leaf_block = LEAF_OFFSET // self.block_size
        per_dir_block = self.dir_block // self.block_size
        for offset, fsb, count in sorted(self._runs(number)):
            if offset >= leaf_block or fsb < 0:
                continue
            for n in range(0, min(count, leaf_block - offset), per_dir_block):
                data = self._read(self._fsb_offset(fsb + n), self.dir_block)
                yield from self._data_block(number, data)

    def _shortform(self, fork: bytes) -> Iterator[tuple[str, int]]:
        count, i8 = fork[0], fork[1]
        width = 8 if i8 else 4
        pos = 2 + width
        for _ in range(count or i8):
            name_len = fork[pos]
            name = fork[pos + 3 : pos + 3 + name_len].decode("utf-8", errors="surrogateescape")
            pos += 3 + name_len + (1 if self.ftype else 0)
            inode = int.from_bytes(fork[pos : pos + width], "big")
            pos += width
            yield name, inode

    def _data_block(self, number: int, data: bytes) -> Iterator[tuple[str, int]]:
        header = DATA_MAGICS.get(data[:4])
        if header is None:
            raise FsError(f"xfs: directory inode {number} has a data block with bad magic")
        end = len(data)
        if data[:4] in (b"XDB3", b"XD2B"):  # block form: leaf entries and a tail at the end
            (leaf_count,) = struct.unpack_from(">I", data, end - 8)
            end -= 8 + 8 * leaf_count
        pos = header
        while pos < end:
            if struct.unpack_from(">H", data, pos)[0] == FREE_TAG:
                (length,) = struct.unpack_from(">H", data, pos + 2)
                if length == 0:
                    raise FsError(f"xfs: directory inode {number} has an empty free space entry")
                pos += length
                continue
            inode, name_len = struct.unpack_from(">QB", data, pos)
            name = data[pos + 9 : pos + 9 + name_len].decode("utf-8", errors="surrogateescape")
            size = 9 + name_len + (1 if self.ftype else 0) + 2
            pos += (size + 7) & ~7
            if name not in (".", ".."):
                yield name, inode

    # -- the InodeTree hooks ----------------------------------------------------------------
    def _root(self) -> int:
        return int(self.root)

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        _, fmt, _, fork = self._core(number)
        if fmt == FMT_LOCAL:
            return iter([fork[: entry.size]])
        return self._content(number, entry.size, block)

    def _link(self, number: int, entry: Entry) -> str:
        _, fmt, size, fork = self._core(number)
        if fmt == FMT_LOCAL:
            return fork[:size].decode("utf-8", errors="surrogateescape")
        per_block = self.block_size - (SYMLINK_HEADER if self.v5 else 0)
        blocks = -(-size // per_block)
        raw = b"".join(self._content(number, blocks * self.block_size, 1 << 20))
        if self.v5 and raw[:4] == SYMLINK_MAGIC:
            pieces = []
            for at in range(0, len(raw), self.block_size):
                blk = raw[at : at + self.block_size]
                if blk[:4] != SYMLINK_MAGIC:
                    raise FsError(f"xfs: symlink inode {number} has a block with bad magic")
                (count,) = struct.unpack_from(">I", blk, 8)
                pieces.append(blk[SYMLINK_HEADER : SYMLINK_HEADER + count])
            target = b"".join(pieces)
        else:
            # v4, or a v5 link written without block headers (as mkfs.xfs -p 6.1 does).
            target = raw[:size]
        return target.decode("utf-8", errors="surrogateescape")


def _extent(data: bytes, at: int) -> Run:
    hi, lo = struct.unpack_from(">QQ", data, at)
    value = hi << 64 | lo
    unwritten = value >> 127
    offset = (value >> 73) & ((1 << 54) - 1)
    fsb = (value >> 21) & ((1 << 52) - 1)
    count = value & ((1 << 21) - 1)
    return (offset, -1 if unwritten else fsb, count)
