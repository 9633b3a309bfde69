"""Data safety (issue 14): each defect an adversarial review found, proven by a test that
failed on the code before its fix. Most run the service's steps directly over the real
SeaweedFS and catalog, interleaved at the exact point the review named; the rest go
through the real Temporal server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from csbs import format as fmt
from csbs.catalog import Catalog
from csbs.drivers import DevServers
from csbs.errors import (
    Conflict,
    CorruptData,
    CsbsError,
    GarbageCollectionRunning,
    InvalidState,
)
from csbs.format import Manifest, encode_chunk
from csbs.model import (
    BackupServerInput,
    DeleteBackupsInput,
    RestoreItem,
    RestoreServerInput,
    check_id,
)
from csbs.naming import check_name
from csbs.policy import RetainedBackup, RetentionKind, select_expired
from csbs.services import Services
from csbs.verify import missing_chunks
from starter.client import CsbsClient
from tests import conftest
from tests.conftest import MIB, Stack, backup, dev_servers, make_settings
from tests.qemu_support import QEMU_AVAILABLE, SKIP_REASON

KIB = 1024


# -- helpers: a delete and a verify through the service, as the workflows run them ----------
def service_backup(svc: Services, server_id: str) -> str:
    made = conftest.service_backup(svc, server_id)
    assert made is not None
    return made


def service_delete(svc: Services, backup_id: str) -> None:
    """Delete a backup's manifests and rows, leaving its chunks to a sweep."""
    pairs = svc.delete.prepare_delete(
        DeleteBackupsInput(backup_ids=[backup_id]), f"del-{uuid.uuid4().hex[:8]}", "wf"
    )
    for bid, tid in pairs:
        svc.delete.delete_backup(bid, tid)


def service_verify(svc: Services, backup_id: str) -> Any:
    task_id = f"task-{uuid.uuid4().hex[:16]}"
    plan = svc.verify.prepare_verify(backup_id, task_id, "wf")
    results = [svc.verify.verify_disk(backup_id, d) for d in plan.disk_ids]
    return svc.verify.finish_verify(backup_id, task_id, results, None)


def small_service(tmp_path: Path, s3: Any, **kw: Any) -> Services:
    return Services(make_settings(tmp_path, s3, chunk_size=64 * KIB, transfer_concurrency=2, **kw))


def twin(svc: Services) -> Services:
    """Another worker over the same catalog, repository and servers."""
    return Services(svc.settings)


def dev(svc: Services) -> DevServers:
    """The service's driver as the dev servers it is in these tests."""
    return dev_servers(svc.driver)


def server_with_data(svc: Services, size: int = 1 * MIB) -> tuple[str, str]:
    server = dev(svc).create_server(f"srv-{uuid.uuid4().hex[:6]}", [size])
    disk = server.disks[0].id
    dev(svc).write(server.id, disk, 0, os.urandom(size))
    return server.id, disk


def stall_first_call(obj: Any, name: str, until: threading.Event) -> threading.Event:
    """Make the first call of ``obj.name`` wait for ``until``; return an event set when
    that call has begun."""
    original = getattr(obj, name)
    began = threading.Event()
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            began.set()
            assert until.wait(60)
        return original(*args, **kwargs)

    setattr(obj, name, call)
    return began


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list receives its result or its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- 1. garbage collection: one sweep at a time, an owner token, a lease --------------------
def test_two_sweeps_never_overlap_so_a_backup_between_them_keeps_its_chunks(
    tmp_path: Path, s3: Any
) -> None:
    """Defect 1: the second sweep went ahead beside the first and released the lock when it
    finished; a backup then committed while the first still swept, and lost its chunks."""
    first = small_service(tmp_path, s3)
    other = twin(first)
    server_id, disk = server_with_data(first)
    service_delete(first, service_backup(first, server_id))  # its chunks are garbage now
    go = threading.Event()
    listing = stall_first_call(first.store, "list_chunks", go)
    sweeper, swept = in_thread(first.delete.collect_garbage)
    assert listing.wait(30)
    # The first sweep has marked (nothing is referenced) and is about to list chunks.
    with pytest.raises((Conflict, GarbageCollectionRunning)):
        other.delete.collect_garbage()
    try:
        made = service_backup(other, server_id)
        late = False
    except GarbageCollectionRunning:
        late = True  # refused while the first sweep holds the chunks: retried after it
    go.set()
    sweeper.join(60)
    assert not isinstance(swept[0], BaseException), swept
    if late:
        made = service_backup(other, server_id)
    assert missing_chunks(other.store, made, [disk], None) == []
    assert service_verify(other, made).ok


