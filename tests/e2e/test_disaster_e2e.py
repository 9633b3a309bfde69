"""Disaster recovery (issue 17, part 3): the catalog database and the primary bucket are
both lost; ``csbs catalog rebuild --from-replica`` brings back every backup of every
tenant (name, server, disks, parent, times, status) and every policy with its servers
from the second site alone, and the servers restore from it bit-identical. Against a
live catalog the same command only reports, and running it again adds nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from csbs.catalog.policies import PolicyCatalog
from csbs.locks import as_utc
from starter.stack import SeaweedS3
from tests.conftest import MIB, ReplicaSite, Stack, make_settings, running_stack

pytestmark = pytest.mark.slow


def snapshot(st: Stack) -> dict[str, Any]:
    """What the catalog says of every backup, as the rebuild must bring it back."""
    out = {}
    for b in st.catalog.list_backups():
        out[b.id] = {
            "name": b.name,
            "server_id": b.server_id,
            "server_name": b.server_name,
            "parent_id": b.parent_id,
            "policy_id": b.policy_id,
            "kind": b.kind,
            "status": b.status,
            "created_at": as_utc(b.created_at),
            "size_bytes": b.size_bytes,
            "disks": sorted(
                (d.disk_id, d.disk_name, d.role, d.size_bytes, d.data_bytes)
                for d in st.catalog.disk_backups(b.id)
            ),
        }
    return out


def wipe_prefix(st: Stack) -> int:
    """Delete every object of the deployment's prefix in the primary bucket."""
    s3, bucket = st.store.s3, st.store.bucket
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{st.settings.s3_prefix}/"
        )
        for obj in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch})  # type: ignore[typeddict-item]
    return len(keys)


async def test_catalog_and_primary_lost_everything_comes_back_from_the_replica(
    tmp_path: Path, s3: SeaweedS3, replica_site: ReplicaSite, temporal: WorkflowEnvironment
) -> None:
    base = make_settings(tmp_path, s3, **replica_site.settings())
    acme_settings, globex_settings = base.for_project("acme"), base.for_project("globex")
    async with (
        running_stack(temporal, acme_settings) as acme,
        running_stack(temporal, globex_settings) as globex,
    ):
        # acme: a manual backup, then a policy that replicates what it makes (incremental).
        server = acme.compute.create_server("acme-db", [8 * MIB, 4 * MIB])
        for disk in server.disks:
            acme.compute.write(server.id, disk.id, 0, os.urandom(3 * MIB))
        first = (await acme.cli("backup", "create", server.id, "--wait", "--json")).json()
        await acme.cli("backup", "replicate", first["id"], "--wait")
        acme.compute.write(server.id, server.disks[0].id, 5 * MIB, os.urandom(MIB))
        pid = (
            await acme.cli("policy", "create", "--name", "nightly", "--time", "02:30",
                           "--keep-count", "7", "--replicate", "--json")
        ).json()["id"]  # fmt: skip
        await acme.cli("policy", "bind", pid, server.id)
        run = (await acme.cli("policy", "run", pid, "--wait", "--json")).json()
        second = run["backups"][server.id]["backup_id"]
        assert run["backups"][server.id]["replica"] == "replicated"
        acme_expected = acme.compute.checksum(server.id)
        # globex: its own server and backup, replicated.
        gserver = globex.compute.create_server("globex-web", [4 * MIB])
        globex.compute.write(gserver.id, gserver.disks[0].id, 0, os.urandom(4 * MIB))
        gbk = (await globex.cli("backup", "create", gserver.id, "--wait", "--json")).json()
        await globex.cli("backup", "replicate", gbk["id"], "--wait")
        globex_expected = globex.compute.checksum(gserver.id)

        # Against the live catalog: a report of differences, nothing changed.
        acme.catalog.update_backup(first["id"], name="renamed_by_hand")
        live = (await acme.cli("catalog", "rebuild", "--from-replica", "--json")).json()
        by_project = {p["project"]: p for p in live["projects"]}
        assert set(by_project) == {"acme", "globex"}
        assert not by_project["acme"]["applied"] and by_project["acme"]["backups_added"] == 0
        (diff,) = by_project["acme"]["differences"]
        assert (diff["id"], diff["problem"]) == (first["id"], "differs")
        assert "name: catalog 'renamed_by_hand'" in diff["detail"]
        assert acme.catalog.get_backup(first["id"]).name == "renamed_by_hand"
        acme.catalog.update_backup(first["id"], name=first["name"])
        before = {"acme": snapshot(acme), "globex": snapshot(globex)}
        assert set(before["acme"]) == {first["id"], second}
        assert before["acme"][second]["parent_id"] == first["id"]

    # The disaster: the catalog database and every object of the primary are gone, and
    # the servers' disks are overwritten.
    db = Path(base.effective_database_url.split("///", 1)[1])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    async with (
        running_stack(temporal, acme_settings) as acme,
        running_stack(temporal, globex_settings) as globex,
    ):
        assert wipe_prefix(acme) > 0
        assert acme.catalog.list_backups() == [] and globex.catalog.list_backups() == []
        for st, srv in ((acme, server), (globex, gserver)):
            for disk in srv.disks:
                st.compute.write(srv.id, disk.id, 0, os.urandom(MIB))

        out = await acme.cli("catalog", "rebuild", "--from-replica", "--json")
        report = out.json()
        by_project = {p["project"]: p for p in report["projects"]}
        assert by_project["acme"]["applied"] and by_project["acme"]["backups_added"] == 2
        assert by_project["globex"]["backups_added"] == 1
        assert (by_project["acme"]["policies_added"], by_project["acme"]["bindings_added"]) == (
            1,
            1,
        )
        assert report["schedules"] == "made"
        after = {"acme": snapshot(acme), "globex": snapshot(globex)}
        assert after == before
        for st in (acme, globex):
            assert {b.replica_status for b in st.catalog.list_backups()} == {"replicated"}
        (policy,) = PolicyCatalog(acme.catalog).all()
        assert (policy.id, policy.name) == (pid, "nightly")
        shown = (await acme.cli("policy", "show", pid, "--json")).json()
        assert shown["times"] == ["02:30"] and shown["retention_value"] == 7
        assert shown["replicate"] is True and shown["server_ids"] == [server.id]

        again = (await acme.cli("catalog", "rebuild", "--from-replica", "--apply", "--json")).json()
        for project in again["projects"]:
            assert project["backups_added"] == project["policies_added"] == 0
            assert project["differences"] == []

        await acme.cli("backup", "restore", second, "--from-replica", "--yes", "--wait")
        assert acme.compute.checksum(server.id) == acme_expected
        await globex.cli("backup", "restore", gbk["id"], "--from-replica", "--yes", "--wait")
        assert globex.compute.checksum(gserver.id) == globex_expected
