"""A read-only NTFS reader.

Boot sector geometry; MFT records (``FILE``, update sequence fixups checked) located
through the ``$MFT``'s own ``$DATA`` runlist; resident and non-resident attributes
(runlists, sparse runs read as zeros, bytes past the initialized size as zeros);
``$ATTRIBUTE_LIST`` for files whose attributes spill into extension records;
``$FILE_NAME`` (Win32 names preferred over DOS 8.3 ones); directories from
``$INDEX_ROOT`` and every in-use ``INDX`` block of ``$INDEX_ALLOCATION``. The unnamed
``$DATA`` stream is a file's content; compressed or encrypted files are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from csbs.fs import Entry, FsError, InodeTree, Kind, Reader

ROOT = 5
AT_ATTRIBUTE_LIST, AT_FILE_NAME, AT_DATA = 0x20, 0x30, 0x80
AT_STANDARD_INFORMATION = 0x10
AT_INDEX_ROOT, AT_INDEX_ALLOCATION, AT_BITMAP, AT_END = 0x90, 0xA0, 0xB0, 0xFFFFFFFF
FLAG_IN_USE, FLAG_DIRECTORY = 0x1, 0x2
ATTR_COMPRESSED, ATTR_ENCRYPTED, ATTR_SPARSE = 0x1, 0x4000, 0x8000
NS_DOS = 2
INDEX_ENTRY_NODE, INDEX_ENTRY_END = 0x1, 0x2
FILE_ATTR_REPARSE = 0x400
#: 100 ns intervals between 1601-01-01 and 1970-01-01.
EPOCH_DELTA = 116444736000000000
MFT_REF_MASK = (1 << 48) - 1


@dataclass
class Attribute:
    type: int
    name: str
    flags: int
    resident: bool
    value: bytes = b""
    #: Non-resident: (cluster or None for sparse, count) runs, and sizes.
    runs: tuple[tuple[int | None, int], ...] = ()
    start_vcn: int = 0
    size: int = 0
    initialized: int = 0


class Ntfs(InodeTree):
    casefold = True
    type_name = "ntfs"

    def __init__(self, read: Reader) -> None:
        self._read = read
        boot = read(0, 512)
        if boot[3:11] != b"NTFS    ":
            raise FsError("ntfs: no NTFS boot sector (OEM id at byte 3)")
        bps, spc = struct.unpack_from("<HB", boot, 11)
        if bps not in (512, 1024, 2048, 4096) or spc == 0:
            raise FsError("ntfs: the boot sector's geometry is not valid")
        # Above 128 the value is a negative exponent: 2^(256 - n) sectors per cluster.
        self.cluster = bps * (spc if spc <= 128 else 1 << (256 - spc))
        self.sector = bps
        (mft_cluster,) = struct.unpack_from("<Q", boot, 48)
        self.record_size = _size(struct.unpack_from("<b", boot, 64)[0], self.cluster)
        self.index_size = _size(struct.unpack_from("<b", boot, 68)[0], self.cluster)
        first = self._fixup(read(mft_cluster * self.cluster, self.record_size), "0")
        data = self._attrs_in(first, 0)
        mft_data = next((a for a in data if a.type == AT_DATA and not a.name), None)
        if mft_data is None or mft_data.resident:
            raise FsError("ntfs: MFT record 0 has no non-resident $DATA")
        self._mft_runs = mft_data.runs
        self._record = lru_cache(maxsize=512)(self._load_record)

    # -- records and attributes -------------------------------------------------------------
    def _fixup(self, record: bytes, what: str) -> bytes:
        magic = record[:4]
        if magic not in (b"FILE", b"INDX"):
            raise FsError(f"ntfs: {what} has bad magic {magic!r}")
        usa_offset, usa_count = struct.unpack_from("<HH", record, 4)
        buf = bytearray(record)
        usn = record[usa_offset : usa_offset + 2]
        for i in range(1, usa_count):
            end = i * self.sector - 2
            if end + 2 > len(buf):
                break
            if buf[end : end + 2] != usn:
                raise FsError(f"ntfs: {what} has a bad fixup (torn write)")
            buf[end : end + 2] = record[usa_offset + 2 * i : usa_offset + 2 * i + 2]
        return bytes(buf)

    def _load_record(self, number: int) -> bytes:
        offset = number * self.record_size
        data = self._runs_read(self._mft_runs, offset, self.record_size)
        record = self._fixup(data, f"MFT record {number}")
        return record

    def _attrs_in(self, record: bytes, number: int) -> list[Attribute]:
        (first,) = struct.unpack_from("<H", record, 20)
        pos, out = first, []
        while pos + 16 <= len(record):
            atype, length = struct.unpack_from("<II", record, pos)
            if atype == AT_END or length == 0:
                break
            if pos + length > len(record):
                raise FsError(f"ntfs: MFT record {number} has an attribute past its end")
            out.append(_attribute(record[pos : pos + length]))
            pos += length
        return out

    def _attributes(self, number: int) -> list[Attribute]:
        """All attributes of a file, following its $ATTRIBUTE_LIST into other records."""
        record = self._record(number)
        flags = struct.unpack_from("<H", record, 22)[0]
        if not flags & FLAG_IN_USE:
            raise FsError(f"ntfs: MFT record {number} is not in use")
        attrs = self._attrs_in(record, number)
        listed = next((a for a in attrs if a.type == AT_ATTRIBUTE_LIST), None)
        if listed is None:
            return attrs
        raw = self._value(listed)
        others: set[int] = set()
        pos = 0
        while pos + 26 <= len(raw):
            length = struct.unpack_from("<H", raw, pos + 4)[0]
            ref = struct.unpack_from("<Q", raw, pos + 16)[0] & MFT_REF_MASK
            if ref != number:
                others.add(ref)
            if length == 0:
                break
            pos += length
        for other in sorted(others):
            attrs += self._attrs_in(self._record(other), other)
        return attrs

    def _value(self, attr: Attribute) -> bytes:
        if attr.resident:
            return attr.value
        return self._runs_read(attr.runs, 0, attr.size)

    def _runs_read(
        self, runs: tuple[tuple[int | None, int], ...], offset: int, length: int
    ) -> bytes:
        out = bytearray()
        vcn_start = 0
        end = offset + length
        for lcn, count in runs:
            run_start, run_end = vcn_start * self.cluster, (vcn_start + count) * self.cluster
            vcn_start += count
            lo, hi = max(offset, run_start), min(end, run_end)
            if lo >= hi:
                continue
            if lcn is None:
                out += bytes(hi - lo)
            else:
                out += self._read(lcn * self.cluster + (lo - run_start), hi - lo)
        if len(out) < length:
            out += bytes(length - len(out))
        return bytes(out)

    # -- entries ------------------------------------------------------------------------------
    def _entry(self, number: int, name: str, path: str) -> Entry:
        attrs = self._attributes(number)
        record = self._record(number)
        is_dir = bool(struct.unpack_from("<H", record, 22)[0] & FLAG_DIRECTORY)
        std = next((a for a in attrs if a.type == AT_STANDARD_INFORMATION), None)
        mtime = None
        file_attrs = 0
        if std is not None and len(std.value) >= 36:
            (modified,) = struct.unpack_from("<Q", std.value, 8)
            mtime = (modified - EPOCH_DELTA) / 1e7
            (file_attrs,) = struct.unpack_from("<I", std.value, 32)
        data = _main_data(attrs)
        kind: Kind = "dir" if is_dir else "other" if file_attrs & FILE_ATTR_REPARSE else "file"
        size = 0 if is_dir or data is None else data.size
        return Entry(name=name, path=path, kind=kind, size=size, mtime=mtime)

    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        """(name, record) of a directory's entries, DOS-only names skipped."""
        attrs = self._attributes(number)
        root = next((a for a in attrs if a.type == AT_INDEX_ROOT and a.name == "$I30"), None)
        if root is None:
            raise FsError(f"ntfs: directory record {number} has no $I30 index")
        (entries_offset,) = struct.unpack_from("<I", root.value, 16)
        yield from _index_entries(root.value, 16 + entries_offset)
        alloc = [a for a in attrs if a.type == AT_INDEX_ALLOCATION and a.name == "$I30"]
        if not alloc:
            return
        bitmap = next((a for a in attrs if a.type == AT_BITMAP and a.name == "$I30"), None)
        used = self._value(bitmap) if bitmap is not None else b""
        runs = tuple(r for a in sorted(alloc, key=lambda a: a.start_vcn) for r in a.runs)
        total = sum(count for _, count in runs) * self.cluster
        for block in range(total // self.index_size):
            if used and not used[block // 8] >> (block % 8) & 1:
                continue
            raw = self._runs_read(runs, block * self.index_size, self.index_size)
            if raw[:4] != b"INDX":
                continue
            data = self._fixup(raw, f"index block {block} of directory record {number}")
            (entries_offset,) = struct.unpack_from("<I", data, 24)
            yield from _index_entries(data, 24 + entries_offset)

    # -- the InodeTree hooks ----------------------------------------------------------------
    def _root(self) -> int:
        return ROOT

    def _hidden(self, number: int, name: str) -> bool:
        return number == ROOT and name.startswith("$")  # $MFT, $Bitmap, ...

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        data = _main_data(self._attributes(number))
        if data is None:
            return iter(())
        if data.flags & (ATTR_COMPRESSED | ATTR_ENCRYPTED):
            raise FsError(f"{entry.path}: compressed or encrypted NTFS data (unsupported)")
        return self._content(data, block)

    def _content(self, data: Attribute, block: int) -> Iterator[bytes]:
        if data.resident:
            yield data.value
            return
        for pos in range(0, data.size, block):
            length = min(block, data.size - pos)
            valid = max(0, min(length, data.initialized - pos))
            piece = self._runs_read(data.runs, pos, valid) if valid else b""
            yield piece + bytes(length - valid)


def _size(value: int, cluster: int) -> int:
    """A record size from the boot sector: clusters, or 2^-n bytes when negative."""
    return cluster * value if value > 0 else 1 << -value


def _main_data(attrs: list[Attribute]) -> Attribute | None:
    """The unnamed $DATA, its non-resident pieces (one per extent record) joined."""
    parts = sorted(
        (a for a in attrs if a.type == AT_DATA and not a.name), key=lambda a: a.start_vcn
    )
    if not parts:
        return None
    head = parts[0]
    if head.resident or len(parts) == 1:
        return head
    runs = tuple(r for p in parts for r in p.runs)
    return Attribute(
        AT_DATA, "", head.flags, False, runs=runs, size=head.size, initialized=head.initialized
    )


def _attribute(raw: bytes) -> Attribute:
    atype, _length, non_resident, name_len, name_offset, flags = struct.unpack_from(
        "<IIBBHH", raw, 0
    )
    name = raw[name_offset : name_offset + 2 * name_len].decode("utf-16-le", errors="replace")
    if not non_resident:
        value_len, value_offset = struct.unpack_from("<IH", raw, 16)
        value = raw[value_offset : value_offset + value_len]
        return Attribute(atype, name, flags, True, value, size=len(value), initialized=len(value))
    start_vcn, _last_vcn, runs_offset = struct.unpack_from("<QQH", raw, 16)
    _alloc, size, initialized = struct.unpack_from("<QQQ", raw, 40)
    return Attribute(
        atype,
        name,
        flags,
        False,
        runs=_runlist(raw, runs_offset),
        start_vcn=start_vcn,
        size=size,
        initialized=initialized,
    )


def _runlist(raw: bytes, pos: int) -> tuple[tuple[int | None, int], ...]:
    runs: list[tuple[int | None, int]] = []
    lcn = 0
    while pos < len(raw) and raw[pos]:
        header = raw[pos]
        len_size, off_size = header & 0xF, header >> 4
        pos += 1
        count = int.from_bytes(raw[pos : pos + len_size], "little")
        pos += len_size
        if off_size == 0:
            runs.append((None, count))  # sparse
        else:
            lcn += int.from_bytes(raw[pos : pos + off_size], "little", signed=True)
            runs.append((lcn, count))
        pos += off_size
    return tuple(runs)


def _index_entries(data: bytes, pos: int) -> Iterator[tuple[str, int]]:
    """(name, record) of the entries of one index node (root or INDX block)."""
    while pos + 16 <= len(data):
        ref, length, key_len, flags = struct.unpack_from("<QHHI", data, pos)
        if flags & INDEX_ENTRY_END or length == 0:
            return
        if key_len >= 66:
            key = data[pos + 16 : pos + 16 + key_len]
            name_len, namespace = key[64], key[65]
            if namespace != NS_DOS and (name_len, key[66:68]) != (1, b".\0"):
                name = key[66 : 66 + 2 * name_len].decode("utf-16-le", errors="replace")
                yield name, ref & MFT_REF_MASK
        pos += length