@pytest.mark.slow
def test_a_sweep_that_lost_its_lease_stops_before_it_deletes_anything(
    tmp_path: Path, s3: Any
) -> None:
    """Defect 1: a sweep that stalls past its lease (a retry started beside it) must find
    out before deleting, whatever happened meanwhile."""
    first = small_service(tmp_path, s3, gc_lease_seconds=1)
    other = twin(first)
    server_id, disk = server_with_data(first)
    service_delete(first, service_backup(first, server_id))
    go = threading.Event()
    listing = stall_first_call(first.store, "list_chunks", go)
    sweeper, swept = in_thread(first.delete.collect_garbage)
    assert listing.wait(30)
    time.sleep(2.5)  # the lease (1 s) and its grace (1 s) run out: the sweep is presumed dead
    beats: list[dict[str, Any]] = []
    other.delete.collect_garbage(heartbeat=beats.append)  # takes the lease over, sweeps, releases
    made = service_backup(other, server_id)  # new chunks, unknown to the stalled sweep
    go.set()
    sweeper.join(60)
    assert isinstance(swept[0], CsbsError) and "lease" in str(swept[0]), swept
    assert missing_chunks(other.store, made, [disk], None) == []
    # The sweep that finished heartbeat in every phase, not only while reading manifests.
    assert {"marking", "listing", "deleting"} <= {b.get("phase") for b in beats}, beats


def test_a_manifest_that_cannot_be_read_stops_the_sweep_before_it_deletes(
    tmp_path: Path, s3: Any
) -> None:
    """Defect 12: a listed manifest that reads as missing was taken for deleted (fail open),
    and the live backup's chunks were swept."""
    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc)
    made = service_backup(svc, server_id)
    chunks = svc.store.get_manifest(made, disk).chunk_ids()
    original = svc.store.get_manifest

    def flaky(backup_id: str, disk_id: str, staging: bool = False) -> Manifest:
        if backup_id == made:
            from csbs.errors import NotFound

            raise NotFound(f"object store: manifest of {backup_id} does not exist")
        return original(backup_id, disk_id, staging)

    svc.store.get_manifest = flaky  # type: ignore[method-assign]
    with pytest.raises(CsbsError, match="nothing was deleted"):
        svc.delete.collect_garbage()
    svc.store.get_manifest = original  # type: ignore[method-assign]
    assert chunks <= set(svc.store.list_chunk_ids())


@pytest.mark.slow
def test_a_sweep_in_shards_deletes_exactly_the_garbage_with_bounded_memory(
    tmp_path: Path, s3: Any
) -> None:
    """Issue 17, GC that scales: with room for 40 chunk ids, a repository of 480 chunks
    is swept in shards of key directories, its marked ids spilled to files; it deletes
    exactly the chunks no manifest references, never held more than a shard's ids, and
    every backup left verifies and restores bit-identical."""
    svc = small_service(tmp_path, s3, gc_shard_chunks=40)
    drv = dev(svc)
    kept_server, disk = server_with_data(svc, 8 * MIB)  # 128 chunks of 64 KiB
    chain = [service_backup(svc, kept_server)]
    for round_ in range(3):  # an incremental chain: a quarter rewritten each time
        drv.write(kept_server, disk, round_ * 2 * MIB, os.urandom(2 * MIB))
        chain.append(service_backup(svc, kept_server))
    expected = drv.checksum(kept_server)
    gone_server, _ = server_with_data(svc, 16 * MIB)  # 256 chunks, all garbage soon
    service_delete(svc, service_backup(svc, gone_server))
    service_delete(svc, chain[1])  # its 32 own chunks go; the rest the others share
    live: set[bytes] = set()
    for backup_id in (chain[0], *chain[2:]):
        live |= svc.store.get_manifest(backup_id, disk).chunk_ids()
    before = set(svc.store.list_chunk_ids())
    assert len(before) == 128 + 3 * 32 + 256 and live < before

    result = svc.delete.collect_garbage()
    assert set(svc.store.list_chunk_ids()) == live
    assert result.chunks == len(before) and result.chunks_deleted == len(before - live)
    assert result.shards >= 10, result
    assert 0 < result.peak_ids <= 2 * 40, result  # a shard's ids (one key directory may hold more)
    for backup_id in (chain[0], *chain[2:]):
        assert service_verify(svc, backup_id).ok
    drv.write(kept_server, disk, 0, os.urandom(MIB))  # damage that the restore undoes
    svc.driver.stop(kept_server)
    plan = svc.restore.prepare_restore(RestoreServerInput(backup_id=chain[-1]), "t-gc", "wf-gc")
    for item in plan.items:
        svc.restore.restore_disk(chain[-1], item)
    svc.restore.finish_restore(chain[-1], "t-gc", ok=True, reason=None)
    assert drv.checksum(kept_server) == expected
    # A second sweep finds nothing more; one shard when everything fits.
    again = Services(svc.settings.model_copy(update={"gc_shard_chunks": 10_000})).delete
    assert again.collect_garbage().chunks_deleted == 0


