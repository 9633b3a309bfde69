"""The stack every benchmark starts for itself: SeaweedFS and a Temporal dev server on
free loopback ports, a fresh bucket and fresh credentials, all gone afterwards."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from starter.stack import SeaweedS3, start_seaweed, tool, wait_for_bucket
from workflows.common import SEARCH_ATTRIBUTES


@dataclass
class BenchStack:
    temporal: WorkflowEnvironment
    weed: SeaweedS3
    bucket: str
    work: Path


@asynccontextmanager
async def bench_stack(bucket: str) -> AsyncIterator[BenchStack]:
    os.environ["AWS_ACCESS_KEY_ID"] = "bench"
    os.environ["AWS_SECRET_ACCESS_KEY"] = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix=f"{bucket}-") as tmp:
        work = Path(tmp)
        weed = start_seaweed(work / "weed", bucket, "bench", os.environ["AWS_SECRET_ACCESS_KEY"])
        try:
            wait_for_bucket(
                ChunkStore(Settings(s3_endpoint=weed.endpoint, s3_bucket=bucket)), marker=False
            )
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=tool("temporal"),
                search_attributes=SEARCH_ATTRIBUTES,
                data_converter=pydantic_data_converter,
            )
            try:
                yield BenchStack(env, weed, bucket, work)
            finally:
                await env.shutdown()
        finally:
            weed.stop()


def bench_settings(work: Path, endpoint: str, bucket: str, name: str) -> Settings:
    """Settings of one benchmark run: its own state, servers, S3 prefix and task queue."""
    return Settings(
        var_dir=work / "var",
        s3_endpoint=endpoint,
        s3_bucket=bucket,
        s3_prefix=f"{name}-{uuid.uuid4().hex[:8]}",
        servers_dir=work / "servers",
        task_queue=f"{name}-{uuid.uuid4().hex[:6]}",
    )
