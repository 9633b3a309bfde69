"""Garbage collection (D1): delete chunks that no manifest references, one sweep per
project at a time, under a renewed lease (docs/format.md, "Locks and leases").

A sweep counts the chunk objects per key directory, marks (reads every committed and
staging manifest), then lists the chunks and deletes the unreferenced ones in batches,
one shard of key directories at a time: with more chunks than ``CSBS_GC_SHARD_CHUNKS``
the marked ids wait in one temporary file per shard, so memory stays bounded however
large the repository (issue 17). It heartbeats and renews its lease in every
phase; a sweep that finds its lease gone (it stalled past it, or a retry took over) stops
before it deletes anything more. A listed manifest it cannot read stops the sweep before
any delete (fail closed), unless the catalog says its backup is being deleted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.errors import CsbsError, LeaseLost, NotFound
from csbs.format import DIGEST_SIZE
from csbs.model import BackupStatus
from csbs.steps import SweepResult

#: Chunks deleted per request (S3's DeleteObjects limit); the lease is renewed before each.
DELETE_BATCH = 1000
#: Heartbeats at most this often within a phase (each phase begins with one).
BEAT_SECONDS = 1.0
#: The most chunk ids a sweep holds in memory at once (``CSBS_GC_SHARD_CHUNKS``).
SHARD_CHUNKS = 2_000_000
ZERO_DIGEST = bytes(DIGEST_SIZE)


class UnreadableManifest(CsbsError):
    """A live backup's manifest could not be read: the sweep stops, nothing is deleted."""

    retryable = True


class Lease:
    """The sweep's lease on the project's chunks: renewed as it goes, checked before every
    delete; ``keep`` also heartbeats so that Temporal sees the sweep alive."""

    def __init__(
        self,
        catalog: Catalog,
        seconds: float,
        owner: str | None,
        heartbeat: Callable[[dict[str, Any]], None] | None,
        site: str = "primary",
    ) -> None:
        self.catalog = catalog
        self.seconds = seconds
        self.site = site
        self.token = catalog.claim_gc(owner, seconds, site)
        self.heartbeat = heartbeat
        self.renewed = time.monotonic()
        self.beat = 0.0
        self.deleted = 0

    def keep(self, phase: str, force: bool = False, **details: Any) -> None:
        """Heartbeat (throttled, or now with ``force``); renew the lease every sixth of it."""
        now = time.monotonic()
        if self.heartbeat is not None and (force or now - self.beat >= BEAT_SECONDS):
            self.beat = now
            self.heartbeat({"phase": phase, **details})
        if now - self.renewed >= self.seconds / 6:
            self.renew()

    def renew(self) -> None:
        if not self.catalog.renew_gc(self.token, self.seconds, self.site):
            done = (
                f"after deleting {self.deleted} chunks"
                if self.deleted
                else "before deleting anything"
            )
            raise LeaseLost(
                f"the sweep lost its lease on project {self.catalog.project} (it stalled "
                f"for over {self.seconds:.0f} s, or a retry took over): it stopped {done}"
            )
        self.renewed = time.monotonic()

    def release(self) -> None:
        self.catalog.release_gc(self.token, self.site)