# -- 2. a backup id of another run ------------------------------------------------------------
@pytest.mark.slow
async def test_a_backup_id_that_belongs_to_another_run_is_refused_and_changes_nothing(
    stack: Stack,
) -> None:
    """Defect 2: ``BackupServer`` started again with an existing backup's id (a reset, a
    reused id) marked that available backup ``error``."""
    server = stack.compute.create_server("reuse", [4 * MIB])
    stack.compute.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    made = await backup(stack, server.id)
    before = stack.catalog.get_backup(made["id"])
    handle = await stack.client.start_workflow(
        "BackupServer",
        BackupServerInput(server_id=server.id, backup_id=made["id"]),
        id=f"reuse-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.queue,
    )
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "belongs to another" in str(failure.value.cause), failure.value.cause
    after = stack.catalog.get_backup(made["id"])
    assert (after.status, after.error, after.finished_at) == ("available", None, before.finished_at)
    assert stack.catalog.running_backup_slots() == []


def test_a_creating_backup_of_another_run_is_not_adopted(tmp_path: Path, s3: Any) -> None:
    svc = small_service(tmp_path, s3)
    server_id, _ = server_with_data(svc)
    inp = BackupServerInput(server_id=server_id)
    svc.backup.prepare_backup(inp, "bk-shared0000000001", "task-a", "wf-a", "run-a")
    with pytest.raises(Conflict, match="belongs to another"):
        svc.backup.prepare_backup(inp, "bk-shared0000000001", "task-b", "wf-b", "run-b")
    svc.backup.fail_backup("bk-shared0000000001", "task-b", "refused", "run-b")
    row = svc.catalog.get_backup("bk-shared0000000001")
    assert (row.status, row.error) == ("creating", None)
    # The owner's own retry is still its own.
    assert svc.backup.prepare_backup(
        inp, "bk-shared0000000001", "task-a", "wf-a", "run-a"
    ).backup_id


# -- 3. a lost or corrupt chunk is uploaded again ----------------------------------------------
def test_a_parent_that_failed_verify_is_never_used_and_the_next_backup_is_whole(
    tmp_path: Path, s3: Any
) -> None:
    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc)
    first = service_backup(svc, server_id)
    lost = sorted(svc.store.get_manifest(first, disk).chunk_ids())[0]
    svc.store.delete_chunks([lost])
    assert not service_verify(svc, first).ok
    dev(svc).write(server_id, disk, 0, os.urandom(4 * KIB))  # a small change
    second = service_backup(svc, server_id)
    assert svc.catalog.get_backup(second).parent_id != first
    assert missing_chunks(svc.store, second, [disk], None) == []
    assert service_verify(svc, second).ok


