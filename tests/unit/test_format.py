"""Unit tests of the on-storage format (docs/format.md): chunks, manifests, chunk maths."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csbs.errors import CorruptData
from csbs.format import (
    CODEC_RAW,
    CODEC_ZSTD,
    Manifest,
    chunk_count,
    chunk_digest,
    chunk_span,
    decode_chunk,
    encode_chunk,
    is_zero,
    ranges_to_chunks,
)


def test_chunk_roundtrip_compresses_text_and_stores_random_raw() -> None:
    text = b"hello backup " * 10000
    blob = encode_chunk(text)
    assert blob[5] == CODEC_ZSTD and len(blob) < len(text) / 10
    assert decode_chunk(blob, chunk_digest(text)) == text
    noise = os.urandom(100000)
    blob = encode_chunk(noise)
    assert blob[5] == CODEC_RAW
    assert decode_chunk(blob, chunk_digest(noise)) == noise


@pytest.mark.parametrize("position", [0, 5, 12, 40, -1])
def test_any_flipped_byte_is_detected_on_read(position: int) -> None:
    data = b"precious data " * 5000
    blob = bytearray(encode_chunk(data))
    blob[position] ^= 0x01
    with pytest.raises(CorruptData):
        decode_chunk(bytes(blob), chunk_digest(data))


def test_chunk_under_another_id_is_rejected() -> None:
    with pytest.raises(CorruptData, match="digest mismatch"):
        decode_chunk(encode_chunk(b"a" * 100), chunk_digest(b"b" * 100))


def test_keyed_digests_differ_per_project() -> None:
    data = b"same data"
    assert chunk_digest(data, b"k" * 32) != chunk_digest(data, b"j" * 32) != chunk_digest(data)


def test_zero_detection() -> None:
    assert is_zero(bytes(4 * 1024 * 1024))
    assert is_zero(bytes(10))
    assert not is_zero(bytes(1000) + b"\x01")
    assert is_zero(b"")


def test_manifest_roundtrip_and_damage() -> None:
    m = Manifest("bk-1", "disk-1", size_bytes=10 * 1024 * 1024 + 5, chunk_size=4 * 1024 * 1024)
    assert m.chunk_count == 3
    m.set_entry(0, chunk_digest(b"x"))
    m.set_entry(2, chunk_digest(b"y"))
    decoded = Manifest.decode(m.encode())
    assert decoded.entry(0) == chunk_digest(b"x")
    assert decoded.entry(1) is None
    assert decoded.entry(2) == chunk_digest(b"y")
    assert decoded.chunk_ids() == {chunk_digest(b"x"), chunk_digest(b"y")}
    assert decoded.data_bytes() == 4 * 1024 * 1024 + 2 * 1024 * 1024 + 5
    blob = bytearray(m.encode())
    blob[-3] ^= 0xFF
    with pytest.raises(CorruptData):
        Manifest.decode(bytes(blob))


@given(
    st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**7)), max_size=20),
    st.sampled_from([65536, 1 << 20, 4 << 20]),
)
def test_ranges_to_chunks_covers_exactly_the_touched_positions(
    ranges: list[tuple[int, int]], chunk_size: int
) -> None:
    touched = ranges_to_chunks(ranges, chunk_size)
    expected = {
        i
        for off, length in ranges
        if length > 0
        for i in range(off // chunk_size, (off + length - 1) // chunk_size + 1)
    }
    assert touched == expected


@given(st.integers(1, 10**12), st.sampled_from([65536, 1 << 20, 4 << 20]))
def test_chunk_spans_tile_the_disk(size: int, chunk_size: int) -> None:
    n = chunk_count(size, chunk_size)
    first = chunk_span(0, size, chunk_size)
    last = chunk_span(n - 1, size, chunk_size)
    assert first[0] == 0
    assert last[0] + last[1] == size
    assert 0 < last[1] <= chunk_size


def test_backup_descriptor_round_trips_and_refuses_what_it_does_not_know() -> None:
    from datetime import UTC, datetime

    from csbs.format import BackupDescriptor, DescriptorDisk, DescriptorServer

    descriptor = BackupDescriptor(
        backup_id="bk-1",
        project="p1",
        name="manualbk_abcd",
        kind="manual",
        created_at=datetime(2026, 11, 27, 8, 0, tzinfo=UTC),
        server=DescriptorServer(id="srv-1", name="web", type="local"),
        chunk_size=4 * 1024 * 1024,
        disks=[
            DescriptorDisk(
                disk_id="vda", name="sys", role="system", size_bytes=8, data_bytes=8, manifest="m"
            )
        ],
    )
    assert BackupDescriptor.decode(descriptor.encode()) == descriptor
    with pytest.raises(CorruptData, match="malformed"):
        BackupDescriptor.decode(b'{"backup_id": "bk-1"}')
    future = descriptor.model_copy(update={"format_version": 2})
    with pytest.raises(CorruptData, match="version 2"):
        BackupDescriptor.decode(future.encode())
