"""A read-only ext2/ext3/ext4 reader.

Superblock, 32- and 64-bit group descriptors, inodes of any size, extent trees (index
nodes of any depth; unwritten extents read as zeros), the block maps of ext2/3 (direct,
single, double and triple indirect), directories read linearly (an htree's index blocks
look like empty entries to a linear reader), fast and slow symlinks, holes and inline
data. Only the blocks needed are read: the superblock, the descriptors of the groups
touched, the inode table blocks of the inodes looked up, and each file's own blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

MAGIC = 0xEF53
ROOT_INODE = 2
EXTENT_MAGIC = 0xF30A
INCOMPAT_64BIT = 0x80
FLAG_EXTENTS = 0x80000
FLAG_INLINE_DATA = 0x10000000
FLAG_ENCRYPT = 0x800
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
#: Unwritten extents have a length above this (the length is then ``len - 32768``).
INIT_MAX_LEN = 32768


class Ext4(InodeTree):
    type_name = "ext4"

    def __init__(self, read: Reader) -> None:
        self._read = read
        sb = read(1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != MAGIC:
            raise FsError("ext4: no superblock (magic 0xEF53 at byte 1080)")
        self.block_size = 1024 << struct.unpack_from("<I", sb, 24)[0]
        self.blocks_per_group, _, self.inodes_per_group = struct.unpack_from("<III", sb, 32)
        (self.first_data_block,) = struct.unpack_from("<I", sb, 20)
        rev = struct.unpack_from("<I", sb, 76)[0]
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
        (self.incompat,) = struct.unpack_from("<I", sb, 96)
        desc_size = struct.unpack_from("<H", sb, 254)[0]
        self.desc_size = desc_size if self.incompat & INCOMPAT_64BIT and desc_size else 32
        if not self.inodes_per_group or not self.inode_size:
            raise FsError("ext4: superblock has no inodes per group or inode size")
        self._inode = lru_cache(maxsize=1024)(self._load_inode)
        self._table_block = lru_cache(maxsize=256)(self._load_block)

    # -- blocks and inodes ------------------------------------------------------------------
    def _block(self, number: int) -> bytes:
        return self._read(number * self.block_size, self.block_size)

    def _load_block(self, number: int) -> bytes:
        return self._block(number)

    def _inode_table(self, group: int) -> int:
        gdt = (self.first_data_block + 1) * self.block_size
        raw = self._read(gdt + group * self.desc_size, self.desc_size)
        lo = int(struct.unpack_from("<I", raw, 8)[0])
        hi = int(struct.unpack_from("<I", raw, 0x28)[0]) if self.desc_size >= 64 else 0
        return lo | hi << 32

    def _load_inode(self, number: int) -> bytes:
        if number < 1:
            raise FsError(f"ext4: inode {number} is not valid")
        group, index = divmod(number - 1, self.inodes_per_group)
        offset = index * self.inode_size
        block = self._inode_table(group) + offset // self.block_size
        data = self._table_block(block)
        start = offset % self.block_size
        return data[start : start + self.inode_size]

    def _entry_of(self, number: int, name: str, path: str) -> Entry:
        raw = self._inode(number)
        mode = struct.unpack_from("<H", raw, 0)[0]
        size = struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 108)[0] << 32
        mtime = float(struct.unpack_from("<i", raw, 16)[0])
        kinds: dict[int, Kind] = {S_IFDIR: "dir", S_IFREG: "file", S_IFLNK: "symlink"}
        kind = kinds.get(mode & S_IFMT, "other")
        return Entry(name=name, path=path, kind=kind, size=size, mtime=mtime, mode=mode & 0o7777)

    # -- mapping a file's blocks ------------------------------------------------------------
    def _runs(self, number: int) -> list[tuple[int, int, int]]:
        """(logical block, physical block or -1 for zeros, count) of an inode's data."""
        raw = self._inode(number)
        flags = struct.unpack_from("<I", raw, 32)[0]
        if flags & FLAG_ENCRYPT:
            raise FsError(f"ext4: inode {number} is encrypted (unsupported)")
        i_block = raw[40:100]
        if flags & FLAG_EXTENTS:
            runs: list[tuple[int, int, int]] = []
            self._extents(number, i_block, runs, depth_left=8)
            return runs
        return self._block_map(i_block)

    def _extents(
        self, number: int, node: bytes, runs: list[tuple[int, int, int]], depth_left: int
    ) -> None:
        magic, entries, _, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC:
            raise FsError(f"ext4: inode {number} has an extent header with bad magic {magic:#x}")
        if depth_left <= 0:
            raise FsError(f"ext4: inode {number}'s extent tree is too deep")
        for i in range(entries):
            at = 12 + 12 * i
            if depth == 0:
                logical, length, hi, lo = struct.unpack_from("<IHHI", node, at)
                physical = lo | hi << 32
                if length > INIT_MAX_LEN:
                    runs.append((logical, -1, length - INIT_MAX_LEN))
                else:
                    runs.append((logical, physical, length))
            else:
                _logical, lo, hi = struct.unpack_from("<IIH", node, at)
                self._extents(number, self._block(lo | hi << 32), runs, depth_left - 1)

    def _block_map(self, i_block: bytes) -> list[tuple[int, int, int]]:
        pointers = struct.unpack("<15I", i_block)
        per = self.block_size // 4
        runs: list[tuple[int, int, int]] = []
        logical = 0

        def add(physical: int) -> None:
            nonlocal logical
            if physical:
                last = runs[-1] if runs else None
                if last and last[0] + last[2] == logical and last[1] + last[2] == physical:
                    runs[-1] = (last[0], last[1], last[2] + 1)
                else:
                    runs.append((logical, physical, 1))
            logical += 1

        def walk(block: int, level: int) -> None:
            nonlocal logical
            if not block:
                logical += per**level
                return
            table = struct.unpack(f"<{per}I", self._block(block))
            for pointer in table:
                if level == 1:
                    add(pointer)
                else:
                    walk(pointer, level - 1)

        for pointer in pointers[:12]:
            add(pointer)
        for level, pointer in zip((1, 2, 3), pointers[12:], strict=True):
            walk(pointer, level)
        return runs

    def _content(self, number: int, size: int, block: int) -> Iterator[bytes]:
        raw = self._inode(number)
        flags = struct.unpack_from("<I", raw, 32)[0]
        if flags & FLAG_INLINE_DATA:
            if size > 60:
                raise FsError(
                    f"ext4: inode {number} keeps {size} bytes inline (only up to 60 are read)"
                )
            yield raw[40 : 40 + size]
            return
        bs = self.block_size
        pos = 0
        for logical, physical, count in sorted(self._runs(number)):
            start = logical * bs
            if start >= size:
                break
            while pos < start:  # a hole
                step = min(block, start - pos)
                yield bytes(step)
                pos += step
            end = min(size, (logical + count) * bs)
            while pos < end:
                step = min(block, end - pos)
                if physical < 0:
                    yield bytes(step)
                else:
                    yield self._read(physical * bs + (pos - start), step)
                pos += step
        while pos < size:
            step = min(block, size - pos)
            yield bytes(step)
            pos += step

    # -- directories ------------------------------------------------------------------------
    def _dir_entries(self, number: int) -> Iterator[tuple[str, int]]:
        entry = self._entry_of(number, "", "")
        if struct.unpack_from("<I", self._inode(number), 32)[0] & FLAG_INLINE_DATA:
            raise FsError(f"ext4: directory inode {number} keeps its entries inline (unsupported)")
        data = b"".join(self._content(number, entry.size, 1 << 20))
        pos = 0
        while pos + 8 <= len(data):
            inode, rec_len, name_len = struct.unpack_from("<IHB", data, pos)
            if rec_len < 8:
                raise FsError(f"ext4: directory inode {number} has a bad entry at byte {pos}")
            if inode:
                name = data[pos + 8 : pos + 8 + name_len].decode("utf-8", errors="surrogateescape")
                if name not in (".", ".."):
                    yield name, inode
            pos += rec_len

    # -- the InodeTree hooks ----------------------------------------------------------------
    def _root(self) -> int:
        return ROOT_INODE

    def _entry(self, number: int, name: str, path: str) -> Entry:
        return self._entry_of(number, name, path)

    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        return self._dir_entries(number)

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        return self._content(number, entry.size, block)

    def _link(self, number: int, entry: Entry) -> str:
        raw = self._inode(number)
        flags = struct.unpack_from("<I", raw, 32)[0]
        if entry.size < 60 and not flags & (FLAG_EXTENTS | FLAG_INLINE_DATA):
            # A fast symlink: the target is in i_block itself.
            return raw[40 : 40 + entry.size].decode("utf-8", errors="surrogateescape")
        data = b"".join(self._content(number, entry.size, 1 << 20))
        return data.decode("utf-8", errors="surrogateescape")
