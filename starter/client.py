"""A Python client for other services: start csbs workflows the way the CLI does."""

from __future__ import annotations

import uuid

from pydantic import BaseModel
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from csbs.config import Settings
from csbs.model import (
    BackupServerInput,
    DeleteBackupsInput,
    ReplicateBackupInput,
    RestoreServerInput,
    RunPolicyInput,
    VerifyBackupInput,
    new_id,
)
from workflows.common import SA_BACKUP_ID, SA_OPERATION, SA_POLICY_ID, SA_SERVER_ID


def backup_summary(name: str, server_id: str, server_name: str | None = None) -> str:
    """The one line the Temporal Web UI shows for a backup run."""
    server = f"{server_name} ({server_id})" if server_name else server_id
    return f"backup {name} of server {server}"


class CsbsClient:
    """Starts backup, restore and delete workflows with ids and search attributes set."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    async def _start(
        self,
        workflow: str,
        inp: BaseModel,
        workflow_id: str,
        operation: str,
        summary: str,
        **attributes: str,
    ) -> WorkflowHandle[object, object]:
        """Start a csbs workflow on the project's queue, findable by ``operation`` and the
        given ids (``server``, ``backup``, ``policy``) and shown by ``summary``."""
        keys = {"server": SA_SERVER_ID, "backup": SA_BACKUP_ID, "policy": SA_POLICY_ID}
        pairs = [SearchAttributePair(keys[k], v) for k, v in attributes.items()]
        return await self.client.start_workflow(
            workflow,
            inp,
            id=workflow_id,
            task_queue=self.settings.queue,
            search_attributes=TypedSearchAttributes(
                [*pairs, SearchAttributePair(SA_OPERATION, operation)]
            ),
            static_summary=summary,
        )

    async def start_backup(
        self, inp: BackupServerInput, server_name: str | None = None
    ) -> tuple[str, WorkflowHandle[object, object]]:
        """Start ``BackupServer``; return (backup id, handle). The Web UI shows the run as
        "backup NAME of server SERVER-NAME (SERVER-ID)"."""
        backup_id = inp.backup_id or new_id("bk")
        inp = inp.model_copy(update={"backup_id": backup_id})
        handle = await self._start(
            "BackupServer",
            inp,
            f"backup-{backup_id}",
            "backup",
            backup_summary(inp.name or backup_id, inp.server_id, server_name),
            server=inp.server_id,
            backup=backup_id,
        )
        return backup_id, handle

    async def start_restore(self, inp: RestoreServerInput) -> WorkflowHandle[object, object]:
        return await self._start(
            "RestoreServer",
            inp,
            f"restore-{inp.backup_id}-{uuid.uuid4().hex[:8]}",
            "restore",
            f"restore of backup {inp.backup_id}",
            backup=inp.backup_id,
        )

    async def start_delete(self, inp: DeleteBackupsInput) -> WorkflowHandle[object, object]:
        return await self._start(
            "DeleteBackups",
            inp,
            f"delete-{uuid.uuid4().hex[:16]}",
            "delete",
            f"delete of {len(inp.backup_ids)} backup(s)",
            backup=inp.backup_ids[0],
        )

    async def start_policy_run(
        self, inp: RunPolicyInput, workflow_id: str
    ) -> WorkflowHandle[object, object]:
        """Start ``RunPolicy`` by hand (P8); schedules start it with the same attributes."""
        return await self._start(
            "RunPolicy",
            inp,
            workflow_id,
            "policy",
            f"{inp.trigger} run of policy {inp.policy_id}",
            policy=inp.policy_id,
        )

    async def start_replicate(self, inp: ReplicateBackupInput) -> WorkflowHandle[object, object]:
        """Start ``ReplicateBackup``: the backup copied to the second site."""
        return await self._start(
            "ReplicateBackup",
            inp,
            f"replicate-{inp.backup_id}-{uuid.uuid4().hex[:8]}",
            "replicate",
            f"replication of backup {inp.backup_id}",
            backup=inp.backup_id,
        )

    async def start_verify(self, inp: VerifyBackupInput) -> WorkflowHandle[object, object]:
        """Start ``VerifyBackup``: every chunk of the backup read and checked."""
        return await self._start(
            "VerifyBackup",
            inp,
            f"verify-{inp.backup_id}-{uuid.uuid4().hex[:8]}",
            "verify",
            f"verify of backup {inp.backup_id}",
            backup=inp.backup_id,
        )
