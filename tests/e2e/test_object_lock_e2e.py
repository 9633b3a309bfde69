"""Immutable backups with S3 Object Lock, compliance mode (issue 17, the guide's first use
case: recovery after an attack), on the real SeaweedFS, which enforces it.

A backup made with ``CSBS_OBJECT_LOCK_DAYS=1`` into a bucket with Object Lock: every
object it needs is locked; with the S3 credentials themselves, deleting any of them,
shortening a lock, or hiding or overwriting the objects changes nothing a restore needs,
and it restores bit-identical; ``csbs backup delete`` is refused with the date; a sweep
leaves locked garbage in place, counted, and deletes the rest for good; reused chunks get
their locks extended once per generation, in one pass."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import pytest_asyncio
from botocore.config import Config
from botocore.exceptions import ClientError
from temporalio.testing import WorkflowEnvironment

from csbs.locks import as_utc, generation
from starter.stack import SeaweedS3
from tests.conftest import MIB, Stack, make_settings, running_stack

pytestmark = pytest.mark.slow

LOCKED_BUCKET = "csbs-locked"


def s3_client(s3: SeaweedS3) -> Any:
    """boto3 with the same S3 credentials csbs holds: what an attacker would have."""
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def locked(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A stack on a bucket made with Object Lock, backups locked 1 day."""
    client = s3_client(s3)
    try:
        client.create_bucket(Bucket=LOCKED_BUCKET, ObjectLockEnabledForBucket=True)
    except ClientError as exc:
        if "BucketAlready" not in str(exc):
            raise
    settings = make_settings(tmp_path, s3, s3_bucket=LOCKED_BUCKET, object_lock_days=1)
    async with running_stack(temporal, settings) as st:
        st.env["CSBS_OBJECT_LOCK_DAYS"] = "1"  # the CLI's too
        yield st


def objects_of(st: Stack, backup_id: str, disk: str) -> dict[str, str]:
    """Key of one of each kind of object the backup needs: a chunk, a manifest, the
    descriptor."""
    store = st.service.store
    chunk = sorted(store.get_manifest(backup_id, disk).chunk_ids())[0]
    return {
        "chunk": store.chunk_key(chunk),
        "manifest": store.manifest_key(backup_id, disk),
        "descriptor": store.descriptor_key(backup_id),
    }


def refused(call: Any) -> str:
    with pytest.raises(ClientError) as err:
        call()
    return str(err.value.response["Error"]["Code"])


