"""The data plane: back up one snapshot disk into chunks, restore one disk from a manifest.

Backup: reading is sequential in the calling thread; hashing, compressing, existence checks
and uploads run in a pool of ``concurrency`` threads. At most ``2 x concurrency`` chunks are
in memory at once (a semaphore taken before each read and given back when the chunk's work
ends), whatever the disk size. Results are applied in position order as they become ready,
without waiting for a slow upload to let the reader go on: a position is cheap to keep
pending, a chunk's bytes are not. Every position below ``done`` is final, which is the
resume point saved in the staging manifest.

Restore: each worker fetches, verifies and writes one chunk (``pwrite`` at its offset), so
at most ``concurrency`` chunks are in memory; zero positions are punched as holes in runs.
Positions below ``done`` are written; a retry resumes there (every write is idempotent).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from csbs.adaptive import AdaptiveLimit
from csbs.chunkstore import ChunkStore
from csbs.drivers.base import DiskWriter, SnapshotReader
from csbs.errors import CorruptData
from csbs.format import Manifest, chunk_count, chunk_span, is_zero, ranges_to_chunks
from csbs.model import TransferStats

#: Called with (positions done, positions safely checkpointed, stats). It may raise to stop.
ProgressFn = Callable[[int, int, TransferStats], None]

#: Most positions pending (read or reused, not yet applied) at once; they cost a few bytes.
WINDOW = 1024
#: How often a blocked loop wakes to report progress (heartbeats keep flowing).
WAKE_SECONDS = 0.5


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


def _acquire(slots: threading.Semaphore, while_waiting: Callable[[], None]) -> None:
    while not slots.acquire(timeout=WAKE_SECONDS):
        while_waiting()


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
    chunk_index: Callable[[int], set[bytes] | None] | None = None,
    suspect: set[bytes] | None = None,
    repaired: set[bytes] | None = None,
    lock_until: datetime | None = None,
    uploaded: set[bytes] | None = None,
) -> TransferStats:
    """Fill ``manifest`` (positions ``start``..end) from ``reader``; upload new chunks.

    ``changed`` are the byte ranges written since the parent's snapshot (changed-block
    tracking), or None to read every allocated range and diff by chunk id. Positions below
    ``start`` must already be filled (a resumed attempt loads them from the staging copy).
    ``chunk_index(n)``, given how many chunks will be read, may return every chunk id in
    the store (then no chunk needs an existence check) or None (check each new chunk).

    What is trusted to be in the store: with changed-block tracking, the parent's chunk at
    every unchanged position (that is the point of an incremental) and the parent's ids;
    with a full read, only what the store itself says, so a full read uploads whatever
    the store lost. ``suspect`` chunk ids (found missing or corrupt by a verify) are never
    trusted: an unchanged position holding one is read again, and a chunk read with that
    id is uploaded over whatever the store holds; those ids go into ``repaired``.

    New chunks are locked until ``lock_until`` (S3 Object Lock); their ids go into
    ``uploaded``.
    """
    suspect = suspect or set()
    began = time.monotonic()
    size, cs = manifest.size_bytes, manifest.chunk_size
    if parent is not None and parent.chunk_size != cs:
        parent = None
    total = chunk_count(size, cs)
    stats = TransferStats(chunks_total=total, read_mode="cbt" if changed is not None else "full")
    changed_chunks = ranges_to_chunks(changed, cs) if changed is not None else None
    allocated = ranges_to_chunks(reader.allocated_ranges(), cs)
    known: set[bytes] = (
        parent.chunk_ids() - suspect if parent is not None and changed is not None else set()
    )

    def reusable(index: int) -> bool:
        """An unchanged position whose parent chunk may be referenced without reading."""
        if changed_chunks is None or index in changed_chunks or parent is None:
            return False
        if not parent_entry_valid(parent, index, size):
            return False
        return parent.entry(index) not in suspect

    to_read = sum(1 for i in range(start, total) if i in allocated and not reusable(i))
    store_ids = chunk_index(to_read) if chunk_index is not None and to_read else None
    if store_ids is not None:
        known |= store_ids - suspect

    slots = threading.Semaphore(2 * concurrency)  # chunks whose bytes are in memory
    repaired_now: set[bytes] = repaired if repaired is not None else set()
    repaired_lock = threading.Lock()

    new_ids: set[bytes] = uploaded if uploaded is not None else set()

    def put(chunk_id: bytes, data: bytes | bytearray) -> int:
        written = store.put_chunk(chunk_id, data, lock_until)
        with repaired_lock:
            new_ids.add(chunk_id)
        return written

    def work(index: int, data: bytes | bytearray) -> _Result:
        try:
            if is_zero(data):
                return _Result(index, None, 0, len(data))
            chunk_id = store.chunk_id(data)
            if chunk_id in suspect:
                with repaired_lock:
                    if chunk_id in repaired_now:  # another position of this run uploaded it
                        return _Result(index, chunk_id, 0, len(data))
                    repaired_now.add(chunk_id)
                return _Result(index, chunk_id, put(chunk_id, data), len(data))
            if chunk_id in known or (store_ids is None and store.has_chunk(chunk_id)):
                return _Result(index, chunk_id, 0, len(data))
            return _Result(index, chunk_id, put(chunk_id, data), len(data))
        finally:
            slots.release()

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
                stats.bytes_reused += result.length
        done = result.index + 1

    def drain(limit: int) -> None:
        """Apply every ready result at the head; block on the head only above ``limit``."""
        nonlocal staged, last_checkpoint
        while inflight:
            head = inflight[0]
            if isinstance(head, Future) and not head.done() and len(inflight) <= limit:
                break
            inflight.popleft()
            apply(head.result() if isinstance(head, Future) else head)
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
                if reusable(index) and parent is not None:
                    entry = parent.entry(index)
                    inflight.append(_Result(index, entry, 0, length))
                elif index not in allocated:
                    inflight.append(_Result(index, None, 0, length))
                else:
                    _acquire(slots, lambda: drain(WINDOW))
                    try:
                        data = reader.read(offset, length)
                        if len(data) != length:
                            raise CorruptData(f"short read at {offset}: {len(data)} of {length}")
                    except BaseException:
                        slots.release()
                        raise
                    stats.chunks_read += 1
                    stats.bytes_read += length
                    inflight.append(pool.submit(work, index, data))
                    del data
                drain(WINDOW)
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
    positions: list[int] | None = None,
    max_concurrency: int | None = None,
) -> TransferStats:
    """Write every position of ``manifest`` from ``start`` on to ``writer`` (only those in
    ``positions``, sorted, for a delta restore).

    Workers fetch, verify and write chunks at their offsets in parallel; zero positions are
    punched as holes (runs of them in one call). Every position is idempotent, so a retry
    resumes at the last reported position. ``concurrency`` GETs are in flight at first;
    the number adapts to their latency up to ``max_concurrency`` (``csbs.adaptive``).
    """
    began = time.monotonic()
    most = max(concurrency, max_concurrency or concurrency)
    gets = AdaptiveLimit(concurrency, most)
    size, cs = manifest.size_bytes, manifest.chunk_size
    total = manifest.chunk_count
    stats = TransferStats(chunks_total=total, read_mode="restore" if positions is None else "delta")
    stats_lock = threading.Lock()
    inflight: deque[tuple[int, Future[None] | None]] = deque()
    zero_run: list[int] = []  # [offset, length] of pending zero positions
    zeroed_until = 0  # every zero position ending at or below this offset is punched
    done = start

    def fetch_and_write(chunk_id: bytes, offset: int, length: int) -> None:
        try:
            with gets.slot():
                blob = store.fetch_chunk(chunk_id)
            stored = len(blob)
            data = store.open_chunk(chunk_id, blob)
            del blob
        except CorruptData:
            # Deleted or overwritten since: a versioned bucket may hold it still.
            recovered = store.recover_chunk(chunk_id)
            if recovered is None:
                raise
            data, stored = recovered
        if len(data) != length:
            raise CorruptData(
                f"chunk {chunk_id.hex()} holds {len(data)} bytes where the manifest needs {length}"
            )
        writer.write(offset, data)
        with stats_lock:
            stats.chunks_fetched += 1
            stats.bytes_fetched += stored
            stats.bytes_written += length
            stats.data_bytes += length

    def flush_zeros() -> None:
        nonlocal zeroed_until
        if zero_run:
            writer.zero(zero_run[0], zero_run[1])
            zeroed_until = zero_run[0] + zero_run[1]
            zero_run.clear()

    def drain(limit: int) -> None:
        """Advance ``done`` over finished positions; block on the head only above ``limit``."""
        nonlocal done
        while inflight:
            index, future = inflight[0]
            if future is None:
                if sum(chunk_span(index, size, cs)) > zeroed_until:
                    if len(inflight) <= limit:
                        break  # its run is still growing; punch it in one call later
                    flush_zeros()
            elif not future.done() and len(inflight) <= limit:
                break
            else:
                future.result()
            inflight.popleft()
            done = index + 1
        if progress is not None:
            progress(done, done, stats)

    with ThreadPoolExecutor(max_workers=most, thread_name_prefix="csbs-down") as pool:
        try:
            todo = (
                range(start, total) if positions is None else [p for p in positions if p >= start]
            )
            for index in todo:
                chunk_id = manifest.entry(index)
                offset, length = chunk_span(index, size, cs)
                if chunk_id is None:
                    stats.chunks_zero += 1
                    if zero_run and zero_run[0] + zero_run[1] == offset:
                        zero_run[1] += length
                    else:
                        flush_zeros()
                        zero_run.extend([offset, length])
                    inflight.append((index, None))
                else:
                    inflight.append((index, pool.submit(fetch_and_write, chunk_id, offset, length)))
                # A pending future holds no chunk until it runs: ``concurrency`` workers
                # bound the memory; the window only bounds the bookkeeping.
                drain(max(WINDOW, 4 * most))
            flush_zeros()
            drain(0)
            if positions is not None and done < total:
                # A delta restore ends with the positions it skipped already right.
                done = total
                if progress is not None:
                    progress(done, done, stats)
        except BaseException:
            for _, item in inflight:
                if item is not None:
                    item.cancel()
            raise
    stats.seconds = time.monotonic() - began
    stats.concurrency, stats.get_ms = gets.limit, round(gets.mean_latency * 1000, 2)
    return stats
