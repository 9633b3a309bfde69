"""csbs against restic on the same VM image, same SeaweedFS, same run (not part of the tests).

Usage: .venv/bin/python bench/compare.py [--disk-gib 4] [--data-gib 2] [--changed 0.10]
       [--repeat 1] [--skip-restic] [--no-qemu] [--no-libvirt]

Builds a local-driver server with one sparse disk holding mixed data (half random, half
compressible text per 4 MiB region), starts its own SeaweedFS and Temporal dev server on
free loopback ports, runs a worker in this process, and times through Temporal (workflow
start to result) a full backup, an incremental after changing a fraction of the written
regions (chunk diffing and changed-block tracking), and a restore. restic 0.14 (Debian
package `restic`) backs up and restores the same raw image file into the same SeaweedFS.
With QEMU installed it also puts the same data on a ``qemu``-driver server and times a full
backup, an incremental after changing 1 % of the regions (dirty bitmaps) and an unchanged
backup; restic backs up the raw image with the same 1 % changed. With libvirt (as root,
libvirtd running or startable) the same image becomes a qcow2 disk of a guest-less domain
defined from XML: a full backup through libvirt's pull-mode backup, then an incremental
after the same 1 % changed (checkpoint bitmaps), with the bytes it read. It measures the raw S3 PUT
ceiling of 4 MiB objects and the CPU seconds of csbs, restic and SeaweedFS per step.
Prints medians and ratios.
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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchstack import bench_settings, bench_stack
from temporalio.testing import WorkflowEnvironment

from csbs.drivers.local import LocalDriver
from csbs.drivers.qemu import QemuDriver
from csbs.model import BackupServerInput, RestoreServerInput
from starter.client import CsbsClient
from worker import build_worker

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


def get_ceiling(store: Any, seconds: float = 8.0, threads: int = 8) -> float:
    """MB/s of raw 4 MiB GETs from the bucket (the upper bound of a full restore), over
    the objects ``put_ceiling`` left."""
    keys = [
        o["Key"]
        for o in store.s3.list_objects_v2(Bucket=store.bucket, Prefix="ceiling/", MaxKeys=200).get(
            "Contents", []
        )
    ]
    deadline = time.monotonic() + seconds

    def worker(n: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            key = keys[(n * 7 + done) % len(keys)]
            done += len(store.s3.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        return done

    began = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    return total / 1e6 / (time.monotonic() - began)


async def worker_rss_round(
    env_temporal: WorkflowEnvironment, settings: Any, server_id: str, out: dict[str, float]
) -> None:
    """A full backup and a full restore of the same server by ``python worker.py`` as its
    own process: its peak RSS (VmHWM) is the worker's alone."""
    from tests.conftest import ROOT, settings_env

    wsettings = settings.model_copy(update={"task_queue": f"{settings.task_queue}-rss"})
    address = env_temporal.client.service_client.config.target_host
    env = settings_env(wsettings, address)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = CsbsClient(env_temporal.client, wsettings)
        _, handle = await client.start_backup(
            BackupServerInput(server_id=server_id, name="rss-full")
        )
        record = cast(dict[str, Any], await handle.result())
        full = RestoreServerInput(backup_id=record["id"], full=True)
        await (await client.start_restore(full)).result()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        out["_worker peak RSS MB"] = int(hwm.split()[1]) / 1024
    finally:
        proc.terminate()
        proc.wait()


