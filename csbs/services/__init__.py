"""The service layer: every step of backup, restore, verify and delete, one service per
feature (as ``workflows/`` has one workflow per feature), over one shared context.

Each method is one step a workflow retries as a unit, so each is idempotent: calling it
again after a crash either finds its work done or finishes it. Pure rules live in
``csbs.rules``; the on-storage formats in ``csbs.format``.
"""

from __future__ import annotations

from collections.abc import Callable

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.drivers import ComputeDriver, make_fleet
from csbs.services.backup import BackupService
from csbs.services.base import Context, Heartbeat, Service
from csbs.services.delete import DeleteService
from csbs.services.replicate import ReplicateService
from csbs.services.restore import RestoreService
from csbs.services.verify import VerifyService

__all__ = [
    "BackupService",
    "Context",
    "DeleteService",
    "Heartbeat",
    "ReplicateService",
    "RestoreService",
    "Service",
    "Services",
    "VerifyService",
]


class Services:
    """Every service of one project, sharing its catalog, object store and driver."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        store: ChunkStore | None = None,
        driver: ComputeDriver | None = None,
    ) -> None:
        catalog = catalog or Catalog(settings.effective_database_url, settings.project)
        self.ctx = Context(
            settings,
            catalog,
            store or ChunkStore(settings),
            driver or make_fleet(settings, catalog),
        )
        self.backup = BackupService(self.ctx)
        self.restore = RestoreService(self.ctx)
        self.verify = VerifyService(self.ctx)
        self.delete = DeleteService(self.ctx)
        self.replicate = ReplicateService(self.ctx)
        #: What every service shares (read-only here: build a new ``Services`` to change).
        self.settings, self.catalog = self.ctx.settings, self.ctx.catalog
        self.store, self.driver = self.ctx.store, self.ctx.driver

    @property
    def closed_run(self) -> Callable[[str, str | None], str | None] | None:
        return self.ctx.closed_run

    @closed_run.setter
    def closed_run(self, fn: Callable[[str, str | None], str | None] | None) -> None:
        self.ctx.closed_run = fn

    def reconcile(self, server_id: str | None = None) -> int:
        """Reconcile operations whose runs closed without finishing them (see Service)."""
        return self.backup.reconcile(server_id)
