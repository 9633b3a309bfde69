"""``csbs policy ...``: policy CRUD, bindings and run-now, each kept in step with its
Temporal Schedule (the catalog is written first; the schedule follows it)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from csbs.policy import DEFAULT_TIME, RETENTION_PRESETS, PolicySpec, RetentionKind
from starter import cli_common as cli
from starter import summaries
from starter.cli_common import PolicyId, ServerIds
from starter.facade import Facade

policy_app = typer.Typer(no_args_is_help=True, help="Backup policies on Temporal Schedules.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _facade() -> Facade:
    return cli.facade(cli.settings())


def _retention(
    keep_count: int | None, keep_days: str | None, keep_forever: bool
) -> dict[str, Any] | None:
    given = [x for x in (keep_count is not None, keep_days is not None, keep_forever) if x]
    if len(given) > 1:
        cli.fail("give one of --keep-count, --keep-days or --keep-forever")
    if keep_count is not None:
        return {"retention": RetentionKind.COUNT, "retention_value": keep_count}
    if keep_days is not None:
        days = RETENTION_PRESETS.get(keep_days) or (int(keep_days) if keep_days.isdigit() else None)
        if days is None:
            cli.fail(f"--keep-days must be 1-99999 or 1m, 3m, 6m, 1y (got {keep_days!r})")
        return {"retention": RetentionKind.DAYS, "retention_value": days}
    if keep_forever:
        return {"retention": RetentionKind.FOREVER, "retention_value": None}
    return None


def _table(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "name", "enabled", "times", "period", "retention", "servers")
    short = cli.facade(cli.settings()).short_ids("policy")
    for p in rows:
        period = (
            f"weekly {','.join(p['weekdays'])}"
            if p["weekdays"]
            else f"every {p['every_days']} days"
        )
        keep = p["retention"] + (f" {p['retention_value']}" if p["retention_value"] else "")
        table.add_row(
            short.get(p["id"], p["id"]),
            p["name"],
            str(p["enabled"]),
            " ".join(p["times"]),
            period,
            keep,
            str(len(p["server_ids"])),
        )
    cli.console.print(table)


@policy_app.command("create")
def policy_create(
    time: Annotated[
        list[str] | None, typer.Option("--time", help="HH:MM, repeat for several (00:00).")
    ] = None,
    name: Annotated[str, typer.Option(help="Policy name.")] = "backup_policy",
    weekdays: Annotated[
        str | None, typer.Option(help="mon,wed,... (weekly period; default every 3 days)")
    ] = None,
    every_days: Annotated[int | None, typer.Option(help="Every N days, 1-30.")] = None,
    keep_count: Annotated[int | None, typer.Option(help="Keep N backups per server.")] = None,
    keep_days: Annotated[
        str | None, typer.Option(help="Keep N days, or 1m, 3m, 6m, 1y (default 6m).")
    ] = None,
    keep_forever: Annotated[bool, typer.Option(help="Never expire backups.")] = False,
    disabled: Annotated[bool, typer.Option(help="Create it disabled.")] = False,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the times.")] = "UTC",
    lock_days: Annotated[
        int | None,
        typer.Option(help="Lock its backups N days with S3 Object Lock (compliance mode)."),
    ] = None,
    replicate: Annotated[
        bool, typer.Option(help="Replicate each backup it makes to the second site.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a policy and its schedule (P1-P3)."""
    facade = _facade()
    # Guide 3.2.1: without --time it runs at 00:00, without a period every 3 days, and
    # without a retention option it keeps backups 6 months.
    retention = _retention(keep_count, keep_days, keep_forever) or {}
    spec = cli.guarded(
        lambda: PolicySpec(
            name=name,
            enabled=not disabled,
            times=time or [DEFAULT_TIME],
            weekdays=weekdays.split(",") if weekdays else None,
            every_days=every_days,
            timezone=timezone,
            lock_days=lock_days,
            replicate=replicate,
            **retention,
        )
    )
    view = cli.run_async(cli.guarded_async(facade.create_policy(spec)))
    cli.emit(view, as_json, lambda: _table([view]))


