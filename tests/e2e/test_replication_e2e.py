"""Replication to a second site (issue 17, CBR's cross-region replication): a second real
SeaweedFS with credentials of its own. ``csbs backup replicate`` copies only the chunks
the replica lacks, then the manifests and the descriptor; it resumes after a crash
without copying anything twice; the Temporal CLI starts it; a refusal leaves a failed
task with the reason."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from temporalio.testing import WorkflowEnvironment

from csbs.chunkstore import ChunkStore
from csbs.errors import StorageError
from csbs.replicate import replicate_backup
from starter.stack import SeaweedS3
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
