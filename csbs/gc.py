"""Garbage collection (D1): delete chunks that no manifest references, one sweep per
project at a time, under a renewed lease (docs/format.md, "Locks and leases").

A sweep marks (reads every committed and staging manifest), lists the chunks, and
deletes the unreferenced ones in batches. It heartbeats and renews its lease in every
phase; a sweep that finds its lease gone (it stalled past it, or a retry took over) stops
before it deletes anything more. A listed manifest it cannot read stops the sweep before
any delete (fail closed), unless the catalog says its backup is being deleted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.errors import CsbsError, LeaseLost, NotFound
from csbs.model import BackupStatus
from csbs.steps import SweepResult

#: Chunks deleted per request (S3's DeleteObjects limit); the lease is renewed before each.
DELETE_BATCH = 1000
#: Heartbeats at most this often within a phase (each phase begins with one).
BEAT_SECONDS = 1.0


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
    ) -> None:
        self.catalog = catalog
        self.seconds = seconds
        self.token = catalog.claim_gc(owner, seconds)
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
        if not self.catalog.renew_gc(self.token, self.seconds):
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
        self.catalog.release_gc(self.token)


def collect_garbage(
    catalog: Catalog,
    store: ChunkStore,
    lease_seconds: float,
    owner: str | None = None,
    heartbeat: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """One sweep of the project's chunks; returns counts of manifests, chunks, chunks
    deleted and bytes freed. Raises GarbageCollectionRunning (another sweep holds the
    lease), GarbageCollectionDeferred (backups run), LeaseLost or UnreadableManifest."""
    lease = Lease(catalog, lease_seconds, owner, heartbeat)
    try:
        lease.keep("marking", force=True, manifests=0)
        refs = [(b, d, False) for b, d in store.list_manifest_refs()]
        refs += [(b, d, True) for b, d in store.list_manifest_refs(staging=True)]
        referenced: set[bytes] = set()
        for i, (backup_id, disk_id, staging) in enumerate(refs):
            manifest = _read(catalog, store, backup_id, disk_id, staging)
            if manifest is not None:
                referenced |= manifest
            lease.keep("marking", manifests=i + 1, of=len(refs))
        lease.keep("listing", force=True, chunks=0)
        total, doomed, freed, stored = 0, [], 0, 0
        for chunk_id, size in store.list_chunks():
            total += 1
            stored += size
            if chunk_id not in referenced:
                doomed.append(chunk_id)
                freed += size
            lease.keep("listing", chunks=total)
        lease.keep("deleting", force=True, deleted=0, of=len(doomed))
        for start in range(0, len(doomed), DELETE_BATCH):
            batch = doomed[start : start + DELETE_BATCH]
            lease.renew()  # the delete that follows is issued well within the lease
            store.delete_chunks(batch)
            lease.deleted += len(batch)
            lease.keep("deleting", deleted=lease.deleted, of=len(doomed))
        # The tenant's stored bytes, measured (B15): no backup runs beside a sweep.
        catalog.set_usage(stored - freed)
    finally:
        lease.release()
    return SweepResult(
        manifests=len(refs), chunks=total, chunks_deleted=len(doomed), bytes_freed=freed
    )


def _read(
    catalog: Catalog, store: ChunkStore, backup_id: str, disk_id: str, staging: bool
) -> set[bytes] | None:
    """The chunk ids a listed manifest references; None only when nothing can need it: its
    backup is deleted or being deleted, or it is the checkpoint of a backup no longer
    being made. Anything else that cannot be read stops the sweep: a chunk is deleted
    only when nothing may need it."""
    try:
        return store.get_manifest(backup_id, disk_id, staging).chunk_ids()
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
