"""``csbs quota show|set``: a tenant's limits on disk backups and stored bytes (B15)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from csbs.units import format_size
from starter import cli_common as cli
from starter.cli_common import JsonOpt

quota_app = typer.Typer(
    no_args_is_help=True, help="A tenant's quota: disk backups and stored bytes."
)

ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", help="The tenant (project); default the global --project."),
]


def _facade(project: str | None) -> Any:
    if project is not None:
        cli.overrides["project"] = project
    return cli.facade(cli.settings())


def _limit(value: int | None, size: bool) -> str:
    if value is None:
        return "no limit"
    return format_size(value) if size else str(value)


def _table(view: dict[str, Any]) -> None:
    table = Table("project", "what", "used", "limit", "limit from")
    for key, label, size in (("disk_backups", "disk backups", False), ("bytes", "bytes", True)):
        item = view[key]
        used = format_size(item["used"]) if size else str(item["used"])
        table.add_row(view["project"], label, used, _limit(item["limit"], size), item["source"])
    cli.console.print(table)


@quota_app.command("show")
def quota_show(project: ProjectOpt = None, as_json: JsonOpt = False) -> None:
    """Show the tenant's limits, where each comes from (its own, or the default from
    CSBS_QUOTA_*), and what it uses: disk backups (one per disk of each server backup not
    in error) and stored bytes (chunks shared by several backups count once)."""
    f = _facade(project)
    view = cli.guarded(f.quota_view)
    cli.emit(view, as_json, lambda: _table(view))


@quota_app.command("set")
def quota_set(
    disk_backups: Annotated[
        str | None,
        typer.Option(help="Most disk backups kept: a number, 'unlimited' or 'default'."),
    ] = None,
    bytes_: Annotated[
        str | None,
        typer.Option(
            "--bytes", help="Most bytes stored: a size like 500GiB, 'unlimited' or 'default'."
        ),
    ] = None,
    project: ProjectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the tenant's own limits; 'default' goes back to CSBS_QUOTA_DISK_BACKUPS or
    CSBS_QUOTA_BYTES. A backup that would pass a limit is refused before it starts."""
    f = _facade(project)
    view = cli.guarded(lambda: f.set_quota(disk_backups, bytes_))
    cli.emit(view, as_json, lambda: _table(view))