async def files_round(
    env_temporal: WorkflowEnvironment, settings: Any, work: Path, out: dict[str, float]
) -> None:
    """A 1 MiB file out of a 4 GiB ext4 disk (96 MiB of other files) of a backup: the
    seconds it takes and the share of the disk's chunks it fetches."""
    from csbs.chunkstore import ChunkStore
    from csbs.file_restore import choose_volume, find_volumes
    from csbs.nbd_server import BackupDiskReader

    tree = work / "files-tree"
    (tree / "var/log").mkdir(parents=True)
    for i in range(24):
        (tree / "var" / f"blob{i:02}.bin").write_bytes(os.urandom(4 * MIB))
    wanted = os.urandom(MIB)
    (tree / "var/log/wanted.log").write_bytes(wanted)
    image = work / "files.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "4G"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(tree)
    fsettings = settings.model_copy(update={"task_queue": f"{settings.task_queue}-f"})
    drv = LocalDriver(fsettings.effective_servers_dir)
    server = drv.create_server("files", [4096 * MIB])
    with open(image, "rb") as f:
        at = 0
        while block := f.read(REGION):
            if block.count(0) != len(block):
                drv.write(server.id, server.disks[0].id, at, block)
            at += len(block)
    image.unlink()
    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(env_temporal.client, fsettings, pool):
            client = CsbsClient(env_temporal.client, fsettings)
            _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
            record = cast(dict[str, Any], await handle.result())
    t0 = time.monotonic()
    manifest = ChunkStore(fsettings).get_manifest(record["id"], server.disks[0].id)
    reader = BackupDiskReader(ChunkStore(fsettings), manifest, readahead=0)
    volume = choose_volume(find_volumes(reader.read, manifest.size_bytes), None)
    assert volume.fs is not None
    assert b"".join(volume.fs.read_file("/var/log/wanted.log")) == wanted
    out["csbs file restore 1 MiB of 4 GiB"] = time.monotonic() - t0
    out["_file chunks fetched"] = reader.chunks_fetched
    out["_file chunks total"] = manifest.chunk_count


async def instant_round(
    env_temporal: WorkflowEnvironment, settings: Any, out: dict[str, float]
) -> None:
    """Instant restore on guest-less QEMU servers of 1 and 8 GiB (256 MiB of data each):
    from the start of the restore to the server running, then to the copy's end."""
    qsettings = settings.model_copy(
        update={"compute_driver": "qemu", "task_queue": f"{settings.task_queue}-i"}
    )
    qdrv = QemuDriver(qsettings.effective_servers_dir)
    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(env_temporal.client, qsettings, pool):
            client = CsbsClient(env_temporal.client, qsettings)
            for gib in (1, 8):
                server = qdrv.create_server(f"instant-{gib}", [gib * 1024 * MIB])
                step = gib * 1024 * MIB // 64
                write_image(qdrv, server, [i * step for i in range(64)], 7 * 10**6)
                try:
                    _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
                    record = cast(dict[str, Any], await handle.result())
                    t0 = time.monotonic()
                    restore = await client.start_restore(
                        RestoreServerInput(backup_id=record["id"], instant=True)
                    )
                    while (await restore.query("progress")).get("step") != "copying disks":
                        await asyncio.sleep(0.05)
                    out[f"csbs instant {gib} GiB: running"] = time.monotonic() - t0
                    await restore.result()
                    out[f"csbs instant {gib} GiB: copied"] = time.monotonic() - t0
                finally:
                    pid = qdrv.pid(server.id)
                    if pid is not None:
                        os.kill(pid, 9)


