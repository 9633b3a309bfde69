"""The on-storage formats (docs/format.md, version 1): chunk ids, chunk objects, manifests.

Pure functions only; the S3 side lives in ``csbs.chunkstore``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Self

import blake3
import zstandard
from pydantic import BaseModel, ValidationError

from csbs.errors import CorruptData

FORMAT_VERSION = 1
DIGEST_SIZE = 32
ZERO_ENTRY = bytes(DIGEST_SIZE)
HASH_NAME = "blake3"

CHUNK_MAGIC = b"CSBC"
MANIFEST_MAGIC = b"CSBM"
CODEC_RAW = 0
CODEC_ZSTD = 1

#: Format limits, checked on every read before anything is allocated from stored lengths.
#: A disk has at most 2**24 chunk positions (64 TiB at the default 4 MiB chunk size).
MAX_CHUNKS_PER_DISK = 1 << 24
#: A manifest's JSON header is small; its entries are 32 bytes a position.
MAX_MANIFEST_HEADER = 64 * 1024
#: The most bytes a manifest object decompresses to (header, entries, trailer).
MAX_MANIFEST_BYTES = 4 + MAX_MANIFEST_HEADER + MAX_CHUNKS_PER_DISK * DIGEST_SIZE + DIGEST_SIZE
#: Chunk sizes a repository may use (powers of two).
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024

_CHUNK_HEADER = struct.Struct(">4sBBHI")  # magic, version, codec, reserved, plain length
#: No chunk object is shorter: the header and at least one payload byte (all-zero chunks,
#: the only ones that could be empty, are never stored).
MIN_CHUNK_OBJECT = _CHUNK_HEADER.size + 1
_MANIFEST_HEADER = struct.Struct(">4sBBH")  # magic, version, codec, reserved
_U32 = struct.Struct(">I")


def chunk_digest(data: bytes | bytearray | memoryview, key: bytes | None = None) -> bytes:
    """The id of a chunk: BLAKE3 of its plaintext (keyed per project when a key is given)."""
    hasher = blake3.blake3(key=key, max_threads=1) if key else blake3.blake3(max_threads=1)
    hasher.update(data)
    return hasher.digest()


_zeros = bytes(4 * 1024 * 1024)


def is_zero(data: bytes | bytearray) -> bool:
    """True when every byte is zero (such chunks are never stored)."""
    global _zeros
    if len(data) > len(_zeros):
        _zeros = bytes(len(data))
    return data == _zeros[: len(data)] if len(data) != len(_zeros) else data == _zeros


def encode_chunk(data: bytes | bytearray, level: int = 1) -> bytes:
    """Serialize a chunk object: header + zstd payload (raw when zstd does not help)."""
    compressed = zstandard.ZstdCompressor(level=level).compress(data)
    codec = CODEC_ZSTD if len(compressed) < len(data) else CODEC_RAW
    payload = compressed if codec == CODEC_ZSTD else bytes(data)
    return _CHUNK_HEADER.pack(CHUNK_MAGIC, FORMAT_VERSION, codec, 0, len(data)) + payload


def decode_chunk(
    blob: bytes, expected_id: bytes, key: bytes | None = None, max_length: int = MAX_CHUNK_SIZE
) -> bytes:
    """Parse a chunk object and return its plaintext; raise CorruptData unless it verifies.

    ``max_length`` (the repository's chunk size) bounds the plaintext length the header
    may claim, so a forged header never makes us inflate more than one chunk."""
    hexid = expected_id.hex()
    if len(blob) < _CHUNK_HEADER.size:
        raise CorruptData(f"chunk {hexid}: object truncated ({len(blob)} bytes)")
    magic, version, codec, _, length = _CHUNK_HEADER.unpack_from(blob)
    if magic != CHUNK_MAGIC:
        raise CorruptData(f"chunk {hexid}: not a chunk object (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptData(f"chunk {hexid}: unsupported format version {version}")
    if length > max_length:
        raise CorruptData(
            f"chunk {hexid}: its header says {length} bytes, larger than the repository's "
            f"chunk size ({max_length})"
        )
    payload = memoryview(blob)[_CHUNK_HEADER.size :]
    try:
        if codec == CODEC_ZSTD:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=length)
        elif codec == CODEC_RAW:
            data = payload.tobytes()
        else:
            raise CorruptData(f"chunk {hexid}: unknown codec {codec}")
    except zstandard.ZstdError as exc:
        raise CorruptData(f"chunk {hexid}: payload does not decompress ({exc})") from exc
    if len(data) != length or chunk_digest(data, key) != expected_id:
        raise CorruptData(f"chunk {hexid}: digest mismatch (stored data is damaged)")
    return data


@dataclass
class Manifest:
    """The fixed index of one disk in one backup: a chunk id (or zero) per position."""

    backup_id: str
    disk_id: str
    size_bytes: int
    chunk_size: int
    entries: bytearray = field(default_factory=bytearray)
    #: Staging copies only: how many leading positions are final (the resume point).
    complete: int | None = None

    def __post_init__(self) -> None:
        if not self.entries:
            self.entries = bytearray(self.chunk_count * DIGEST_SIZE)
        if len(self.entries) != self.chunk_count * DIGEST_SIZE:
            raise CorruptData(
                f"manifest {self.backup_id}/{self.disk_id}: {len(self.entries)} entry bytes "
                f"for {self.chunk_count} chunks"
            )

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size_bytes, self.chunk_size)

    def entry(self, index: int) -> bytes | None:
        """The chunk id at ``index``, or None for a zero chunk."""
        entry = bytes(self.entries[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])
        return None if entry == ZERO_ENTRY else entry

    def set_entry(self, index: int, digest: bytes | None) -> None:
        self.entries[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest or ZERO_ENTRY

    def chunk_ids(self) -> set[bytes]:
        """Every distinct non-zero chunk id this manifest references."""
        ids = {
            bytes(self.entries[i : i + DIGEST_SIZE])
            for i in range(0, len(self.entries), DIGEST_SIZE)
        }
        ids.discard(ZERO_ENTRY)
        return ids

    def data_bytes(self) -> int:
        """Bytes of the disk held in non-zero chunks."""
        total = 0
        for index in range(self.chunk_count):
            if self.entry(index) is not None:
                total += chunk_span(index, self.size_bytes, self.chunk_size)[1]
        return total

    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "hash": HASH_NAME,
            "backup_id": self.backup_id,
            "disk_id": self.disk_id,
            "size_bytes": self.size_bytes,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
        }
        if self.complete is not None:
            header["complete"] = self.complete
        return header

    def encode(self) -> bytes:
        header = json.dumps(self.header(), sort_keys=True).encode()
        body = _U32.pack(len(header)) + header + bytes(self.entries)
        trailer = blake3.blake3(body).digest()
        compressed = zstandard.ZstdCompressor(level=3).compress(body + trailer)
        return _MANIFEST_HEADER.pack(MANIFEST_MAGIC, FORMAT_VERSION, CODEC_ZSTD, 0) + compressed

    @classmethod
    def decode(cls, blob: bytes) -> Manifest:
        if len(blob) < _MANIFEST_HEADER.size:
            raise CorruptData("manifest truncated")
        magic, version, codec, _ = _MANIFEST_HEADER.unpack_from(blob)
        if magic != MANIFEST_MAGIC or codec != CODEC_ZSTD:
            raise CorruptData("not a manifest object (bad magic or codec)")
        if version != FORMAT_VERSION:
            raise CorruptData(f"unsupported manifest format version {version}")
        plain = _bounded_decompress(blob[_MANIFEST_HEADER.size :], MAX_MANIFEST_BYTES)
        body, trailer = plain[:-DIGEST_SIZE], plain[-DIGEST_SIZE:]
        if len(plain) < _U32.size + DIGEST_SIZE or blake3.blake3(body).digest() != trailer:
            raise CorruptData("manifest checksum mismatch (stored manifest is damaged)")
        (header_len,) = _U32.unpack_from(body)
        if header_len > min(MAX_MANIFEST_HEADER, len(body) - _U32.size):
            raise CorruptData(f"manifest header length {header_len} is out of bounds")
        try:
            header = json.loads(body[_U32.size : _U32.size + header_len])
            fields = (header["backup_id"], header["disk_id"])
            size, chunk_size = int(header["size_bytes"]), int(header["chunk_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"manifest header is malformed ({exc})") from exc
        if header.get("hash") != HASH_NAME:
            raise CorruptData(f"manifest uses unknown hash {header.get('hash')!r}")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
            raise CorruptData(f"manifest chunk size {chunk_size} is not a valid chunk size")
        if size < 0 or chunk_count(size, chunk_size) > MAX_CHUNKS_PER_DISK:
            raise CorruptData(f"manifest disk size {size} is out of bounds")
        return cls(
            backup_id=str(fields[0]),
            disk_id=str(fields[1]),
            size_bytes=size,
            chunk_size=chunk_size,
            entries=bytearray(body[_U32.size + header_len :]),
            complete=header.get("complete"),
        )


def _bounded_decompress(data: bytes, limit: int) -> bytes:
    """zstd-decompress ``data``, refusing (CorruptData) to produce more than ``limit``
    bytes, whatever the frame claims."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while True:
                piece = reader.read(1 << 20)
                if not piece:
                    break
                out += piece
                if len(out) > limit:
                    raise CorruptData(
                        f"manifest decompresses to more than {limit} bytes, larger than the "
                        f"format allows"
                    )
    except zstandard.ZstdError as exc:
        raise CorruptData(f"manifest does not decompress ({exc})") from exc
    return bytes(out)


def chunk_count(size_bytes: int, chunk_size: int) -> int:
    """Number of fixed-size chunk positions covering a disk (the last may be short)."""
    return (size_bytes + chunk_size - 1) // chunk_size


def chunk_span(index: int, size_bytes: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk position ``index`` on a disk of ``size_bytes``."""
    offset = index * chunk_size
    return offset, min(chunk_size, size_bytes - offset)


def ranges_to_chunks(ranges: list[tuple[int, int]], chunk_size: int) -> set[int]:
    """The chunk positions touched by byte ranges given as (offset, length)."""
    touched: set[int] = set()
    for offset, length in ranges:
        if length <= 0:
            continue
        touched.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return touched


class DescriptorServer(BaseModel):
    """The server a backup was made of."""

    id: str
    name: str
    type: str


class DescriptorDisk(BaseModel):
    """One disk of a backup: what it was and where its manifest is."""

    disk_id: str
    name: str
    role: str
    size_bytes: int
    data_bytes: int
    manifest: str
    #: Bytes of chunk objects this disk's backup uploaded anew (absent before issue 17).
    stored_bytes: int | None = None


class JsonDocument(BaseModel):
    """A versioned JSON object of the repository (descriptor, policy copy)."""

    #: How a parse error names the document.
    _what: ClassVar[str] = "document"
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse one; CorruptData unless it is one of this format version."""
        try:
            doc = cls.model_validate_json(data)
        except ValidationError as exc:
            raise CorruptData(f"{cls._what} is malformed ({exc.error_count()} errors)") from exc
        if doc.format_version != FORMAT_VERSION:
            raise CorruptData(f"{cls._what} has unsupported format version {doc.format_version}")
        return doc


class PolicyCopy(JsonDocument):
    """``policies/<policy_id>.json`` (docs/format.md, "Policy copy"): a copy of a policy
    and the servers bound to it, rewritten on every change, so that ``csbs catalog
    rebuild`` brings policies back with the backups."""

    _what: ClassVar[str] = "policy copy"
    id: str
    project: str
    name: str
    enabled: bool
    #: The policy's rules as ``csbs policy show --json`` prints them (times, period,
    #: time zone, retention, lock days, replicate).
    spec: dict[str, Any]
    server_ids: list[str]
    created_at: datetime
    updated_at: datetime


class BackupDescriptor(JsonDocument):
    """``backups/<backup_id>.json`` (docs/format.md, "Backup descriptor"): written last,
    its presence commits the backup; with the manifests it is all a restore needs."""

    _what: ClassVar[str] = "backup descriptor"
    backup_id: str
    project: str
    name: str
    description: str = ""
    kind: str
    policy_id: str | None = None
    parent_id: str | None = None
    created_at: datetime
    snapshot_at: datetime | None = None
    #: When the backup was committed (absent in descriptors written before issue 17).
    finished_at: datetime | None = None
    server: DescriptorServer
    chunk_size: int
    #: S3 Object Lock (issue 17): this descriptor and the backup's manifests are locked
    #: in compliance mode until then (None: not locked).
    locked_until: datetime | None = None
    disks: list[DescriptorDisk]
