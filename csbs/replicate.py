"""Replication of a backup to the second site (issue 17): its missing chunks first, then
its manifests, then its descriptor, which commits it there as it does on the primary.

Incremental: a chunk whose id sits at the same position of the disk's parent manifest
on the replica is there already (the replica's sweep keeps every chunk a manifest there
references), so only the others are looked up, and only the ones the replica lacks are
copied. Each chunk is verified (digest, and key where encrypted) before it is written:
a damaged primary is never copied over a good replica. The chunk objects are copied as
stored (compressed, sealed); manifests and descriptors are verified, then sealed again
for the replica's object names.

Resumable: a retry after a crash looks the candidates up again and copies only those
still missing, so what was copied is never copied twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from csbs import locks
from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.errors import CsbsError
from csbs.format import DIGEST_SIZE, Manifest
from csbs.locks import ObjectLocked, as_utc
from csbs.steps import ReplicateResult

ZERO = bytes(DIGEST_SIZE)
#: Heartbeats at most this often.
BEAT_SECONDS = 1.0


def candidates(manifest: Manifest, parent: Manifest | None) -> set[bytes]:
    """The chunk ids of ``manifest`` that the replica may lack: every non-zero entry that
    is not at the same position of the parent's manifest already replicated."""
    entries = manifest.entries
    before = parent.entries if parent is not None else b""
    out: set[bytes] = set()
    for at in range(0, len(entries), DIGEST_SIZE):
        digest = bytes(entries[at : at + DIGEST_SIZE])
        if digest == ZERO or before[at : at + DIGEST_SIZE] == digest:
            continue
        out.add(digest)
    return out


def _bounded(
    pool: ThreadPoolExecutor, fn: Callable[[bytes], Any], items: list[bytes], window: int
) -> Iterator[tuple[bytes, Any]]:
    """``fn`` over ``items`` in the pool with at most ``window`` in flight, in order."""
    pending: list[tuple[bytes, Future[Any]]] = []
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            first, fut = pending.pop(0)
            yield first, fut.result()
    for item, fut in pending:
        yield item, fut.result()


def prune_replica(
    catalog: Catalog, replica: ChunkStore, retention_days: int, now: datetime | None = None
) -> tuple[int, list[str]]:
    """The replica's retention: delete the copies of backups the primary deleted (their
    tombstones) once they are ``retention_days`` old; returns how many, and why any was
    kept (S3 Object Lock still holds it). Copies the catalog knows nothing of are left
    alone: after a lost catalog, ``csbs catalog rebuild`` must run first."""
    now = now or datetime.now(UTC)
    pruned, kept = 0, []
    for tomb in catalog.replica_tombstones():
        if as_utc(tomb.created_at) + timedelta(days=retention_days) > now:
            continue
        try:
            replica.delete_backup_objects(tomb.backup_id)
        except ObjectLocked as exc:
            kept.append(f"replica copy of {tomb.backup_id} kept: {exc}")
            continue
        catalog.drop_tombstone(tomb.backup_id)
        pruned += 1
    return pruned, kept


def replicate_policies(primary: ChunkStore, replica: ChunkStore) -> int:
    """Make the replica's policy copies those of the primary (``csbs catalog rebuild
    --from-replica`` brings them back); returns how many there are."""
    ids = primary.policy_ids()
    for policy_id in ids:
        replica.put_policy(primary.get_policy(policy_id))
    replica.delete_policies([p for p in replica.policy_ids() if p not in set(ids)])
    return len(ids)


