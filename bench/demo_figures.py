"""Backup and restore figures on the running embedded stack (``scripts/up`` first).

Usage: .venv/bin/python bench/demo_figures.py [--data-gib 1] [--change-pct 10]
Creates a server with a 1 GiB system disk and a 2 GiB data disk, writes --data-gib GiB of
mixed data (half random, half text), then times through Temporal (workflow start to
result): a full backup, an incremental after changing --change-pct % of the written 4 MiB
regions, an incremental of the unchanged server, and a restore. Prints MB/s of data,
objects uploaded and bytes read. Uses the stack's driver: run both ``scripts/up`` and this
script with ``CSBS_COMPUTE_DRIVER=qemu`` for the QEMU figures. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any, cast

from csbs.config import Settings
from csbs.drivers import make_dev_servers
from csbs.model import BackupServerInput, RestoreServerInput
from runtime.connection import connect
from starter.client import CsbsClient
from starter.stack import stack_env

MIB = 1024 * 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--change-pct", type=float, default=10.0)
    args = parser.parse_args()
    settings = Settings()
    os.environ.update({k: v for k, v in stack_env(settings).items() if k.startswith("AWS_")})
    drv = make_dev_servers(settings)
    server = drv.create_server(f"bench-{int(time.time())}", [1 << 30, 2 << 30])
    data_bytes = int(args.data_gib * (1 << 30))
    regions = []
    text = (b"csbs benchmark text line 0123456789 abcdefghijklmnopqrstuvwxyz\n" * 70000)[: 4 * MIB]
    rng = random.Random(7)
    for i in range(data_bytes // (4 * MIB)):
        disk = server.disks[i % 2]
        offset = (i // 2) * 4 * MIB
        drv.write(server.id, disk.id, offset, os.urandom(4 * MIB) if i % 2 else text)
        regions.append((disk.id, offset))
    client = CsbsClient(await connect(settings), settings)

    async def backup() -> tuple[dict[str, Any], float]:
        began = time.monotonic()
        _, handle = await client.start_backup(BackupServerInput(server_id=server.id))
        return cast(dict[str, Any], await handle.result()), time.monotonic() - began

    full, t_full = await backup()
    for disk_id, offset in rng.sample(regions, max(1, int(len(regions) * args.change_pct / 100))):
        drv.write(server.id, disk_id, offset, os.urandom(4 * MIB))
    incr, t_incr = await backup()
    same, t_same = await backup()
    began = time.monotonic()
    handle = await client.start_restore(RestoreServerInput(backup_id=incr["id"]))
    await handle.result()
    t_restore = time.monotonic() - began

    def up(b: dict[str, Any]) -> int:
        return sum(d["chunks_uploaded"] for d in b["disks"])

    def read(b: dict[str, Any]) -> str:
        modes = ",".join(sorted({d["read_mode"] for d in b["disks"]}))
        return f"{sum(d['bytes_read'] for d in b['disks']) / MIB:.0f} MiB read ({modes})"

    mb = data_bytes / 1e6
    print(
        f"data written        {data_bytes / MIB:.0f} MiB on {server.size_bytes / MIB:.0f} MiB of "
        f"disks, driver {settings.compute_driver}"
    )
    print(
        f"full backup         {t_full:6.2f} s  {mb / t_full:7.1f} MB/s  "
        f"{up(full)} chunks uploaded, {full['stored_bytes'] / MIB:.0f} MiB stored, {read(full)}"
    )
    label = f"incremental ({args.change_pct:g}%)"
    print(
        f"{label:<19} {t_incr:6.2f} s  {mb / t_incr:7.1f} MB/s of data covered  "
        f"{up(incr)} chunks uploaded, {read(incr)}"
    )
    print(f"unchanged           {t_same:6.2f} s  {up(same)} chunks uploaded, {read(same)}")
    print(f"restore             {t_restore:6.2f} s  {mb / t_restore:7.1f} MB/s")
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