@policy_app.command("update")
def policy_update(
    policy_id: PolicyId,
    time: Annotated[list[str] | None, typer.Option("--time", help="HH:MM, replaces all.")] = None,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    weekdays: Annotated[str | None, typer.Option(help="mon,wed,...")] = None,
    every_days: Annotated[int | None, typer.Option(help="Every N days, 1-30.")] = None,
    keep_count: Annotated[int | None, typer.Option()] = None,
    keep_days: Annotated[str | None, typer.Option()] = None,
    keep_forever: Annotated[bool, typer.Option()] = False,
    timezone: Annotated[str | None, typer.Option()] = None,
    lock_days: Annotated[
        int | None, typer.Option(help="Lock its next backups N days (S3 Object Lock).")
    ] = None,
    replicate: Annotated[
        bool | None,
        typer.Option(
            "--replicate/--no-replicate", help="Replicate its next backups to the second site."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a policy; its schedule is rewritten (P7)."""
    facade = _facade()
    changes: dict[str, Any] = _retention(keep_count, keep_days, keep_forever) or {}
    if time:
        changes["times"] = time
    if name:
        changes["name"] = name
    if weekdays:
        changes["weekdays"] = weekdays.split(",")
    if every_days is not None:
        changes["every_days"] = every_days
    if timezone:
        changes["timezone"] = timezone
    if lock_days is not None:
        changes["lock_days"] = lock_days
    if replicate is not None:
        changes["replicate"] = replicate
    view = cli.run_async(cli.guarded_async(facade.update_policy(policy_id, changes)))
    cli.emit(view, as_json, lambda: _table([view]))


def _set_enabled(policy_id: str, enabled: bool, as_json: bool) -> None:
    facade = _facade()
    view = cli.run_async(cli.guarded_async(facade.set_policy_enabled(policy_id, enabled)))
    cli.emit(view, as_json, lambda: _table([view]))


@policy_app.command("enable")
def policy_enable(policy_id: PolicyId, as_json: JsonOpt = False) -> None:
    """Enable a policy (its schedule is unpaused)."""
    _set_enabled(policy_id, True, as_json)


@policy_app.command("disable")
def policy_disable(policy_id: PolicyId, as_json: JsonOpt = False) -> None:
    """Disable a policy: no future runs; runs in progress finish (P7)."""
    _set_enabled(policy_id, False, as_json)


@policy_app.command("list")
def policy_list(limit: cli.LimitOpt = None, as_json: JsonOpt = False) -> None:
    """List policies, by id."""
    page = cli.guarded(lambda: _facade().policies_page(cli.rows_for(limit, as_json)))
    rows = page.items
    cli.emit(rows, as_json, lambda: _table(rows))
    cli.note_more(page, as_json)


@policy_app.command("show")
def policy_show(policy_id: PolicyId, as_json: JsonOpt = False) -> None:
    """Show a policy with its servers and next run times."""
    view = cli.run_async(cli.guarded_async(_facade().policy_view(policy_id, next_runs=True)))

    def render() -> None:
        _table([view])
        cli.console.print("next runs: " + ", ".join(view["next_runs"][:5]))

    cli.emit(view, as_json, render)


@policy_app.command("delete")
def policy_delete(
    policy_id: PolicyId,
    yes: Annotated[bool, typer.Option("--yes", "-y")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a policy and its schedule; its backups stay (P7)."""
    facade = _facade()
    cli.guarded(lambda: facade.check_policy(policy_id))
    cli.confirm(f"Delete policy {policy_id}? Its backups are kept.", yes)
    cli.run_async(cli.guarded_async(facade.delete_policy(policy_id)))
    cli.emit({"deleted": policy_id}, as_json, lambda: cli.console.print(f"deleted {policy_id}"))


def _emit_bound(policy_id: str, bound: list[str], as_json: bool) -> None:
    cli.emit(
        {"policy_id": policy_id, "server_ids": bound},
        as_json,
        lambda: cli.console.print(f"{policy_id}: {len(bound)} server(s) bound"),
    )


@policy_app.command("bind")
def policy_bind(policy_id: PolicyId, server_ids: ServerIds, as_json: JsonOpt = False) -> None:
    """Bind servers (a server bound elsewhere moves here) (P6)."""
    facade = _facade()
    cli.guarded(lambda: facade.check_policy(policy_id))
    _emit_bound(policy_id, cli.guarded(lambda: facade.bind(policy_id, server_ids)), as_json)


@policy_app.command("unbind")
def policy_unbind(policy_id: PolicyId, server_ids: ServerIds, as_json: JsonOpt = False) -> None:
    """Unbind servers; their backups stay (P9)."""
    facade = _facade()
    _emit_bound(policy_id, cli.guarded(lambda: facade.unbind(policy_id, server_ids)), as_json)


@policy_app.command("reconcile")
def policy_reconcile(as_json: JsonOpt = False) -> None:
    """Repair drift: create missing policy schedules, delete orphans, ensure daily cleanup."""
    result = cli.run_async(_facade().reconcile_schedules())
    cli.emit(result, as_json, lambda: cli.say_lines(summaries.reconciled(result)))


@policy_app.command("run")
def policy_run(
    policy_id: PolicyId,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a policy now: back up every bound server (names backup_xxxx) (P8)."""
    from temporalio.client import WorkflowFailureError

    facade = _facade()

    async def run_now() -> dict[str, Any]:
        handle = await cli.guarded_async(facade.run_policy(policy_id))
        if not wait:
            return {"workflow_id": handle.id, "policy_id": policy_id, "status": "running"}
        try:
            result: dict[str, Any] = await handle.result()
        except WorkflowFailureError as exc:
            cli.fail(cli.workflow_error(exc))
        return result

    result = cli.run_async(run_now())
    cli.emit(result, as_json, lambda: cli.say_lines(summaries.policy_run(result)))
