"""A read-only NTFS reader.

Written from the Linux-NTFS project's description of the on-disk format ("NTFS
Documentation", flatcap.github.io/linux-ntfs) and Microsoft's [MS-XCA] for LZNT1.
Everything on disk is little-endian.

The boot sector gives the geometry: cluster size (a sectors-per-cluster byte above 128 is
a negative power of two), the ``$MFT``'s first cluster and the sizes of MFT records and
index blocks (a positive count of clusters, or a negative ``n`` for ``2**-n`` bytes).
Record 0 describes the ``$MFT`` itself; its ``$DATA`` runlist (followed into extension
records when the ``$MFT`` has an ``$ATTRIBUTE_LIST``) locates every other record, so one
record is one read. Records (``FILE``) and index blocks (``INDX``) carry an update sequence
array: the last two bytes of each 512-byte stride were swapped out for a sequence number
when written, and are checked and put back before anything is parsed.

A file's attributes are resident (the value inside the record) or non-resident (a runlist
of clusters; sparse runs read as zeros, bytes past the initialized size too); a file whose
attributes do not fit one record lists them in ``$ATTRIBUTE_LIST`` and the pieces of its
``$DATA`` are joined by their first VCN. The unnamed ``$DATA`` stream is the content (named
streams are not files); LZNT1-compressed streams are decompressed; encrypted ones (EFS),
and Windows' WOF- and dedup-backed files whose data lives elsewhere, are refused.

Directories are the ``$I30`` B+tree: ``$INDEX_ROOT`` in the record and ``INDX`` blocks of
``$INDEX_ALLOCATION``. A listing walks the tree from its root (so only live blocks are
read); a lookup descends it with the volume's own ``$UpCase`` table, which is how NTFS
collates names, and falls back to the walk if that misses. DOS 8.3 aliases are left out.
Windows symlinks and junctions, WSL symlinks and the Interix symlinks that ntfs-3g writes
are symlinks; other reparse points are "other". The times are ``$STANDARD_INFORMATION``'s.
The ``$LogFile`` is not replayed, so changes only in the log of an unclean volume are not
seen.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

ROOT = 5
UPCASE = 10
#: The metadata files in the root; a listing leaves them out, a lookup still finds them.
#: (Other "$" names there, such as ``$Recycle.Bin``, are ordinary folders.)
METADATA_NAMES = frozenset(
    [
        "$MFT",
        "$MFTMirr",
        "$LogFile",
        "$Volume",
        "$AttrDef",
        "$Bitmap",
        "$Boot",
        "$BadClus",
        "$Secure",
        "$UpCase",
        "$Extend",
    ]
)

AT_STANDARD_INFORMATION = 0x10
AT_ATTRIBUTE_LIST = 0x20
AT_DATA = 0x80
AT_INDEX_ROOT = 0x90
AT_INDEX_ALLOCATION = 0xA0
AT_REPARSE_POINT = 0xC0
AT_END = 0xFFFFFFFF
I30 = "$I30"
COLLATION_FILE_NAME = 1

RECORD_IN_USE, RECORD_IS_DIRECTORY = 0x1, 0x2
#: Attribute flags: the low byte is the compression method (1 = LZNT1).
ATTR_COMPRESSION_MASK, ATTR_ENCRYPTED = 0x00FF, 0x4000
FILE_ATTR_SYSTEM, FILE_ATTR_REPARSE, FILE_ATTR_ENCRYPTED = 0x4, 0x400, 0x4000
NAMESPACE_DOS = 2
ENTRY_HAS_CHILD, ENTRY_LAST = 0x1, 0x2
MFT_REF_MASK = (1 << 48) - 1

REPARSE_MOUNT_POINT = 0xA0000003
REPARSE_SYMLINK = 0xA000000C
REPARSE_LX_SYMLINK = 0xA000001D
#: Reparse tags whose file content is kept elsewhere (compressed by WOF, deduplicated).
REPARSE_ELSEWHERE = {0x80000017: "WOF-compressed data", 0x80000013: "deduplicated data"}
SYMLINK_RELATIVE = 0x1
INTERIX_SYMLINK = b"IntxLNK\x01"
#: An Interix symlink is a small system file; bigger system files are not read to check.
MAX_INTERIX_SIZE = 8 + 2 * 4096

#: 100 ns intervals between 1601-01-01 (FILETIME's epoch) and 1970-01-01.
FILETIME_EPOCH = 116444736000000000
#: Metadata read whole ($ATTRIBUTE_LIST, $UpCase, reparse data) is never this large.
MAX_METADATA = 16 << 20
#: LZNT1 splits a compression unit into chunks of this many bytes.
LZNT1_CHUNK = 4096
#: A B+tree deeper than this is damaged (real ones stay far lower).
MAX_INDEX_DEPTH = 32


@dataclass(frozen=True)
class _Run:
    """``count`` clusters of a stream from ``vcn`` on, stored from cluster ``lcn`` (None:
    sparse, they read as zeros)."""

    vcn: int
    lcn: int | None
    count: int


@dataclass(frozen=True)
class _Attribute:
    """One attribute record as stored in one MFT record (a non-resident one may be only
    the extent of its stream that starts at ``start_vcn``)."""

    type: int
    name: str
    flags: int
    value: bytes | None
    runs: tuple[_Run, ...] = ()
    start_vcn: int = 0
    #: Only the extent at VCN 0 carries the stream's sizes and compression unit.
    size: int = 0
    initialized: int = 0
    compression_unit: int = 0


@dataclass(frozen=True)
class _Stream:
    """An attribute's whole value: ``value`` when resident, else runs over clusters."""

    flags: int
    size: int
    initialized: int
    value: bytes | None = None
    runs: tuple[_Run, ...] = ()
    compression_unit: int = 0
    #: The first VCN of each run, for bisecting.
    starts: tuple[int, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class _IndexEntry:
    """An entry of an ``$I30`` node; the node's last entry has no name, only maybe a child."""

    name: str | None
    record: int
    namespace: int
    child: int | None


@dataclass(frozen=True)
class _Index:
    """A directory's ``$I30`` B+tree: the root node's entries and where its blocks are."""

    root: tuple[_IndexEntry, ...]
    block_size: int
    #: Bytes per VCN of the index allocation: a cluster, or a 512-byte block when index
    #: blocks are smaller than clusters.
    vcn_size: int
    allocation: _Stream | None
    collation: int


@dataclass(frozen=True)
class _Info:
    """What a listing needs of a file and what reading it needs."""

    kind: Kind
    size: int
    mtime: float | None
    data: _Stream | None
    encrypted: bool
    target: str | None = None
    #: Why the content cannot be read here, for files whose data is kept elsewhere.
    elsewhere: str | None = None


class Ntfs(InodeTree):
    """An NTFS volume read through ``read``; MFT records, attributes, index blocks and the
    ``$UpCase`` table are cached once read, so walking a tree reads each of them once."""

    type_name = "ntfs"
    casefold = True

    def __init__(self, read: Reader) -> None:
        self._read = read
        boot = read(0, 512)
        if len(boot) < 512 or boot[3:11] != b"NTFS    ":
            raise FsError("ntfs: no NTFS boot sector (OEM id 'NTFS' at byte 3)")
        sector, per_cluster = struct.unpack_from("<HB", boot, 11)
        (mft_lcn,) = struct.unpack_from("<Q", boot, 48)
        record_code, index_code = struct.unpack_from("<b3xb", boot, 64)
        # Above 128 the byte is a negative exponent: 2**(256 - n) sectors per cluster.
        per_cluster = per_cluster if per_cluster <= 128 else 1 << (256 - per_cluster)
        self.cluster = sector * per_cluster
        self.record_size = _coded_size(record_code, self.cluster)
        #: The volume's default; each directory's index root gives its own, which is used.
        self.index_size = _coded_size(index_code, self.cluster)
        if (
            sector not in (512, 1024, 2048, 4096)
            or not _power_of_two(self.cluster)
            or self.cluster > 2 << 20
            or not _power_of_two(self.record_size)
            or not 512 <= self.record_size <= 65536
        ):
            raise FsError(
                f"ntfs: the boot sector's geometry is not valid ({sector} bytes per sector, "
                f"{self.cluster}-byte clusters, {self.record_size}-byte MFT records)"
            )
        self._records = lru_cache(maxsize=1024)(self._load_record)
        self._attributes = lru_cache(maxsize=1024)(self._load_attributes)
        self._infos = lru_cache(maxsize=1024)(self._load_info)
        self._indexes = lru_cache(maxsize=64)(self._load_index)
        self._nodes = lru_cache(maxsize=256)(self._load_node)
        self._upcase_table: tuple[int, ...] | None = None

        # Record 0 is read straight from the boot sector's cluster; its first $DATA extent
        # then maps the records that hold the rest of the $MFT's runlist, if any.
        first = self._fixup(read(mft_lcn * self.cluster, self.record_size), b"FILE", "MFT record 0")
        head = next(
            (
                a
                for a in self._attrs_in(first, 0)
                if a.type == AT_DATA and not a.name and a.start_vcn == 0
            ),
            None,
        )
        if head is None or head.value is not None:
            raise FsError("ntfs: MFT record 0 ($MFT) has no non-resident $DATA")
        self._mft = _stream([head], "the $MFT's $DATA")
        # With that much of the $MFT mapped, its own attributes give its whole runlist.
        whole = self._stream(self._attributes(0), AT_DATA, "", "the $MFT's $DATA")
        self._mft = whole or self._mft

    # -- records and attributes ---------------------------------------------------------------
    def _fixup(self, raw: bytes, magic: bytes, what: str) -> bytes:
        """``raw`` with the update sequence array's bytes back at each stride's end; a
        stride whose end does not hold the sequence number was torn in writing."""
        if raw[:4] != magic:
            raise FsError(f"ntfs: {what} has no {magic.decode()} magic (found {raw[:4]!r})")
        usa_offset, usa_count = struct.unpack_from("<HH", raw, 4)
        strides = usa_count - 1
        if (
            strides < 1
            or len(raw) % strides
            or len(raw) // strides < 256
            or usa_offset < 8
            or usa_offset + 2 * usa_count > len(raw) // strides - 2
        ):
            raise FsError(f"ntfs: {what} has a bad update sequence array")
        stride = len(raw) // strides
        buf = bytearray(raw)
        usn = raw[usa_offset : usa_offset + 2]
        for i in range(1, usa_count):
            end = i * stride
            if buf[end - 2 : end] != usn:
                raise FsError(f"ntfs: {what} has a bad fixup (torn write or damage)")
            buf[end - 2 : end] = raw[usa_offset + 2 * i : usa_offset + 2 * i + 2]
        return bytes(buf)

    def _load_record(self, number: int) -> bytes:
        offset = number * self.record_size
        if number < 0 or offset + self.record_size > self._mft.size:
            raise FsError(f"ntfs: MFT record {number} is past the end of the $MFT")
        raw = self._read_stream(self._mft, offset, self.record_size, "the $MFT")
        return self._fixup(raw, b"FILE", f"MFT record {number}")

    def _attrs_in(self, record: bytes, number: int) -> list[_Attribute]:
        """The attribute records stored in one MFT record."""
        (pos,) = struct.unpack_from("<H", record, 20)
        out: list[_Attribute] = []
        while True:
            if pos + 8 > len(record):
                raise FsError(f"ntfs: MFT record {number} has no end of attributes marker")
            atype, length = struct.unpack_from("<II", record, pos)
            if atype == AT_END:
                return out
            if length < 24 or pos + length > len(record):
                raise FsError(f"ntfs: MFT record {number} has an attribute past its end")
            out.append(_attribute(record[pos : pos + length], number))
            pos += length

    def _load_attributes(self, number: int) -> tuple[_Attribute, ...]:
        """All attributes of a file, from its base record and the extension records that
        its ``$ATTRIBUTE_LIST`` names."""
        record = self._records(number)
        flags, base = struct.unpack_from("<H8xQ", record, 22)
        if not flags & RECORD_IN_USE:
            raise FsError(f"ntfs: MFT record {number} is not in use")
        if base & MFT_REF_MASK:
            raise FsError(
                f"ntfs: MFT record {number} is an extension of record {base & MFT_REF_MASK}"
            )
        attrs = self._attrs_in(record, number)
        listed = [a for a in attrs if a.type == AT_ATTRIBUTE_LIST]
        if not listed:
            return tuple(attrs)
        what = f"the $ATTRIBUTE_LIST of MFT record {number}"
        raw = self._value(_stream(listed, what), what)
        extensions: dict[int, None] = {}
        pos = 0
        while pos + 26 <= len(raw):
            (length,) = struct.unpack_from("<H", raw, pos + 4)
            (ref,) = struct.unpack_from("<Q", raw, pos + 16)
            if length < 26:
                raise FsError(f"ntfs: {what} has an entry of {length} bytes")
            if ref & MFT_REF_MASK != number:
                extensions[ref & MFT_REF_MASK] = None
            pos += length
        for other in extensions:
            extension = self._records(other)
            flags, base = struct.unpack_from("<H8xQ", extension, 22)
            if not flags & RECORD_IN_USE or base & MFT_REF_MASK != number:
                raise FsError(f"ntfs: MFT record {other} is not an extension of record {number}")
            attrs += self._attrs_in(extension, other)
        return tuple(attrs)

    def _stream(
        self, attrs: Iterable[_Attribute], atype: int, name: str, what: str
    ) -> _Stream | None:
        """The attribute ``atype`` named ``name`` (its extents joined), or None."""
        parts = [a for a in attrs if a.type == atype and a.name == name]
        return _stream(parts, what) if parts else None

    # -- reading streams ----------------------------------------------------------------------
    def _read_stream(self, stream: _Stream, offset: int, length: int, what: str) -> bytes:
        """Bytes ``[offset, offset + length)`` of a stream; sparse runs, clusters no run
        maps and bytes past the initialized size read as zeros."""
        if stream.value is not None:
            piece = stream.value[offset : offset + length]
            return piece + bytes(length - len(piece))
        valid = max(0, min(length, stream.initialized - offset))
        out = bytearray(self._read_clusters(stream, offset, valid, what))
        out += bytes(length - valid)
        return bytes(out)

    def _read_clusters(self, stream: _Stream, offset: int, length: int, what: str) -> bytes:
        out = bytearray()
        pos, end = offset, offset + length
        i = max(0, bisect.bisect_right(stream.starts, offset // self.cluster) - 1)
        while pos < end:
            if i >= len(stream.runs):
                out += bytes(end - pos)
                break
            run = stream.runs[i]
            run_start = run.vcn * self.cluster
            run_end = run_start + run.count * self.cluster
            if pos >= run_end:
                i += 1
                continue
            if pos < run_start:  # clusters no run maps
                n = min(end, run_start) - pos
                out += bytes(n)
                pos += n
                continue
            n = min(end, run_end) - pos
            if run.lcn is None:
                out += bytes(n)
            else:
                data = self._read(run.lcn * self.cluster + pos - run_start, n)
                if len(data) != n:
                    raise FsError(f"ntfs: {what} maps clusters past the end of the volume")
                out += data
            pos += n
            i += 1
        return bytes(out)

    def _value(self, stream: _Stream, what: str) -> bytes:
        """The whole value of a metadata stream (an attribute list, reparse data, ...)."""
        if stream.size > MAX_METADATA:
            raise FsError(f"ntfs: {what} is {stream.size} bytes long (damaged?)")
        if stream.flags & (ATTR_COMPRESSION_MASK | ATTR_ENCRYPTED) and stream.value is None:
            raise FsError(f"ntfs: {what} is compressed or encrypted")
        return self._read_stream(stream, 0, stream.size, what)

    def _plain(self, stream: _Stream, block: int, what: str) -> Iterator[bytes]:
        for pos in range(0, stream.size, block):
            yield self._read_stream(stream, pos, min(block, stream.size - pos), what)

    def _decompressed(self, stream: _Stream, block: int, what: str) -> Iterator[bytes]:
        """An LZNT1-compressed stream, one compression unit at a time: a unit's clusters
        are all stored (kept uncompressed), none (zeros), or its compressed bytes followed
        by sparse clusters."""
        unit_clusters = 1 << stream.compression_unit
        unit = unit_clusters * self.cluster

        def units() -> Iterator[bytes]:
            for start in range(0, stream.size, unit):
                stored = self._stored_clusters(stream, start // self.cluster, unit_clusters)
                if stored == unit_clusters:
                    data = self._read_clusters(stream, start, unit, what)
                elif stored == 0:
                    data = bytes(unit)
                else:
                    raw = self._read_clusters(stream, start, stored * self.cluster, what)
                    data = _lznt1(raw, unit, f"{what} at byte {start}")
                valid = max(0, min(unit, stream.initialized - start))
                yield (data[:valid] + bytes(unit - valid))[: stream.size - start]

        return _rechunk(units(), block)

    def _stored_clusters(self, stream: _Stream, vcn: int, count: int) -> int:
        """How many clusters of ``[vcn, vcn + count)`` are stored (not sparse)."""
        stored = 0
        i = max(0, bisect.bisect_right(stream.starts, vcn) - 1)
        for run in stream.runs[i:]:
            if run.vcn >= vcn + count:
                break
            if run.lcn is not None:
                stored += max(0, min(run.vcn + run.count, vcn + count) - max(run.vcn, vcn))
        return stored

    # -- files --------------------------------------------------------------------------------
    def _load_info(self, number: int) -> _Info:
        attrs = self._attributes(number)
        (flags,) = struct.unpack_from("<H", self._records(number), 22)
        std = next((a for a in attrs if a.type == AT_STANDARD_INFORMATION), None)
        mtime, file_attrs = None, 0
        if std is not None and std.value is not None and len(std.value) >= 36:
            modified, file_attrs = struct.unpack_from("<8xQ16xI", std.value)
            mtime = (modified - FILETIME_EPOCH) / 1e7
        where = f"MFT record {number}"
        data = self._stream(attrs, AT_DATA, "", f"the $DATA of {where}")
        encrypted = bool(file_attrs & FILE_ATTR_ENCRYPTED) or (
            data is not None and bool(data.flags & ATTR_ENCRYPTED)
        )
        size = data.size if data is not None else 0
        is_dir = bool(flags & RECORD_IS_DIRECTORY)
        reparse = self._stream(attrs, AT_REPARSE_POINT, "", f"the reparse point of {where}")
        if reparse is not None:
            raw = self._value(reparse, f"the reparse point of {where}")
            tag, target = _reparse_target(raw)
            if target is not None:
                return _Info("symlink", len(target.encode()), mtime, None, False, target)
            if tag in REPARSE_ELSEWHERE and not is_dir:
                return _Info("file", size, mtime, data, encrypted, None, REPARSE_ELSEWHERE[tag])
            return _Info("other", 0, mtime, None, encrypted)
        if is_dir:
            return _Info("dir", 0, mtime, None, encrypted)
        if data is None:  # $Secure, $Extend's $Quota and $ObjId: indexes, not files
            return _Info("other", 0, mtime, None, encrypted)
        if (
            file_attrs & FILE_ATTR_SYSTEM
            and len(INTERIX_SYMLINK) < data.size <= MAX_INTERIX_SIZE
            and not encrypted
            and not data.flags & ATTR_COMPRESSION_MASK
        ):
            raw = self._value(data, f"the $DATA of {where}")
            if raw.startswith(INTERIX_SYMLINK):
                target = raw[len(INTERIX_SYMLINK) :].decode("utf-16-le", errors="replace")
                return _Info("symlink", len(target.encode()), mtime, None, False, target)
        return _Info("file", size, mtime, data, encrypted)

    # -- directories --------------------------------------------------------------------------
    def _load_index(self, number: int) -> _Index:
        attrs = self._attributes(number)
        root = next((a for a in attrs if a.type == AT_INDEX_ROOT and a.name == I30), None)
        if root is None or root.value is None or len(root.value) < 32:
            raise FsError(f"ntfs: MFT record {number} has no $I30 index root")
        collation, block_size, per_block = struct.unpack_from("<4xIIB", root.value)
        if not _power_of_two(block_size) or block_size < 512 or not per_block:
            raise FsError(f"ntfs: the $I30 index root of MFT record {number} is damaged")
        # Blocks at least a cluster big are addressed in clusters, smaller ones in blocks
        # of ``block_size / per_block`` bytes (512).
        vcn_size = self.cluster if block_size >= self.cluster else block_size // per_block
        allocation = self._stream(
            attrs, AT_INDEX_ALLOCATION, I30, f"the $I30 allocation of MFT record {number}"
        )
        entries = _node_entries(root.value, 16, f"the $I30 index root of MFT record {number}")
        return _Index(entries, block_size, vcn_size, allocation, collation)

    def _load_node(self, number: int, vcn: int) -> tuple[_IndexEntry, ...]:
        index = self._indexes(number)
        what = f"index block {vcn} of directory MFT record {number}"
        if index.allocation is None:
            raise FsError(f"ntfs: {what} is named but the directory has no $INDEX_ALLOCATION")
        raw = self._read_stream(index.allocation, vcn * index.vcn_size, index.block_size, what)
        block = self._fixup(raw, b"INDX", what)
        (stored_vcn,) = struct.unpack_from("<Q", block, 16)
        if stored_vcn != vcn:
            raise FsError(f"ntfs: {what} says it is block {stored_vcn}")
        return _node_entries(block, 24, what)

    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        """Every (name, record) of the directory, walking its B+tree from the root; DOS
        8.3 aliases and the root's "." entry are left out."""
        index = self._indexes(number)
        pending: list[tuple[_IndexEntry, ...]] = [index.root]
        seen: set[int] = set()
        while pending:
            for entry in pending.pop():
                if entry.child is not None:
                    if entry.child in seen:
                        raise FsError(
                            f"ntfs: the $I30 index of MFT record {number} "
                            f"visits block {entry.child} twice"
                        )
                    seen.add(entry.child)
                    pending.append(self._nodes(number, entry.child))
                if entry.name is not None and _listed(entry):
                    yield entry.name, entry.record

    def _find(self, number: int, part: str) -> tuple[str, int] | None:
        """Descend the B+tree, comparing names as NTFS collates them; walk the whole
        directory only when that finds nothing (a damaged or oddly collated index)."""
        found = self._descend(number, part)
        return found if found is not None else super()._find(number, part)

    def _descend(self, number: int, part: str) -> tuple[str, int] | None:
        index = self._indexes(number)
        if index.collation != COLLATION_FILE_NAME:
            return None
        key = self._collation_key(part)
        entries = index.root
        for _ in range(MAX_INDEX_DEPTH):
            child = None
            for entry in entries:
                if entry.name is None:
                    child = entry.child
                    break
                stored = self._collation_key(entry.name)
                if stored == key:
                    return (entry.name, entry.record) if _listed(entry) else None
                if key < stored:
                    child = entry.child
                    break
            if child is None:
                return None
            entries = self._nodes(number, child)
        raise FsError(f"ntfs: the $I30 index of MFT record {number} is deeper than it can be")

    def _collation_key(self, name: str) -> tuple[int, ...]:
        """A name's UTF-16 code units upper-cased by ``$UpCase``: NTFS orders file names
        by comparing these."""
        table = self._upcase()
        raw = name.encode("utf-16-le", errors="surrogatepass")
        return tuple(table[unit] for unit in struct.unpack(f"<{len(raw) // 2}H", raw))

    def _upcase(self) -> tuple[int, ...]:
        if self._upcase_table is None:
            what = "the $UpCase table"
            data = self._stream(self._attributes(UPCASE), AT_DATA, "", what)
            if data is None or data.size != 2 * 65536:
                raise FsError(f"ntfs: {what} is not 65536 characters long")
            self._upcase_table = struct.unpack("<65536H", self._value(data, what))
        return self._upcase_table

    # -- the InodeTree hooks ------------------------------------------------------------------
    def _root(self) -> int:
        return ROOT

    def _hidden(self, number: int, name: str) -> bool:
        return number == ROOT and name in METADATA_NAMES

    def _entry(self, number: int, name: str, path: str) -> Entry:
        info = self._infos(number)
        return Entry(name=name, path=path, kind=info.kind, size=info.size, mtime=info.mtime)

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        info = self._infos(number)
        if info.elsewhere is not None:
            raise FsError(f"{entry.path}: NTFS {info.elsewhere} (unsupported)")
        if info.encrypted:
            raise FsError(f"{entry.path}: encrypted NTFS data (EFS, unsupported)")
        data = info.data
        if data is None:
            return iter(())
        what = f"the $DATA of {entry.path}"
        if data.value is not None or not data.flags & ATTR_COMPRESSION_MASK:
            return self._plain(data, block, what)
        if data.flags & ATTR_COMPRESSION_MASK != 1 or not data.compression_unit:
            raise FsError(
                f"{entry.path}: NTFS compression method {data.flags & ATTR_COMPRESSION_MASK} "
                f"(unsupported)"
            )
        return self._decompressed(data, block, what)

    def _link(self, number: int, entry: Entry) -> str:
        target = self._infos(number).target
        if target is None:
            raise FsError(f"{entry.path}: not a symbolic link")
        return target


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


def _coded_size(code: int, cluster: int) -> int:
    """A record size from the boot sector: clusters, or ``2**-code`` bytes when negative."""
    return cluster * code if code > 0 else 1 << -code


def _listed(entry: _IndexEntry) -> bool:
    return entry.namespace != NAMESPACE_DOS and entry.name != "."


def _attribute(raw: bytes, number: int) -> _Attribute:
    """Parse one attribute record (``raw`` is exactly its bytes)."""
    atype, _, non_resident, name_len, name_offset, flags = struct.unpack_from("<IIBBHH", raw)
    if name_offset + 2 * name_len > len(raw):
        raise FsError(f"ntfs: MFT record {number} has an attribute name past its end")
    name = raw[name_offset : name_offset + 2 * name_len].decode("utf-16-le", errors="replace")
    if not non_resident:
        value_len, value_offset = struct.unpack_from("<IH", raw, 16)
        if value_offset + value_len > len(raw):
            raise FsError(f"ntfs: MFT record {number} has a resident value past its end")
        value = raw[value_offset : value_offset + value_len]
        return _Attribute(atype, name, flags, value, size=len(value), initialized=len(value))
    if len(raw) < 64:
        raise FsError(f"ntfs: MFT record {number} has a truncated non-resident attribute")
    start_vcn, _, runs_offset, compression_unit = struct.unpack_from("<QQHH", raw, 16)
    _, size, initialized = struct.unpack_from("<QQQ", raw, 40)
    return _Attribute(
        atype,
        name,
        flags,
        None,
        runs=_runlist(raw, runs_offset, start_vcn, number),
        start_vcn=start_vcn,
        size=size,
        initialized=min(initialized, size),
        compression_unit=compression_unit,
    )


def _runlist(raw: bytes, pos: int, vcn: int, number: int) -> tuple[_Run, ...]:
    """Decode a mapping pairs array: each run is a header byte (low nibble: bytes of the
    length, high nibble: bytes of the signed LCN delta, 0 for a sparse run) and the two
    numbers; a zero header ends it."""
    runs: list[_Run] = []
    lcn = 0
    while True:
        if pos >= len(raw):
            raise FsError(f"ntfs: MFT record {number} has a runlist past its attribute")
        header = raw[pos]
        if not header:
            return tuple(runs)
        len_size, delta_size = header & 0xF, header >> 4
        pos += 1
        if not 1 <= len_size <= 8 or delta_size > 8 or pos + len_size + delta_size > len(raw):
            raise FsError(f"ntfs: MFT record {number} has a damaged runlist")
        count = int.from_bytes(raw[pos : pos + len_size], "little")
        pos += len_size
        if delta_size:
            lcn += int.from_bytes(raw[pos : pos + delta_size], "little", signed=True)
            if lcn < 0:
                raise FsError(f"ntfs: MFT record {number} has a run before cluster 0")
            runs.append(_Run(vcn, lcn, count))
        else:
            runs.append(_Run(vcn, None, count))
        pos += delta_size
        vcn += count


def _stream(parts: list[_Attribute], what: str) -> _Stream:
    """Join an attribute's extents (one per MFT record it spreads over) into one stream."""
    head = min(parts, key=lambda a: a.start_vcn)
    if head.value is not None:
        return _Stream(head.flags, len(head.value), len(head.value), value=head.value)
    if head.start_vcn != 0:
        raise FsError(f"ntfs: {what} has no extent at VCN 0")
    runs = tuple(sorted((r for p in parts for r in p.runs), key=lambda r: r.vcn))
    return _Stream(
        head.flags,
        head.size,
        head.initialized,
        runs=runs,
        compression_unit=head.compression_unit,
        starts=tuple(r.vcn for r in runs),
    )


def _node_entries(node: bytes, header: int, what: str) -> tuple[_IndexEntry, ...]:
    """The entries of one ``$I30`` node, from its index header at byte ``header``."""
    first, used = struct.unpack_from("<II", node, header)
    pos, end = header + first, min(header + used, len(node))
    out: list[_IndexEntry] = []
    while True:
        if pos + 16 > end:
            raise FsError(f"ntfs: {what} has no last index entry")
        ref, length, key_len, flags = struct.unpack_from("<QHHH", node, pos)
        if length < 16 or pos + length > end:
            raise FsError(f"ntfs: {what} has an index entry past its end")
        child = None
        if flags & ENTRY_HAS_CHILD:
            if length < 24:
                raise FsError(f"ntfs: {what} has an index entry too short for its child")
            (child,) = struct.unpack_from("<Q", node, pos + length - 8)
        if flags & ENTRY_LAST:
            out.append(_IndexEntry(None, 0, 0, child))
            return tuple(out)
        # The key is the file's $FILE_NAME: name length and namespace at 64, name at 66.
        key = pos + 16
        if key_len < 66 or 16 + key_len > length:
            raise FsError(f"ntfs: {what} has an index entry without a file name")
        name_len, namespace = node[key + 64], node[key + 65]
        if 66 + 2 * name_len > key_len:
            raise FsError(f"ntfs: {what} has a file name past its index entry")
        name = node[key + 66 : key + 66 + 2 * name_len].decode("utf-16-le", errors="replace")
        out.append(_IndexEntry(name, ref & MFT_REF_MASK, namespace, child))
        pos += length


def _reparse_target(raw: bytes) -> tuple[int, str | None]:
    """A reparse point's tag, and its target when it is a symlink (Windows symlinks and
    junctions: the print name, ``\\`` made ``/``; WSL symlinks: UTF-8 after a version)."""
    if len(raw) < 8:
        return 0, None
    tag, length = struct.unpack_from("<IH", raw)
    data = raw[8 : 8 + length]
    if tag == REPARSE_LX_SYMLINK and len(data) >= 4:
        return tag, data[4:].decode("utf-8", errors="replace")
    if tag not in (REPARSE_SYMLINK, REPARSE_MOUNT_POINT) or len(data) < 8:
        return tag, None
    sub_offset, sub_len, print_offset, print_len = struct.unpack_from("<4H", data)
    buffer = data[12:] if tag == REPARSE_SYMLINK else data[8:]
    substitute = buffer[sub_offset : sub_offset + sub_len].decode("utf-16-le", errors="replace")
    printed = buffer[print_offset : print_offset + print_len].decode("utf-16-le", errors="replace")
    if tag == REPARSE_MOUNT_POINT and substitute.startswith("\\??\\Volume{"):
        return tag, None  # a volume mounted on a folder, not a link
    target = printed or substitute.removeprefix("\\??\\")
    return tag, target.replace("\\", "/") if target else None


def _lznt1(src: bytes, size: int, what: str) -> bytes:
    """Decompress one LZNT1 compression unit to ``size`` bytes ([MS-XCA] 2.5). Chunks of
    4 KiB each start with a 16-bit header: bit 15 set when compressed, the low 12 bits the
    chunk's stored length minus 3 (with the header); a zero header ends the unit. Each chunk
    fills its own 4 KiB of output, zero-padded when it decompresses to less."""
    out = bytearray()
    pos = 0
    while pos + 2 <= len(src) and len(out) < size:
        (header,) = struct.unpack_from("<H", src, pos)
        if not header:
            break
        end = pos + 2 + (header & 0xFFF) + 1
        if end > len(src):
            raise FsError(f"ntfs: {what} has an LZNT1 chunk past its compression unit")
        chunk = src[pos + 2 : end]
        out += _lznt1_chunk(chunk, what) if header & 0x8000 else chunk
        out += bytes(-len(out) % LZNT1_CHUNK)
        pos = end
    return bytes(out[:size]) + bytes(max(0, size - len(out)))


def _lznt1_chunk(src: bytes, what: str) -> bytearray:
    """One compressed LZNT1 chunk: groups of a flag byte and eight tokens, a clear bit a
    literal byte, a set bit a 16-bit back-reference whose split between distance and
    length widens the distance as the output grows (4 bits up to 16 bytes out, 12 at most)."""
    out = bytearray()
    pos = 0
    while pos < len(src):
        flags = src[pos]
        pos += 1
        for bit in range(8):
            if pos >= len(src):
                break
            if not flags >> bit & 1:
                out.append(src[pos])
                pos += 1
                continue
            if pos + 2 > len(src) or not out:
                raise FsError(f"ntfs: {what} has a damaged LZNT1 chunk")
            (token,) = struct.unpack_from("<H", src, pos)
            pos += 2
            distance_bits = max(4, (len(out) - 1).bit_length())
            length_bits = 16 - distance_bits
            length = (token & ((1 << length_bits) - 1)) + 3
            distance = (token >> length_bits) + 1
            if distance > len(out) or len(out) + length > LZNT1_CHUNK:
                raise FsError(f"ntfs: {what} has a damaged LZNT1 chunk")
            start = len(out) - distance
            if distance >= length:
                out += out[start : start + length]
            else:  # the copy overlaps what it writes: repeat the last ``distance`` bytes
                pattern = out[start:]
                out += (pattern * (length // distance + 1))[:length]
    return out


def _rechunk(pieces: Iterator[bytes], block: int) -> Iterator[bytes]:
    """The bytes of ``pieces`` again, in pieces of ``block`` bytes (the last shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= block:
            yield bytes(buffer[:block])
            del buffer[:block]
    if buffer:
        yield bytes(buffer)
