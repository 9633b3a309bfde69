"""A read-only ext2/ext3/ext4 reader.

Written from the kernel's "ext4 Data Structures and Algorithms". Everything on disk is
little-endian. The superblock gives the geometry; the group descriptors (32 or 64 bytes,
in the classic table after the superblock or spread over meta groups with ``meta_bg``)
give each group's inode table, so an inode is one descriptor and one table block away.

A file's blocks are mapped by an extent tree (index nodes of any depth; unwritten extents
read as zeros) or, on ext2/3, by a block map (12 direct pointers, then single, double and
triple indirect blocks); unmapped blocks are holes and read as zeros. Small files,
directories and symlinks may live in the inode (``inline_data``: ``i_block`` and then the
``system.data`` extended attribute). Directories are read linearly: the index blocks of an
htree look like empty entries to a linear reader, so every name is still found. Symlinks
are fast (the target in ``i_block``) or slow (the target in a data block).

Only what is needed is read: the superblock, the descriptor blocks of the groups touched
and the inode table blocks of the inodes looked up (both cached), the extent index or
indirect blocks of the files walked, and each file's own data blocks, lazily as the file
is read. The journal is not replayed, so changes still only in the journal of an unclean
filesystem are not seen. Encrypted files and directories, and the long-gone ext2
compression, are refused with FsError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

SUPERBLOCK_AT = 1024
MAGIC = 0xEF53
ROOT_INODE = 2
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_REV = 0
MAX_LOG_BLOCK_SIZE = 6  # 64 KiB

COMPAT_SPARSE_SUPER2 = 0x200
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
#: Incompatible features that leave the structures read here readable: the journal is
#: not replayed (recover), dirdata entries keep their rec_len, encryption is checked per
#: inode, and casefolded directories store names as they were given.
INCOMPAT_KNOWN = (
    INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD
)

FLAG_COMPRESSED = 0x4
FLAG_ENCRYPT = 0x800
FLAG_HUGE_FILE = 0x40000
FLAG_EXTENTS = 0x80000
FLAG_INLINE_DATA = 0x10000000

EXTENT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5
#: An extent longer than this is unwritten (its length is then ``len - 32768``).
INIT_MAX_LEN = 32768
#: ``i_block``: 15 block pointers, or an extent root, or inline data, or a fast symlink.
I_BLOCK = slice(40, 100)
I_BLOCK_SIZE = 60
DIRECT_BLOCKS = 12
#: An inline directory's ``i_block`` starts with its parent's inode number.
INLINE_DIR_PARENT = 4

XATTR_MAGIC = 0xEA020000
XATTR_ENTRY = struct.Struct("<BBHIII")
XATTR_INDEX_SYSTEM = 7
XATTR_INLINE_NAME = b"data"

DIRENT = struct.Struct("<IHBB")
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
KINDS: dict[int, Kind] = {S_IFDIR: "dir", S_IFREG: "file", S_IFLNK: "symlink"}

#: Parsed inodes, descriptor blocks, inode table blocks and directories kept.
INODE_CACHE = 4096
DESCRIPTOR_CACHE = 64
TABLE_CACHE = 256
DIRECTORY_CACHE = 16


@dataclass(frozen=True)
class Superblock:
    """The superblock fields this reader uses."""

    inodes_count: int
    blocks_count: int
    first_data_block: int
    block_size: int
    cluster_size: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    desc_size: int
    first_meta_bg: int
    compat: int
    incompat: int
    ro_compat: int
    backup_bgs: tuple[int, int]

    @classmethod
    def parse(cls, raw: bytes) -> Superblock:
        if len(raw) < 1024 or struct.unpack_from("<H", raw, 0x38)[0] != MAGIC:
            raise FsError(f"ext4: no superblock (magic {MAGIC:#x} at byte {SUPERBLOCK_AT + 0x38})")
        inodes, blocks_lo, _, _, _, first_data, log_block, log_cluster = struct.unpack_from(
            "<8I", raw, 0
        )
        blocks_per_group, _, inodes_per_group = struct.unpack_from("<3I", raw, 0x20)
        (rev,) = struct.unpack_from("<I", raw, 0x4C)
        (inode_size,) = struct.unpack_from("<H", raw, 0x58)
        compat, incompat, ro_compat = struct.unpack_from("<3I", raw, 0x5C)
        (desc_size,) = struct.unpack_from("<H", raw, 0xFE)
        (first_meta_bg,) = struct.unpack_from("<I", raw, 0x104)
        (blocks_hi,) = struct.unpack_from("<I", raw, 0x150)
        backup_bgs = struct.unpack_from("<2I", raw, 0x24C)
        if log_block > MAX_LOG_BLOCK_SIZE:
            raise FsError(f"ext4: block size 2^{10 + log_block} is not valid")
        wide = bool(incompat & INCOMPAT_64BIT)
        sb = cls(
            inodes_count=inodes,
            blocks_count=blocks_lo | (blocks_hi << 32 if wide else 0),
            first_data_block=first_data,
            block_size=1024 << log_block,
            cluster_size=1024 << min(log_cluster, 30),
            blocks_per_group=blocks_per_group,
            inodes_per_group=inodes_per_group,
            inode_size=GOOD_OLD_INODE_SIZE if rev == GOOD_OLD_REV else inode_size,
            desc_size=desc_size if wide else 32,
            first_meta_bg=first_meta_bg,
            compat=compat,
            incompat=incompat,
            ro_compat=ro_compat,
            backup_bgs=(backup_bgs[0], backup_bgs[1]),
        )
        sb.check()
        return sb

    def check(self) -> None:
        """Refuse geometry that would make the reader read nonsense, and features it
        cannot read."""
        if not self.inodes_per_group or not self.blocks_per_group:
            raise FsError("ext4: the superblock has no inodes or blocks per group")
        size = self.inode_size
        if size < GOOD_OLD_INODE_SIZE or size & (size - 1) or size > self.block_size:
            raise FsError(f"ext4: inode size {size} is not valid")
        if self.desc_size < 32 or self.desc_size & (self.desc_size - 1):
            raise FsError(f"ext4: group descriptor size {self.desc_size} is not valid")
        if self.incompat & INCOMPAT_JOURNAL_DEV:
            raise FsError("ext4: this is an external journal device, not a filesystem")
        if self.incompat & INCOMPAT_COMPRESSION:
            raise FsError("ext4: compressed ext2 (the compression feature) is unsupported")
        unknown = self.incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise FsError(f"ext4: unsupported incompatible features {unknown:#x}")

    def has_super(self, group: int) -> bool:
        """Whether ``group`` starts with a superblock copy (and so, with meta_bg, its
        descriptor block comes one block later)."""
        if group == 0:
            return True
        if self.compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if not self.ro_compat & RO_COMPAT_SPARSE_SUPER or group == 1:
            return True
        return any(_is_power(group, base) for base in (3, 5, 7))


@dataclass(frozen=True)
class Inode:
    """The inode fields this reader uses."""

    number: int
    mode: int
    size: int
    mtime: float
    flags: int
    #: i_blocks in 512-byte sectors (data, index and extended attribute blocks).
    sectors: int
    file_acl: int
    i_block: bytes
    #: The in-inode extended attributes after their magic (empty when there are none).
    xattrs: bytes

    @property
    def kind(self) -> Kind:
        return KINDS.get(self.mode & S_IFMT, "other")


class Run(NamedTuple):
    """``length`` blocks of a file from ``logical``: at ``physical``, or zeros when None."""

    logical: int
    physical: int | None
    length: int


class Ext4(InodeTree):
    """An ext2, ext3 or ext4 filesystem on a volume."""

    type_name = "ext4"

    def __init__(self, read: Reader) -> None:
        self._read = read
        self.sb = Superblock.parse(read(SUPERBLOCK_AT, 1024))
        self.block_size = self.sb.block_size
        self._inode = lru_cache(maxsize=INODE_CACHE)(self._load_inode)
        self._descriptor_block = lru_cache(maxsize=DESCRIPTOR_CACHE)(self._block)
        self._table_block = lru_cache(maxsize=TABLE_CACHE)(self._block)
        self._listing = lru_cache(maxsize=DIRECTORY_CACHE)(self._load_listing)
        if self._inode(ROOT_INODE).kind != "dir":
            raise FsError(f"ext4: the root inode {ROOT_INODE} is not a directory")

    # -- blocks, group descriptors and inodes -----------------------------------------------
    def _block(self, number: int) -> bytes:
        data = self._read(number * self.block_size, self.block_size)
        if len(data) < self.block_size:
            raise FsError(f"ext4: block {number} is past the end of the volume")
        return data

    def _descriptor_location(self, index: int) -> int:
        """The block holding the ``index``-th block of group descriptors."""
        sb = self.sb
        sb_block = SUPERBLOCK_AT // self.block_size
        if not sb.incompat & INCOMPAT_META_BG or index < sb.first_meta_bg:
            return sb_block + 1 + index
        # meta_bg: each meta group's descriptors are in its first group (after a
        # superblock copy when that group has one).
        group = index * (self.block_size // sb.desc_size)
        if group == 0:
            return sb_block + 1
        first = sb.first_data_block + group * sb.blocks_per_group
        return first + (1 if sb.has_super(group) else 0)

    def _inode_table(self, group: int) -> int:
        per_block = self.block_size // self.sb.desc_size
        index, slot = divmod(group, per_block)
        location = self._descriptor_location(index)
        at = slot * self.sb.desc_size
        raw = self._descriptor_block(location)[at : at + self.sb.desc_size]
        lo = int(struct.unpack_from("<I", raw, 0x8)[0])
        hi = int(struct.unpack_from("<I", raw, 0x28)[0]) if self.sb.desc_size >= 64 else 0
        table = lo | hi << 32
        if not 0 < table < self.sb.blocks_count:
            raise FsError(f"ext4: group {group}'s inode table is at block {table}, not valid")
        return table

    def _load_inode(self, number: int) -> Inode:
        if not 1 <= number <= self.sb.inodes_count:
            raise FsError(f"ext4: inode {number} is out of range (1-{self.sb.inodes_count})")
        group, index = divmod(number - 1, self.sb.inodes_per_group)
        offset = index * self.sb.inode_size
        table = self._table_block(self._inode_table(group) + offset // self.block_size)
        start = offset % self.block_size
        return self._parse_inode(number, table[start : start + self.sb.inode_size])

    def _parse_inode(self, number: int, raw: bytes) -> Inode:
        mode, size_lo, mtime = struct.unpack_from("<H2xI8xi", raw, 0)
        sectors_lo, flags = struct.unpack_from("<II", raw, 0x1C)
        acl_lo, size_hi = struct.unpack_from("<II", raw, 0x68)
        sectors_hi, acl_hi = struct.unpack_from("<HH", raw, 0x74)
        wide_size = mode & S_IFMT == S_IFREG or self.sb.incompat & INCOMPAT_LARGEDIR
        sectors = sectors_lo | (sectors_hi << 32 if self.sb.ro_compat & RO_COMPAT_HUGE_FILE else 0)
        if flags & FLAG_HUGE_FILE:
            sectors *= self.block_size // 512
        extra = self._extra_isize(raw)
        seconds, nanoseconds = float(mtime), 0
        if extra >= 12:  # i_mtime_extra (at 0x88) is there: 2 epoch bits, then ns
            (mtime_extra,) = struct.unpack_from("<I", raw, 0x88)
            seconds += (mtime_extra & 3) << 32
            nanoseconds = mtime_extra >> 2
        return Inode(
            number=number,
            mode=mode,
            size=size_lo | (size_hi << 32 if wide_size else 0),
            mtime=seconds + nanoseconds / 1e9,
            flags=flags,
            sectors=sectors,
            file_acl=acl_lo | acl_hi << 32,
            i_block=raw[I_BLOCK],
            xattrs=self._inode_xattrs(raw, extra),
        )

    def _extra_isize(self, raw: bytes) -> int:
        """The size of the fields after the 128 bytes of the original inode, or 0 when
        there are none (128-byte inodes) or the size is not valid."""
        if self.sb.inode_size <= GOOD_OLD_INODE_SIZE:
            return 0
        (extra,) = struct.unpack_from("<H", raw, GOOD_OLD_INODE_SIZE)
        if extra % 4 or GOOD_OLD_INODE_SIZE + extra > self.sb.inode_size:
            return 0
        return int(extra)

    def _inode_xattrs(self, raw: bytes, extra: int) -> bytes:
        if self.sb.inode_size <= GOOD_OLD_INODE_SIZE:
            return b""
        start = GOOD_OLD_INODE_SIZE + extra
        if start + 4 > len(raw) or struct.unpack_from("<I", raw, start)[0] != XATTR_MAGIC:
            return b""
        return raw[start + 4 :]

    # -- inline data --------------------------------------------------------------------------
    def _system_data(self, inode: Inode) -> bytes:
        """The value of the in-inode ``system.data`` attribute: the part of an inline
        file or directory beyond ``i_block``."""
        area, pos = inode.xattrs, 0
        while pos + XATTR_ENTRY.size <= len(area) and area[pos : pos + 4] != bytes(4):
            name_len, index, value_at, value_inode, value_size, _ = XATTR_ENTRY.unpack_from(
                area, pos
            )
            name = area[pos + XATTR_ENTRY.size : pos + XATTR_ENTRY.size + name_len]
            if index == XATTR_INDEX_SYSTEM and name == XATTR_INLINE_NAME:
                if value_inode or value_at + value_size > len(area):
                    raise FsError(f"ext4: inode {inode.number}'s inline data is not readable")
                return area[value_at : value_at + value_size]
            pos += (XATTR_ENTRY.size + name_len + 3) & ~3
        return b""

    def _inline(self, inode: Inode) -> bytes:
        data = (inode.i_block + self._system_data(inode))[: inode.size]
        if len(data) < inode.size:
            raise FsError(
                f"ext4: inode {inode.number} keeps {len(data)} of its {inode.size} bytes inline"
            )
        return data

    # -- mapping a file's blocks --------------------------------------------------------------
    def _runs(self, inode: Inode) -> Iterator[Run]:
        """The runs of a file's blocks in logical order, found as they are needed."""
        if inode.flags & FLAG_EXTENTS:
            return self._extent_runs(inode, inode.i_block, None)
        return _merged(self._mapped_blocks(inode))

    def _check_blocks(self, inode: Inode, physical: int, count: int) -> None:
        if physical + count > self.sb.blocks_count:
            raise FsError(
                f"ext4: inode {inode.number} maps blocks {physical}-{physical + count - 1}, "
                f"past the end of the filesystem ({self.sb.blocks_count} blocks)"
            )

    def _extent_runs(self, inode: Inode, node: bytes, depth_wanted: int | None) -> Iterator[Run]:
        """The runs of an extent tree node: its leaf extents, or those of its children."""
        magic, entries, capacity, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC:
            raise FsError(
                f"ext4: inode {inode.number} has an extent header with bad magic {magic:#06x}"
            )
        if depth > MAX_EXTENT_DEPTH or depth_wanted not in (None, depth):
            raise FsError(f"ext4: inode {inode.number}'s extent tree has a node of depth {depth}")
        if entries > capacity or 12 + 12 * entries > len(node):
            raise FsError(f"ext4: inode {inode.number}'s extent node holds {entries} entries")
        for at in range(12, 12 + 12 * entries, 12):
            if depth == 0:
                logical, length, hi, lo = struct.unpack_from("<IHHI", node, at)
                unwritten = length > INIT_MAX_LEN
                length -= INIT_MAX_LEN if unwritten else 0
                physical = lo | hi << 32
                self._check_blocks(inode, physical, length)
                yield Run(logical, None if unwritten else physical, length)
            else:
                _, lo, hi = struct.unpack_from("<IIH", node, at)
                child = lo | hi << 32
                self._check_blocks(inode, child, 1)
                yield from self._extent_runs(inode, self._block(child), depth - 1)

    def _mapped_blocks(self, inode: Inode) -> Iterator[tuple[int, int]]:
        """(logical, physical) of each block of a block-mapped (ext2/3) file up to its
        size: 12 direct pointers, then a single, a double and a triple indirect block."""
        pointers = struct.unpack("<15I", inode.i_block)
        total = -(-inode.size // self.block_size)
        for logical, pointer in enumerate(pointers[:DIRECT_BLOCKS]):
            if pointer and logical < total:
                self._check_blocks(inode, pointer, 1)
                yield logical, pointer
        per = self.block_size // 4
        first = DIRECT_BLOCKS
        for level, pointer in enumerate(pointers[DIRECT_BLOCKS:], start=1):
            yield from self._indirect(inode, pointer, level, first, total)
            first += per**level

    def _indirect(
        self, inode: Inode, pointer: int, level: int, first: int, total: int
    ) -> Iterator[tuple[int, int]]:
        """The blocks under an indirect block of ``level`` (1 single, 2 double, 3 triple)
        that maps logical blocks from ``first``; a zero pointer is a hole."""
        if not pointer or first >= total:
            return
        self._check_blocks(inode, pointer, 1)
        per = self.block_size // 4
        span = per ** (level - 1)
        for i, child in enumerate(struct.unpack(f"<{per}I", self._block(pointer))):
            logical = first + i * span
            if logical >= total:
                return
            if level > 1:
                yield from self._indirect(inode, child, level - 1, logical, total)
            elif child:
                self._check_blocks(inode, child, 1)
                yield logical, child

    # -- reading a file -----------------------------------------------------------------------
    def _content(self, inode: Inode, block: int) -> Iterator[bytes]:
        """A file's bytes in pieces of at most ``block``; holes and unwritten extents are
        zeros, read from nowhere."""
        if block < 1:
            raise ValueError(f"block must be positive, not {block}")
        if inode.flags & (FLAG_ENCRYPT | FLAG_COMPRESSED):
            raise FsError(f"ext4: inode {inode.number} is encrypted or compressed (unsupported)")
        if inode.flags & FLAG_INLINE_DATA:
            data = self._inline(inode)
            for at in range(0, len(data), block):
                yield data[at : at + block]
            return
        bs, size, pos = self.block_size, inode.size, 0
        for run in self._runs(inode):
            start = run.logical * bs
            if start >= size:
                break
            if start < pos:
                raise FsError(f"ext4: inode {inode.number} maps logical block {run.logical} twice")
            yield from _zeros(start - pos, block)
            end = min(size, start + run.length * bs)
            if run.physical is None:
                yield from _zeros(end - start, block)
            else:
                yield from self._data(inode, run.physical * bs, end - start, block)
            pos = end
        yield from _zeros(size - pos, block)

    def _data(self, inode: Inode, offset: int, length: int, block: int) -> Iterator[bytes]:
        for at in range(offset, offset + length, block):
            want = min(block, offset + length - at)
            piece = self._read(at, want)
            if len(piece) < want:
                raise FsError(f"ext4: inode {inode.number}'s data at byte {at} is past the volume")
            yield piece

    # -- directories and symlinks -------------------------------------------------------------
    def _load_listing(self, number: int) -> tuple[tuple[str, int], ...]:
        """A directory's (name, inode) pairs, without ``.`` and ``..``."""
        inode = self._inode(number)
        if inode.kind != "dir":
            raise FsError(f"ext4: inode {number} is not a directory")
        if inode.flags & FLAG_ENCRYPT:
            raise FsError(f"ext4: directory inode {number} is encrypted (unsupported)")
        if inode.flags & FLAG_INLINE_DATA:
            # Two separate areas of entries: i_block after the parent's number, and
            # the system.data attribute.
            areas = [inode.i_block[INLINE_DIR_PARENT:], self._system_data(inode)]
        else:
            data = b"".join(self._content(inode, 1 << 20))
            areas = [data[at : at + self.block_size] for at in range(0, len(data), self.block_size)]
        found: list[tuple[str, int]] = []
        for area in areas:
            found += self._dirents(number, area)
        return tuple(found)

    def _dirents(self, number: int, area: bytes) -> Iterator[tuple[str, int]]:
        """The live entries of one directory block (or inline area). An htree's index
        blocks hold one empty entry spanning the block, so they yield nothing."""
        if area.count(0) == len(area):
            return  # a hole in the directory
        pos = 0
        while pos + DIRENT.size <= len(area):
            child, rec_len, name_len, file_type = DIRENT.unpack_from(area, pos)
            rec_len = self._rec_len(rec_len)
            if not self.sb.incompat & INCOMPAT_FILETYPE:
                name_len |= file_type << 8  # the name length's high byte, then
            if rec_len < DIRENT.size + name_len or rec_len % 4 or pos + rec_len > len(area):
                raise FsError(
                    f"ext4: directory inode {number} has a damaged entry "
                    f"(rec_len {rec_len}, name_len {name_len})"
                )
            name = area[pos + DIRENT.size : pos + DIRENT.size + name_len]
            if child and name not in (b".", b".."):
                yield name.decode("utf-8", errors="surrogateescape"), child
            pos += rec_len

    def _rec_len(self, raw: int) -> int:
        """An entry's length; 64 KiB blocks keep two more bits in its low bits."""
        if self.block_size < 65536:
            return raw
        if raw in (0, 65535):
            return 65536
        return (raw & 65532) | (raw & 3) << 16

    def _is_fast_symlink(self, inode: Inode) -> bool:
        """A fast symlink has no data block: its i_blocks count at most an extended
        attribute block."""
        ea_sectors = self.sb.cluster_size // 512 if inode.file_acl else 0
        return inode.sectors <= ea_sectors

    # -- the InodeTree hooks --------------------------------------------------------------------
    def _root(self) -> int:
        return ROOT_INODE

    def _entry(self, number: int, name: str, path: str) -> Entry:
        inode = self._inode(number)
        return Entry(
            name=name,
            path=path,
            kind=inode.kind,
            size=inode.size,
            mtime=inode.mtime,
            mode=inode.mode & 0o7777,
        )

    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        return iter(self._listing(number))

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        return self._content(self._inode(number), block)

    def _link(self, number: int, entry: Entry) -> str:
        inode = self._inode(number)
        if inode.flags & FLAG_ENCRYPT:
            raise FsError(f"{entry.path}: the symlink is encrypted (unsupported)")
        if inode.flags & FLAG_INLINE_DATA:
            target = self._inline(inode)
        elif self._is_fast_symlink(inode):
            if inode.size > I_BLOCK_SIZE:
                raise FsError(f"ext4: inode {number} is a fast symlink of {inode.size} bytes")
            target = inode.i_block[: inode.size]
        else:
            target = b"".join(self._content(inode, 1 << 20))
        return target.decode("utf-8", errors="surrogateescape")


def _merged(blocks: Iterator[tuple[int, int]]) -> Iterator[Run]:
    """Runs of consecutive (logical, physical) blocks."""
    run: Run | None = None
    for logical, physical in blocks:
        if (
            run is not None
            and run.physical is not None
            and run.logical + run.length == logical
            and run.physical + run.length == physical
        ):
            run = run._replace(length=run.length + 1)
            continue
        if run is not None:
            yield run
        run = Run(logical, physical, 1)
    if run is not None:
        yield run


@lru_cache(maxsize=4)
def _zero_block(length: int) -> bytes:
    return bytes(length)


def _zeros(length: int, block: int) -> Iterator[bytes]:
    """``length`` zero bytes in pieces of at most ``block``; full pieces are one shared
    object, so a large hole costs no memory."""
    if length >= block:
        full = _zero_block(block)
        while length >= block:
            yield full
            length -= block
    if length > 0:
        yield bytes(length)


def _is_power(number: int, base: int) -> bool:
    while number > 1 and number % base == 0:
        number //= base
    return number == 1