def restic(env: dict[str, str], *args: str) -> float:
    began = time.monotonic()
    subprocess.run(["restic", "-q", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - began


class Cpu:
    """CPU seconds used by this process, its children (restic) and SeaweedFS over a step."""

    def __init__(self, weed_pid: int) -> None:
        self.weed_pid = weed_pid
        self.steps: dict[str, tuple[float, float, float]] = {}

    def _now(self) -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        fields = Path(f"/proc/{self.weed_pid}/stat").read_text().rsplit(")", 1)[1].split()
        weed = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, weed

    def start(self) -> tuple[float, float, float]:
        return self._now()

    def stop(self, step: str, began: tuple[float, float, float]) -> None:
        now = self._now()
        self.steps[step] = (now[0] - began[0], now[1] - began[1], now[2] - began[2])


def write_image(drv: Any, server: Any, offsets: list[int], salt: int = 0) -> None:
    disk = server.disks[0]
    for i, off in enumerate(offsets):
        drv.write(server.id, disk.id, off, mixed_region(salt + i))


async def one_round(
    args: argparse.Namespace,
    env_temporal: WorkflowEnvironment,
    endpoint: str,
    bucket: str,
    work: Path,
    cpu: Cpu,
) -> dict[str, float]:
    settings = bench_settings(work, endpoint, bucket, "bench")
    drv = LocalDriver(settings.effective_servers_dir)
    server = drv.create_server("bench", [int(args.disk_gib * 1024) * MIB])
    disk = server.disks[0]
    regions = int(args.data_gib * 1024 * MIB) // REGION
    stride = max(1, (disk.size_bytes // REGION) // regions)
    offsets = [i * stride * REGION for i in range(regions)]
    write_image(drv, server, offsets)
    image = drv._disk_path(server.id, disk.id)
    out: dict[str, float] = {"_data_mb": regions * REGION / 1e6}
    changed = offsets[:: max(1, int(1 / args.changed))]

    renv = dict(
        os.environ,
        RESTIC_PASSWORD="bench",
        RESTIC_REPOSITORY=f"s3:{endpoint}/{bucket}/restic-{uuid.uuid4().hex[:8]}",
    )

    def run_restic(step: str, *restic_args: str) -> None:
        if not args.skip_restic:
            began = cpu.start()
            out[step] = restic(renv, *restic_args)
            cpu.stop(step, began)

    if not args.skip_restic:
        restic(renv, "init")
    run_restic("restic full", "backup", str(image))

    async def backup(client: CsbsClient, server_id: str, step: str) -> dict[str, Any]:
        began, t0 = cpu.start(), time.monotonic()
        _, handle = await client.start_backup(BackupServerInput(server_id=server_id))
        result = cast(dict[str, Any], await handle.result())
        out[step] = time.monotonic() - t0
        cpu.stop(step, began)
        out[f"_{step} stored"] = result["stored_bytes"]
        return result

    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(env_temporal.client, settings, pool):
            client = CsbsClient(env_temporal.client, settings)
            await backup(client, server.id, "csbs full")
            write_image(drv, server, changed, 10**6)
            run_restic("restic incremental", "backup", str(image))
            await backup(client, server.id, "csbs incremental (cbt)")
            # Chunk diffing without changed-block tracking: drop the CBT checkpoint.
            write_image(drv, server, changed, 2 * 10**6)
            drv._set_checkpoint(server.id, disk.id, None)
            incr = await backup(client, server.id, "csbs incremental (diff)")
            # Delta restore: 1 % of the disk written since the backup; only that goes back.
            write_image(drv, server, offsets[:: max(1, int(1 / 0.01))], 5 * 10**6)
            # The guest's writes reach the disk before the restore starts, as they would
            # long before an operator restores: the restore's fsync then flushes only
            # what it wrote, not the benchmark's setup.
            os.sync()
            began, t0 = cpu.start(), time.monotonic()
            delta = RestoreServerInput(backup_id=incr["id"])
            await (await client.start_restore(delta)).result()
            out["csbs delta restore 1%"] = time.monotonic() - t0
            cpu.stop("csbs delta restore 1%", began)
            # A full restore, as restic's (which writes a new file): every chunk.
            os.sync()
            began, t0 = cpu.start(), time.monotonic()
            full = RestoreServerInput(backup_id=incr["id"], full=True)
            await (await client.start_restore(full)).result()
            out["csbs restore"] = time.monotonic() - t0
            cpu.stop("csbs restore", began)
    drv._set_checkpoint(server.id, disk.id, None)  # the worker reads the whole disk
    await worker_rss_round(env_temporal, settings, server.id, out)
    target = work / "restic-restore"
    os.sync()
    run_restic("restic restore", "restore", "latest", "--target", str(target))
    shutil.rmtree(target, ignore_errors=True)
    one_pct = offsets[:: max(1, int(1 / 0.01))]
    if args.qemu or args.libvirt:
        # restic backs up the raw image with 1 % changed: the peer of the QEMU and libvirt
        # dirty-bitmap incrementals below, which change the same 1 %.
        write_image(drv, server, one_pct, 3 * 10**6)
        run_restic("restic incremental 1%", "backup", str(image))
    if args.qemu:
        # The same image on a QEMU server: dirty-bitmap incrementals at 1 % changed.
        qsettings = settings.model_copy(
            update={"compute_driver": "qemu", "task_queue": f"{settings.task_queue}-q"}
        )
        qdrv = QemuDriver(qsettings.effective_servers_dir)
        qserver = qdrv.create_server("bench-qemu", [disk.size_bytes])
        try:
            write_image(qdrv, qserver, offsets)
            with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
                async with build_worker(env_temporal.client, qsettings, pool):
                    qclient = CsbsClient(env_temporal.client, qsettings)
                    await backup(qclient, qserver.id, "csbs qemu full")
                    write_image(qdrv, qserver, one_pct, 4 * 10**6)
                    await backup(qclient, qserver.id, "csbs qemu bitmap 1%")
                    await backup(qclient, qserver.id, "csbs qemu unchanged")
        finally:
            pid = qdrv.pid(qserver.id)
            if pid is not None:
                os.kill(pid, 9)
    if args.libvirt:
        await libvirt_round(args, env_temporal, settings, image, offsets, out, backup)
    if args.qemu:
        await instant_round(env_temporal, settings, out)
    await files_round(env_temporal, settings, work, out)
    from csbs.chunkstore import ChunkStore

    store = ChunkStore(settings)
    out["_put_ceiling"] = put_ceiling(store)
    out["_get_ceiling"] = get_ceiling(store)
    shutil.rmtree(work / "servers", ignore_errors=True)
    return out


async def libvirt_round(
    args: argparse.Namespace,
    env_temporal: WorkflowEnvironment,
    settings: Any,
    image: Path,
    offsets: list[int],
    out: dict[str, float],
    backup: Any,
) -> None:
    """The same data as a libvirt domain's qcow2 disk: full, then 1 % changed."""
    from tests.libvirt_support import Lab, LabServers, libvirtd

    with libvirtd():
        lab = Lab()
        try:
            qcow2 = lab.dir / "bench.qcow2"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                check=True,
            )
            dom = lab.define("bench", [(qcow2, "qcow2")])
            lsettings = settings.model_copy(
                update={"compute_driver": "libvirt", "task_queue": f"{settings.task_queue}-lv"}
            )
            guest = LabServers(Path(lsettings.var_dir) / "lab", lab)
            one_pct = offsets[:: max(1, int(1 / 0.01))]
            with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
                async with build_worker(env_temporal.client, lsettings, pool):
                    client = CsbsClient(env_temporal.client, lsettings)
                    await backup(client, dom.UUIDString(), "csbs libvirt full")
                    for i, off in enumerate(one_pct):
                        guest.write(dom.UUIDString(), "vda", off, mixed_region(5 * 10**6 + i))
                    incr = await backup(client, dom.UUIDString(), "csbs libvirt bitmap 1%")
            out["_libvirt read MB"] = sum(d["bytes_read"] for d in incr["disks"]) / 1e6
            out["_libvirt changed MB"] = len(one_pct) * REGION / 1e6
        finally:
            lab.cleanup()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--disk-gib", type=float, default=4)
    parser.add_argument("--data-gib", type=float, default=2)
    parser.add_argument("--changed", type=float, default=0.10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-restic", action="store_true", help="csbs only (profiling)")
    parser.add_argument(
        "--no-qemu", dest="qemu", action="store_false", help="skip the QEMU dirty-bitmap steps"
    )
    parser.add_argument(
        "--no-libvirt", dest="libvirt", action="store_false", help="skip the libvirt steps"
    )
    args = parser.parse_args()
    if args.libvirt and (os.getuid() != 0 or not shutil.which("libvirtd")):
        sys.exit(
            "the libvirt steps need root and libvirtd (apt-get install libvirt-daemon-system), or pass --no-libvirt"
        )
    if args.qemu and not shutil.which("qemu-system-x86_64"):
        sys.exit(
            "QEMU is needed for the dirty-bitmap steps (apt-get install qemu-system-x86 "
            "qemu-utils), or pass --no-qemu"
        )
    if not args.skip_restic and not shutil.which("restic"):
        sys.exit("restic is needed: apt-get install -y restic")
    async with bench_stack("csbs-bench") as st:
        cpus = [Cpu(st.weed.proc.pid) for _ in range(args.repeat)]
        rounds = [
            await one_round(args, st.temporal, st.weed.endpoint, st.bucket, st.work, cpu)
            for cpu in cpus
        ]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    mb = med.pop("_data_mb")
    ceiling = med.pop("_put_ceiling")
    get_mb = med.pop("_get_ceiling")
    worker_rss = med.pop("_worker peak RSS MB")
    file_fetched, file_total = med.pop("_file chunks fetched"), med.pop("_file chunks total")
    lv_read, lv_changed = med.pop("_libvirt read MB", None), med.pop("_libvirt changed MB", None)
    stored = {k[1:].removesuffix(" stored"): v for k, v in med.items() if k.endswith(" stored")}
    cpu = {
        k: tuple(statistics.median(c.steps[k][i] for c in cpus) for i in range(3))
        for k in cpus[0].steps
    }
    print(
        f"data {mb:.0f} MB on a {args.disk_gib:g} GiB sparse disk, {args.changed:.0%} of regions "
        f"changed, median of {args.repeat}; 2 cores shared by all"
    )
    print(f"{'step':28} {'seconds':>8} {'MB/s':>8}   cpu-s: {'csbs':>5} {'restic':>6} {'weed':>5}")
    for key, secs in med.items():
        if key.startswith("_"):
            continue
        c = cpu.get(key, (0.0, 0.0, 0.0))
        print(f"{key:28} {secs:8.2f} {mb / secs:8.1f}          {c[0]:5.1f} {c[1]:6.1f} {c[2]:5.1f}")
    print(f"raw S3 PUT ceiling (4 MiB, 8 threads): {ceiling:.1f} MB/s")
    print(f"raw S3 GET ceiling (4 MiB, 8 threads): {get_mb:.1f} MB/s")
    # The full restore fetches about what the full backup stored (compressed chunks).
    restored = stored["csbs full"] / 1e6
    restore_rate = restored / med["csbs restore"]
    print(
        f"csbs full restore fetches ~{restored:.0f} MB at {restore_rate:.1f} MB/s = "
        f"{restore_rate / get_mb:.0%} of the GET ceiling"
    )
    full_rate = stored["csbs full"] / 1e6 / med["csbs full"]
    print(
        f"csbs full uploads {stored['csbs full'] / 1e6:.0f} MB at {full_rate:.1f} MB/s = "
        f"{full_rate / ceiling:.0%} of the PUT ceiling"
    )
    pairs = [
        ("full", "full"),
        ("incremental (diff)", "incremental"),
        ("incremental (cbt)", "incremental"),
        ("restore", "restore"),
        ("qemu bitmap 1%", "incremental 1%"),
        ("libvirt bitmap 1%", "incremental 1%"),
    ]
    for step, peer in pairs:
        if f"restic {peer}" in med and f"csbs {step}" in med:
            ratio = med[f"restic {peer}"] / med[f"csbs {step}"]
            print(f"ratio {step:22} csbs is {ratio:.2f}x restic")
    if "csbs delta restore 1%" in med:
        ratio = med["csbs restore"] / med["csbs delta restore 1%"]
        print(f"ratio delta restore 1%        csbs delta is {ratio:.1f}x its full restore")
    if lv_read is not None:
        print(
            f"libvirt incremental read {lv_read:.1f} MB for {lv_changed:.1f} MB changed "
            f"(only the checkpoint's dirty ranges, aligned to chunks)"
        )
    print(
        f"single-file restore (1 MiB of a 4 GiB ext4 disk) fetched {file_fetched:.0f} of "
        f"{file_total:.0f} chunks = {file_fetched / file_total:.2%} of the disk's chunks"
    )
    print(f"worker peak RSS (python worker.py, a full backup and restore): {worker_rss:.0f} MB")
    print(
        f"process peak RSS (bench + worker + client): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
