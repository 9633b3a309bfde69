"""Run a csbs worker: ``python worker.py`` (configured by ``CSBS_*`` environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker

from activities import CsbsActivities
from csbs import tuning
from csbs.config import Settings
from csbs.drivers import DEFAULT_HOST, Fleet
from csbs.services import Services
from csbs.telemetry import setup_tracing, shutdown_tracing
from runtime.connection import connect
from workflows import ALL_WORKFLOWS


def build_worker(
    client: Client,
    settings: Settings,
    executor: ThreadPoolExecutor,
    service: Services | None = None,
) -> Worker:
    """The worker: every workflow and activity of csbs on the configured task queue, and
    the data plane of the default host's servers. With ``settings.host`` naming another
    host, a host agent: only that host's data plane, on its own queue."""
    tuning.apply(settings)
    service = service or Services(settings)
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    steps = CsbsActivities(service, client, loop)
    if settings.host != DEFAULT_HOST:
        return Worker(
            client,
            task_queue=settings.host_queue(settings.host),
            activities=steps.data_plane(),
            activity_executor=executor,
            max_concurrent_activities=settings.max_concurrent_activities,
        )
    return Worker(
        client,
        task_queue=settings.queue,
        workflows=ALL_WORKFLOWS,
        activities=steps.all(),
        activity_executor=executor,
        max_concurrent_activities=settings.max_concurrent_activities,
    )


async def keep_inventory(settings: Settings, service: Services) -> None:
    """Report this host's servers to the catalog now and every ``inventory_seconds``, so
    that the central worker, the CLI and the API see the servers of every host."""
    driver = service.driver
    local = driver.local if isinstance(driver, Fleet) else driver
    while True:
        try:
            servers = await asyncio.to_thread(local.list_servers)
            await asyncio.to_thread(
                service.catalog.record_inventory, settings.host, local.name, servers
            )
        except Exception:
            logging.exception("could not report the servers of host %s", settings.host)
        await asyncio.sleep(settings.inventory_seconds)


def build_workers(
    client: Client, settings: Settings, executor: ThreadPoolExecutor
) -> list[tuple[Worker, Settings, Services]]:
    """One worker per project the settings serve (``CSBS_PROJECTS``), each on its
    project's task queue with its own catalog view, repository and servers."""
    built = []
    for project in settings.project_list():
        mine = settings.for_project(project)
        service = Services(mine)
        built.append((build_worker(client, mine, executor, service), mine, service))
    return built


async def reconcile(client: object, settings: Settings) -> None:
    """Bring policy schedules in line with the catalog before taking work (issue 4)."""
    from csbs.catalog import Catalog
    from csbs.chunkstore import ChunkStore
    from csbs.drivers import make_fleet
    from csbs.policy_service import PolicyService
    from runtime.schedules import reconcile_schedules

    catalog = Catalog(settings.effective_database_url, settings.project)
    try:
        svc = PolicyService(catalog, make_fleet(settings, catalog), ChunkStore(settings))
        result = await reconcile_schedules(client, svc, settings)  # type: ignore[arg-type]
        logging.info("schedules reconciled: %s", result)
        # The copies ``csbs catalog rebuild`` reads (issue 17), in case one was missed.
        logging.info("policy copies written: %d", await asyncio.to_thread(svc.publish))
    except Exception:
        logging.exception("could not reconcile policy schedules; will retry at next start")
    finally:
        catalog.dispose()


async def run(settings: Settings) -> None:
    client = await connect(settings, serve_metrics=True)
    if settings.host == DEFAULT_HOST:
        for project in settings.project_list():
            await reconcile(client, settings.for_project(project))
    # Each project's worker may run max_concurrent_activities at once: a thread for each.
    threads = settings.max_concurrent_activities * len(settings.project_list())
    with ThreadPoolExecutor(threads) as executor:
        built = build_workers(client, settings, executor)
        workers = [w for w, _, _ in built]
        inventories = [
            asyncio.create_task(keep_inventory(mine, service)) for _, mine, service in built
        ]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.info(
            "csbs %s on %s, task queue(s) %s, driver %s, metrics %s",
            "worker" if settings.host == DEFAULT_HOST else f"agent of host {settings.host}",
            settings.temporal_address,
            ", ".join(w.task_queue for w in workers),
            settings.compute_driver,
            f"http://{settings.metrics_bind}/metrics" if settings.metrics_bind else "off",
        )
        async with contextlib.AsyncExitStack() as running:
            for w in workers:
                await running.enter_async_context(w)
            await stop.wait()
        for task in inventories:
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run a csbs worker (configured by CSBS_* environment variables)."
    )
    parser.add_argument(
        "--host",
        help="serve the data plane of this hypervisor host's servers (a host agent); "
        "same as CSBS_HOST. Without it: workflows, bookkeeping and the default host.",
    )
    args = parser.parse_args()
    settings = Settings(**({"host": args.host} if args.host else {}))
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
