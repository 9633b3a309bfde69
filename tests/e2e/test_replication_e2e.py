"""Replication to a second site (issue 17, CBR's cross-region replication): a second real
SeaweedFS with credentials of its own. ``csbs backup replicate`` copies only the chunks
the replica lacks, then the manifests and the descriptor; it resumes after a crash
without copying anything twice; the Temporal CLI starts it; a refusal leaves a failed
task with the reason."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from temporalio.testing import WorkflowEnvironment

from csbs.chunkstore import ChunkStore
from csbs.errors import StorageError
from csbs.replicate import replicate_backup
from starter.stack import SeaweedS3, start_seaweed, wait_for_bucket
from tests.conftest import MIB, ReplicaSite, Stack, make_settings, running_stack
from tests.e2e.test_cli_e2e import temporal_cli

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(loop_scope="session")
async def site2(
    tmp_path: Path, s3: SeaweedS3, replica_site: ReplicaSite, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A stack whose replica is the second SeaweedFS."""
    settings = make_settings(tmp_path, s3, **replica_site.settings())
    async with running_stack(temporal, settings) as st:
        yield st


def replica_of(st: Stack) -> ChunkStore:
    return ChunkStore(st.settings.replica())


async def test_replication_copies_only_what_the_replica_lacks(
    site2: Stack, replica_site: ReplicaSite
) -> None:
    """Issue 17 part 2: a full backup's chunks are all copied; the next, incremental,
    backup copies just its changed chunks (looked up: just those); replicating again
    copies nothing. The replica holds descriptor and manifests that read back as the
    primary's, and its credentials are not the primary's."""
    st = site2
    drv = st.driver
    server = drv.create_server("rep", [8 * MIB, 4 * MIB])
    d0, d1 = (d.id for d in server.disks)
    drv.write(server.id, d0, 0, os.urandom(6 * MIB))
    drv.write(server.id, d1, MIB, os.urandom(2 * MIB))
    first = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()

    out = (await st.cli("backup", "replicate", first["id"], "--wait", "--json")).json()
    assert out["status"] == "replicated"
    assert out["chunks_referenced"] == 8 and out["chunks_copied"] == 8
    assert out["manifests"] == 2
    shown = (await st.cli("backup", "show", first["id"], "--json")).json()
    assert shown["replica_status"] == "replicated" and shown["replicated_at"]
    (task,) = [t for t in st.catalog.list_tasks(kind="replicate") if t.backup_id == first["id"]]
    assert task.status == "succeeded" and "8 of 8 chunks copied" in (task.detail or "")

    replica = replica_of(st)
    assert replica.get_descriptor(first["id"]) == st.store.get_descriptor(first["id"])
    for disk in (d0, d1):
        theirs = replica.get_manifest(first["id"], disk)
        assert theirs.entries == st.store.get_manifest(first["id"], disk).entries
        for chunk_id in theirs.chunk_ids():
            assert replica.get_chunk(chunk_id)[0] == st.store.get_chunk(chunk_id)[0]
    # Its own credentials: the primary's are refused by the second site.
    primary_creds = make_settings(Path("/nonexistent"), replica_site.weed)
    with pytest.raises(ClientError):
        ChunkStore(primary_creds).s3.list_objects_v2(Bucket="csbs-replica", MaxKeys=1)

    doctor = {c["check"]: c for c in (await st.cli("doctor", "--json")).json()}
    assert doctor["replica"]["ok"] and "keeps what the primary keeps" in doctor["replica"]["detail"]
    wrong = {"CSBS_REPLICA_SECRET_ACCESS_KEY": "not-the-secret"}
    doctor = {
        c["check"]: c for c in (await st.cli("doctor", "--json", env=wrong, check=False)).json()
    }
    assert not doctor["replica"]["ok"]
    assert "CSBS_REPLICA_ACCESS_KEY_ID" in doctor["replica"]["detail"], doctor["replica"]

    drv.write(server.id, d0, 2 * MIB, os.urandom(MIB))
    second = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    assert second["parent_id"] == first["id"]
    out = (await st.cli("backup", "replicate", second["id"], "--wait", "--json")).json()
    assert (out["chunks_copied"], out["chunks_checked"]) == (1, 1)

    again = (await st.cli("backup", "replicate", second["id"], "--wait", "--json")).json()
    assert again["chunks_copied"] == 0


