"""What an operator sees in the Temporal Web UI and CLI: every run of a server found by its
id, each with a one-line summary, current details that show progress, and a failure whose
message is the task's reason."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from starter.stack import tool
from tests.conftest import Stack

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


async def temporal(stack: Stack, *args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        tool("temporal"),
        *args,
        "--address",
        stack.env["CSBS_TEMPORAL_ADDRESS"],
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode().strip()
    return (
        json.loads(text)
        if text.startswith(("[", "{"))
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )


async def test_every_run_of_a_server_is_found_by_its_id_and_explains_itself(stack: Stack) -> None:
    drv = stack.driver
    server = drv.create_server("web-1", [8 * MIB, 8 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(2 * MIB))

    manual = (
        await stack.cli("backup", "create", server.id, "--name", "ui_bk", "--wait", "--json")
    ).json()
    policy = (
        await stack.cli(
            "policy",
            "create",
            "--time",
            "03:00",
            "--every-days",
            "1",
            "--keep-count",
            "5",
            "--json",
        )
    ).json()
    await stack.cli("policy", "bind", policy["id"], server.id)
    run = (await stack.cli("policy", "run", policy["id"], "--wait", "--json")).json()
    child_backup = run["backups"][server.id]["backup_id"]
    await stack.cli("backup", "restore", manual["id"], "--yes", "--wait", "--no-power-on")
    # A backup that fails after it was recorded: its data disk is gone.
    disk_file = drv._disk_path(server.id, server.disks[1].id)
    disk_file.rename(disk_file.with_suffix(".gone"))
    failed = await stack.cli(
        "backup", "create", server.id, "--name", "ui_fail", "--wait", check=False
    )
    assert failed.code != 0
    disk_file.with_suffix(".gone").rename(disk_file)

    # `temporal workflow list -q "CsbsServerId='...'"`, which the Web UI's search box runs.
    query = f"CsbsServerId='{server.id}'"
    for _ in range(100):
        runs = await temporal(stack, "workflow", "list", "-q", query)
        if len(runs) >= 4:
            break
        await asyncio.sleep(0.2)
    types = sorted(r["type"]["name"] for r in runs)
    assert types == ["BackupServer", "BackupServer", "BackupServer", "RestoreServer"], runs

    summaries = {}
    for r in runs:
        handle = stack.client.get_workflow_handle(r["execution"]["workflowId"])
        desc = await handle.describe()
        summaries[handle.id] = (await desc.static_summary(), desc.status)
    assert summaries[f"backup-{manual['id']}"] == (
        f"backup ui_bk of server web-1 ({server.id})",
        WorkflowExecutionStatus.COMPLETED,
    )
    assert summaries[f"backup-{child_backup}"][0] == (
        f"backup {child_backup} of server {server.id} (policy {policy['id']})"
    )
    restore_summary = next(s for wid, s in summaries.items() if wid.startswith("restore-"))
    assert restore_summary[0] == f"restore of backup {manual['id']}"
    failed_id, (_, failed_status) = next(
        (wid, s) for wid, s in summaries.items() if s[0] and "ui_fail" in s[0]
    )
    assert failed_status == WorkflowExecutionStatus.FAILED

    # The failure is a typed ApplicationError whose message is the task's reason.
    history = await temporal(stack, "workflow", "show", "-w", failed_id)
    events = history["events"] if isinstance(history, dict) else history
    final = next(e for e in events if e.get("eventType") == "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED")
    app_failure = final["workflowExecutionFailedEventAttributes"]["failure"]
    task = next(t for t in stack.catalog.list_tasks(kind="backup") if t.status == "failed")
    assert app_failure["message"] == task.reason
    assert app_failure["applicationFailureInfo"]["type"] == "DiskUnavailable"
    assert server.disks[1].id in (task.reason or "")

    # Current details (the UI's "Current Details") say where a run is; activity summaries
    # name the disk.
    handle = stack.client.get_workflow_handle(f"backup-{manual['id']}")
    meta = await handle.query("__temporal_workflow_metadata")
    assert meta.current_details == "done; disks 2/2"
    history = await temporal(stack, "workflow", "show", "-w", f"backup-{manual['id']}")
    events = history["events"] if isinstance(history, dict) else history
    activity_summaries = sorted(
        json.loads(base64.b64decode(e["userMetadata"]["summary"]["data"]))
        for e in events
        if e.get("eventType") == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED" and "userMetadata" in e
    )
    assert activity_summaries == sorted(f"disk {d.id}" for d in server.disks)