def test_a_corrupt_chunk_found_by_verify_is_uploaded_again(tmp_path: Path, s3: Any) -> None:
    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc)
    first = service_backup(svc, server_id)
    bad = sorted(svc.store.get_manifest(first, disk).chunk_ids())[0]
    svc.store._raw_put(svc.store.chunk_key(bad), b"CSBC" + os.urandom(200))
    report = service_verify(svc, first)
    assert [p.problem for p in report.problems] == ["corrupt"]
    second = service_backup(svc, server_id)
    assert service_verify(svc, second).ok
    assert service_verify(svc, first).ok  # the repair healed the old backup too


def test_an_empty_stub_at_a_chunk_key_is_uploaded_over_not_referenced(
    tmp_path: Path, s3: Any
) -> None:
    """SeaweedFS keeps an empty object when a PUT's connection drops before its body (a
    worker killed mid-upload; checked by hand against weed 4.48). Such a stub at a chunk's
    key was taken for the chunk by the next backup's existence check: a backup that
    committed ``available`` and could not be restored."""
    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc, 256 * KIB)
    svc.store.ensure_config()
    snap = "snap-stub"
    svc.driver.group_snapshot(server_id, snap)
    reader = svc.driver.open_snapshot(server_id, snap, disk)
    try:
        data = reader.read(0, 64 * KIB)
    finally:
        reader.close()
        svc.driver.release_snapshot(server_id, snap, False)
    stub = svc.store.chunk_id(data)
    svc.store._raw_put(svc.store.chunk_key(stub), b"")
    made = service_backup(svc, server_id)
    assert stub in svc.store.get_manifest(made, disk).chunk_ids()
    assert service_verify(svc, made).ok


def test_a_full_read_uploads_a_chunk_the_parent_lost(tmp_path: Path, s3: Any) -> None:
    """Defect 3: a full read trusted every chunk id its parent references."""
    from csbs.transfer import backup_disk

    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc)
    first = service_backup(svc, server_id)
    parent = svc.store.get_manifest(first, disk)
    lost = sorted(parent.chunk_ids())[0]
    svc.store.delete_chunks([lost])
    snap = "snap-full-read"
    svc.driver.group_snapshot(server_id, snap)
    reader = svc.driver.open_snapshot(server_id, snap, disk)
    try:
        manifest = Manifest("bk-fullread0000001", disk, reader.size_bytes, 64 * KIB)
        backup_disk(svc.store, reader, manifest, parent, None, concurrency=2)
    finally:
        reader.close()
        svc.driver.release_snapshot(server_id, snap, False)
    assert lost in manifest.chunk_ids()
    assert svc.store.has_chunk(lost)


# -- 4. operation locks: check-and-set in one step ---------------------------------------------
def test_a_restore_and_a_delete_of_one_backup_are_never_both_accepted(
    tmp_path: Path, s3: Any
) -> None:
    svc = small_service(tmp_path, s3)
    other = twin(svc)
    server_id, _ = server_with_data(svc)
    made = service_backup(svc, server_id)
    original = svc.catalog.get_backup
    fired: list[str] = []

    def read_then_delete(backup_id: str) -> Any:
        row = original(backup_id)
        if not fired:  # the delete lands between the restore's read and its write
            fired.append(backup_id)
            other.delete.prepare_delete(
                DeleteBackupsInput(backup_ids=[backup_id]), "t-del", "wf-del"
            )
        return row

    svc.catalog.get_backup = read_then_delete  # type: ignore[method-assign]
    with pytest.raises((InvalidState, Conflict)):
        svc.restore.prepare_restore(RestoreServerInput(backup_id=made), "t-rest", "wf-rest", "run")
    assert fired
    svc.catalog.get_backup = original  # type: ignore[method-assign]
    assert svc.catalog.get_backup(made).status == "deleting"


