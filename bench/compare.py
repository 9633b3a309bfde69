"""csbs against restic on the same VM image, same SeaweedFS, same run (not part of the tests).

Usage: .venv/bin/python bench/compare.py [--disk-gib 4] [--data-gib 2] [--changed 0.10] [--repeat 1]

Builds a local-driver server with one sparse disk holding mixed data (half random, half
compressible text per 4 MiB region), starts its own SeaweedFS and Temporal dev server on
free loopback ports, runs a worker in this process, and times through Temporal (workflow
start to result) a full backup, an incremental after changing a fraction of the written
regions (chunk diffing and changed-block tracking), and a restore. restic 0.14 (Debian
package `restic`) backs up and restores the same raw image file into the same SeaweedFS.
It also measures the raw S3 PUT ceiling of 4 MiB objects. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from csbs.config import Settings
from csbs.drivers.local import LocalDriver
from csbs.model import BackupServerInput, RestoreServerInput
from starter.client import CsbsClient
from starter.stack import start_seaweed, tool
from worker import build_worker
from workflows.common import SEARCH_ATTRIBUTES

MIB = 1024 * 1024
REGION = 4 * MIB


def mixed_region(index: int) -> bytes:
    text = (f"region {index:08d} csbs benchmark text, compressible but unique; " * 40000).encode()
    return os.urandom(REGION // 2) + text[: REGION // 2]


def put_ceiling(store: Any, seconds: float = 8.0, threads: int = 8) -> float:
    """MB/s of raw 4 MiB PUTs into the bucket (the upper bound of a full backup)."""
    blob = os.urandom(REGION)
    deadline = time.monotonic() + seconds
    count = 0

    def worker(n: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            store.s3.put_object(Bucket=store.bucket, Key=f"ceiling/{n}/{done}", Body=blob)
            done += 1
        return done

    began = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        count = sum(pool.map(worker, range(threads)))
    return count * REGION / 1e6 / (time.monotonic() - began)


def restic(env: dict[str, str], *args: str) -> float:
    began = time.monotonic()
    subprocess.run(["restic", "-q", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - began


async def one_round(
    args: argparse.Namespace,
    env_temporal: WorkflowEnvironment,
    endpoint: str,
    bucket: str,
    work: Path,
) -> dict[str, float]:
    settings = Settings(
        var_dir=work / "var",
        s3_endpoint=endpoint,
        s3_bucket=bucket,
        s3_prefix=f"bench-{uuid.uuid4().hex[:8]}",
        servers_dir=work / "servers",
        task_queue=f"bench-{uuid.uuid4().hex[:6]}",
    )
    drv = LocalDriver(settings.effective_servers_dir)
    server = drv.create_server("bench", [int(args.disk_gib * 1024) * MIB])
    disk = server.disks[0]
    regions = int(args.data_gib * 1024 * MIB) // REGION
    stride = max(1, (disk.size_bytes // REGION) // regions)
    offsets = [i * stride * REGION for i in range(regions)]
    for i, off in enumerate(offsets):
        drv.write(server.id, disk.id, off, mixed_region(i))
    data_mb = regions * REGION / 1e6
    image = drv._disk_path(server.id, disk.id)
    out: dict[str, float] = {}

    renv = dict(
        os.environ,
        RESTIC_PASSWORD="bench",
        RESTIC_REPOSITORY=f"s3:{endpoint}/{bucket}/restic-{uuid.uuid4().hex[:8]}",
    )
    restic(renv, "init")
    out["restic full"] = restic(renv, "backup", str(image))

    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(env_temporal.client, settings, pool):
            client = CsbsClient(env_temporal.client, settings)

            async def backup() -> tuple[float, dict[str, Any]]:
                began = time.monotonic()
                _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
                result = cast(dict[str, Any], await handle.result())
                return time.monotonic() - began, result

            out["csbs full"], _ = await backup()
            changed = offsets[:: max(1, int(1 / args.changed))]
            for i, off in enumerate(changed):
                drv.write(server.id, disk.id, off, mixed_region(10**6 + i))
            out["restic incremental"] = restic(renv, "backup", str(image))
            out["csbs incremental (cbt)"], incr = await backup()
            # Chunk diffing without changed-block tracking: drop the CBT checkpoint.
            for i, off in enumerate(changed):
                drv.write(server.id, disk.id, off, mixed_region(2 * 10**6 + i))
            drv._set_checkpoint(server.id, disk.id, None)
            out["csbs incremental (diff)"], incr = await backup()

            began = time.monotonic()
            handle = await client.start_restore(RestoreServerInput(backup_id=incr["id"]))
            await handle.result()
            out["csbs restore"] = time.monotonic() - began
    target = work / "restic-restore"
    out["restic restore"] = restic(renv, "restore", "latest", "--target", str(target))
    shutil.rmtree(target, ignore_errors=True)
    out["_data_mb"] = data_mb
    from csbs.chunkstore import ChunkStore

    out["_put_ceiling"] = put_ceiling(ChunkStore(settings))
    shutil.rmtree(work / "servers", ignore_errors=True)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--disk-gib", type=float, default=4)
    parser.add_argument("--data-gib", type=float, default=2)
    parser.add_argument("--changed", type=float, default=0.10)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("restic"):
        sys.exit("restic is needed: apt-get install -y restic")
    os.environ["AWS_ACCESS_KEY_ID"] = "bench"
    os.environ["AWS_SECRET_ACCESS_KEY"] = uuid.uuid4().hex
    bucket = "csbs-bench"
    with tempfile.TemporaryDirectory(prefix="csbs-bench-") as tmp:
        work = Path(tmp)
        weed = start_seaweed(
            work / "weed",
            bucket,
            os.environ["AWS_ACCESS_KEY_ID"],
            os.environ["AWS_SECRET_ACCESS_KEY"],
        )
        try:
            from csbs.chunkstore import ChunkStore

            probe = ChunkStore(Settings(s3_endpoint=weed.endpoint, s3_bucket=bucket))
            for _ in range(100):
                try:
                    probe.ensure_bucket()
                    break
                except Exception:
                    time.sleep(0.3)
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=tool("temporal"),
                search_attributes=SEARCH_ATTRIBUTES,
                data_converter=pydantic_data_converter,
            )
            rounds = [
                await one_round(args, env, weed.endpoint, bucket, work) for _ in range(args.repeat)
            ]
            await env.shutdown()
        finally:
            weed.stop()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    mb = med.pop("_data_mb")
    ceiling = med.pop("_put_ceiling")
    print(
        f"data {mb:.0f} MB on a {args.disk_gib:g} GiB sparse disk, {args.changed:.0%} of regions "
        f"changed, median of {args.repeat}"
    )
    print(f"{'step':28} {'seconds':>8} {'MB/s':>8}")
    for key, secs in med.items():
        print(f"{key:28} {secs:8.2f} {mb / secs:8.1f}")
    print(f"raw S3 PUT ceiling (4 MiB, 8 threads): {ceiling:.1f} MB/s")
    for step, peer in [
        ("full", "full"),
        ("incremental (diff)", "incremental"),
        ("incremental (cbt)", "incremental"),
        ("restore", "restore"),
    ]:
        print(f"ratio {step:22} csbs is {med[f'restic {peer}'] / med[f'csbs {step}']:.2f}x restic")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
