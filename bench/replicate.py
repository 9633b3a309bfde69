"""Replication to a second site (issue 17): ``ReplicateBackup`` against a plain S3-to-S3
copy of the same objects, side by side in one run, as ratios.

Usage: .venv/bin/python bench/replicate.py [--data-gib 1] [--changed 0.01] [--repeat 1]

Two SeaweedFS on loopback (the primary, and the replica with credentials of its own) and
a Temporal dev server. A local server's 4 GiB disk gets ``--data-gib`` of 4 MiB regions,
half random and half text (zstd halves it); it is backed up (full), and:

- *csbs full*: the ``ReplicateBackup`` workflow copies that backup to an empty replica,
  from the start of the run to its result (lookups, digest checks, chunks, manifests,
  descriptor, policy copies);
- *plain copy*: every object of the same repository (chunks, manifests, descriptor,
  config) copied with boto3 GET from the primary and PUT to the replica, 8 threads (csbs's
  ``CSBS_TRANSFER_CONCURRENCY``), into a fresh prefix: what a bucket-to-bucket copy tool
  does, with no checks;
- *csbs incremental*: after ``--changed`` of the regions are rewritten and backed up
  again, the replication of that backup (only the chunks the replica lacks);
- *plain incremental*: the same new objects copied plainly, knowing which they are
  (a copy tool would have to list and compare both buckets first; not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchstack import bench_settings, bench_stack
from compare import REGION, mixed_region
from pydantic import SecretStr

from csbs.chunkstore import ChunkStore, make_s3_client
from csbs.config import Settings
from csbs.drivers.local import LocalDriver
from csbs.model import BackupServerInput, ReplicateBackupInput
from starter.client import CsbsClient
from starter.stack import start_seaweed, wait_for_bucket
from worker import build_worker

MIB = 1024 * 1024


def plain_copy(primary: Settings, replica: Settings, keys: list[str], threads: int = 8) -> float:
    """Seconds to GET ``keys`` from the primary and PUT them under a fresh prefix of the
    replica, ``threads`` at a time; returns the time."""
    src, dst = make_s3_client(primary, max_pool=threads), make_s3_client(replica, max_pool=threads)
    prefix = f"plain-{uuid.uuid4().hex[:8]}/"

    def one(key: str) -> int:
        body = src.get_object(Bucket=primary.s3_bucket, Key=key)["Body"].read()
        dst.put_object(Bucket=replica.s3_bucket, Key=prefix + key, Body=body)
        return len(body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, keys))
    return time.monotonic() - t0


def all_keys(store: ChunkStore) -> list[str]:
    return [k for k, _ in store._raw_list(f"{store.root}/")]


async def one_round(args: argparse.Namespace, stack: Any, replica_endpoint: str) -> dict[str, Any]:
    settings = bench_settings(stack.work, stack.weed.endpoint, stack.bucket, "rep")
    settings = settings.model_copy(
        update={
            "replica_endpoint": replica_endpoint,
            "replica_bucket": "replica",
            "replica_prefix": f"r-{uuid.uuid4().hex[:8]}",
            "replica_access_key_id": SecretStr("replica"),
            "replica_secret_access_key": SecretStr(os.environ["BENCH_REPLICA_SECRET"]),
        }
    )
    drv = LocalDriver(settings.effective_servers_dir)
    server = drv.create_server("rep", [4096 * MIB])
    disk = server.disks[0]
    regions = int(args.data_gib * 1024 * MIB) // REGION
    stride = max(1, (disk.size_bytes // REGION) // regions)
    offsets = [i * stride * REGION for i in range(regions)]
    for i, off in enumerate(offsets):
        drv.write(server.id, disk.id, off, mixed_region(i))
    primary = ChunkStore(settings)
    out: dict[str, Any] = {}
    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(stack.temporal.client, settings, pool):
            client = CsbsClient(stack.temporal.client, settings)

            async def backup() -> str:
                _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
                return str(cast(dict[str, Any], await handle.result())["id"])

            async def replicate(backup_id: str, step: str) -> dict[str, Any]:
                t0 = time.monotonic()
                handle = await client.start_replicate(ReplicateBackupInput(backup_id=backup_id))
                result = cast(dict[str, Any], await handle.result())
                out[step] = time.monotonic() - t0
                return result

            first = await backup()
            before = set(all_keys(primary))
            stored = sum(s for k, s in primary._raw_list(f"{primary.root}/"))
            full = await replicate(first, "csbs full")
            out["_stored_mb"] = stored / 1e6
            out["_full copied"] = full["chunks_copied"]
            out["plain full"] = plain_copy(settings, settings.replica(), sorted(before))
            for i, off in enumerate(offsets[:: max(1, int(1 / args.changed))]):
                drv.write(server.id, disk.id, off, mixed_region(10**6 + i))
            second = await backup()
            new = sorted(set(all_keys(primary)) - before)
            inc = await replicate(second, "csbs incremental")
            out["_incremental copied"] = inc["chunks_copied"]
            out["_incremental looked up"] = inc["chunks_checked"]
            out["plain incremental"] = plain_copy(settings, settings.replica(), new)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    async with bench_stack("primary") as stack:
        secret = uuid.uuid4().hex
        os.environ["BENCH_REPLICA_SECRET"] = secret
        weed = start_seaweed(stack.work / "replica", "replica", "replica", secret)
        try:
            probe = Settings(
                replica_endpoint=weed.endpoint,
                replica_bucket="replica",
                replica_access_key_id=SecretStr("replica"),
                replica_secret_access_key=SecretStr(secret),
            )
            wait_for_bucket(ChunkStore(probe.replica()), marker=False)
            rounds = [await one_round(args, stack, weed.endpoint) for _ in range(args.repeat)]
        finally:
            weed.stop()
    best = {k: min(r[k] for r in rounds) for k in rounds[0]}
    mb = best["_stored_mb"]
    print(f"stored {mb:.0f} MB in {best['_full copied']} chunks; best of {args.repeat} round(s)")
    print("| step | csbs | plain copy | csbs / plain |")
    print("|---|---|---|---|")
    for step in ("full", "incremental"):
        csbs, plain = best[f"csbs {step}"], best[f"plain {step}"]
        print(f"| {step} | {csbs:.2f} s | {plain:.2f} s | {csbs / plain:.2f}x |")
    print(
        f"full: csbs {mb / best['csbs full']:.0f} MB/s, plain {mb / best['plain full']:.0f} MB/s; "
        f"incremental: {best['_incremental copied']} chunks copied of "
        f"{best['_incremental looked up']} looked up"
    )


if __name__ == "__main__":
    asyncio.run(main())