def race_backup_and_restore(svc: Services, other: Services, n: int) -> list[Any]:
    """Both read the server's state at the same moment (a barrier in ``get_server``),
    then race to start; their outcomes (a plan, or the exception)."""
    server_id, _ = server_with_data(svc, 256 * KIB)
    made = service_backup(svc, server_id)
    barrier = threading.Barrier(2, timeout=30)
    met: set[int] = set()
    originals = {s: s.driver.get_server for s in (svc, other)}

    def meeting(real: Callable[[str], Any]) -> Callable[[str], Any]:
        def meet(sid: str) -> Any:
            if sid == server_id and threading.get_ident() not in met:
                met.add(threading.get_ident())
                barrier.wait()
            return real(sid)

        return meet

    for s, real in originals.items():
        s.driver.get_server = meeting(real)  # type: ignore[method-assign,assignment]
    try:
        restoring, restored = in_thread(
            lambda: svc.restore.prepare_restore(
                RestoreServerInput(backup_id=made), f"t-rest-{n}", "wf-rest", "run"
            )
        )
        backing, backed = in_thread(
            lambda: other.backup.prepare_backup(
                BackupServerInput(server_id=server_id), f"bk-race{n:011d}", f"t-bk-{n}", "w", "r"
            )
        )
        restoring.join(30)
        backing.join(30)
    finally:
        barrier.abort()
        for s, real in originals.items():
            s.driver.get_server = real  # type: ignore[method-assign]
    return [restored[0], backed[0]]


def test_a_backup_and_a_restore_of_one_server_are_never_both_accepted(
    tmp_path: Path, s3: Any
) -> None:
    """Ten races from the same instant: each time exactly one starts, and the other is
    refused with a Conflict naming what holds the server."""
    svc = small_service(tmp_path, s3)
    other = twin(svc)
    for n in range(10):
        outcomes = race_backup_and_restore(svc, other, n)
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(refused) == 1, f"race {n}: {outcomes}"
        assert isinstance(refused[0], Conflict), refused


# -- 5. a terminated backup is reconciled ------------------------------------------------------
@pytest.mark.slow
async def test_a_terminated_backup_is_reconciled_and_frees_its_server(stack: Stack) -> None:
    server = stack.compute.create_server("terminated", [64 * MIB, 64 * MIB])
    for disk in server.disks:
        stack.compute.write(server.id, disk.id, 0, os.urandom(48 * MIB))
    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    for _ in range(500):
        row = stack.catalog.find_backup(backup_id)
        if row is not None and row.snapshot_at is not None:
            break
        await asyncio.sleep(0.02)
    await handle.terminate(reason="operator terminated it")
    # The next backup of the server is not refused forever: the closed run is reconciled.
    made = await backup(stack, server.id)
    assert made["status"] == "available"
    old = stack.catalog.get_backup(backup_id)
    assert old.status == "error" and "terminated" in (old.error or ""), old
    task = stack.catalog.list_tasks(backup_id=backup_id)[0]
    assert task.status == "failed" and "terminated" in (task.reason or "")
    assert stack.compute.snapshots(server.id) == []
    assert stack.catalog.running_backup_slots() == []
    # A sweep is not deferred by the dead backup.
    result = await stack.client.execute_workflow(
        "CollectGarbage", {}, id=f"gc-{uuid.uuid4().hex[:8]}", task_queue=stack.settings.queue
    )
    assert "chunks_deleted" in result, result


@pytest.mark.slow
async def test_a_sweep_deferred_by_a_running_backup_waits_and_then_sweeps(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 5: GC's Conflict was a dead end (the run failed and nothing swept until
    someone started one by hand). Now a CollectGarbage run waits for the backup, and a
    delete whose own sweep is deferred hands it to one."""
    from csbs.services import backup as backup_service

    old = stack.compute.create_server("garbage", [4 * MIB])
    stack.compute.write(old.id, old.disks[0].id, 0, os.urandom(4 * MIB))
    doomed = await backup(stack, old.id)
    server = stack.compute.create_server("busy", [4 * MIB])
    stack.compute.write(server.id, server.disks[0].id, 0, os.urandom(4 * MIB))
    go, uploading = threading.Event(), threading.Event()
    real_transfer = backup_service.backup_disk  # type: ignore[attr-defined]

    def held_transfer(*args: Any, **kwargs: Any) -> Any:
        uploading.set()
        assert go.wait(120)
        return real_transfer(*args, **kwargs)

    monkeypatch.setattr(backup_service, "backup_disk", held_transfer)
    client = CsbsClient(stack.client, stack.settings)
    backup_id, running = await client.start_backup(BackupServerInput(server_id=server.id))
    assert await asyncio.to_thread(uploading.wait, 60)  # the backup holds its server lock
    gc = await stack.client.start_workflow(
        "CollectGarbage",
        {"retry_seconds": 1},
        id=f"gc-waits-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.queue,
    )
    deleted: dict[str, Any] = await (  # type: ignore[assignment]
        await client.start_delete(DeleteBackupsInput(backup_ids=[doomed["id"]]))
    ).result()
    assert "deferred" in deleted["reclaimed"], deleted
    handed = stack.client.get_workflow_handle(deleted["reclaimed"]["handed_to"])
    assert (await handed.describe()).status == WorkflowExecutionStatus.RUNNING
    await asyncio.sleep(2)
    go.set()
    assert (await running.result())["status"] == "available"  # type: ignore[index]
    swept = await asyncio.wait_for(gc.result(), timeout=120)
    assert swept["waited_seconds"] >= 1 and swept["chunks_deleted"] >= 4, swept
    # The deleted backup's chunks are gone, the new backup's all there.
    live = stack.store.get_manifest(backup_id, server.disks[0].id).chunk_ids()
    assert set(stack.store.list_chunk_ids()) == live
    await handed.terminate(reason="test over: its sweep was done by the other run")


# -- 6. the QEMU socket directory ----------------------------------------------------------------
@pytest.fixture
def short_tmp() -> Any:
    """A temporary directory with a short path (socket paths must stay short, or the
    driver falls back to /tmp)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="csbs-t", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("unsafe", ["other-owner", "world-writable", "symlink"])
