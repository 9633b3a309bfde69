"""Readable summaries of what a command did (issue 16, part 5): the lines ``csbs`` prints
where ``--json`` prints the document. Plain functions of that document, so that each is
tested without a stack; ``--json`` stays as it always was."""

from __future__ import annotations

from typing import Any

from csbs.units import format_size


def _ids(ids: list[str]) -> str:
    return ", ".join(ids) if ids else "none"


def deleted(result: dict[str, Any]) -> list[str]:
    """``backup delete``: started (not waited for), or what it deleted and reclaimed."""
    if result.get("status") == "deleting":
        ids = list(result.get("backup_ids") or [])
        return [
            f"deleting {len(ids)} backup(s): {_ids(ids)}",
            f"workflow {result['workflow_id']}; follow it with csbs backup list --status deleting",
        ]
    ids = list(result.get("deleted") or [])
    lines = [f"deleted {len(ids)} backup(s): {_ids(ids)}"]
    reclaimed = result.get("reclaimed") or {}
    if "deferred" in reclaimed:
        lines.append(
            f"storage is reclaimed later by {reclaimed.get('handed_to')}: {reclaimed['deferred']}"
        )
    elif reclaimed:
        lines.append(
            f"reclaimed {format_size(int(reclaimed.get('bytes_freed', 0)))} "
            f"({reclaimed.get('chunks_deleted', 0)} chunks no backup uses any more)"
        )
    return lines


def started(what: str, result: dict[str, Any], follow: str) -> list[str]:
    """A workflow started and not waited for: its task and how to follow it."""
    task = result.get("task_id")
    lines = [f"{what}: workflow {result['workflow_id']}" + (f", task {task}" if task else "")]
    lines.append(f"follow it with {follow.format(task=task)}")
    return lines


def policy_run(result: dict[str, Any]) -> list[str]:
    """``policy run``: started, or per server what it made, then retention."""
    if result.get("status") == "running":
        return [
            f"policy {result['policy_id']} is backing up its servers now "
            f"(workflow {result['workflow_id']})",
            "follow it with csbs task list --kind backup",
        ]
    backups = result.get("backups") or {}
    lines = [f"policy {result['policy_id']} ({result.get('trigger', 'manual')}): "
             f"{len(backups)} server(s) backed up"]  # fmt: skip
    for server, one in sorted(backups.items()):
        line = f"  {server}: backup {one.get('backup_id')} {one.get('outcome')}"
        if one.get("replica"):
            line += f", replica {one['replica']}"
        lines.append(line)
    for server, why in sorted((result.get("skipped") or {}).items()):
        lines.append(
            f"  {server}: {why}" if why.startswith("skipped") else f"  {server}: skipped ({why})"
        )
    retention = result.get("retention") or {}
    expired = list(retention.get("expired") or [])
    if retention.get("error"):
        lines.append(f"retention failed: {retention['error']}")
    else:
        lines.append(f"retention: {len(expired)} expired backup(s) deleted: {_ids(expired)}")
    return lines


def reconciled(result: dict[str, list[str]]) -> list[str]:
    """``policy reconcile``: the schedules created and removed."""
    created, removed = result.get("created") or [], result.get("removed") or []
    if not created and not removed:
        return ["every schedule matches its policy: nothing to repair"]
    return [f"created {len(created)} schedule(s): {_ids(created)}",
            f"removed {len(removed)} schedule(s): {_ids(removed)}"]  # fmt: skip
