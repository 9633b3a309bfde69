"""The fault suite (issue 7, marker ``fault``; loopback only, bounded in time): csbs never
loses or silently corrupts a backup. Every case ends in a restorable backup or an
``error`` backup with a clear reason, and leaves no snapshot, overlay or slot behind.

- the worker killed with SIGKILL at seeded random points of backups and restores;
- the S3 endpoint down for 20 s in the middle of a backup and of a restore;
- the Temporal server (file persistence) restarted in the middle of a backup;
- the database unreachable for a while in the middle of a backup;
- garbage collection racing backups and deletes in 100 seeded interleavings.

Each test prints its figures (``pytest -s -m fault``); the README's reliability section
quotes the last run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from csbs.errors import CsbsError, GarbageCollectionDeferred, GarbageCollectionRunning
from csbs.model import (
    BackupServerInput,
    DeleteBackupsInput,
    RestoreServerInput,
    ServerState,
)
from csbs.services import Services
from csbs.verify import missing_chunks, verify_disk
from starter.client import CsbsClient
from starter.stack import start_seaweed
from tests.conftest import (
    Stack,
    backup,
    dev_servers,
    kill9,
    make_settings,
    max_attempt,
    restore,
    running_stack,
    service_backup,
    settings_env,
    start_worker,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow]
MIB = 1024 * 1024
KIB = 1024


# -- garbage collection against backups and deletes --------------------------------------------
@contextmanager
def jittered(service: Services, seed: int) -> Iterator[None]:
    """Sleep a seeded random moment before every S3 request, so that each seed interleaves
    the threads' requests differently."""
    store = service.store
    names = ["_put", "_get", "_head", "_delete", "list_objects"]
    originals = {n: getattr(store, n) for n in names}
    local = threading.local()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            rng = getattr(local, "rng", None)
            if rng is None:
                rng = local.rng = random.Random(f"{seed}-{threading.current_thread().name}")
            time.sleep(rng.random() * 0.004)
            return fn(*args, **kwargs)

        return call

    for n, fn in originals.items():
        setattr(store, n, wrap(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(store, n, fn)


def run_backup(service: Services, server_id: str) -> str | None:
    """One backup as the workflow runs it, waiting out a sweep; None if it failed."""
    return service_backup(service, server_id, wait_for_sweep=True, check=False)


def run_delete(service: Services, backup_id: str) -> None:
    """A delete as ``DeleteBackups`` runs it: mark, delete, then sweep."""
    pairs = service.delete.prepare_delete(
        DeleteBackupsInput(backup_ids=[backup_id]), "del-" + backup_id, "wf"
    )
    for bid, tid in pairs:
        service.delete.delete_backup(bid, tid)
    run_gc(service)


SWEEP_WAITS = (GarbageCollectionDeferred, GarbageCollectionRunning)


def run_gc(service: Services) -> None:
    # Deferred (a backup holds its lock) or refused (another sweep holds the lease): the
    # CollectGarbage workflow waits and tries again; a later sweep here does the same.
    with contextlib.suppress(*SWEEP_WAITS):
        service.delete.collect_garbage()


def test_gc_never_sweeps_a_chunk_a_live_or_running_backup_needs(tmp_path: Path, s3: Any) -> None:
    """Per seed: a backup, two deletes (each followed by its own sweep, as DeleteBackups
    does) and a CollectGarbage sweep run at once, their S3 requests jittered by the seed.
    Up to four sweeps race for the lease beside a backup; nothing it needs may go."""
    settings = make_settings(tmp_path, s3, chunk_size=64 * KIB, transfer_concurrency=2)
    service = Services(settings)
    drv = dev_servers(service.driver)
    server = drv.create_server("gc-race", [1 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(1 * MIB))
    expected: dict[str, str] = {}

    def change_and_back_up(rng: random.Random) -> None:
        # The guest changes 1-4 chunks; the backup shares the rest with older ones.
        for _ in range(rng.randint(1, 4)):
            drv.write(server.id, disk, rng.randrange(16) * 64 * KIB, rng.randbytes(64 * KIB))
        made = run_backup(service, server.id)
        assert made is not None
        expected[made] = drv.checksum(server.id)[disk]

    change_and_back_up(random.Random("first"))
    change_and_back_up(random.Random("second"))
    interleavings = checked = double_deletes = 0
    for seed in range(100):
        rng = random.Random(seed)
        change_and_back_up(rng)  # one more to delete, so two deletes each round
        for _ in range(rng.randint(1, 4)):
            drv.write(server.id, disk, rng.randrange(16) * 64 * KIB, rng.randbytes(64 * KIB))
        state = drv.checksum(server.id)[disk]
        live = [b.id for b in service.catalog.list_backups() if b.status == "available"]
        victims = rng.sample(live[1:], k=min(2, len(live) - 1))
        double_deletes += len(victims) == 2
        made: list[str | None] = []

        def backup_job(out: list[str | None] = made) -> None:
            out.append(run_backup(service, server.id))

        jobs: list[Callable[[], None]] = [backup_job, lambda: run_gc(service)]
        jobs += [lambda v=v: run_delete(service, v) for v in victims]  # type: ignore[misc]
        rng.shuffle(jobs)
        errors: list[BaseException] = []

        def guarded(
            job: Callable[[], None], sink: list[BaseException] = errors
        ) -> Callable[[], None]:
            def run() -> None:
                try:
                    job()
                except BaseException as exc:
                    sink.append(exc)
                    traceback.print_exc()

            return run

        with jittered(service, seed):
            threads = [
                threading.Thread(target=guarded(j), name=f"t{i}") for i, j in enumerate(jobs)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert errors == [], (seed, errors)
        interleavings += 1
        if made and made[0]:
            expected[made[0]] = state
        for victim in victims:
            expected.pop(victim, None)
        run_gc(service)  # a sweep with nothing running, the strictest moment
        for b in service.catalog.list_backups():
            assert b.status == "available", (seed, b.id, b.status, b.error)
            assert missing_chunks(service.store, b.id, [disk], None) == [], (seed, b.id)
            checked += 1
        assert drv.snapshots(server.id) == []
    # Every backup still there reads back whole and as it was made.
    for backup_id in expected:
        result = verify_disk(service.store, backup_id, disk, 4)
        assert result.problems == [], backup_id
    assert set(expected) == {b.id for b in service.catalog.list_backups()}
    assert double_deletes == 100
    print(
        f"GC: {interleavings} seeded interleavings of a backup, two deletes (each with its "
        f"sweep) and a sweep; {checked} backup checks, {len(expected)} backups verified "
        f"chunk by chunk"
    )
    service.catalog.dispose()


async def test_a_sweep_that_outlives_its_heartbeat_loses_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep stalls (no heartbeat) while listing chunks; Temporal gives it up and starts
    a retry beside it, which takes the lease over and finishes. A backup then commits new
    chunks. When the stalled attempt wakes, it finds its lease gone and stops before
    deleting anything: the backup restores bit-identical."""
    from csbs import gc, tuning
    from csbs.chunkstore import ChunkStore

    monkeypatch.setattr(tuning, "HEARTBEAT_TIMEOUT", timedelta(seconds=3))
    server = stack.compute.create_server("gc-stall", [4 * MIB])
    disk = server.disks[0].id
    stack.compute.write(server.id, disk, 0, os.urandom(4 * MIB))
    first = await backup(stack, server.id)
    for bid, tid in stack.service.delete.prepare_delete(
        DeleteBackupsInput(backup_ids=[first["id"]]), "del-stall", "wf"
    ):
        stack.service.delete.delete_backup(bid, tid)  # its chunks are garbage, no sweep yet
    wake = threading.Event()
    real_list, calls = ChunkStore.list_chunks, [0]

    def stalling_list(self: ChunkStore, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            assert wake.wait(120)
        return real_list(self, *args)

    outcomes: list[Any] = []
    real_sweep = gc.collect_garbage

    def recorded_sweep(*args: Any, **kwargs: Any) -> Any:
        try:
            outcomes.append(real_sweep(*args, **kwargs))
        except BaseException as exc:
            outcomes.append(exc)
            raise
        return outcomes[-1]

    monkeypatch.setattr(ChunkStore, "list_chunks", stalling_list)
    monkeypatch.setattr(gc, "collect_garbage", recorded_sweep)
    handle = await stack.client.start_workflow(
        "CollectGarbage",
        {},
        id=f"gc-stall-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.queue,
    )
    swept = await asyncio.wait_for(handle.result(), timeout=120)
    attempts = await max_attempt(handle)
    stack.compute.write(server.id, disk, 0, os.urandom(4 * MIB))
    expected = stack.compute.checksum(server.id)
    second = await backup(stack, server.id)
    wake.set()
    for _ in range(600):
        if len(outcomes) == 2:
            break
        await asyncio.sleep(0.05)
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert attempts >= 2 and len(outcomes) == 2, (attempts, outcomes)
    # The stalled attempt stopped at its next heartbeat (Temporal had given it up: the SDK
    # cancels it) or at its next renewal (the lease was taken over), before any delete.
    assert len(lost) == 1, outcomes
    assert "lost its lease" in str(lost[0]) or "Cancel" in type(lost[0]).__name__, outcomes
    assert missing_chunks(stack.store, second["id"], [disk], None) == []
    await restore(stack, second["id"])
    assert stack.compute.checksum(server.id) == expected
    print(
        f"GC outliving its heartbeat: attempt 1 stalled, attempt {attempts} took the lease "
        f"over and deleted {swept['chunks_deleted']} chunks; the stalled one stopped "
        f"({lost[0]}); the backup made meanwhile restored bit-identical"
    )


# -- the worker killed with SIGKILL --------------------------------------------------------------
async def stuck(handle: Any) -> str:
    """What a workflow that did not finish is waiting for (for the failure message)."""
    desc = await handle.describe()
    pending = [
        f"{a.activity_type.name} attempt {a.attempt} state {a.state} "
        f"last failure {a.last_failure.message!r}"
        for a in desc.raw_description.pending_activities
    ]
    events = [e async for e in handle.fetch_history_events()]
    tail = [str(e.event_type) for e in events[-8:]]
    return f"{handle.id} {desc.status}; pending {pending}; last events {tail}"


async def test_worker_killed_at_random_points_of_backups_and_restores(stack: Stack) -> None:
    """20 operations, each with the worker killed (SIGKILL) after a seeded random delay and
    a new one started: every backup completes and restores bit-identical, every restore
    writes exactly the backup, and a resumed transfer skips what it had committed."""
    queue = f"csbs-kill9-{uuid.uuid4().hex[:6]}"
    env = dict(
        stack.env,
        CSBS_TASK_QUEUE=queue,
        CSBS_HEARTBEAT_TIMEOUT="3",
        CSBS_CHECKPOINT_SECONDS="0.05",
        CSBS_TRANSFER_CONCURRENCY="1",
    )
    drv, client = stack.compute, stack.client
    chunk = stack.settings.chunk_size
    size = 64 * MIB
    server = drv.create_server("faulty", [size, size])
    for disk in server.disks:
        drv.write(server.id, disk.id, 0, os.urandom(48 * MIB))
    rng = random.Random(20261125)
    made: dict[str, dict[str, str]] = {}
    mid_operation = resumed_disks = skipped = reread = 0
    worker = start_worker(env)
    try:
        for i in range(20):
            if i % 2 == 0 or not made:
                for _ in range(rng.randint(1, 3)):  # 4-40 MiB of guest writes
                    target = rng.choice(server.disks).id
                    length = rng.randint(4, 16) * MIB
                    offset = rng.randrange(0, size - length)
                    drv.write(server.id, target, offset, rng.randbytes(length))
                expected = drv.checksum(server.id)
                op_id = f"bk-{uuid.uuid4().hex[:16]}"
                handle = await client.start_workflow(
                    "BackupServer",
                    BackupServerInput(server_id=server.id, backup_id=op_id),
                    id=f"backup-{op_id}",
                    task_queue=queue,
                    task_timeout=timedelta(seconds=2),
                )
            else:
                op_id = rng.choice(sorted(made))
                expected = made[op_id]
                drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
                handle = await client.start_workflow(
                    "RestoreServer",
                    RestoreServerInput(backup_id=op_id),
                    id=f"restore-{op_id}-{i}",
                    task_queue=queue,
                    task_timeout=timedelta(seconds=2),
                )
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            running = (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
            at_kill = {}
            if i % 2 == 0 or len(made) == 0:
                for row in stack.catalog.disk_backups(op_id):
                    if not row.done:
                        with contextlib.suppress(CsbsError):
                            staged = stack.store.get_manifest(op_id, row.disk_id, staging=True)
                            at_kill[row.disk_id] = staged.complete or 0
            kill9(worker)
            worker = start_worker(env)
            try:
                result = await asyncio.wait_for(handle.result(), timeout=180)
            except TimeoutError:
                raise AssertionError(f"run {i} stuck: {await stuck(handle)}") from None
            mid_operation += running
            if handle.id.startswith("backup-"):
                assert result["status"] == "available", result
                made[op_id] = expected
                retried = await retried_transfers(handle)
                for disk in result["disks"]:
                    done = at_kill.get(disk["disk_id"], 0)
                    # Resumed after `done` positions were committed. (A disk that finished
                    # in the moment between reading its checkpoint and the kill was not.)
                    if done and disk["disk_id"] in retried:
                        resumed_disks += 1
                        skipped += done * chunk
                        reread += disk["bytes_read"]
                        assert disk["bytes_read"] <= (size // chunk - done) * chunk, disk
            else:
                assert drv.checksum(server.id) == expected, f"restore {i} of {op_id}"
                assert drv.get_server(server.id).state == ServerState.RUNNING
            assert drv.snapshots(server.id) == []
            assert stack.catalog.running_backup_slots() == []
    finally:
        kill9(worker)
    # Every backup made under fire restores bit-identical (through the stack's own worker).
    client_ok = CsbsClient(stack.client, stack.settings)
    for backup_id, expected in sorted(made.items()):
        await (await client_ok.start_restore(RestoreServerInput(backup_id=backup_id))).result()
        assert drv.checksum(server.id) == expected, backup_id
    assert mid_operation >= 10, f"only {mid_operation} kills landed mid-operation"
    print(
        f"kill -9: 20 operations ({len(made)} backups, {20 - len(made)} restores), "
        f"{mid_operation} killed mid-operation; {resumed_disks} disk transfers resumed, "
        f"skipping {skipped / MIB:.0f} MiB already committed and reading {reread / MIB:.0f} MiB; "
        f"{len(made)} backups restored bit-identical afterwards"
    )


async def retried_transfers(handle: Any) -> set[str]:
    """The disks whose ``backup_disk`` completed on a second or later attempt."""
    disks: dict[int, str] = {}
    retried = set()
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "backup_disk":
                disks[event.event_id] = json.loads(attrs.input.payloads[0].data)["disk_id"]
        elif event.HasField("activity_task_started_event_attributes"):
            attrs = event.activity_task_started_event_attributes
            if attrs.scheduled_event_id in disks and attrs.attempt > 1:
                retried.add(disks[attrs.scheduled_event_id])
    return retried


# -- outages of S3, Temporal and the database ------------------------------------------------
def busy_server(stack: Stack, mib: int = 48) -> Any:
    server = stack.compute.create_server("outage", [64 * MIB, 64 * MIB])
    for disk in server.disks:
        stack.compute.write(server.id, disk.id, 0, os.urandom(mib * MIB))
    return server


async def start_busy_backup(stack: Stack) -> tuple[Any, dict[str, str], CsbsClient, str, Any]:
    """A server with 96 MiB of data and a backup of it caught mid-upload: (server, its
    checksums, client, backup id, handle)."""
    server = busy_server(stack)
    expected = stack.compute.checksum(server.id)
    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    await wait_for_upload(stack, backup_id, server.disks[0].id)
    return server, expected, client, backup_id, handle


async def wait_for_upload(stack: Stack, backup_id: str, disk_id: str) -> None:
    """Until the backup has checkpointed a few chunks of the disk (it is mid-upload)."""
    for _ in range(500):
        with contextlib.suppress(CsbsError):
            if (stack.store.get_manifest(backup_id, disk_id, staging=True).complete or 0) >= 2:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("the upload never got going")


async def test_s3_down_for_20_seconds_mid_backup_and_mid_restore(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    bucket = "csbs-outage"
    weed = start_seaweed(tmp_path / "weed", bucket, access_key=access, secret_key=secret)
    settings = make_settings(
        tmp_path,
        s3,
        s3_endpoint=weed.endpoint,
        s3_bucket=bucket,
        transfer_concurrency=1,
        checkpoint_seconds=0.05,
    )

    async def outage(seconds: float, during: Any) -> float:
        """S3 gone (SIGKILL) for ``seconds`` while the workflow ``during`` runs."""
        nonlocal weed
        began = time.monotonic()
        os.killpg(weed.proc.pid, signal.SIGKILL)
        weed.proc.wait()
        assert (await during.describe()).status == WorkflowExecutionStatus.RUNNING
        await asyncio.sleep(seconds)
        weed = await asyncio.to_thread(
            start_seaweed,
            tmp_path / "weed",
            bucket,
            access_key=access,
            secret_key=secret,
            ports=weed.ports,
        )
        return time.monotonic() - began

    try:
        async with running_stack(temporal, settings) as stack:
            server, expected, client, backup_id, handle = await start_busy_backup(stack)
            down_backup = await outage(20, handle)
            result: Any = await asyncio.wait_for(handle.result(), timeout=240)
            assert result["status"] == "available"
            assert stack.compute.snapshots(server.id) == []

            for disk in server.disks:
                stack.compute.write(server.id, disk.id, 0, os.urandom(8 * MIB))
            restore = await client.start_restore(RestoreServerInput(backup_id=backup_id))
            for _ in range(1000):  # until the restore is running
                if stack.catalog.get_backup(backup_id).status == "restoring":
                    break
                await asyncio.sleep(0.005)
            down_restore = await outage(20, restore)
            await asyncio.wait_for(restore.result(), timeout=240)
            assert stack.compute.checksum(server.id) == expected
            attempts = await max_attempt(restore)
            print(
                f"S3 down {down_backup:.0f} s mid-backup and {down_restore:.0f} s mid-restore: "
                f"both completed (restore activities took up to {attempts} attempts), "
                f"restore bit-identical"
            )
    finally:
        weed.stop()


async def test_temporal_restarted_mid_backup(tmp_path: Path, s3: Any) -> None:
    """The Temporal dev server with file persistence is stopped mid-backup and started
    again on the same database; the backup completes and restores bit-identical."""
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    from starter.stack import free_port, stop_process, temporal_dev_server_args, wait_port

    port, ui = free_port(), free_port()
    db = tmp_path / "temporal.db"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*temporal_dev_server_args(db, port, ui), "--headless"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(port, timeout=60, proc=proc)
        return proc

    server_proc = start()
    settings = make_settings(tmp_path, s3, transfer_concurrency=1)
    worker_env = {
        **settings_env(settings, f"127.0.0.1:{port}"),
        "CSBS_CHECKPOINT_SECONDS": "0.05",
    }
    worker = start_worker(worker_env)
    service = Services(settings)
    try:
        client = await Client.connect(f"127.0.0.1:{port}", data_converter=pydantic_data_converter)
        stack = Stack(settings, service, client, worker_env)
        server = busy_server(stack)
        expected = stack.compute.checksum(server.id)
        backup_id, handle = await CsbsClient(client, settings).start_backup(
            BackupServerInput(server_id=server.id)
        )
        await wait_for_upload(stack, backup_id, server.disks[0].id)
        stop_process(server_proc)
        await asyncio.sleep(3)
        server_proc = await asyncio.to_thread(start)
        client = await Client.connect(f"127.0.0.1:{port}", data_converter=pydantic_data_converter)
        result = await asyncio.wait_for(client.get_workflow_handle(handle.id).result(), timeout=240)
        assert result["status"] == "available" and result["id"] == backup_id
        assert stack.compute.snapshots(server.id) == []
        for disk in server.disks:
            stack.compute.write(server.id, disk.id, 0, os.urandom(MIB))
        restore = await CsbsClient(client, settings).start_restore(
            RestoreServerInput(backup_id=backup_id)
        )
        await asyncio.wait_for(restore.result(), timeout=120)
        assert stack.compute.checksum(server.id) == expected
        print("Temporal restarted mid-backup: the backup completed, restore bit-identical")
    finally:
        kill9(worker)
        stop_process(server_proc)
        service.catalog.dispose()


class FlakyProxy:
    """A TCP proxy to PostgreSQL that can drop every connection and refuse new ones."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket

        self.upstream = upstream
        self.down = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[Any] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        import socket

        self.down.set()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
            self.conns.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.postgres
async def test_database_unreachable_for_a_while_mid_backup(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    """The catalog (PostgreSQL) is cut off for 10 s mid-backup: the steps that need it fail
    and are retried, the backup completes, nothing is left behind."""
    import sqlalchemy as sa

    from tests.conftest import PG_URL, pg_available

    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (CI must provide it)")
    url = sa.engine.make_url(PG_URL)
    name = f"csbs_fault_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    proxy = FlakyProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port, database=name)
    settings = make_settings(
        tmp_path,
        s3,
        database_url=proxied.render_as_string(hide_password=False),
        transfer_concurrency=1,
        checkpoint_seconds=0.05,
    )
    try:
        async with running_stack(temporal, settings) as stack:
            server, expected, client, backup_id, handle = await start_busy_backup(stack)
            proxy.cut()
            await asyncio.sleep(10)
            proxy.restore()
            result: Any = await asyncio.wait_for(handle.result(), timeout=240)
            assert result["status"] == "available"
            assert stack.compute.snapshots(server.id) == []
            assert stack.catalog.running_backup_slots() == []
            for disk in server.disks:
                stack.compute.write(server.id, disk.id, 0, os.urandom(MIB))
            restore = await client.start_restore(RestoreServerInput(backup_id=backup_id))
            await asyncio.wait_for(restore.result(), timeout=120)
            assert stack.compute.checksum(server.id) == expected
            attempts = await max_attempt(handle)
            print(
                f"database cut off 10 s mid-backup: completed (uploads took up to "
                f"{attempts} attempts), restore bit-identical"
            )
    finally:
        proxy.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
