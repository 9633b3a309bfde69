"""A read-only XFS reader (v5, the CRC format of mkfs.xfs 6.x, and the older v4).

Written from "XFS Algorithms & Data Structures". Everything on disk is big-endian. The
superblock gives the geometry; an inode number encodes its allocation group, the block in
that group and the slot in the block (``sb_agblklog``/``sb_inopblog``), so an inode is one
read away without the inode btrees. Data forks in local, extents and btree (``BMA3``/
``BMAP`` blocks) format are mapped; unwritten extents and holes read as zeros. Directories
are shortform, or their data blocks (``XDB3``/``XDD3``, ``XD2B``/``XD2D`` on v4) below the
32 GiB leaf offset are read linearly: the leaf, node and free blocks above it only index
them. Symlinks are local or remote (``XSLM`` block headers on v5). CRCs are not checked
(the standard library has no CRC32C); magic numbers and v5 inodes' own numbers are.

Only what is needed is read: the superblock, the inode blocks of the inodes looked up
(cached), the bmap btree and directory blocks of the inodes walked, and a file's own data.
The log is not replayed, so changes still only in the log of an unclean filesystem are not
seen. Realtime files are refused.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

SB_MAGIC = b"XFSB"
INODE_MAGIC = b"IN"
BMAP_MAGIC = {4: b"BMAP", 5: b"BMA3"}
#: Directory block magics per superblock version: (single-block directory, data block).
DIR_MAGIC = {4: (b"XD2B", b"XD2D"), 5: (b"XDB3", b"XDD3")}
SYMLINK_MAGIC = b"XSLM"
#: Header sizes of bmap btree, directory data and remote symlink blocks per version.
BMAP_HDR = {4: 24, 5: 72}
DIR_HDR = {4: 16, 5: 64}
SYMLINK_HDR = {4: 0, 5: 56}
#: Directory data blocks live below this byte offset of the directory's data fork.
DIR_LEAF_OFFSET = 32 << 30
DIR_FREE_TAG = 0xFFFF
MAX_SYMLINK = 1024

VERSION_DIRV2 = 0x2000
VERSION_MOREBITS = 0x8000
FEATURES2_FTYPE = 0x200
INCOMPAT_FTYPE = 0x1
#: v5 incompatible features that leave the structures read here as they are: ftype,
#: sparse inodes, meta UUID, bigtime, needsrepair, nrext64 (flagged per inode too),
#: exchange-range, parent pointers (kept in xattrs), metadir (the user tree is unchanged).
INCOMPAT_KNOWN = 0x1FF

FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3
DIFLAG_REALTIME = 0x1
DIFLAG2_BIGTIME = 0x8
DIFLAG2_NREXT64 = 0x10
#: Bigtime timestamps count nanoseconds from this many seconds before the epoch.
BIGTIME_EPOCH_OFFSET = 1 << 31
S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
KINDS: dict[int, Kind] = {S_IFDIR: "dir", S_IFREG: "file", S_IFLNK: "symlink"}
#: A bmap btree deeper than this is damaged (real ones stay far lower).
MAX_BTREE_DEPTH = 10


@dataclass(frozen=True)
class _Extent:
    """A run of a fork: ``count`` blocks at file block ``offset`` stored from filesystem
    block ``start`` (AG-encoded); ``unwritten`` ones are allocated but read as zeros."""

    offset: int
    start: int
    count: int
    unwritten: bool


@dataclass(frozen=True)
class _Inode:
    """What the reader needs of an on-disk inode; ``fork`` holds the data fork's bytes."""

    number: int
    mode: int
    format: int
    size: int
    mtime: float
    flags: int
    nextents: int
    fork: bytes

    @property
    def kind(self) -> Kind:
        return KINDS.get(self.mode & S_IFMT, "other")


