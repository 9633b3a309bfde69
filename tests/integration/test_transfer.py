"""The data plane against real SeaweedFS and the local driver: memory stays bounded however
large the disk, results are exact whatever order uploads finish in, restores punch holes,
and a resumed restore writes only from its resume point (B2, B3, B5)."""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path

import pytest

from csbs.chunkstore import ChunkStore
from csbs.drivers.local import LocalDriver
from csbs.format import Manifest
from csbs.model import TransferStats
from csbs.transfer import backup_disk, restore_disk
from starter.stack import SeaweedS3
from tests.conftest import MIB, make_settings


class _Buf(bytearray):
    """A chunk buffer we can count while it is alive."""


class CountingReader:
    """Wraps a snapshot reader; counts chunk buffers alive at once."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.size_bytes = inner.size_bytes  # type: ignore[attr-defined]
        self.changed_since = None
        self.full_read_reason = None
        self.alive = 0
        self.max_alive = 0
        self._lock = threading.Lock()

    def allocated_ranges(self) -> list[tuple[int, int]]:
        return self.inner.allocated_ranges()  # type: ignore[attr-defined, no-any-return]

    def changed_ranges(self) -> None:
        return None

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1

    def read(self, offset: int, length: int) -> bytearray:
        buf = _Buf(self.inner.read(offset, length))  # type: ignore[attr-defined]
        with self._lock:
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(buf, self._gone)
        return buf

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


@pytest.fixture
def store(tmp_path: Path, s3: SeaweedS3) -> ChunkStore:
    return ChunkStore(make_settings(tmp_path, s3, chunk_size=MIB))


@pytest.mark.slow
def test_backup_memory_is_bounded_and_restore_is_exact(tmp_path: Path, store: ChunkStore) -> None:
    drv = LocalDriver(tmp_path / "servers")
    server = drv.create_server("big", [96 * MIB, 8 * MIB])
    disk, target = server.disks
    payload = os.urandom(64 * MIB)
    drv.write(server.id, disk.id, 0, payload)
    drv.write(server.id, disk.id, 80 * MIB, b"tail" * 1000)
    drv.group_snapshot(server.id, "s1")
    reader = CountingReader(drv.open_snapshot(server.id, "s1", disk.id))
    manifest = Manifest("bk-1", disk.id, 96 * MIB, MIB)
    seen: list[int] = []
    stats = backup_disk(
        store,
        reader,  # type: ignore[arg-type]
        manifest,
        None,
        None,
        concurrency=2,
        progress=lambda done, staged, st: seen.append(done),
    )
    reader.close()
    drv.release_snapshot(server.id, "s1", committed=True)
    # 65 chunks were read; never more than 2 x concurrency (+ one per worker finishing up)
    # were in memory at once.
    assert stats.chunks_read == 65 and stats.bytes_read == 65 * MIB
    assert reader.max_alive <= 6, reader.max_alive
    assert seen == sorted(seen) and seen[-1] == 96
    assert stats.chunks_uploaded == 65 and stats.chunks_zero == 31

    # Restore onto another (smaller) disk of a stopped server, resized to the manifest.
    store.put_manifest(manifest)
    drv.stop(server.id)
    writer = drv.open_disk_writer(server.id, target.id, 96 * MIB)
    writer.write(70 * MIB, b"garbage" * 1000)  # must be punched back to zeros
    done: list[int] = []
    rst = restore_disk(
        store, manifest, writer, concurrency=3, progress=lambda d, s, st: done.append(d)
    )
    writer.close()
    assert isinstance(rst, TransferStats) and rst.chunks_fetched == 65
    assert done == sorted(done) and done[-1] == 96
    expected = bytearray(96 * MIB)
    expected[: 64 * MIB] = payload
    expected[80 * MIB : 80 * MIB + 4000] = b"tail" * 1000
    assert drv.checksum(server.id)[target.id] == hashlib.sha256(expected).hexdigest()


def test_a_resumed_restore_writes_only_from_its_resume_point(
    tmp_path: Path, store: ChunkStore
) -> None:
    drv = LocalDriver(tmp_path / "servers")
    server = drv.create_server("r", [8 * MIB])
    disk = server.disks[0]
    drv.write(server.id, disk.id, 0, os.urandom(8 * MIB))
    drv.group_snapshot(server.id, "s")
    reader = drv.open_snapshot(server.id, "s", disk.id)
    manifest = Manifest("bk-2", disk.id, 8 * MIB, MIB)
    backup_disk(store, reader, manifest, None, None, concurrency=2)
    reader.close()
    drv.release_snapshot(server.id, "s", committed=True)
    drv.stop(server.id)
    writer = drv.open_disk_writer(server.id, disk.id, 8 * MIB)
    stats = restore_disk(store, manifest, writer, start=5, concurrency=2)
    writer.close()
    assert stats.chunks_fetched == 3 and stats.bytes_written == 3 * MIB


def test_a_listed_store_replaces_existence_checks(tmp_path: Path, store: ChunkStore) -> None:
    """With the store's chunk ids listed up front, no chunk is HEAD-checked, and chunks that
    another backup already stored are still reused, not uploaded again."""
    drv = LocalDriver(tmp_path / "servers")
    server = drv.create_server("dedup", [8 * MIB, 8 * MIB])
    a, b = server.disks
    shared = os.urandom(3 * MIB)
    drv.write(server.id, a.id, 0, shared)
    drv.write(server.id, b.id, 0, shared + os.urandom(MIB))
    drv.group_snapshot(server.id, "s")
    heads: list[str] = []
    store.s3.meta.events.register("before-call.s3.HeadObject", lambda **kw: heads.append("x"))
    asked: list[int] = []

    def index(to_read: int) -> set[bytes] | None:
        asked.append(to_read)
        return store.chunk_index(1000)

    stats = []
    for disk in (a, b):
        reader = drv.open_snapshot(server.id, "s", disk.id)
        manifest = Manifest(f"bk-{disk.id}", disk.id, 8 * MIB, MIB)
        stats.append(backup_disk(store, reader, manifest, None, None, chunk_index=index))
        reader.close()
    drv.release_snapshot(server.id, "s", committed=True)
    assert heads == [] and asked == [3, 4]
    assert stats[0].chunks_uploaded == 3
    assert (stats[1].chunks_uploaded, stats[1].chunks_reused) == (1, 3)


@pytest.mark.slow
def test_a_restore_from_a_far_store_opens_up_its_gets(tmp_path: Path, store: ChunkStore) -> None:
    """Issue 18, adaptive concurrency: the same real store 30 ms further away (each GET
    waits 30 ms first, as across a WAN). Latency stays flat as more GETs go out, so the
    restore raises them from 2 towards its maximum of 12, never past it; bytes exact."""
    drv = LocalDriver(tmp_path / "servers")
    server = drv.create_server("far", [96 * MIB])
    disk = server.disks[0]
    payload = os.urandom(96 * MIB)
    drv.write(server.id, disk.id, 0, payload)
    drv.group_snapshot(server.id, "s")
    reader = drv.open_snapshot(server.id, "s", disk.id)
    manifest = Manifest("bk-far", disk.id, 96 * MIB, MIB)
    backup_disk(store, reader, manifest, None, None, concurrency=4)
    reader.close()
    drv.release_snapshot(server.id, "s", committed=True)
    drv.stop(server.id)

    fetch, lock, inside, most = store.fetch_chunk, threading.Lock(), [0], [0]

    def far(chunk_id: bytes) -> bytes:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            threading.Event().wait(0.030)
            return fetch(chunk_id)
        finally:
            with lock:
                inside[0] -= 1

    store.fetch_chunk = far  # type: ignore[method-assign]
    writer = drv.open_disk_writer(server.id, disk.id, 96 * MIB)
    stats = restore_disk(store, manifest, writer, concurrency=2, max_concurrency=12)
    writer.close()
    assert drv.checksum(server.id)[disk.id] == hashlib.sha256(payload).hexdigest()
    assert stats.chunks_fetched == 96
    assert stats.concurrency > 2 and 2 < most[0] <= 12, (stats.concurrency, most[0])
    assert stats.get_ms >= 30
