"""A policy run over many small servers: orchestration overhead versus data-bound time.

Usage: .venv/bin/python bench/policy_fanout.py [--servers 64] [--data-mib 8] [--concurrency 8 16]

Starts its own SeaweedFS and Temporal dev server on free loopback ports and a worker in
this process. Creates N local-driver servers (one 64 MiB disk with --data-mib MiB of
random data each) bound to one policy, then times through Temporal (workflow start to
result):

- one server's backup on its own (what a run would cost done one server at a time),
- ``RunPolicy`` over all N servers at each --concurrency,
- the same total data on one server (the data-bound time of that many bytes).

Not part of the tests.
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
from temporalio.testing import WorkflowEnvironment

from csbs.catalog import Catalog
from csbs.drivers.local import LocalDriver
from csbs.model import BackupServerInput, RunPolicyInput
from csbs.policy import PolicySpec, RetentionKind
from csbs.policy_service import PolicyService
from starter.client import CsbsClient
from worker import build_worker

MIB = 1024 * 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=64)
    parser.add_argument("--data-mib", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    async with bench_stack("csbs-fanout") as st:
        rows = await run(args, st.temporal, st.weed.endpoint, st.bucket, st.work)
    total_mib = args.servers * args.data_mib
    print(f"{args.servers} servers x {args.data_mib} MiB of data ({total_mib} MiB in all)")
    for label, seconds in rows:
        print(f"{label:44} {seconds:7.2f} s")
    os._exit(0)


async def run(
    args: argparse.Namespace, env: WorkflowEnvironment, endpoint: str, bucket: str, work: Path
) -> list[tuple[str, float]]:
    settings = bench_settings(work, endpoint, bucket, "fanout")
    (work / "var").mkdir(parents=True, exist_ok=True)
    drv = LocalDriver(settings.effective_servers_dir)
    servers = []
    for i in range(args.servers):
        server = drv.create_server(f"small-{i:02d}", [64 * MIB])
        drv.write(server.id, server.disks[0].id, 0, os.urandom(args.data_mib * MIB))
        servers.append(server)
    big = drv.create_server("all-in-one", [args.servers * args.data_mib * MIB + 64 * MIB])
    for i in range(args.servers):
        drv.write(big.id, big.disks[0].id, i * args.data_mib * MIB, os.urandom(args.data_mib * MIB))
    catalog = Catalog(settings.effective_database_url, settings.project)
    policies = PolicyService(catalog, drv)
    rows: list[tuple[str, float]] = []
    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        async with build_worker(env.client, settings, pool):
            client = CsbsClient(env.client, settings)

            async def backup(server_id: str) -> float:
                began = time.monotonic()
                _, handle = await client.start_backup(BackupServerInput(server_id=server_id))
                await handle.result()
                return time.monotonic() - began

            one = await backup(servers[0].id)
            rows.append(("one small server alone (full)", one))
            rows.append((f"  x {args.servers}, one at a time (estimate)", one * args.servers))
            rows.append(("same data on one server (data-bound)", await backup(big.id)))
            for concurrency in args.concurrency:
                policy = policies.create(
                    PolicySpec(
                        name=f"fanout-{concurrency}",
                        times=["03:00"],
                        every_days=1,
                        retention=RetentionKind.FOREVER,
                    )
                )
                policies.bind(policy.id, [s.id for s in servers])
                began = time.monotonic()
                handle = await env.client.start_workflow(
                    "RunPolicy",
                    RunPolicyInput(policy_id=policy.id, concurrency=concurrency),
                    id=f"fanout-{uuid.uuid4().hex[:8]}",
                    task_queue=settings.task_queue,
                )
                result = cast(dict[str, Any], await handle.result())
                seconds = time.monotonic() - began
                failed = [s for s, b in result["backups"].items() if b["outcome"] != "available"]
                if failed:
                    raise SystemExit(f"{len(failed)} backups failed: {result['backups']}")
                rows.append((f"RunPolicy over {args.servers}, concurrency {concurrency}", seconds))
    return rows


if __name__ == "__main__":
    asyncio.run(main())
