"""The README's story through the real ``csbs`` CLI and the ``temporal`` CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from starter.stack import tool
from tests.conftest import ROOT, Stack

pytestmark = pytest.mark.slow


async def test_readme_story_backup_change_backup_restore(stack: Stack) -> None:
    """B2, B4, R1, R3 via the CLI: create, write, back up, write, back up, restore."""
    server = (
        await stack.cli(
            "dev",
            "server",
            "create",
            "--name",
            "demo",
            "--disk",
            "16MiB",
            "--disk",
            "24MiB",
            "--json",
        )
    ).json()
    assert [d["role"] for d in server["disks"]] == ["system", "data"]
    assert set(server["disks"][0]) == {"id", "name", "size_bytes", "role", "shared", "unsupported"}
    assert server["host"] == "default"
    sid, (d0, d1) = server["id"], (d["id"] for d in server["disks"])
    listed = (await stack.cli("server", "list", "--json")).json()
    assert [s["id"] for s in listed] == [sid]
    await stack.cli(
        "dev",
        "server",
        "write",
        sid,
        "--disk",
        d0,
        "--offset",
        "0",
        "--length",
        "3MiB",
        "--pattern",
        "random",
    )
    await stack.cli(
        "dev",
        "server",
        "write",
        sid,
        "--disk",
        d1,
        "--offset",
        "8MiB",
        "--length",
        "2MiB",
        "--pattern",
        "text",
    )
    first_sums = (await stack.cli("dev", "server", "checksum", sid)).json()
    first = (await stack.cli("backup", "create", sid, "--wait", "--json")).json()
    assert first["status"] == "available" and first["name"].startswith("manualbk_")
    assert first["progress"] == 100 and first["kind"] == "manual"
    for field in (
        "id",
        "name",
        "description",
        "server_id",
        "server_name",
        "server_type",
        "status",
        "kind",
        "policy_id",
        "parent_id",
        "created_at",
        "finished_at",
        "progress",
        "size_bytes",
        "stored_bytes",
        "disks",
    ):
        assert field in first

    await stack.cli(
        "dev", "server", "write", sid, "--disk", d1, "--offset", "1MiB", "--length", "1MiB"
    )
    second = (
        await stack.cli("backup", "create", sid, "--name", "after-change", "--wait", "--json")
    ).json()
    assert second["parent_id"] == first["id"] and second["name"] == "after-change"
    second_sums = (await stack.cli("dev", "server", "checksum", sid)).json()
    assert second_sums != first_sums

    refused = await stack.cli("backup", "restore", first["id"], check=False)
    assert refused.code != 0 and "--yes" in refused.stderr
    await stack.cli("backup", "restore", first["id"], "--yes", "--wait", "--json")
    assert (await stack.cli("dev", "server", "checksum", sid)).json() == first_sums
    await stack.cli("backup", "restore", second["id"], "--yes", "--wait", "--json")
    assert (await stack.cli("dev", "server", "checksum", sid)).json() == second_sums

    listed = (await stack.cli("backup", "list", "--json", "--server-id", sid)).json()
    assert [b["id"] for b in listed] == [second["id"], first["id"]]
    shown = (await stack.cli("backup", "show", first["id"], "--json")).json()
    assert {t["kind"] for t in shown["tasks"]} == {"backup", "restore"}
    tasks = (await stack.cli("task", "list", "--kind", "restore", "--json")).json()
    assert len(tasks) == 2 and {t["status"] for t in tasks} == {"succeeded"}
    table = await stack.cli("backup", "list")
    assert "after-change" in table.stdout

    deleted = await stack.cli("backup", "delete", first["id"], "--yes", "--wait", "--json")
    assert deleted.json()["deleted"] == [first["id"]]
    missing = await stack.cli("backup", "show", first["id"], check=False)
    assert (
        missing.code == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    )


async def test_cli_refusals_are_one_clear_line(stack: Stack) -> None:
    for args, needle in [
        (("dev", "server", "create", "--name", "x", "--disk", "12XB"), "disk must be"),
        (("backup", "create", "srv-nope", "--json"), "server srv-nope does not exist"),
        (("backup", "create", "bad/id"), "server_id must be"),
        (("backup", "restore", "bk-nope", "--yes"), "backup bk-nope does not exist"),
        (("backup", "list", "--since", "yesterday"), "since must be"),
    ]:
        result = await stack.cli(*args, check=False)
        assert result.code != 0, args
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert stack.catalog.list_backups() == []


async def temporal_cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        tool("temporal"),
        *args,
        "--address",
        stack.env["CSBS_TEMPORAL_ADDRESS"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_temporal_cli_starts_a_backup_and_bad_input_fails_at_once(stack: Stack) -> None:
    """Contract: `temporal workflow start --type BackupServer --input '{...}'` works."""
    server = stack.driver.create_server("tcli", [8 * 1024 * 1024])
    stack.driver.write(server.id, server.disks[0].id, 0, b"t" * 100000)
    code, out, err = await temporal_cli(
        stack,
        "workflow",
        "execute",
        "--type",
        "BackupServer",
        "--task-queue",
        stack.settings.task_queue,
        "--workflow-id",
        "tcli-backup-1",
        "--input",
        json.dumps({"server_id": server.id}),
        "-o",
        "json",
    )
    assert code == 0, err
    backups = stack.catalog.list_backups()
    assert [b.status for b in backups] == ["available"]
    assert backups[0].workflow_id == "tcli-backup-1"

    code, out, err = await temporal_cli(
        stack,
        "workflow",
        "execute",
        "--type",
        "BackupServer",
        "--task-queue",
        stack.settings.task_queue,
        "--workflow-id",
        "tcli-backup-2",
        "--input",
        json.dumps({"server_id": server.id, "name": "no spaces allowed"}),
    )
    assert code != 0
    assert "name must be" in out + err

    # The run is found by its search attributes (visibility is eventually consistent).
    for _ in range(50):
        code, out, err = await temporal_cli(
            stack, "workflow", "list", "-q", f"CsbsServerId='{server.id}'", "-o", "json"
        )
        if out.strip() and len(json.loads(out)) >= 1:
            break
        await asyncio.sleep(0.2)
    assert "tcli-backup-1" in out


async def test_task_delete_only_failed_records(stack: Stack) -> None:
    """T2: delete one failed task record, or all failed ones; others are refused."""
    from datetime import UTC, datetime

    from csbs.catalog import TaskRow

    now = datetime.now(UTC)
    for tid, status in [
        ("t-f1", "failed"),
        ("t-f2", "failed"),
        ("t-f3", "failed"),
        ("t-ok", "succeeded"),
    ]:
        stack.catalog.add_task(
            TaskRow(
                id=tid, project="default", kind="backup", status=status, started_at=now, reason="x"
            )
        )
    refused = await stack.cli("task", "delete", "t-ok", "--yes", check=False)
    assert refused.code != 0 and "only failed task records" in refused.stderr
    assert (await stack.cli("task", "delete", "t-f1", "--yes", "--json")).json() == {
        "deleted": ["t-f1"]
    }
    out = (await stack.cli("task", "delete", "--all-failed", "--yes", "--json")).json()
    assert sorted(out["deleted"]) == ["t-f2", "t-f3"]
    left = (await stack.cli("task", "list", "--json")).json()
    assert [t["id"] for t in left] == ["t-ok"]


async def test_preconditions_refuse_with_one_line_and_change_nothing(stack: Stack) -> None:
    """B8, R2: only running/stopped servers without shared disks are backed up; restore
    refuses servers in fault/resizing/resize_verifying and backups not available."""
    drv = stack.driver
    shared = drv.create_server("clustered", [8 * 1024 * 1024], [8 * 1024 * 1024])
    refused = await stack.cli("backup", "create", shared.id, check=False)
    assert refused.code != 0 and "shared disk" in refused.stderr
    ok = drv.create_server("ok", [8 * 1024 * 1024])
    drv.write(ok.id, ok.disks[0].id, 0, b"z" * 5000)
    for state in ("fault", "resizing", "resize_verifying"):
        drv.set_state(ok.id, state)  # type: ignore[arg-type]
        refused = await stack.cli("backup", "create", ok.id, check=False)
        assert refused.code != 0 and "only running or stopped" in refused.stderr
    assert stack.catalog.list_backups() == []
    drv.set_state(ok.id, "stopped")  # type: ignore[arg-type]
    backup = (await stack.cli("backup", "create", ok.id, "--wait", "--json")).json()
    assert backup["status"] == "available"
    sums = drv.checksum(ok.id)
    for state in ("fault", "resizing", "resize_verifying"):
        drv.set_state(ok.id, state)  # type: ignore[arg-type]
        refused = await stack.cli("backup", "restore", backup["id"], "--yes", "--wait", check=False)
        assert refused.code != 0 and f"is {state}" in refused.stderr
        assert refused.stderr.strip().count("\n") == 0
    assert drv.checksum(ok.id) == sums
    stack.catalog.update_backup(backup["id"], status="error")
    drv.set_state(ok.id, "running")  # type: ignore[arg-type]
    refused = await stack.cli("backup", "restore", backup["id"], "--yes", check=False)
    assert refused.code != 0 and "only available backups can be restored" in refused.stderr
    assert stack.catalog.list_tasks(kind="restore") == []


async def test_restore_one_disk_and_map_onto_another_disk(stack: Stack) -> None:
    """R4, R7: restore a single disk of a server backup; map a disk onto a larger one."""
    drv = stack.driver
    server = drv.create_server("two", [8 * 1024 * 1024, 8 * 1024 * 1024, 16 * 1024 * 1024])
    sys_d, data_d, big_d = (d.id for d in server.disks)
    drv.write(server.id, sys_d, 0, b"s" * 300000)
    drv.write(server.id, data_d, 4096, b"d" * 300000)
    backup = (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()
    at_backup = drv.checksum(server.id)
    drv.write(server.id, sys_d, 0, b"S" * 1000)
    drv.write(server.id, data_d, 0, b"D" * 1000)
    changed = drv.checksum(server.id)
    out = await stack.cli(
        "backup", "restore", backup["id"], "--disk", data_d, "--yes", "--wait", "--json"
    )
    assert "only disk(s)" in out.stderr  # the cross-disk consistency warning
    now = drv.checksum(server.id)
    assert now[data_d] == at_backup[data_d] and now[sys_d] == changed[sys_d]

    # The data disk onto the larger third disk; onto the system disk is refused.
    refused = await stack.cli(
        "backup",
        "restore",
        backup["id"],
        "--disk",
        data_d,
        "--map",
        f"{data_d}={sys_d}",
        "--yes",
        check=False,
    )
    assert refused.code != 0 and "cannot be restored onto system disk" in refused.stderr
    await stack.cli(
        "backup",
        "restore",
        backup["id"],
        "--disk",
        data_d,
        "--map",
        f"{data_d}={big_d}",
        "--yes",
        "--wait",
    )
    import hashlib

    image = bytes(4096) + b"d" * 300000
    expected = hashlib.sha256(image + bytes(16 * 1024 * 1024 - len(image))).hexdigest()
    assert drv.checksum(server.id)[big_d] == expected


async def test_batch_names_listing_filters_and_progress(stack: Stack) -> None:
    """B7 (numbered names), B9 (progress), B11 (every filter of backup list)."""
    drv = stack.driver
    servers = [drv.create_server(f"web-{i}", [8 * 1024 * 1024]) for i in range(2)]
    for s in servers:
        drv.write(s.id, s.disks[0].id, 0, b"w" * 100000)
    made = (
        await stack.cli(
            "backup",
            "create",
            servers[0].id,
            servers[1].id,
            "--name",
            "nightly",
            "--description",
            "before upgrade",
            "--wait",
            "--json",
        )
    ).json()
    assert [b["name"] for b in made] == ["nightly-0001", "nightly-0002"]
    assert {b["description"] for b in made} == {"before upgrade"}
    default = (
        await stack.cli("backup", "create", servers[0].id, servers[1].id, "--wait", "--json")
    ).json()
    base = default[0]["name"].removesuffix("-0001")
    assert base.startswith("manualbk_") and default[1]["name"] == f"{base}-0002"
    too_long = await stack.cli(
        "backup", "create", servers[0].id, "--description", "d" * 256, check=False
    )
    assert too_long.code != 0 and "at most 255" in too_long.stderr

    async def ids(*args: str) -> set[str]:
        return {b["id"] for b in (await stack.cli("backup", "list", "--json", *args)).json()}

    everything = await ids()
    assert len(everything) == 4
    assert await ids("--server-id", servers[1].id) == {made[1]["id"], default[1]["id"]}
    assert await ids("--server-name", "web-0") == {made[0]["id"], default[0]["id"]}
    assert await ids("--server-type", "local") == everything
    assert await ids("--server-type", "qemu") == set()
    assert await ids("--name", "nightly") == {made[0]["id"], made[1]["id"]}
    assert await ids("--id", made[0]["id"]) == {made[0]["id"]}
    assert await ids("--status", "available") == everything
    assert await ids("--status", "error") == set()
    assert await ids("--since", made[0]["created_at"], "--until", made[1]["created_at"]) == {
        made[0]["id"],
        made[1]["id"],
    }
    assert await ids("--since", "2999-01-01") == set()
    bad = await stack.cli("backup", "list", "--status", "lost", check=False)
    assert bad.code != 0

    # Progress of a finished backup's workflow, as the Web UI and `temporal` see it.
    handle = stack.client.get_workflow_handle(f"backup-{made[0]['id']}")
    progress = await handle.query("progress")
    assert progress["step"] == "done" and progress["disks_done"] == progress["disks_total"] == 1


async def test_restore_after_disks_were_added_grown_and_removed(stack: Stack) -> None:
    """R5, R4: a server changed since the backup returns to its disks at backup time;
    an added disk keeps its data (with a warning), a removed one is re-created."""
    mib = 1024 * 1024
    server = (
        await stack.cli(
            "dev", "server", "create", "--name", "chg", "--disk", "8MiB", "--disk", "8MiB", "--json"
        )
    ).json()
    sid, (d0, d1) = server["id"], (d["id"] for d in server["disks"])
    await stack.cli(
        "dev", "server", "write", sid, "--disk", d0, "--offset", "0", "--length", "1MiB"
    )
    await stack.cli(
        "dev", "server", "write", sid, "--disk", d1, "--offset", "7MiB", "--length", "1MiB"
    )
    at_backup = (await stack.cli("dev", "server", "checksum", sid)).json()
    backup = (await stack.cli("backup", "create", sid, "--wait", "--json")).json()

    added = (await stack.cli("dev", "server", "add-disk", sid, "--size", "4MiB", "--json")).json()
    await stack.cli(
        "dev", "server", "write", sid, "--disk", added["id"], "--offset", "0", "--length", "4096"
    )
    await stack.cli("dev", "server", "resize-disk", sid, "--disk", d1, "--size", "12MiB")
    await stack.cli(
        "dev", "server", "write", sid, "--disk", d1, "--offset", "10MiB", "--length", "1MiB"
    )
    added_sum = (await stack.cli("dev", "server", "checksum", sid)).json()[added["id"]]
    out = await stack.cli("backup", "restore", backup["id"], "--yes", "--wait", "--json")
    assert "now has 3 disks" in out.stderr
    now = (await stack.cli("dev", "server", "checksum", sid)).json()
    assert now == {**at_backup, added["id"]: added_sum}
    assert stack.driver.get_server(sid).disk(d1).size_bytes == 8 * mib

    await stack.cli("dev", "server", "remove-disk", sid, "--disk", d1)
    out = await stack.cli("backup", "restore", backup["id"], "--yes", "--wait", "--json")
    assert "re-created" in out.stderr
    now = (await stack.cli("dev", "server", "checksum", sid)).json()
    assert now[d0] == at_backup[d0] and now[d1] == at_backup[d1]
    disk = stack.driver.get_server(sid).disk(d1)
    assert (disk.role.value, disk.size_bytes) == ("data", 8 * mib)
    # A later backup of the changed server is correct too (it cannot trust changed blocks).
    later = (await stack.cli("backup", "create", sid, "--wait", "--json")).json()
    await stack.cli(
        "dev", "server", "write", sid, "--disk", d1, "--offset", "0", "--length", "1MiB"
    )
    await stack.cli("backup", "restore", later["id"], "--yes", "--wait")
    assert (await stack.cli("dev", "server", "checksum", sid)).json() == now


async def test_states_progress_and_refused_deletes_while_running(stack: Stack) -> None:
    """B9: `creating` with progress in list/show and in the workflow's progress query and
    current details; D1: a backup that is not available/error/delete_failed is not deleted;
    destructive commands ask for confirmation."""
    import os

    mib = 1024 * 1024
    drv = stack.driver
    server = drv.create_server("busy", [512 * mib])
    for offset in range(0, 512 * mib, 64 * mib):
        drv.write(server.id, server.disks[0].id, offset, os.urandom(64 * mib))
    from csbs.model import BackupServerInput
    from starter.client import CsbsClient

    client = CsbsClient(stack.client, stack.settings)
    backup_id, handle = await client.start_backup(BackupServerInput(server_id=server.id))
    seen: set[int] = set()
    for _ in range(300):
        row = stack.catalog.find_backup(backup_id)
        if row is not None and row.status == "creating":
            seen.add(row.progress)
            if 0 < row.progress < 100:
                # Both commands at once, while it is still being made (each CLI process
                # takes about 2 s to start).
                listing, refused = await asyncio.gather(
                    stack.cli("backup", "list", "--json", "--status", "creating"),
                    stack.cli("backup", "delete", backup_id, "--yes", check=False),
                )
                listed = listing.json()
                assert listed[0]["id"] == backup_id and 0 < listed[0]["progress"] < 100
                progress = await handle.query("progress")
                assert progress["step"] == "uploading"
                assert refused.code != 0 and "creating" in refused.stderr
                break
        await asyncio.sleep(0.05)
    assert any(0 < p < 100 for p in seen), seen
    await handle.result()
    unconfirmed = await stack.cli("backup", "delete", backup_id, check=False)
    assert unconfirmed.code != 0 and "--yes" in unconfirmed.stderr
    assert stack.catalog.get_backup(backup_id).status == "available"


async def test_doctor_says_what_is_wrong(stack: Stack) -> None:
    """``csbs doctor`` checks every dependency; a broken one is named with what to do."""
    good = await stack.cli("doctor", "--json")
    checks = {c["check"]: c for c in good.json()}
    assert set(checks) == {
        "temporal", "search attributes", "worker", "s3", "object lock", "replica", "catalog",
        "hypervisor",
    }  # fmt: skip
    assert all(c["ok"] for c in checks.values()), checks
    assert "worker(s) polling" in checks["worker"]["detail"]
    # Issue 17: backups are not locked here, and it says what that means.
    assert "backups are not locked (CSBS_OBJECT_LOCK_DAYS=0)" in checks["object lock"]["detail"]
    assert "no replica configured" in checks["replica"]["detail"]

    broken = {"CSBS_S3_BUCKET": "no-such-bucket", "CSBS_TASK_QUEUE": "nobody-polls"}
    result = await stack.cli("doctor", "--json", check=False, env=broken)
    assert result.code == 1
    bad = {c["check"]: c for c in result.json()}
    assert not bad["s3"]["ok"] and "no-such-bucket" in bad["s3"]["detail"]
    assert "does not exist" in bad["s3"]["detail"]
    assert not bad["worker"]["ok"] and "python worker.py" in bad["worker"]["detail"]
    assert bad["temporal"]["ok"] and bad["catalog"]["ok"]


async def test_shell_completion_completes_commands(stack: Stack) -> None:
    """``csbs --install-completion`` installs what ``--show-completion`` prints; completing
    ``csbs bac<TAB>`` through that protocol offers ``backup``."""
    csbs = str(Path(sys.executable).parent / "csbs")

    async def run(env: dict[str, str], *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            csbs, *args, stdout=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT)
        )
        out, _ = await proc.communicate()
        return out.decode()

    script = await run(dict(stack.env), "--show-completion", "bash")
    assert "complete -o default -F _csbs_completion csbs" in script
    env = dict(stack.env, _CSBS_COMPLETE="complete_bash", COMP_WORDS="csbs bac", COMP_CWORD="1")
    assert (await run(env)).split() == ["backup"]


async def test_tables_show_ids_that_can_be_copied_and_prefixes_are_taken(stack: Stack) -> None:
    """Issue 16, part 5: at 80 columns the backup and task tables show each id as its
    shortest unique prefix of at least 8 characters, never cut; every command that takes an
    id takes such a prefix; an ambiguous one is refused in one line."""
    drv = stack.driver
    server = drv.create_server("prefixes", [4 * 1024 * 1024])
    drv.write(server.id, server.disks[0].id, 0, b"p" * 100000)
    made = [
        (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()["id"]
        for _ in range(2)
    ]
    narrow = {"COLUMNS": "80"}
    table = (await stack.cli("backup", "list", env=narrow)).stdout
    for backup_id in made:
        shown = next(w for w in table.split() if w.startswith("bk-") and backup_id.startswith(w))
        assert len(shown) >= 8 and [b for b in made if b.startswith(shown)] == [backup_id]
        assert "…" not in shown
        out = (await stack.cli("backup", "show", shown, "--json")).json()
        assert out["id"] == backup_id
    tasks = (await stack.cli("task", "list", env=narrow)).stdout
    task_id = stack.catalog.list_tasks(backup_id=made[0])[0].id
    shown = next(w for w in tasks.split() if task_id.startswith(w) and w.startswith("task-"))
    assert (await stack.cli("task", "show", shown, "--json")).json()["id"] == task_id
    server_prefix = server.id[:8]
    listed = (await stack.cli("backup", "list", "--json")).json()
    assert {b["server_id"] for b in listed} == {server.id}
    again = (await stack.cli("backup", "create", server_prefix, "--wait", "--json")).json()
    assert again["server_id"] == server.id

    ambiguous = await stack.cli("backup", "show", "bk-", check=False)
    assert ambiguous.code != 0
    assert "backup id bk- is ambiguous: 3 ids begin with it" in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1
    missing = await stack.cli("backup", "show", "bk-zzzz", check=False)
    assert missing.code != 0 and "backup bk-zzzz does not exist" in missing.stderr

    # Issue 16, part 6: --limit cuts a list to its newest rows; a table says when more
    # follow, JSON prints every row unless limited; a readable summary, not a dict.
    newest = (await stack.cli("backup", "list", "--json")).json()
    assert len(newest) == 3
    cut = await stack.cli("backup", "list", "--limit", "2", env={"COLUMNS": "200"})
    shown_ids = [w for w in cut.stdout.split() if w.startswith("bk-")]
    assert len(shown_ids) == 2
    assert all(b["id"].startswith(w) for b, w in zip(newest, shown_ids, strict=False))
    assert "the first 2 rows; see more with --limit N, or all with --json" in cut.stderr
    limited = (await stack.cli("backup", "list", "--json", "--limit", "1")).json()
    assert [b["id"] for b in limited] == [newest[0]["id"]]
    assert (await stack.cli("task", "list", "--json", "--limit", "2")).json()[0]["backup_id"]
    bad = await stack.cli("backup", "list", "--limit", "0", check=False)
    assert bad.code != 0 and "--limit" in bad.stderr
    deleting = await stack.cli("backup", "delete", newest[0]["id"], "--yes")
    assert deleting.stdout.startswith(f"deleting 1 backup(s): {newest[0]['id']}")
    assert "{" not in deleting.stdout