def replicate_backup(
    primary: ChunkStore,
    replica: ChunkStore,
    backup_id: str,
    parent_id: str | None,
    concurrency: int,
    heartbeat: Callable[[dict[str, Any]], None] | None = None,
    slack_days: int = 10,
) -> ReplicateResult:
    """Copy one committed backup to the replica; ``parent_id``: a backup of the same
    server already on the replica (its manifests narrow what is looked up).

    A locked backup (S3 Object Lock) is locked on the replica too when its bucket has
    Object Lock: manifests and descriptor until the backup's lock date, chunks to its
    generation (``csbs.locks``), the reused ones extended unless the parent's copy
    covers them; into a bucket without Object Lock it is copied unlocked, and the result
    says so."""
    started = time.monotonic()
    last_beat = 0.0

    def beat(phase: str, **details: Any) -> None:
        nonlocal last_beat
        now = time.monotonic()
        if heartbeat is not None and now - last_beat >= BEAT_SECONDS:
            last_beat = now
            heartbeat({"phase": phase, **details})

    descriptor = primary.get_descriptor(backup_id)
    replica.ensure_config()
    need, gen, note = None, None, ""
    if descriptor.locked_until is not None:
        if replica.versions.status() == (True, "Enabled"):
            need = as_utc(descriptor.locked_until)
            gen = locks.generation(need, slack_days)
        else:
            note = (
                f"the backup is locked until {descriptor.locked_until:%Y-%m-%d}, but the "
                f"replica's bucket {replica.bucket} has no Object Lock: its copy is not locked"
            )
    parents: dict[str, Manifest] = {}
    manifests: list[Manifest] = []
    wanted: set[bytes] = set()
    referenced: set[bytes] = set()
    for disk in descriptor.disks:
        manifest = primary.get_manifest(backup_id, disk.disk_id)
        parent = None
        if parent_id is not None:
            try:
                parent = replica.get_manifest(parent_id, disk.disk_id)
            except CsbsError:
                parent = None  # not there (a new disk, or pruned): look every chunk up
            if parent is not None and parent.size_bytes != manifest.size_bytes:
                parent = None
        if parent is not None:
            parents[disk.disk_id] = parent
        manifests.append(manifest)
        referenced.update(
            bytes(manifest.entries[a : a + DIGEST_SIZE])
            for a in range(0, len(manifest.entries), DIGEST_SIZE)
        )
        wanted |= candidates(manifest, parent)
    referenced.discard(ZERO)
    looked_up = sorted(wanted)
    missing: list[bytes] = []
    copied = copied_bytes = 0
    new: set[bytes] = set()
    window = 4 * concurrency
    with ThreadPoolExecutor(concurrency, thread_name_prefix="replicate") as pool:
        for done, (chunk_id, present) in enumerate(
            _bounded(pool, replica.has_chunk, looked_up, window), start=1
        ):
            if not present:
                missing.append(chunk_id)
            beat("checking", checked=done, of=len(looked_up))

        def copy(chunk_id: bytes) -> int:
            blob = primary.fetch_chunk(chunk_id)
            primary.open_chunk(chunk_id, blob)  # CorruptData: never copy damage
            replica.put_chunk_blob(chunk_id, blob, lock_until=gen)
            return len(blob)

        for chunk_id, size in _bounded(pool, copy, missing, window):
            new.add(chunk_id)
            copied += 1
            copied_bytes += size
            beat("copying", copied=copied, of=len(missing), bytes=copied_bytes)
    extended = 0
    if need is not None and gen is not None:
        parent_until = None
        if parent_id is not None:
            with contextlib.suppress(CsbsError):
                locked = replica.get_descriptor(parent_id).locked_until
                parent_until = locks.generation(as_utc(locked), slack_days) if locked else None
        todo: set[bytes] = set()
        for manifest in manifests:
            parent = parents.get(manifest.disk_id)
            todo |= locks.chunks_to_extend(
                manifest.chunk_ids(),
                new,
                parent.chunk_ids() if parent is not None else None,
                parent_until,
                need,
            )
        extended, _longer = replica.extend_chunk_locks(todo, gen)
    for manifest in manifests:
        replica.put_manifest(manifest, lock_until=need)
    replica.put_descriptor(descriptor, lock_until=need)
    policies = replicate_policies(primary, replica)
    return ReplicateResult(
        policies=policies,
        locks_extended=extended,
        note=note,
        backup_id=backup_id,
        chunks_referenced=len(referenced),
        chunks_checked=len(looked_up),
        chunks_copied=copied,
        bytes_copied=copied_bytes,
        manifests=len(manifests),
        seconds=round(time.monotonic() - started, 3),
    )