async def test_locked_backups_resist_the_s3_credentials_and_still_restore(
    locked: Stack, s3: SeaweedS3
) -> None:
    st, attacker = locked, s3_client(s3)
    drv = st.compute
    server = drv.create_server("locked", [16 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(12 * MIB))
    expected = drv.checksum(server.id)
    doctor = (await st.cli("doctor", "--json", check=False)).json()
    lock_check = next(c for c in doctor if c["check"] == "object lock")
    assert lock_check["ok"] and "Object Lock enabled, versioning enabled" in lock_check["detail"]

    made = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    until = as_utc(datetime.fromisoformat(made["locked_until"]))
    assert timedelta(hours=23) < until - datetime.now(UTC) <= timedelta(days=1)

    keys = objects_of(st, made["id"], disk)
    originals = {}
    for kind, key in keys.items():
        head = attacker.head_object(Bucket=LOCKED_BUCKET, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE", kind
        assert as_utc(head["ObjectLockRetainUntilDate"]) >= until - timedelta(seconds=1), kind
        version = head["VersionId"]
        originals[kind] = (
            version,
            attacker.get_object(Bucket=LOCKED_BUCKET, Key=key)["Body"].read(),
        )
        # Deleting the locked version, in one call or in a batch: refused.
        assert (
            refused(
                lambda k=key, v=version: attacker.delete_object(
                    Bucket=LOCKED_BUCKET, Key=k, VersionId=v
                )
            )
            == "AccessDenied"
        ), kind
        batch = attacker.delete_objects(
            Bucket=LOCKED_BUCKET, Delete={"Objects": [{"Key": key, "VersionId": version}]}
        )
        assert [e["Code"] for e in batch.get("Errors", [])] == ["AccessDenied"], kind
        # Shortening its lock: refused.
        assert (
            refused(
                lambda k=key, v=version: attacker.put_object_retention(
                    Bucket=LOCKED_BUCKET,
                    Key=k,
                    VersionId=v,
                    Retention={
                        "Mode": "COMPLIANCE",
                        "RetainUntilDate": datetime.now(UTC) + timedelta(minutes=5),
                    },
                )
            )
            == "AccessDenied"
        ), kind

    # What the credentials can still do changes nothing a restore needs: the chunk is
    # hidden behind a delete marker, the manifest and descriptor overwritten with garbage
    # (each a new version; the locked one stays as it was).
    attacker.delete_object(Bucket=LOCKED_BUCKET, Key=keys["chunk"])
    for kind in ("manifest", "descriptor"):
        attacker.put_object(Bucket=LOCKED_BUCKET, Key=keys[kind], Body=b"ransom note")
    for kind, key in keys.items():
        version, body = originals[kind]
        kept = attacker.get_object(Bucket=LOCKED_BUCKET, Key=key, VersionId=version)["Body"].read()
        assert kept == body, kind

    drv.write(server.id, disk, 0, os.urandom(16 * MIB))  # the attack on the server itself
    await st.cli("backup", "restore", made["id"], "--yes", "--wait", "--json")
    assert drv.checksum(server.id) == expected

    # csbs itself refuses to delete it before its lock date, saying when.
    out = await st.cli("backup", "delete", made["id"], "--yes", check=False)
    assert out.code != 0
    assert f"{made['id']} until {until:%Y-%m-%d %H:%M} UTC" in out.stdout + out.stderr
    assert st.catalog.get_backup(made["id"]).status == "available"


async def test_reused_chunks_are_extended_once_per_generation(locked: Stack, s3: SeaweedS3) -> None:
    """The next backup of a disk extends nothing while its parent's generation covers its
    own lock date. A policy with ``--lock-days 30`` then backs the server up: its lock
    date is past the parent's generation, so every chunk it reuses is extended to its own
    generation in one pass, and S3 says so."""
    st, attacker = locked, s3_client(s3)
    store = st.service.store
    drv = st.compute
    server = drv.create_server("gens", [8 * MIB])
    disk = server.disks[0].id
    drv.write(server.id, disk, 0, os.urandom(8 * MIB))
    first = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    gen = generation(as_utc(datetime.fromisoformat(first["locked_until"])), 10)
    assert as_utc(st.catalog.disk_backups(first["id"])[0].chunks_locked_until) == gen  # type: ignore[arg-type]

    drv.write(server.id, disk, 0, os.urandom(MIB))
    second = (await st.cli("backup", "create", server.id, "--wait", "--json")).json()
    # Its parent's generation covers its lock date: its reused chunks were left alone.
    assert as_utc(st.catalog.disk_backups(second["id"])[0].chunks_locked_until) == gen  # type: ignore[arg-type]
    reused = store.get_manifest(second["id"], disk).chunk_ids()
    for chunk_id in reused:
        head = attacker.head_object(Bucket=LOCKED_BUCKET, Key=store.chunk_key(chunk_id))
        assert as_utc(head["ObjectLockRetainUntilDate"]) == gen

    pid = (
        await st.cli("policy", "create", "--name", "locked30", "--keep-count", "5",
                     "--lock-days", "30", "--json")
    ).json()["id"]  # fmt: skip
    assert (await st.cli("policy", "show", pid, "--json")).json()["lock_days"] == 30
    await st.cli("policy", "bind", pid, server.id)
    drv.write(server.id, disk, 4 * MIB, os.urandom(MIB))
    await st.cli("policy", "run", pid, "--wait", "--json")
    (third,) = [b for b in st.catalog.list_backups() if b.policy_id == pid]
    assert third.locked_until is not None
    need = as_utc(third.locked_until)
    assert timedelta(days=29) < need - datetime.now(UTC) <= timedelta(days=30)
    later = as_utc(st.catalog.disk_backups(third.id)[0].chunks_locked_until)  # type: ignore[arg-type]
    assert later == generation(need, 10) > gen
    for chunk_id in store.get_manifest(third.id, disk).chunk_ids():
        head = attacker.head_object(Bucket=LOCKED_BUCKET, Key=store.chunk_key(chunk_id))
        assert as_utc(head["ObjectLockRetainUntilDate"]) == later, chunk_id.hex()


async def test_a_sweep_leaves_locked_garbage_and_deletes_the_rest_for_good(
    locked: Stack, s3: SeaweedS3
) -> None:
    st, attacker = locked, s3_client(s3)
    store = st.service.store
    until = datetime.now(UTC) + timedelta(days=1)
    locked_id, free_id = os.urandom(32), os.urandom(32)  # garbage: no manifest has them
    store.put_chunk(locked_id, os.urandom(4096), lock_until=until)
    store.put_chunk(free_id, os.urandom(4096))
    store.put_chunk(free_id, os.urandom(4096))  # two versions
    result = st.service.delete.collect_garbage()
    assert result.chunks_locked >= 1
    versions = attacker.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=store.chunk_key(free_id))
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")  # gone for good
    head = attacker.head_object(Bucket=LOCKED_BUCKET, Key=store.chunk_key(locked_id))
    assert head["ObjectLockMode"] == "COMPLIANCE"  # left in place, still readable


async def test_a_locked_backup_into_a_bucket_without_object_lock_is_refused(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> None:
    """Nothing is written unlocked when a lock was asked for: the backup is refused before
    it starts, saying what to do, and the refusal is on record (a failed task)."""
    settings = make_settings(tmp_path, s3, object_lock_days=7)  # the plain test bucket
    async with running_stack(temporal, settings) as st:
        st.env["CSBS_OBJECT_LOCK_DAYS"] = "7"
        server = st.compute.create_server("plain", [4 * MIB])
        out = await st.cli("backup", "create", server.id, "--wait", "--json", check=False)
        said = out.stdout + out.stderr
        assert out.code != 0
        assert "Object Lock not enabled" in said and "CSBS_OBJECT_LOCK_DAYS=0" in said, said
        tasks = [t for t in st.catalog.list_tasks(kind="backup") if t.server_id == server.id]
        assert [t.status for t in tasks] == ["failed"]
        doctor = (await st.cli("doctor", "--json", check=False)).json()
        check = next(c for c in doctor if c["check"] == "object lock")
        assert not check["ok"] and "create a new bucket" in check["detail"]