def test_a_qemu_socket_directory_another_user_could_control_is_refused(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, unsafe: str
) -> None:
    from csbs.drivers.qemu import QemuDriver

    tmp_path = short_tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    base = tmp_path / f"csbs-qemu-{os.getuid()}"
    if unsafe == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        base.symlink_to(tmp_path / "elsewhere")
    else:
        base.mkdir(mode=0o700)
        if unsafe == "other-owner":
            os.chown(base, 65534, 65534)
        else:
            base.chmod(0o777)
    driver = QemuDriver(tmp_path / "servers")
    with pytest.raises(CsbsError, match="socket directory"):
        driver._new_runtime("srv-x")


def test_a_fresh_qemu_socket_directory_is_private(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csbs.drivers.qemu import QemuDriver

    tmp_path = short_tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    runtime = QemuDriver(tmp_path / "servers")._new_runtime("srv-x")
    for path in (runtime, runtime.parent):
        st = os.lstat(path)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


# -- 7. the NBD client trusts no length ----------------------------------------------------------
def fake_nbd(path: str, reply: Callable[[socket.socket, int, int, int], None]) -> threading.Thread:
    """A one-connection NBD server: handshake, then ``reply(sock, cookie, offset, length)``
    for the first READ. ``reply`` may also be called with cookie -1 to answer the
    STRUCTURED_REPLY option itself."""
    from csbs.drivers import nbd

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def recv(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise ConnectionError
            buf += got
        return buf

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            conn.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE))
            recv(conn, 4)
            while True:
                _, option, length = struct.unpack(">QII", recv(conn, 16))
                recv(conn, length)
                if option == nbd.OPT_STRUCTURED_REPLY:
                    if reply.__name__ == "huge_option_reply":
                        reply(conn, -1, 0, 0)
                        time.sleep(0.5)
                        return
                    conn.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, option, nbd.REP_ACK, 0))
                elif option == nbd.OPT_GO:
                    info = struct.pack(">HQH", nbd.INFO_EXPORT, 1 * MIB, 0)
                    conn.sendall(
                        struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, option, nbd.REP_INFO, len(info))
                        + info
                    )
                    conn.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, option, nbd.REP_ACK, 0))
                    break
            _, _, _, cookie, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
            reply(conn, cookie, offset, length)
            time.sleep(0.5)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = False, length: int = -1) -> bytes:
    from csbs.drivers import nbd

    size = len(payload) if length < 0 else length
    flags = nbd.REPLY_FLAG_DONE if done else 0
    header = struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, size)
    return header + payload


def overlapping(conn: socket.socket, cookie: int, offset: int, length: int) -> None:
    from csbs.drivers import nbd

    half = length // 2  # two data chunks over the first half: covered == length, a gap of zeros
    conn.sendall(chunk(cookie, nbd.REPLY_OFFSET_DATA, struct.pack(">Q", offset) + b"A" * half))
    conn.sendall(
        chunk(cookie, nbd.REPLY_OFFSET_DATA, struct.pack(">Q", offset) + b"B" * half, done=True)
    )


