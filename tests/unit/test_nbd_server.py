"""The NBD server of ``csbs backup mount`` (issue 18) against our own NBD client: the
handshake, reads across chunks and zero chunks, and refusals (writes, an unknown
export). The chunks come from a stand-in store."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from csbs.chunkstore import ChunkStore
from csbs.drivers.nbd import NbdClient, NbdError
from csbs.format import Manifest
from csbs.nbd_server import BackupDiskReader, NbdServer

KIB = 1024


class Chunks:
    """The part of ChunkStore the reader uses: chunks by id, counted."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.gets = 0

    def put(self, data: bytes) -> bytes:
        chunk_id = hashlib.sha256(data).digest()
        self.data[chunk_id] = data
        return chunk_id

    def get_chunk(self, chunk_id: bytes) -> tuple[bytes, int]:
        self.gets += 1
        return self.data[chunk_id], len(self.data[chunk_id])


@pytest.fixture
def served(tmp_path: Path) -> Any:
    chunks = Chunks()
    manifest = Manifest("bk-1", "d1", 10 * 64 * KIB + 100, 64 * KIB)  # a short last chunk
    disk = bytearray(manifest.size_bytes)
    for index in (0, 1, 5, 10):
        start = index * 64 * KIB
        piece = bytes([index + 1]) * min(64 * KIB, manifest.size_bytes - start)
        disk[start : start + len(piece)] = piece
        manifest.set_entry(index, chunks.put(piece))
    reader = BackupDiskReader(cast(ChunkStore, chunks), manifest, readahead=0)
    server = NbdServer(reader, "bk-1/d1", tmp_path / "s.sock")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, bytes(disk), chunks
    server.close()


def test_reads_return_the_disk_and_fetch_only_what_they_touch(served: Any) -> None:
    server, disk, chunks = served
    with NbdClient(str(server.socket_path), "bk-1/d1") as nbd:
        assert nbd.info.size == len(disk) and nbd.info.read_only
        assert nbd.read(0, 4 * KIB) == disk[: 4 * KIB]
        assert chunks.gets == 1
        assert nbd.read(60 * KIB, 200 * KIB) == disk[60 * KIB : 260 * KIB]  # chunks 0-4
        assert chunks.gets == 2  # chunk 0 was cached; 2-4 are zero chunks
        assert nbd.read(len(disk) - 300, 300) == disk[-300:]
        assert nbd.read(0, len(disk), whole=True) == disk


def test_writes_and_unknown_exports_are_refused(served: Any) -> None:
    server, disk, _ = served
    refused = pytest.raises(NbdError, match=r"write failed \(errno 1\): read-only backup export")
    with NbdClient(str(server.socket_path), "bk-1/d1") as nbd, refused:
        nbd.write(0, b"x" * 512)
    with NbdClient(str(server.socket_path), "bk-1/d1") as nbd:
        assert nbd.read(0, 512) == disk[:512]  # the disk is as it was
    with pytest.raises(NbdError):
        NbdClient(str(server.socket_path), "bk-2/d1")


def test_a_server_closed_late_leaves_its_successors_socket_alone(
    served: Any, tmp_path: Path
) -> None:
    """A retried instant restore binds a new server on the same path while the attempt it
    replaces is still closing: that close must not unlink the new one's socket (its
    clients could never reconnect)."""
    server, disk, chunks = served
    reader = BackupDiskReader(cast(ChunkStore, chunks), server.reader.manifest, readahead=0)
    successor = NbdServer(reader, "bk-1/d1", server.socket_path)
    threading.Thread(target=successor.serve_forever, daemon=True).start()
    try:
        server.close()  # the old attempt's cleanup, late
        assert server.socket_path.exists()
        with NbdClient(str(server.socket_path), "bk-1/d1") as nbd:
            assert nbd.read(0, 64 * KIB) == disk[: 64 * KIB]
    finally:
        successor.close()
    assert not server.socket_path.exists()
