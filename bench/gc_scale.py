"""A garbage-collection sweep of a repository of a million chunk objects (issue 17, "GC
that scales"): its time and peak RSS, in one shard (every id in memory) and in shards.

Usage: .venv/bin/python bench/gc_scale.py [--chunks 1000000] [--shard-chunks 100000]

How the repository is made: the chunk objects are synthetic and tiny. Each is a random
32-byte id stored at its real key (``<prefix>/chunks/<2 hex>/<64 hex>``) with a
``MIN_CHUNK_OBJECT``-byte body, PUT by 32 threads (a sweep never reads a chunk's body,
only lists keys). The manifests are real (``Manifest``, as backups write them): 10 disks of
``chunks / 15`` chunks (at most 75,000: 300 GiB at 4 MiB), each with a chain of 5 backups
that rewrites 5 % of the positions each time, so about 80 % of the chunks are live and the
rest garbage (for a million: 799,980 live, 200,020 garbage). The
catalog is a fresh SQLite database (it holds no rows for these backups: the sweep orders
them by disk alone).

Each sweep runs in a child process of its own (``--sweep``), so its peak RSS (ru_maxrss)
is the sweep's alone; the first sweep (in shards) deletes the garbage, which is PUT again
for the second (every id in memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchstack import bench_settings, bench_stack

from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.format import MIN_CHUNK_OBJECT, Manifest

DISKS, CHAIN, CHANGE = 10, 5, 0.05


def make_repository(settings: Settings, chunks: int, seed: int) -> tuple[int, list[bytes]]:
    """PUT ``chunks`` synthetic chunk objects and the manifests of 10 chains; the number of
    live chunk ids and the garbage ones."""
    store = ChunkStore(settings)
    store.ensure_config()
    rng = random.Random(seed)
    per_disk = min(75_000, int(chunks / (DISKS * 1.5)))
    ids: list[bytes] = []
    live: set[bytes] = set()
    for disk in range(DISKS):
        current = [rng.randbytes(32) for _ in range(per_disk)]
        ids += current
        live.update(current)
        for step in range(CHAIN):
            backup_id = f"bk-{disk:02d}{step:02d}{'0' * 12}"
            manifest = Manifest(backup_id, f"d{disk}", len(current) * (4 << 20), 4 << 20)
            for index, chunk_id in enumerate(current):
                manifest.set_entry(index, chunk_id)
            store.put_manifest(manifest)
            if step < CHAIN - 1:
                for index in rng.sample(range(len(current)), int(len(current) * CHANGE)):
                    current[index] = rng.randbytes(32)
                    ids.append(current[index])
                    live.add(current[index])
    garbage: list[bytes] = []
    while len(ids) + len(garbage) < chunks:  # chunks of backups deleted long ago
        garbage.append(rng.randbytes(32))
    put_chunks(store, ids + garbage)
    return len(live), garbage


def put_chunks(store: ChunkStore, ids: list[bytes]) -> None:
    body = bytes(MIN_CHUNK_OBJECT)
    s3, bucket = store.chunk_s3, store.bucket
    began = time.monotonic()

    def put(part: list[bytes]) -> None:
        for chunk_id in part:
            s3.put_object(Bucket=bucket, Key=store.chunk_key(chunk_id), Body=body)

    parts = [ids[i::32] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, parts))
    seconds = time.monotonic() - began
    print(f"  PUT {len(ids)} chunk objects in {seconds:.0f} s ({len(ids) / seconds:.0f}/s)")


def sweep(settings_json: str) -> None:
    """The child: one sweep; prints its result, seconds and peak RSS as JSON."""
    from csbs.services import Services

    settings = Settings.model_validate_json(settings_json)
    began = time.monotonic()
    result = Services(settings).delete.collect_garbage()
    seconds = time.monotonic() - began
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**result.model_dump(), "seconds": seconds, "rss_mb": rss}))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--shard-chunks", type=int, default=100_000)
    parser.add_argument("--sweep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep:
        sweep(args.sweep)
        return
    async with bench_stack("gcbench") as stack:
        rows: list[tuple[int, dict[str, Any]]] = []
        settings = bench_settings(stack.work, stack.weed.endpoint, stack.bucket, "gc")
        live, garbage = make_repository(settings, args.chunks, seed=1)
        for budget in (args.shard_chunks, 10 * args.chunks):
            if rows:  # the first sweep deleted the garbage: put it back
                put_chunks(ChunkStore(settings), garbage)
            settings = settings.model_copy(
                update={"gc_shard_chunks": budget, "gc_lease_seconds": 600.0}
            )
            print(f"sweep with room for {budget} ids:", flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--sweep", settings.model_dump_json()],
                check=True,
                capture_output=True,
                text=True,
                env=dict(os.environ),
            ).stdout
            found = json.loads(out.strip().splitlines()[-1])
            assert found["chunks"] - found["chunks_deleted"] == live, (found, live)
            assert found["chunks_deleted"] == len(garbage), found
            rows.append((budget, found))
    print()
    print(f"{'ids in memory at most':>22} {'shards':>7} {'peak ids':>9} {'chunks':>9} "
          f"{'deleted':>8} {'seconds':>8} {'peak RSS MB':>12}")  # fmt: skip
    for budget, f in rows:
        print(f"{budget:>22} {f['shards']:>7} {f['peak_ids']:>9} {f['chunks']:>9} "
              f"{f['chunks_deleted']:>8} {f['seconds']:>8.1f} {f['rss_mb']:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