def oversized(conn: socket.socket, cookie: int, offset: int, length: int) -> None:
    from csbs.drivers import nbd

    conn.sendall(chunk(cookie, nbd.REPLY_OFFSET_DATA, b"", done=True, length=0xFFFFFF00))


def huge_option_reply(conn: socket.socket, cookie: int, offset: int, length: int) -> None:
    from csbs.drivers import nbd

    conn.sendall(
        struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK, 1 << 31)
    )


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (overlapping, "overlap"),
        (oversized, "longer than"),
        (huge_option_reply, "longer than"),
    ],
)
def test_the_nbd_client_bounds_every_length_by_the_request(
    tmp_path: Path, reply: Callable[..., None], message: str
) -> None:
    from csbs.drivers.nbd import NbdClient, NbdError

    path = str(tmp_path / "nbd.sock")
    fake_nbd(path, reply)
    with pytest.raises(NbdError, match=message):
        client = NbdClient(path, "vda", timeout=5)
        try:
            client.read(0, 64 * KIB)
        finally:
            client.close()


# -- 8. daily runs of each project have their own workflow ids ----------------------------------
@pytest.mark.slow
async def test_the_daily_runs_of_two_projects_never_share_a_workflow_id(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    from csbs.drivers import make_driver
    from csbs.policy_service import PolicyService
    from runtime.schedules import (
        GC_SCHEDULE_ID,
        RETENTION_SCHEDULE_ID,
        VERIFY_SCHEDULE_ID,
        project_schedule_id,
        reconcile_schedules,
    )

    client: Client = temporal.client
    projects = [f"p{uuid.uuid4().hex[:6]}", f"q{uuid.uuid4().hex[:6]}"]
    action_ids: dict[str, set[str]] = {}
    for project in projects:
        settings = make_settings(tmp_path / project, s3, project=project)
        catalog = Catalog(settings.effective_database_url, project)
        await reconcile_schedules(client, PolicyService(catalog, make_driver(settings)), settings)
        catalog.dispose()
        for base in (RETENTION_SCHEDULE_ID, VERIFY_SCHEDULE_ID, GC_SCHEDULE_ID):
            handle = client.get_schedule_handle(project_schedule_id(base, settings))
            action = (await handle.describe()).schedule.action
            action_ids.setdefault(base, set()).add(action.id)  # type: ignore[attr-defined]
            assert project in action.id  # type: ignore[attr-defined]
            await handle.delete()
    assert all(len(ids) == 2 for ids in action_ids.values()), action_ids


# -- 9. no secret reaches a child process --------------------------------------------------------
@pytest.mark.skipif(not QEMU_AVAILABLE, reason=SKIP_REASON)
def test_qemu_and_qemu_img_get_no_secret_from_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csbs.drivers import qemu

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("CSBS_ENCRYPTION_KEY", "ab" * 32)
    envs: list[dict[str, str] | None] = []
    import subprocess

    real_run = subprocess.run

    def spy(*args: Any, **kwargs: Any) -> Any:
        envs.append(kwargs.get("env"))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    driver = qemu.QemuDriver(tmp_path / "servers")
    server = driver.create_server("env", [1 * MIB])
    try:
        pid = driver.pid(server.id)
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.encode() not in environ and b"CSBS_ENCRYPTION_KEY" not in environ
    finally:
        from tests.conftest import kill_qemu

        kill_qemu(driver)
    assert envs and all(e is not None for e in envs), "qemu-img inherited the whole environment"
    assert not any(secret in "".join((e or {}).values()) for e in envs)


def test_the_dev_s3_secret_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starter.stack import dev_credentials

    # Even if the process died right after writing (before any chmod), the file is private.
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0o022)
    try:
        dev_credentials(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s3-credentials").st_mode) == 0o600


# -- 10. ids and names take a full match --------------------------------------------------------
@pytest.mark.parametrize("bad", ["srv-1\n", "srv-1\r\n", "srv\n-1"])
def test_an_id_or_name_with_a_newline_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_id(bad)
    with pytest.raises(ValueError):
        check_name(bad)


# -- 11. user text is never markup ---------------------------------------------------------------
@pytest.mark.slow
async def test_user_text_in_cli_tables_is_printed_literally(stack: Stack) -> None:
    made = await stack.cli("dev", "server", "create", "--name", "[/x]", "--disk", "1MiB", "--json")
    fake = await stack.cli("dev", "server", "create", "--name", "[bold]ok[/bold]", "--disk", "1MiB")
    listed = await stack.cli("server", "list")
    assert "[/x]" in listed.stdout and "[bold]ok[/bold]" in listed.stdout, fake.stdout
    await backup(stack, made.json()["id"])
    backups = await stack.cli("backup", "list")
    assert "[/x]" in backups.stdout
    missing = await stack.cli("backup", "show", "[/x]", check=False)
    assert missing.code != 0 and "[/x]" in missing.stderr and "Traceback" not in missing.stderr


# -- 12. unencrypted repositories bound what they read -------------------------------------------
def test_a_chunk_larger_than_the_repository_chunk_size_is_refused(tmp_path: Path, s3: Any) -> None:
    svc = small_service(tmp_path, s3)
    svc.store.ensure_config()
    data = os.urandom(256 * KIB)  # 4 x the repository's 64 KiB chunk size
    chunk_id = svc.store.chunk_id(data)
    svc.store._raw_put(svc.store.chunk_key(chunk_id), encode_chunk(data))
    with pytest.raises(CorruptData, match="larger than"):
        svc.store.get_chunk(chunk_id)


def test_manifest_decompression_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = Manifest("bk-bounded00000001", "disk-1", 64 * MIB, 64 * KIB)
    blob = manifest.encode()
    monkeypatch.setattr(fmt, "MAX_MANIFEST_BYTES", 16 * KIB)
    with pytest.raises(CorruptData, match="larger than"):
        Manifest.decode(blob)


def test_a_manifest_of_another_chunk_size_or_disk_size_is_refused(tmp_path: Path, s3: Any) -> None:
    svc = small_service(tmp_path, s3)
    server_id, disk = server_with_data(svc)
    made = service_backup(svc, server_id)
    good = svc.store.get_manifest(made, disk)
    forged = Manifest(made, disk, 2 * good.size_bytes, good.chunk_size)
    forged.entries[: len(good.entries)] = good.entries
    svc.store.put_manifest(forged)
    before = svc.driver.get_server(server_id).disk(disk).size_bytes
    item = RestoreItem(source_disk_id=disk, target_disk_id=disk, size_bytes=before)
    svc.driver.stop(server_id)
    with pytest.raises(CorruptData, match="size"):
        svc.restore.restore_disk(made, item)
    assert svc.driver.get_server(server_id).disk(disk).size_bytes == before
    other = Manifest(made, disk, good.size_bytes, 128 * KIB)
    svc.store.put_manifest(other)
    with pytest.raises(CorruptData, match="chunk size"):
        svc.store.get_manifest(made, disk)


# -- retention never deletes a server's last good backup ------------------------------------------
def test_retention_by_age_keeps_the_newest_available_backup_while_newer_ones_fail() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 11, 27, tzinfo=UTC)
    backups = [
        RetainedBackup("bk-old", "srv-1", "scheduled", "available", now - timedelta(days=20)),
        RetainedBackup("bk-good", "srv-1", "scheduled", "available", now - timedelta(days=10)),
        *(
            RetainedBackup(f"bk-bad{i}", "srv-1", "scheduled", "error", now - timedelta(days=i))
            for i in range(1, 9)
        ),
    ]
    expired = select_expired(backups, RetentionKind.DAYS, 7, now)
    assert "bk-good" not in expired and "bk-old" in expired
    from csbs.policy import retention_notes

    notes = retention_notes(backups, RetentionKind.DAYS, 7, now)
    assert "bk-good" in notes and "last available" in notes["bk-good"]
    # A server that keeps another good backup (a manual one) is not left without one.
    assert "bk-good" in select_expired(backups, RetentionKind.DAYS, 7, now, frozenset({"srv-1"}))
