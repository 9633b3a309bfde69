"""The pure parts of a sharded sweep (issue 17, "GC that scales") and of replication:
shards of key directories, the spilled set of marked ids, and which chunks of a backup
the replica may lack."""

from __future__ import annotations

import os

from csbs.format import DIGEST_SIZE, Manifest
from csbs.gc import SpilledRefs, plan_shards
from csbs.replicate import candidates


def test_shards_hold_at_most_their_share_and_cover_every_directory() -> None:
    counts = [10] * 256
    shards = plan_shards(counts, 100)
    assert shards[0] == (0, 10) and shards[-1][1] == 256
    assert all(sum(counts[lo:hi]) <= 100 for lo, hi in shards)
    assert [hi for _, hi in shards[:-1]] == [lo for lo, _ in shards[1:]]  # contiguous
    # A directory larger than a shard ends its shard (with the empty ones before it);
    # an empty repository is one shard.
    assert plan_shards([0, 500, 0] + [0] * 253, 100) == [(0, 2), (2, 256)]
    assert plan_shards([0] * 256, 100) == [(0, 256)]


def _ids(n: int) -> list[bytes]:
    return [os.urandom(DIGEST_SIZE) for _ in range(n)]


def test_spilled_refs_give_back_every_marked_id_in_its_shard() -> None:
    """Spilled to files shard by shard, the ids read back are exactly those marked: the
    entries of a manifest that repeat its parent's at the same position are not written
    again, zero entries never."""
    shards = [(0, 128), (128, 256)]
    parent = _ids(300)
    child = list(parent)
    for i in range(0, 300, 7):
        child[i] = os.urandom(DIGEST_SIZE)
    child[5] = bytes(DIGEST_SIZE)
    with SpilledRefs(shards, None) as marked:
        marked.add_novel(b"".join(parent), None)
        marked.add_novel(b"".join(child), b"".join(parent))
        low, high = marked.load(0), marked.load(1)  # each shard is read back once
    expected = (set(parent) | set(child)) - {bytes(DIGEST_SIZE)}
    assert low | high == expected
    assert all(c[0] < 128 for c in low) and all(c[0] >= 128 for c in high)


def test_the_replica_is_asked_only_for_chunks_that_differ_from_the_parent() -> None:
    size = 8 * 1024 * 1024
    parent = Manifest(backup_id="b1", disk_id="d", size_bytes=size, chunk_size=1024 * 1024)
    child = Manifest(backup_id="b2", disk_id="d", size_bytes=size, chunk_size=1024 * 1024)
    ids = _ids(8)
    for i, chunk_id in enumerate(ids):
        parent.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = chunk_id
        child.entries[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = chunk_id
    moved, fresh = ids[0], os.urandom(DIGEST_SIZE)
    child.entries[3 * DIGEST_SIZE : 4 * DIGEST_SIZE] = fresh
    child.entries[5 * DIGEST_SIZE : 6 * DIGEST_SIZE] = moved  # an old chunk at a new place
    child.entries[7 * DIGEST_SIZE : 8 * DIGEST_SIZE] = bytes(DIGEST_SIZE)  # now zero
    assert candidates(child, parent) == {fresh, moved}
    assert candidates(child, None) == set(ids[:7]) - {ids[3], ids[5]} | {fresh, moved}