def collect_garbage(
    catalog: Catalog,
    store: ChunkStore,
    lease_seconds: float,
    owner: str | None = None,
    heartbeat: Callable[[dict[str, Any]], None] | None = None,
    shard_chunks: int = SHARD_CHUNKS,
    temp_dir: str | None = None,
    site: str = "primary",
    before_marking: Callable[[], None] | None = None,
) -> SweepResult:
    """One sweep of the project's chunks; returns counts of manifests, chunks, chunks
    deleted and bytes freed. Raises GarbageCollectionRunning (another sweep holds the
    lease), GarbageCollectionDeferred (backups run), LeaseLost or UnreadableManifest.

    Memory stays bounded by ``shard_chunks`` chunk ids whatever the repository's size
    (issue 17): see ``plan_shards`` and ``SpilledRefs``. ``site="replica"``: ``store`` is
    the replica, swept under its own lease, beside no replication."""
    lease = Lease(catalog, lease_seconds, owner, heartbeat, site)
    try:
        if before_marking is not None:  # under the lease: the replica's retention
            lease.keep("pruning", force=True)
            before_marking()
        # 1. Count the chunk objects per key directory; keep their ids only while they
        #    fit in one shard (then the sweep needs no second listing).
        lease.keep("counting", force=True, chunks=0)
        counts = [0] * 256
        kept: list[tuple[bytes, int]] | None = []
        total = 0
        for chunk_id, size in store.list_chunks():
            counts[chunk_id[0]] += 1
            total += 1
            if kept is not None:
                kept.append((chunk_id, size))
                if len(kept) > shard_chunks:
                    kept = None
            lease.keep("counting", chunks=total)
        shards = plan_shards(counts, shard_chunks)
        # 2. Mark: every chunk id a manifest references, into its shard.
        refs = _ordered_refs(catalog, store)
        lease.keep("marking", force=True, manifests=0, of=len(refs))
        with SpilledRefs(shards, temp_dir) as marked:
            previous: tuple[Any, bytes] | None = None
            for i, (group, backup_id, disk_id, staging) in enumerate(refs):
                entries = _read(catalog, store, backup_id, disk_id, staging)
                if entries is not None:
                    same = previous[1] if previous is not None and previous[0] == group else None
                    marked.add_novel(entries, same)
                    previous = (group, entries)
                lease.keep("marking", manifests=i + 1, of=len(refs))
            # 3. Sweep shard by shard: list its directories, delete what nothing marked.
            versioned = store.versions.enabled()
            doomed_total, freed, stored, peak, locked = 0, 0, 0, 0, 0
            for number, (lo, hi) in enumerate(shards):
                lease.keep("listing", force=True, shard=number + 1, of=len(shards))
                live = marked.load(number)
                peak = max(peak, len(live))
                doomed: list[tuple[str, str]] = []  # (key, version id; "" unversioned)
                sizes: dict[tuple[str, str], int] = {}
                keys: set[str] = set()
                if versioned:
                    # Every version: a delete marker hides a chunk, it does not free it.
                    for chunk_id, key, version_id, size in store.list_chunk_versions(range(lo, hi)):
                        stored += size
                        if chunk_id not in live:
                            doomed.append((key, version_id))
                            sizes[(key, version_id)] = size
                            keys.add(key)
                        lease.keep("listing", shard=number + 1, of=len(shards))
                else:
                    listed = (
                        kept
                        if kept is not None and len(shards) == 1
                        else store.list_chunks(range(lo, hi))
                    )
                    for chunk_id, size in listed:
                        stored += size
                        if chunk_id not in live:
                            key = store.chunk_key(chunk_id)
                            doomed.append((key, ""))
                            sizes[(key, "")] = size
                            keys.add(key)
                        lease.keep("listing", shard=number + 1, of=len(shards))
                del live
                lease.keep("deleting", force=True, deleted=lease.deleted, shard=number + 1)
                for start in range(0, len(doomed), DELETE_BATCH):
                    batch = doomed[start : start + DELETE_BATCH]
                    lease.renew()  # the delete that follows is issued well within the lease
                    if versioned:
                        refused = set(store.versions.delete_versions(batch))
                    else:
                        store.delete_keys([k for k, _ in batch])
                        refused = set()
                    gone = [t for t in batch if t[0] not in refused]
                    freed += sum(sizes[t] for t in gone)
                    lease.deleted += len({k for k, _ in gone})
                    locked += len(refused)
                    lease.keep("deleting", deleted=lease.deleted, shard=number + 1)
                doomed_total += len(keys)
        # The tenant's stored bytes, measured (B15): no backup runs beside a sweep.
        if site == "primary":
            catalog.set_usage(stored - freed)
    finally:
        lease.release()
    return SweepResult(
        manifests=len(refs),
        chunks=total,
        chunks_deleted=doomed_total - locked,
        bytes_freed=freed,
        shards=len(shards),
        peak_ids=peak,
        chunks_locked=locked,
    )


