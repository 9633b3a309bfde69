"""Projects (issue 7): every entity carries a project; ``--project`` picks it; a project can
never list, restore, delete or learn of another's servers, backups, policies or tasks;
limits are per project. Two projects share one catalog, bucket prefix, servers directory,
Temporal namespace and task-queue name, as a real multi-project deployment does."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from csbs.model import RestoreServerInput
from csbs.policy import MAX_POLICIES_PER_PROJECT, PolicySpec
from csbs.policy_service import PolicyService
from starter.client import CsbsClient
from tests.conftest import make_settings, running_stack
from worker import build_workers

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


async def test_one_worker_serves_each_project_on_its_own_queue(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    settings = make_settings(tmp_path, s3, projects="acme, globex,acme", task_queue="q")
    with ThreadPoolExecutor(settings.max_concurrent_activities) as pool:
        workers = build_workers(temporal.client, settings, pool)
    assert [w.task_queue for w, _, _ in workers] == ["q.acme", "q.globex"]
    assert settings.for_project("default").queue == "q"


async def test_a_project_never_sees_or_touches_another_projects_things(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    base = make_settings(tmp_path, s3)
    acme_settings, globex_settings = base.for_project("acme"), base.for_project("globex")
    async with (
        running_stack(temporal, acme_settings) as acme,
        running_stack(temporal, globex_settings) as globex,
    ):
        server = acme.compute.create_server("acme-db", [8 * MIB])
        acme.compute.write(server.id, server.disks[0].id, 0, os.urandom(2 * MIB))
        before = acme.compute.checksum(server.id)
        bk = (await acme.cli("backup", "create", server.id, "--wait", "--json")).json()
        policy = (
            await acme.cli(
                "policy",
                "create",
                "--time",
                "01:00",
                "--every-days",
                "1",
                "--keep-count",
                "3",
                "--json",
            )
        ).json()
        await acme.cli("policy", "bind", policy["id"], server.id)
        task = acme.catalog.list_tasks()[0]
        assert (bk["project"], task.project) == ("acme", "acme")

        async def as_globex(*args: str) -> Any:
            return await acme.cli("--project", "globex", *args, check=False)

        # Nothing of acme's is listed to globex...
        listings: list[tuple[str, ...]] = [
            ("server", "list", "--json"),
            ("backup", "list", "--json"),
            ("task", "list", "--json"),
            ("policy", "list", "--json"),
        ]
        for listing in listings:
            out = await as_globex(*listing)
            assert out.code == 0 and out.json() == [], listing
        # ...nor shown, restored, deleted, verified, bound or run: each answer is the one a
        # missing thing gets, so globex cannot even learn that it exists.
        checks: list[tuple[tuple[str, ...], str]] = [
            (("backup", "show", bk["id"]), f"backup {bk['id']} does not exist"),
            (("backup", "restore", bk["id"], "--yes"), f"backup {bk['id']} does not exist"),
            (("backup", "delete", bk["id"], "--yes"), f"backup {bk['id']} does not exist"),
            (("backup", "verify", bk["id"]), f"backup {bk['id']} does not exist"),
            (("backup", "create", server.id, "--wait"), f"server {server.id} does not exist"),
            (("task", "show", task.id), "does not exist"),
            (("task", "delete", task.id, "--yes"), "does not exist"),
            (("policy", "show", policy["id"]), "does not exist"),
            (("policy", "bind", policy["id"], server.id), "does not exist"),
            (("policy", "delete", policy["id"], "--yes"), "does not exist"),
            (("policy", "run", policy["id"]), "does not exist"),
            (("dev", "server", "checksum", server.id), "does not exist"),
        ]
        for args, needle in checks:
            out = await as_globex(*args)
            assert out.code == 1 and needle in out.stderr, (args, out.stderr)
            assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        # A globex policy cannot take acme's server either.
        mine = (
            await acme.cli(
                "--project",
                "globex",
                "policy",
                "create",
                "--time",
                "02:00",
                "--weekdays",
                "mon",
                "--keep-forever",
                "--json",
            )
        ).json()
        out = await as_globex("policy", "bind", mine["id"], server.id)
        assert out.code == 1 and f"server {server.id} does not exist" in out.stderr

        # Workflows started directly on globex's queue act as globex.
        with pytest.raises(WorkflowFailureError) as info:
            handle = await CsbsClient(globex.client, globex_settings).start_restore(
                RestoreServerInput(backup_id=bk["id"])
            )
            await handle.result()
        assert f"backup {bk['id']} does not exist" in str(info.value.cause)

        # Limits are per project: globex fills its 32 policies; acme can still create.
        svc = PolicyService(globex.catalog, globex.compute)
        spec = PolicySpec(times=["03:00"], every_days=2, retention_value=1)
        for _ in range(MAX_POLICIES_PER_PROJECT - 1):
            svc.create(spec)
        refused = await as_globex(
            "policy", "create", "--time", "04:00", "--every-days", "1", "--keep-count", "1"
        )
        assert refused.code == 1 and "at most 32 policies" in refused.stderr
        await acme.cli(
            "policy", "create", "--time", "05:00", "--every-days", "1", "--keep-count", "1"
        )

        # acme's things are as they were.
        assert acme.catalog.get_backup(bk["id"]).status == "available"
        shown = (await acme.cli("policy", "show", policy["id"], "--json")).json()
        assert shown["server_ids"] == [server.id]
        assert acme.compute.checksum(server.id) == before
        keys = list(acme.store.list_keys(""))
        assert keys and all(k.startswith(f"{base.s3_prefix}/acme/") for k in keys)
        assert list(globex.store.list_keys("backups/")) == []
