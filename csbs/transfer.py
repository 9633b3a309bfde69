"""The data plane: back up one snapshot disk into chunks, restore one disk from a manifest.

Reading is sequential in the calling thread; hashing, compressing, existence checks and
uploads (or fetches and verification on restore) run in a bounded thread pool, so at most
``2 x concurrency`` chunks are in memory whatever the disk size. Results are applied in
position order, which gives a simple resume point: every position below ``done`` is final.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from csbs.chunkstore import ChunkStore
from csbs.drivers.base import DiskWriter, SnapshotReader
from csbs.errors import CorruptData
from csbs.format import Manifest, chunk_count, chunk_digest, chunk_span, is_zero, ranges_to_chunks
from csbs.model import TransferStats

#: Called with (positions done, positions safely checkpointed, stats). It may raise to stop.
ProgressFn = Callable[[int, int, TransferStats], None]


@dataclass
class _Result:
    index: int
    chunk_id: bytes | None
    uploaded: int  # bytes written to the store, 0 when the chunk was already there
    length: int


def parent_entry_valid(parent: Manifest | None, index: int, size_bytes: int) -> bool:
    """Whether position ``index`` of the parent covers the same bytes as ours."""
    if parent is None:
        return False
    if parent.size_bytes == size_bytes:
        return index < parent.chunk_count
    return (index + 1) * parent.chunk_size <= min(parent.size_bytes, size_bytes)


def backup_disk(
    store: ChunkStore,
    reader: SnapshotReader,
    manifest: Manifest,
    parent: Manifest | None,
    changed: list[tuple[int, int]] | None,
    start: int = 0,
    concurrency: int = 8,
    checkpoint_seconds: float = 10.0,
    progress: ProgressFn | None = None,
) -> TransferStats:
    """Fill ``manifest`` (positions ``start``..end) from ``reader``; upload new chunks.

    ``changed`` are the byte ranges written since the parent's snapshot (changed-block
    tracking), or None to read every allocated range and diff by chunk id. Positions below
    ``start`` must already be filled (a resumed attempt loads them from the staging copy).
    """
    began = time.monotonic()
    size, cs = manifest.size_bytes, manifest.chunk_size
    if parent is not None and parent.chunk_size != cs:
        parent = None
    total = chunk_count(size, cs)
    stats = TransferStats(chunks_total=total, read_mode="cbt" if changed is not None else "full")
    changed_chunks = ranges_to_chunks(changed, cs) if changed is not None else None
    allocated = ranges_to_chunks(reader.allocated_ranges(), cs)
    known: set[bytes] = parent.chunk_ids() if parent is not None else set()

    def work(index: int, data: bytes) -> _Result:
        if is_zero(data):
            return _Result(index, None, 0, len(data))
        chunk_id = chunk_digest(data)
        if chunk_id in known or store.has_chunk(chunk_id):
            return _Result(index, chunk_id, 0, len(data))
        return _Result(index, chunk_id, store.put_chunk(chunk_id, data), len(data))

    inflight: deque[Future[_Result] | _Result] = deque()
    done = staged = start
    last_checkpoint = time.monotonic()

    def apply(result: _Result) -> None:
        nonlocal done
        manifest.set_entry(result.index, result.chunk_id)
        if result.chunk_id is None:
            stats.chunks_zero += 1
        else:
            stats.data_bytes += result.length
            if result.uploaded:
                stats.chunks_uploaded += 1
                stats.bytes_uploaded += result.uploaded
                known.add(result.chunk_id)
            else:
                stats.chunks_reused += 1
        done = result.index + 1

    def drain(limit: int) -> None:
        nonlocal staged, last_checkpoint
        while len(inflight) > limit:
            item = inflight.popleft()
            apply(item.result() if isinstance(item, Future) else item)
        now = time.monotonic()
        if done > staged and now - last_checkpoint >= checkpoint_seconds and done < total:
            manifest.complete = done
            store.put_manifest(manifest, staging=True)
            manifest.complete = None
            staged, last_checkpoint = done, now
        if progress is not None:
            progress(done, staged, stats)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="csbs-up") as pool:
        try:
            for index in range(start, total):
                offset, length = chunk_span(index, size, cs)
                reuse = (
                    changed_chunks is not None
                    and index not in changed_chunks
                    and parent_entry_valid(parent, index, size)
                )
                if reuse and parent is not None:
                    entry = parent.entry(index)
                    inflight.append(_Result(index, entry, 0, length))
                elif index not in allocated:
                    inflight.append(_Result(index, None, 0, length))
                else:
                    data = reader.read(offset, length)
                    if len(data) != length:
                        raise CorruptData(f"short read at {offset}: {len(data)} of {length}")
                    stats.chunks_read += 1
                    stats.bytes_read += length
                    inflight.append(pool.submit(work, index, data))
                drain(2 * concurrency)
            drain(0)
        except BaseException:
            for item in inflight:
                if isinstance(item, Future):
                    item.cancel()
            raise
    stats.seconds = time.monotonic() - began
    return stats


def restore_disk(
    store: ChunkStore,
    manifest: Manifest,
    writer: DiskWriter,
    start: int = 0,
    concurrency: int = 8,
    progress: ProgressFn | None = None,
) -> TransferStats:
    """Write every position of ``manifest`` from ``start`` on to ``writer``.

    Chunks are fetched and verified in parallel and written in order; zero positions are
    punched as holes (runs of them in one call). Every position is idempotent, so a retry
    resumes at the last reported position.
    """
    began = time.monotonic()
    size, cs = manifest.size_bytes, manifest.chunk_size
    total = manifest.chunk_count
    stats = TransferStats(chunks_total=total, read_mode="restore")
    inflight: deque[tuple[int, Future[tuple[bytes, int]] | None]] = deque()
    zero_run: list[int] = []  # [offset, length] of pending zero positions
    done = start

    def fetch(chunk_id: bytes, length: int) -> tuple[bytes, int]:
        data, stored = store.get_chunk(chunk_id)
        if len(data) != length:
            raise CorruptData(
                f"chunk {chunk_id.hex()} holds {len(data)} bytes where the manifest needs {length}"
            )
        return data, stored

    def flush_zeros() -> None:
        if zero_run:
            writer.zero(zero_run[0], zero_run[1])
            zero_run.clear()

    def drain(limit: int) -> None:
        nonlocal done
        while len(inflight) > limit:
            index, future = inflight.popleft()
            offset, length = chunk_span(index, size, cs)
            if future is None:
                stats.chunks_zero += 1
                if zero_run and zero_run[0] + zero_run[1] == offset:
                    zero_run[1] += length
                else:
                    flush_zeros()
                    zero_run.extend([offset, length])
            else:
                flush_zeros()
                data, stored = future.result()
                writer.write(offset, data)
                stats.chunks_fetched += 1
                stats.bytes_fetched += stored
                stats.bytes_written += length
                stats.data_bytes += length
            done = index + 1
        if progress is not None:
            if zero_run:
                flush_zeros()
            progress(done, done, stats)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="csbs-down") as pool:
        try:
            for index in range(start, total):
                chunk_id = manifest.entry(index)
                length = chunk_span(index, size, cs)[1]
                inflight.append(
                    (index, None if chunk_id is None else pool.submit(fetch, chunk_id, length))
                )
                drain(2 * concurrency)
            drain(0)
            flush_zeros()
        except BaseException:
            for _, item in inflight:
                if item is not None:
                    item.cancel()
            raise
    stats.seconds = time.monotonic() - began
    return stats
