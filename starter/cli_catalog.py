"""``csbs catalog rebuild``: bring the catalog back from storage alone (issue 17)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.rebuild import RebuildReport, projects_in, rebuild
from starter import cli_common as ui
from starter.cli_common import JsonOpt

catalog_app = typer.Typer(
    no_args_is_help=True, help="The catalog: rebuild it from the repository in S3."
)


def _empty(catalog: Catalog) -> bool:
    from csbs.catalog.policies import PolicyCatalog

    return not catalog.list_backups() and not PolicyCatalog(catalog).all()


@catalog_app.command("rebuild")
def catalog_rebuild(
    from_replica: Annotated[
        bool,
        typer.Option("--from-replica", help="Read the second site's repository (CSBS_REPLICA_*)."),
    ] = False,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="Add what the catalog lacks even where it holds backups or policies already "
            "(an empty catalog is always filled).",
        ),
    ] = False,
    project: Annotated[
        list[str] | None,
        typer.Option("--project", help="Only this project (repeatable); default: every one."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Read every backup's descriptor and manifests, and every policy's copy, from the
    repository; add to the catalog what it lacks, and report where the two differ.

    A project whose catalog is empty (the database was lost) is filled. Against a live
    catalog it only reports, unless --apply; it never changes what the catalog holds.
    Running it again adds nothing."""
    base = ui.settings()
    site = ui.guarded(lambda: base.replica() if from_replica else base)
    names = project or ui.guarded(lambda: projects_in(ChunkStore(site)))
    reports: list[RebuildReport] = []
    for name in names:
        catalog = Catalog(base.effective_database_url, name)
        try:
            store = ChunkStore(site.for_project(name))
            write = apply or _empty(catalog)
            reports.append(
                ui.guarded(
                    lambda c=catalog, s=store, w=write: rebuild(  # type: ignore[misc]
                        c, s, apply=w, on_replica=from_replica
                    )
                )
            )
        finally:
            catalog.dispose()
    added = [r for r in reports if r.policies_added]
    schedules = _schedules(base, [r.project for r in added]) if added else None
    result: dict[str, Any] = {
        "source": "replica" if from_replica else "primary",
        "projects": [r.model_dump(mode="json") for r in reports],
        "schedules": schedules,
    }
    ui.emit(result, as_json, lambda: _render(reports, schedules))
    if any(r.unreadable for r in reports):
        raise typer.Exit(1)


def _schedules(base: Any, projects: list[str]) -> str:
    """Give the policies brought back their Temporal Schedules (as the worker does when
    it starts); say so, or what to run when Temporal cannot be reached."""
    from starter.facade import Facade

    async def sync() -> None:
        for name in projects:
            await Facade(base.for_project(name)).reconcile_schedules()

    try:
        ui.run_async(sync())
    except Exception as exc:
        return (
            f"not made ({exc}); run csbs policy reconcile, or start the worker, once Temporal is up"
        )
    return "made"


def _render(reports: list[RebuildReport], schedules: str | None) -> None:
    for r in reports:
        verb = "added" if r.applied else "would add (run with --apply)"
        ui.console.print(
            f"project {r.project} ({r.source}): {r.backups_found} backups and "
            f"{r.policies_found} policies in storage; {verb}: {r.backups_added} backups, "
            f"{r.policies_added} policies, {r.bindings_added} bindings",
            highlight=False,
        )
        for d in r.differences:
            ui.console.print(f"  {d.kind} {d.id}: {d.problem}: {d.detail}", highlight=False)
        for u in r.unreadable:
            ui.say("unreadable:", "red", u)
    if schedules is not None:
        ui.console.print(f"schedules of the policies brought back: {schedules}", highlight=False)