def _extent(raw: bytes, at: int) -> _Extent:
    """A packed 128-bit bmap record: flag (1 bit), file offset (54), block (52), count (21)."""
    hi, lo = struct.unpack_from(">QQ", raw, at)
    return _Extent(
        offset=(hi >> 9) & ((1 << 54) - 1),
        start=((hi & 0x1FF) << 43) | (lo >> 21),
        count=lo & 0x1FFFFF,
        unwritten=bool(hi >> 63),
    )


class Xfs(InodeTree):
    type_name = "xfs"

    def __init__(self, read: Reader) -> None:
        self._read = read
        sb = read(0, 512)
        if len(sb) < 512 or sb[:4] != SB_MAGIC:
            raise FsError("xfs: no superblock (magic XFSB at byte 0)")
        block_size, root = struct.unpack_from(">I48xQ", sb, 4)
        ag_blocks, ag_count = struct.unpack_from(">II", sb, 84)
        versionnum, _, inode_size = struct.unpack_from(">HHH", sb, 100)
        block_log, _, _, inopb_log, agblk_log = struct.unpack_from(">5B", sb, 120)
        features2, incompat = struct.unpack_from(">I12xI", sb, 200)
        self.block_size: int = block_size
        self.root_inode: int = root
        self.ag_blocks: int = ag_blocks
        self.ag_count: int = ag_count
        self.inode_size: int = inode_size
        self.block_log: int = block_log
        self.inopb_log: int = inopb_log
        self.agblk_log: int = agblk_log
        self.version: int = versionnum & 0xF
        if self.version not in (4, 5):
            raise FsError(f"xfs: superblock version {self.version} is not supported (4 or 5)")
        if self.version == 4 and not versionnum & VERSION_DIRV2:
            raise FsError("xfs: version 1 directories are not supported")
        if self.version == 5 and incompat & ~INCOMPAT_KNOWN:
            raise FsError(f"xfs: unknown incompatible features {incompat & ~INCOMPAT_KNOWN:#x}")
        if (
            block_size != 1 << block_log
            or not 512 <= block_size <= 65536
            or not 256 <= inode_size <= block_size
            or inode_size << inopb_log != block_size
            or not ag_blocks
            or not ag_count
            or ag_blocks > 1 << agblk_log
        ):
            raise FsError("xfs: superblock geometry is not valid (block, inode or AG size)")
        if self.version == 5:
            self.ftype = bool(incompat & INCOMPAT_FTYPE)
        else:
            self.ftype = bool(versionnum & VERSION_MOREBITS and features2 & FEATURES2_FTYPE)
        #: Directory blocks may span several filesystem blocks (``mkfs.xfs -n size=``).
        self.dirblk_log: int = sb[192]
        self._inode_block = lru_cache(maxsize=256)(self._blocks)
        self._inode = lru_cache(maxsize=4096)(self._load_inode)
        self._dir_entries = lru_cache(maxsize=16)(self._load_dir_entries)

    # -- blocks and inodes ------------------------------------------------------------------
    def _disk_block(self, fsb: int) -> int:
        """The linear block number of an AG-encoded filesystem block number: AGs are
        ``sb_agblocks`` long on disk but numbered in steps of ``2**sb_agblklog``."""
        ag, block = fsb >> self.agblk_log, fsb & ((1 << self.agblk_log) - 1)
        if ag >= self.ag_count or block >= self.ag_blocks:
            raise FsError(f"xfs: block {fsb} is outside the filesystem")
        return ag * self.ag_blocks + block

    def _blocks(self, fsb: int, count: int = 1) -> bytes:
        data = self._read(self._disk_block(fsb) * self.block_size, count * self.block_size)
        if len(data) < count * self.block_size:
            raise FsError(f"xfs: block {fsb} is beyond the end of the volume")
        return data

    def _load_inode(self, number: int) -> _Inode:
        """An inode from the cached block that holds it: the number's low ``sb_inopblog``
        bits are the slot, the rest the AG-encoded block."""
        slot = number & ((1 << self.inopb_log) - 1)
        raw = self._inode_block(number >> self.inopb_log)
        raw = raw[slot * self.inode_size : (slot + 1) * self.inode_size]
        if raw[:2] != INODE_MAGIC:
            raise FsError(f"xfs: inode {number} has bad magic {raw[:2].hex()} (not 'IN')")
        mode, version, fmt = struct.unpack_from(">HBB", raw, 2)
        core, diflags2 = 100, 0
        if version >= 3:
            (diflags2,) = struct.unpack_from(">Q", raw, 120)
            (self_number,) = struct.unpack_from(">Q", raw, 152)
            if self_number != number:
                raise FsError(f"xfs: inode {number} records the number {self_number}")
            core = 176
        if mode == 0:
            raise FsError(f"xfs: inode {number} is not in use")
        if diflags2 & DIFLAG2_BIGTIME:
            (ns,) = struct.unpack_from(">Q", raw, 40)
            mtime = ns / 1e9 - BIGTIME_EPOCH_OFFSET
        else:
            sec, nsec = struct.unpack_from(">iI", raw, 40)
            mtime = sec + nsec / 1e9
        (size,) = struct.unpack_from(">Q", raw, 56)
        # Large extent counts move the data fork's count to the old padding at byte 24.
        at, fmt_count = (24, ">Q") if diflags2 & DIFLAG2_NREXT64 else (76, ">I")
        (nextents,) = struct.unpack_from(fmt_count, raw, at)
        forkoff = raw[82]
        (flags,) = struct.unpack_from(">H", raw, 90)
        fork_size = forkoff * 8 if forkoff else self.inode_size - core
        return _Inode(
            number=number,
            mode=mode,
            format=fmt,
            size=size,
            mtime=mtime,
            flags=flags,
            nextents=nextents,
            fork=raw[core : core + fork_size],
        )

    # -- mapping a fork ---------------------------------------------------------------------
    def _extents(self, inode: _Inode) -> list[_Extent]:
        """The data fork's extents, sorted by file offset."""
        if inode.format == FMT_EXTENTS:
            if inode.nextents * 16 > len(inode.fork):
                raise FsError(
                    f"xfs: inode {inode.number} claims {inode.nextents} extents, more than "
                    "its fork holds"
                )
            found = [_extent(inode.fork, 16 * i) for i in range(inode.nextents)]
        elif inode.format == FMT_BTREE:
            # The root in the inode: level, count, then keys and pointers each in as many
            # slots as the fork has room for.
            found = []
            level, records = struct.unpack_from(">HH", inode.fork, 0)
            slots = (len(inode.fork) - 4) // 16
            if level == 0 or records > slots:
                raise FsError(f"xfs: inode {inode.number} has a bad bmap btree root")
            for i in range(records):
                (child,) = struct.unpack_from(">Q", inode.fork, 4 + slots * 8 + 8 * i)
                self._bmap_node(inode.number, child, level - 1, found)
        else:
            raise FsError(
                f"xfs: inode {inode.number} has data fork format {inode.format}, "
                "not extents or btree"
            )
        found.sort(key=lambda e: e.offset)
        return found

    def _bmap_node(self, number: int, fsb: int, level: int, found: list[_Extent]) -> None:
        """Collect the records below one bmap btree block (``BMA3`` on v5, ``BMAP`` on v4)."""
        if level >= MAX_BTREE_DEPTH:
            raise FsError(f"xfs: inode {number}'s bmap btree is too deep")
        block = self._blocks(fsb)
        if block[:4] != BMAP_MAGIC[self.version]:
            raise FsError(f"xfs: inode {number}'s bmap block {fsb} has bad magic {block[:4]!r}")
        block_level, records = struct.unpack_from(">HH", block, 4)
        hdr = BMAP_HDR[self.version]
        slots = (self.block_size - hdr) // 16
        if block_level != level or records > slots:
            raise FsError(f"xfs: inode {number}'s bmap block {fsb} has a bad header")
        if level == 0:
            found.extend(_extent(block, hdr + 16 * i) for i in range(records))
            return
        for i in range(records):
            (child,) = struct.unpack_from(">Q", block, hdr + slots * 8 + 8 * i)
            self._bmap_node(number, child, level - 1, found)

    def _read_range(self, extents: list[_Extent], first: int, count: int) -> bytes:
        """``count`` blocks of a fork from file block ``first``, holes and unwritten
        extents as zeros: a directory block may straddle extents."""
        starts = [e.offset for e in extents]
        out = bytearray()
        block, end = first, first + count
        while block < end:
            i = bisect.bisect_right(starts, block) - 1
            ext = extents[i] if i >= 0 else None
            if ext is None or block >= ext.offset + ext.count:
                following = extents[i + 1].offset if i + 1 < len(extents) else end
                step = min(end, following) - block
                out += bytes(step * self.block_size)
            else:
                step = min(end, ext.offset + ext.count) - block
                if ext.unwritten:
                    out += bytes(step * self.block_size)
                else:
                    out += self._blocks(ext.start + block - ext.offset, step)
            block += step
        return bytes(out)

    def _content(self, inode: _Inode, extents: list[_Extent], piece: int) -> Iterator[bytes]:
        bs, size, pos = self.block_size, inode.size, 0
        for ext in extents:
            start = ext.offset * bs
            if start >= size:
                break
            if start < pos:
                raise FsError(f"xfs: inode {inode.number} has overlapping extents")
            while pos < start:  # a hole
                step = min(piece, start - pos)
                yield bytes(step)
                pos += step
            end = min(size, (ext.offset + ext.count) * bs)
            disk = self._disk_block(ext.start) * bs
            while pos < end:
                step = min(piece, end - pos)
                if ext.unwritten:
                    yield bytes(step)
                else:
                    data = self._read(disk + (pos - start), step)
                    if len(data) < step:
                        raise FsError(f"xfs: inode {inode.number}'s data is beyond the volume")
                    yield data
                pos += step
        while pos < size:  # a hole at the end
            step = min(piece, size - pos)
            yield bytes(step)
            pos += step

    # -- directories ------------------------------------------------------------------------
    def _load_dir_entries(self, number: int) -> tuple[tuple[str, int], ...]:
        """(name, inode number) of a directory, without ``.`` and ``..``; cached, as a path
        walk asks the same directories again and again."""
        inode = self._inode(number)
        if inode.format == FMT_LOCAL:
            return tuple(self._shortform(inode))
        extents = self._extents(inode)
        per = 1 << self.dirblk_log
        limit = DIR_LEAF_OFFSET >> self.block_log
        dir_blocks: set[int] = set()
        for ext in extents:
            stop = min(ext.offset + ext.count, limit)
            if ext.offset < stop:
                dir_blocks.update(range(ext.offset // per, (stop - 1) // per + 1))
        out: list[tuple[str, int]] = []
        for db in sorted(dir_blocks):
            data = self._read_range(extents, db * per, per)
            out.extend(self._data_block(number, db, data))
        return tuple(out)

    def _shortform(self, inode: _Inode) -> Iterator[tuple[str, int]]:
        """Entries kept in the inode: a count, whether inode numbers take 8 bytes (else
        4), the parent, then (name length, offset tag, name, [file type], inode number)."""
        fork = inode.fork[: inode.size]
        if len(fork) < 6:
            raise FsError(f"xfs: directory inode {inode.number} has a short shortform header")
        count, i8count = fork[0], fork[1]
        width = 8 if i8count else 4
        pos = 2 + width
        for _ in range(count):
            namelen = fork[pos] if pos < len(fork) else 0
            name_at = pos + 3
            ino_at = name_at + namelen + (1 if self.ftype else 0)
            if namelen == 0 or ino_at + width > len(fork):
                raise FsError(f"xfs: directory inode {inode.number} has a bad entry at {pos}")
            name = fork[name_at : name_at + namelen].decode("utf-8", errors="surrogateescape")
            yield name, int.from_bytes(fork[ino_at : ino_at + width], "big")
            pos = ino_at + width

    def _data_block(self, number: int, db: int, data: bytes) -> Iterator[tuple[str, int]]:
        """Entries of one directory data block: (inode u64, name length, name, [file type],
        tag u16) padded to 8 bytes, between unused regions (0xFFFF, length). A
        single-block directory ends with its leaf entries and a (count, stale) tail."""
        block_magic, data_magic = DIR_MAGIC[self.version]
        magic, end = data[:4], len(data)
        if magic == block_magic:
            (leaf_count,) = struct.unpack_from(">I", data, end - 8)
            end -= 8 + 8 * leaf_count
        elif magic != data_magic:
            raise FsError(f"xfs: directory inode {number} block {db} has bad magic {magic!r}")
        pos = DIR_HDR[self.version]
        if end < pos:
            raise FsError(f"xfs: directory inode {number} block {db} has a bad leaf count")
        extra = 1 if self.ftype else 0
        while pos + 8 <= end:
            (tag,) = struct.unpack_from(">H", data, pos)
            if tag == DIR_FREE_TAG:
                (length,) = struct.unpack_from(">H", data, pos + 2)
                if length < 8 or length % 8:
                    raise FsError(f"xfs: directory inode {number} block {db} has a bad gap")
                pos += length
                continue
            child, namelen = struct.unpack_from(">QB", data, pos)
            size = (8 + 1 + namelen + extra + 2 + 7) & ~7
            if namelen == 0 or pos + size > end:
                raise FsError(f"xfs: directory inode {number} block {db} has a bad entry at {pos}")
            name = data[pos + 9 : pos + 9 + namelen].decode("utf-8", errors="surrogateescape")
            if name not in (".", ".."):
                yield name, child
            pos += size

    # -- symlinks ---------------------------------------------------------------------------
    def _remote_symlink(self, inode: _Inode) -> bytes:
        """The target from the symlink's blocks. On v5 each block starts with an ``XSLM``
        header saying how many bytes of the target it holds; a first block without one is
        read whole, as on v4, because ``mkfs.xfs -p`` (6.1 at least) writes long links
        that way, and a restore had better return the target than refuse it."""
        hdr = SYMLINK_HDR[self.version]
        per_block = self.block_size - hdr
        blocks = (inode.size + per_block - 1) // per_block
        raw = self._read_range(self._extents(inode), 0, blocks)
        if not hdr or raw[:4] != SYMLINK_MAGIC:
            return raw[: inode.size]
        out = bytearray()
        for i in range(blocks):
            block = raw[i * self.block_size : (i + 1) * self.block_size]
            if block[:4] != SYMLINK_MAGIC:
                raise FsError(
                    f"xfs: symlink inode {inode.number} block {i} has bad magic {block[:4]!r}"
                )
            (length,) = struct.unpack_from(">I", block, 8)
            out += block[hdr : hdr + min(length, per_block)]
        return bytes(out[: inode.size])

    # -- the InodeTree hooks ----------------------------------------------------------------
    def _root(self) -> int:
        return self.root_inode

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
        return iter(self._dir_entries(number))

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        inode = self._inode(number)
        if inode.flags & DIFLAG_REALTIME:
            raise FsError(f"xfs: {entry.path}: its data is on a realtime device (unsupported)")
        # Mapped before the first piece, so that a damaged map fails the call itself.
        return self._content(inode, self._extents(inode), max(1, block))

    def _link(self, number: int, entry: Entry) -> str:
        inode = self._inode(number)
        if not 0 < inode.size <= MAX_SYMLINK:
            raise FsError(f"xfs: symlink inode {number} has a bad length {inode.size}")
        if inode.format == FMT_LOCAL:
            target = inode.fork[: inode.size]
        else:
            target = self._remote_symlink(inode)
        if len(target) != inode.size:
            raise FsError(f"xfs: symlink inode {number} holds {len(target)} of {inode.size} bytes")
        return target.decode("utf-8", errors="surrogateescape")