def plan_shards(counts: list[int], shard_chunks: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``[lo, hi)`` of chunk-id first bytes (the key directories
    ``chunks/<lo:02x>/`` to ``chunks/<hi-1:02x>/``), each holding at most
    ``shard_chunks`` chunk objects where a single directory allows it."""
    shards: list[tuple[int, int]] = []
    lo, held = 0, 0
    for first, count in enumerate(counts):
        if held and held + count > shard_chunks:
            shards.append((lo, first))
            lo, held = first, 0
        held += count
    shards.append((lo, len(counts)))
    return shards


class SpilledRefs:
    """The referenced chunk ids of a sweep, split by shard. With one shard they are a set
    in memory; with more, each shard's ids go to its own file of 32-byte records under a
    temporary directory, read back one shard at a time.

    ``add_novel`` writes only the entries of a manifest that differ from the previous
    manifest of the same disk at the same position (an incremental chain repeats most of
    its parent's entries): by induction each of those was written already. So the files
    grow with the chunks written, not with backups times disk size."""

    def __init__(self, shards: list[tuple[int, int]], temp_dir: str | None) -> None:
        self.shards = shards
        self.owner = bytearray(256)  # first byte -> shard number
        for number, (lo, hi) in enumerate(shards):
            for first in range(lo, hi):
                self.owner[first] = number
        self.memory: set[bytes] | None = set() if len(shards) == 1 else None
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.files: list[BinaryIO] = []
        self.temp_dir = temp_dir

    def __enter__(self) -> SpilledRefs:
        if self.memory is None:
            self.folder = tempfile.TemporaryDirectory(prefix="csbs-gc-", dir=self.temp_dir)
            self.files = [
                open(os.path.join(self.folder.name, f"{n}.ids"), "w+b")  # noqa: SIM115
                for n in range(len(self.shards))
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files:
            f.close()
        if self.folder is not None:
            self.folder.cleanup()

    def add_novel(self, entries: bytes, previous: bytes | None) -> None:
        view = memoryview(entries)
        same = previous is not None and len(previous) == len(entries)
        before = memoryview(previous if same and previous is not None else b"")
        block = DIGEST_SIZE * 128
        for start in range(0, len(entries), block):
            end = start + block
            if same and view[start:end] == before[start:end]:
                continue
            for at in range(start, min(end, len(entries)), DIGEST_SIZE):
                digest = view[at : at + DIGEST_SIZE]
                if digest == ZERO_DIGEST:
                    continue
                if same and digest == before[at : at + DIGEST_SIZE]:
                    continue
                self._add(bytes(digest))

    def _add(self, chunk_id: bytes) -> None:
        if self.memory is not None:
            self.memory.add(chunk_id)
        else:
            self.files[self.owner[chunk_id[0]]].write(chunk_id)

    def load(self, number: int) -> set[bytes]:
        """The ids marked in shard ``number``."""
        if self.memory is not None:
            return self.memory
        f = self.files[number]
        f.flush()
        f.seek(0)
        live: set[bytes] = set()
        while record := f.read(DIGEST_SIZE * 4096):
            live.update(record[i : i + DIGEST_SIZE] for i in range(0, len(record), DIGEST_SIZE))
        f.close()
        return live


def _ordered_refs(catalog: Catalog, store: ChunkStore) -> list[tuple[Any, str, str, bool]]:
    """Every committed and staging manifest as (group, backup id, disk id, staging), the
    manifests of one server's disk together, oldest first (so that each follows its
    parent, the one it shares most entries with)."""
    rows = {b.id: b for b in catalog.list_backups()}
    refs = [(b, d, False) for b, d in store.list_manifest_refs()]
    refs += [(b, d, True) for b, d in store.list_manifest_refs(staging=True)]

    def order(ref: tuple[str, str, bool]) -> tuple[str, str, str, str]:
        row = rows.get(ref[0])
        when = row.created_at.isoformat() if row is not None and row.created_at else ""
        return (row.server_id if row is not None else "", ref[1], when, ref[0])

    refs.sort(key=order)
    return [((order(r)[0], r[1]), r[0], r[1], r[2]) for r in refs]


def _read(
    catalog: Catalog, store: ChunkStore, backup_id: str, disk_id: str, staging: bool
) -> bytes | None:
    """The entries (chunk ids) of a listed manifest; None only when nothing can need it: its
    backup is deleted or being deleted, or it is the checkpoint of a backup no longer
    being made. Anything else that cannot be read stops the sweep: a chunk is deleted
    only when nothing may need it."""
    try:
        return bytes(store.get_manifest(backup_id, disk_id, staging).entries)
    except CsbsError as exc:
        row = catalog.find_backup(backup_id)
        if staging:
            # A checkpoint matters only to its backup while that is being made.
            if row is None or row.status != BackupStatus.CREATING:
                return None
        elif isinstance(exc, NotFound) and (
            row is None or row.status in {BackupStatus.DELETING, BackupStatus.DELETE_FAILED}
        ):
            return None  # deleted since it was listed: its chunks are no longer needed
        raise UnreadableManifest(
            f"manifest of disk {disk_id} of backup {backup_id} was listed but cannot be read "
            f"({exc}); the sweep stopped and nothing was deleted"
        ) from exc