async def test_a_replication_resumes_after_a_crash_without_copying_twice(site2: Stack) -> None:
    """The copy dies after 3 chunks (the replica stops answering); the next attempt, as
    Temporal's retry would run it, copies the rest and nothing it copied before."""
    st = site2
    drv = st.driver
    server = drv.create_server("crash", [8 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(8 * MIB))
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()

    replica = replica_of(st)
    real_put = replica.put_chunk_blob
    puts: list[bytes] = []

    def dying_put(chunk_id: bytes, blob: bytes, lock_until: object = None) -> None:
        if len(puts) >= 3:
            raise StorageError("object store: PUT failed (connection reset)")
        real_put(chunk_id, blob)
        puts.append(chunk_id)

    replica.put_chunk_blob = dying_put  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        replicate_backup(st.store, replica, made["id"], None, concurrency=1)
    with pytest.raises(Exception):  # noqa: B017 - nothing was committed there
        replica.get_descriptor(made["id"])

    fresh = replica_of(st)
    done = replicate_backup(st.store, fresh, made["id"], None, concurrency=2)
    assert (done.chunks_referenced, done.chunks_copied) == (8, 5)
    assert fresh.get_descriptor(made["id"]).backup_id == made["id"]


async def test_the_temporal_cli_starts_a_replication_and_a_refusal_leaves_a_task(
    site2: Stack, stack: Stack
) -> None:
    """Contract: ``temporal workflow execute --type ReplicateBackup``. A replication that
    cannot run (no replica configured) fails with the reason on a failed task; the csbs
    command refuses it in one line before starting anything."""
    st = site2
    server = st.driver.create_server("tcli-rep", [4 * MIB])
    st.driver.write(server.id, server.disks[0].id, 0, os.urandom(2 * MIB))
    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    code, out, err = await temporal_cli(
        st, "workflow", "execute", "--type", "ReplicateBackup",
        "--task-queue", st.settings.task_queue, "--workflow-id", f"tcli-rep-{made['id']}",
        "--input", json.dumps({"backup_id": made["id"]}), "-o", "json",
    )  # fmt: skip
    assert code == 0, err
    assert st.catalog.get_backup(made["id"]).replica_status == "replicated"

    # A stack without a replica: csbs refuses at once; a run started anyway leaves a task.
    plain = stack
    server = plain.driver.create_server("no-rep", [4 * MIB])
    plain.driver.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    made = (await plain.cli("backup", "create", server.id, "--wait", "--json")).json()
    refused = await plain.cli("backup", "replicate", made["id"], check=False)
    assert refused.code != 0 and "no replica is configured" in refused.stderr + refused.stdout
    assert len((refused.stderr + refused.stdout).strip().splitlines()) == 1
    assert plain.catalog.list_tasks(kind="replicate", backup_id=made["id"]) == []
    code, out, err = await temporal_cli(
        plain, "workflow", "execute", "--type", "ReplicateBackup",
        "--task-queue", plain.settings.task_queue, "--workflow-id", f"tcli-norep-{made['id']}",
        "--input", json.dumps({"backup_id": made["id"]}),
    )  # fmt: skip
    assert code != 0 and "no replica is configured" in out + err
    (task,) = plain.catalog.list_tasks(kind="replicate", status="failed")
    assert task.backup_id == made["id"] and task.server_name == "no-rep"
    assert "CSBS_REPLICA_ENDPOINT" in (task.reason or "")


async def test_restore_from_the_replica_while_the_primary_is_down(
    tmp_path: Path, s3: SeaweedS3, replica_site: ReplicaSite, temporal: WorkflowEnvironment
) -> None:
    """The primary's own SeaweedFS is stopped: ``csbs backup restore --from-replica
    --verify`` checks and restores from the second site, bit-identical. ``csbs backup
    verify --replica`` then finds a chunk damaged on the replica: the backup's
    ``replica_error`` says so, its own verification record is untouched."""
    primary = start_seaweed(
        tmp_path / "primary",
        "csbs-primary",
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    try:
        settings = make_settings(
            tmp_path, primary, s3_bucket="csbs-primary", **replica_site.settings()
        )
        wait_for_bucket(ChunkStore(settings))
        async with running_stack(temporal, settings) as st:
            drv = st.driver
            server = drv.create_server("dr", [8 * MIB, 4 * MIB])
            for disk in server.disks:
                drv.write(server.id, disk.id, 0, os.urandom(3 * MIB))
            made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
            expected = drv.checksum(server.id)
            await st.cli("backup", "replicate", made["id"], "--wait")
            for disk in server.disks:
                drv.write(server.id, disk.id, 0, os.urandom(4 * MIB))

            primary.stop()  # the primary site is down
            out = await st.cli(
                "backup", "restore", made["id"], "--from-replica", "--verify", "--yes",
                "--wait", "--json",
            )  # fmt: skip
            assert out.json()["backup_id"] == made["id"]
            assert drv.checksum(server.id) == expected

            replica = replica_of(st)
            chunk_id = sorted(replica.get_manifest(made["id"], server.disks[0].id).chunk_ids())[0]
            replica.s3.put_object(
                Bucket=replica.bucket, Key=replica.chunk_key(chunk_id), Body=b"x" * 100
            )
            bad = await st.cli("backup", "verify", made["id"], "--replica", "--wait", check=False)
            assert bad.code != 0
            row = st.catalog.get_backup(made["id"])
            assert (row.replica_error or "").startswith("replica: verify found")
            assert row.verify_status == ""  # the primary's record is its own
            (task,) = st.catalog.list_tasks(kind="verify")
            assert task.status == "failed" and task.detail == "the copy on the replica"
    finally:
        primary.stop()


async def test_a_policy_replicates_every_backup_it_makes(site2: Stack, stack: Stack) -> None:
    """``csbs policy create --replicate``: each run's backups are replicated as child
    ``ReplicateBackup`` runs, and the run's result says so per server. Without a replica
    configured, such a policy is refused in one line, naming the field."""
    st = site2
    server = st.driver.create_server("pol-rep", [4 * MIB])
    st.driver.write(server.id, server.disks[0].id, 0, os.urandom(3 * MIB))
    pid = (
        await st.cli("policy", "create", "--name", "rep", "--keep-count", "3", "--replicate",
                     "--json")
    ).json()["id"]  # fmt: skip
    assert (await st.cli("policy", "show", pid, "--json")).json()["replicate"] is True
    await st.cli("policy", "bind", pid, server.id)
    run = (await st.cli("policy", "run", pid, "--wait", "--json")).json()
    made = run["backups"][server.id]
    assert made["outcome"] == "available" and made["replica"] == "replicated"
    row = st.catalog.get_backup(made["backup_id"])
    assert row.replica_status == "replicated"
    assert replica_of(st).get_descriptor(row.id).backup_id == row.id

    refused = await stack.cli(
        "policy", "create", "--name", "norep", "--replicate", "--json", check=False
    )
    assert refused.code != 0
    assert "replicate: no replica is configured" in refused.stderr + refused.stdout
    names = [p["name"] for p in (await stack.cli("policy", "list", "--json")).json()]
    assert "norep" not in names


async def collect_garbage(st: Stack) -> dict[str, Any]:
    """One run of the daily ``CollectGarbage`` workflow."""
    result: dict[str, Any] = await st.client.execute_workflow(
        "CollectGarbage", {}, id=f"gc-{uuid.uuid4().hex[:8]}", task_queue=st.settings.queue
    )
    return result


async def test_the_replica_keeps_deleted_backups_for_its_own_retention(
    tmp_path: Path, s3: SeaweedS3, replica_site: ReplicaSite, temporal: WorkflowEnvironment
) -> None:
    """A backup deleted from the primary stays on the replica while
    ``CSBS_REPLICA_RETENTION_DAYS`` has not passed since it was made; with 0 the daily
    sweep deletes its copy, and the replica's chunks that only it referenced, and the
    backup made after it still restores from the replica bit-identical."""
    keep = make_settings(
        tmp_path / "keep", s3, **replica_site.settings(), replica_retention_days=30
    )
    same = make_settings(tmp_path / "same", s3, **replica_site.settings())
    for settings, kept in ((keep, True), (same, False)):
        async with running_stack(temporal, settings) as st:
            drv = st.driver
            server = drv.create_server("ret", [4 * MIB])
            disk = server.disks[0].id
            drv.write(server.id, disk, 0, os.urandom(4 * MIB))
            first = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
            await st.cli("backup", "replicate", first["id"], "--wait")
            drv.write(server.id, disk, 0, os.urandom(2 * MIB))
            second = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
            await st.cli("backup", "replicate", second["id"], "--wait")
            expected = drv.checksum(server.id)
            replica = replica_of(st)
            only_first = replica.get_manifest(first["id"], disk).chunk_ids() - (
                replica.get_manifest(second["id"], disk).chunk_ids()
            )
            assert len(only_first) == 2

            await st.cli("backup", "delete", first["id"], "--yes", "--wait")
            swept = await collect_garbage(st)
            assert swept["replica"]["site"] == "replica"
            if kept:
                assert swept["replica"]["replicas_pruned"] == 0
                assert replica.get_descriptor(first["id"]).backup_id == first["id"]
                assert all(replica.has_chunk(c) for c in only_first)
                assert [t.backup_id for t in st.catalog.replica_tombstones()] == [first["id"]]
            else:
                assert swept["replica"]["replicas_pruned"] == 1
                assert swept["replica"]["chunks_deleted"] == 2
                assert replica.backup_ids() == [second["id"]]
                assert not any(replica.has_chunk(c) for c in only_first)
                assert st.catalog.replica_tombstones() == []
            drv.write(server.id, disk, 0, os.urandom(4 * MIB))
            await st.cli("backup", "restore", second["id"], "--from-replica", "--yes", "--wait")
            assert drv.checksum(server.id) == expected


async def test_a_locked_backup_is_locked_on_the_replica_too(
    tmp_path: Path, s3: SeaweedS3, replica_site: ReplicaSite, temporal: WorkflowEnvironment
) -> None:
    """A backup locked on the primary (S3 Object Lock, compliance mode) is locked on a
    replica bucket with Object Lock: every object it needs there refuses deletion with the
    replica's own credentials. The next backup reuses chunks the parent's copy already
    holds locked long enough: none of them is extended. Into a replica bucket without
    Object Lock it is copied unlocked, and the task says so."""
    from tests.e2e.test_object_lock_e2e import LOCKED_BUCKET, s3_client

    try:
        s3_client(s3).create_bucket(Bucket=LOCKED_BUCKET, ObjectLockEnabledForBucket=True)
    except ClientError as exc:
        if "BucketAlready" not in str(exc):
            raise
    plain = ChunkStore(make_settings(tmp_path, s3, **replica_site.settings()).replica())
    try:
        plain.s3.create_bucket(Bucket="csbs-replica-locked", ObjectLockEnabledForBucket=True)
    except ClientError as exc:
        if "BucketAlready" not in str(exc):
            raise
    for bucket, locked in (("csbs-replica-locked", True), ("csbs-replica", False)):
        settings = make_settings(
            tmp_path / bucket, s3, s3_bucket=LOCKED_BUCKET, object_lock_days=1,
            **{**replica_site.settings(), "replica_bucket": bucket},
        )  # fmt: skip
        async with running_stack(temporal, settings) as st:
            st.env["CSBS_OBJECT_LOCK_DAYS"] = "1"
            drv = st.driver
            server = drv.create_server("locked-rep", [4 * MIB])
            disk = server.disks[0].id
            drv.write(server.id, disk, 0, os.urandom(4 * MIB))
            made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
            out = (await st.cli("backup", "replicate", made["id"], "--wait", "--json")).json()
            replica = replica_of(st)
            keys = [
                replica.descriptor_key(made["id"]),
                replica.manifest_key(made["id"], disk),
                *(replica.chunk_key(c) for c in replica.get_manifest(made["id"], disk).chunk_ids()),
            ]
            for key in keys:
                head = replica.s3.head_object(Bucket=bucket, Key=key)
                if not locked:
                    assert "ObjectLockMode" not in head, key
                    continue
                assert head["ObjectLockMode"] == "COMPLIANCE", key
                with pytest.raises(ClientError):
                    replica.s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
            if not locked:
                assert "its copy is not locked" in out["note"]
                (task,) = st.catalog.list_tasks(kind="replicate")
                assert "its copy is not locked" in (task.detail or "")
                continue
            assert out["note"] == ""
            drv.write(server.id, disk, 0, os.urandom(MIB))
            second = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
            out = (await st.cli("backup", "replicate", second["id"], "--wait", "--json")).json()
            assert (out["chunks_copied"], out["locks_extended"]) == (1, 0)
