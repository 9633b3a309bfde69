"""A Python client for other services: start csbs workflows the way the CLI does."""

from __future__ import annotations

import uuid

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter

from csbs.config import Settings
from csbs.model import BackupServerInput, DeleteBackupsInput, RestoreServerInput
from workflows.common import SA_BACKUP_ID, SA_OPERATION, SA_SERVER_ID


async def connect(settings: Settings) -> Client:
    """A Temporal client with the pydantic converter that csbs workflows expect."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.namespace,
        data_converter=pydantic_data_converter,
    )


class CsbsClient:
    """Starts backup, restore and delete workflows with ids and search attributes set."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    async def start_backup(
        self, inp: BackupServerInput
    ) -> tuple[str, WorkflowHandle[object, object]]:
        """Start ``BackupServer``; return (backup id, handle)."""
        backup_id = inp.backup_id or f"bk-{uuid.uuid4().hex[:16]}"
        inp = inp.model_copy(update={"backup_id": backup_id})
        handle = await self.client.start_workflow(
            "BackupServer",
            inp,
            id=f"backup-{backup_id}",
            task_queue=self.settings.task_queue,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_SERVER_ID, inp.server_id),
                    SearchAttributePair(SA_BACKUP_ID, backup_id),
                    SearchAttributePair(SA_OPERATION, "backup"),
                ]
            ),
            static_summary=f"backup {inp.name or ''} of server {inp.server_id}".replace("  ", " "),
        )
        return backup_id, handle

    async def start_restore(self, inp: RestoreServerInput) -> WorkflowHandle[object, object]:
        return await self.client.start_workflow(
            "RestoreServer",
            inp,
            id=f"restore-{inp.backup_id}-{uuid.uuid4().hex[:8]}",
            task_queue=self.settings.task_queue,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_BACKUP_ID, inp.backup_id),
                    SearchAttributePair(SA_OPERATION, "restore"),
                ]
            ),
            static_summary=f"restore of backup {inp.backup_id}",
        )

    async def start_delete(self, inp: DeleteBackupsInput) -> WorkflowHandle[object, object]:
        return await self.client.start_workflow(
            "DeleteBackups",
            inp,
            id=f"delete-{uuid.uuid4().hex[:16]}",
            task_queue=self.settings.task_queue,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_BACKUP_ID, inp.backup_ids[0]),
                    SearchAttributePair(SA_OPERATION, "delete"),
                ]
            ),
            static_summary=f"delete of {len(inp.backup_ids)} backup(s)",
        )
