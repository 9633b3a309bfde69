"""Run a csbs worker: ``python worker.py`` (configured by ``CSBS_*`` environment variables)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from temporalio.worker import Worker

from activities import CsbsActivities
from csbs import tuning
from csbs.config import Settings
from csbs.services import Services
from csbs.telemetry import setup_tracing, shutdown_tracing
from runtime.connection import connect
from workflows import ALL_WORKFLOWS


def build_worker(client: object, settings: Settings, executor: ThreadPoolExecutor) -> Worker:
    """The worker: every workflow and activity of csbs on the configured task queue."""
    tuning.apply(settings)
    service = Services(settings)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    return Worker(
        client,  # type: ignore[arg-type]
        task_queue=settings.queue,
        workflows=ALL_WORKFLOWS,
        activities=CsbsActivities(service, client, loop).all(),  # type: ignore[arg-type]
        activity_executor=executor,
        max_concurrent_activities=settings.max_concurrent_activities,
    )


def build_workers(client: object, settings: Settings, executor: ThreadPoolExecutor) -> list[Worker]:
    """One worker per project the settings serve (``CSBS_PROJECTS``), each on its
    project's task queue with its own catalog view, repository and servers."""
    return [
        build_worker(client, settings.for_project(p), executor) for p in settings.project_list()
    ]


async def reconcile(client: object, settings: Settings) -> None:
    """Bring policy schedules in line with the catalog before taking work (issue 4)."""
    from csbs.catalog import Catalog
    from csbs.drivers import make_driver
    from csbs.policy_service import PolicyService
    from runtime.schedules import reconcile_schedules

    catalog = Catalog(settings.effective_database_url, settings.project)
    try:
        svc = PolicyService(catalog, make_driver(settings))
        result = await reconcile_schedules(client, svc, settings)  # type: ignore[arg-type]
        logging.info("schedules reconciled: %s", result)
    except Exception:
        logging.exception("could not reconcile policy schedules; will retry at next start")
    finally:
        catalog.dispose()


async def run(settings: Settings) -> None:
    client = await connect(settings, serve_metrics=True)
    for project in settings.project_list():
        await reconcile(client, settings.for_project(project))
    # Each project's worker may run max_concurrent_activities at once: a thread for each.
    threads = settings.max_concurrent_activities * len(settings.project_list())
    with ThreadPoolExecutor(threads) as executor:
        workers = build_workers(client, settings, executor)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.info(
            "csbs worker on %s, task queue(s) %s, driver %s, metrics %s",
            settings.temporal_address,
            ", ".join(w.task_queue for w in workers),
            settings.compute_driver,
            f"http://{settings.metrics_bind}/metrics" if settings.metrics_bind else "off",
        )
        async with contextlib.AsyncExitStack() as running:
            for w in workers:
                await running.enter_async_context(w)
            await stop.wait()


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    setup_tracing("csbs-worker")
    try:
        asyncio.run(run(settings))
    finally:
        shutdown_tracing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see NOTES: avoid the SDK's interpreter-exit abort


if __name__ == "__main__":
    main()
