"""The ``csbs`` command line (Typer + Rich). Every command takes ``--json``."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated, Any

import typer
from rich.text import Text

from csbs.model import (
    TaskKind,
    TaskStatus,
)
from starter import cli_common as ui
from starter.audit_cli import audit_app
from starter.cli_backup import backup_app
from starter.cli_catalog import catalog_app
from starter.cli_common import JsonOpt, YesOpt
from starter.cli_dev import dev_server_app
from starter.policy_cli import policy_app
from starter.quota_cli import quota_app
from starter.token_cli import token_app

app = typer.Typer(no_args_is_help=True, help="Cloud Server Backup Service")


server_app = typer.Typer(no_args_is_help=True, help="Servers the compute driver knows.")


task_app = typer.Typer(no_args_is_help=True, help="Backup, restore and delete task records.")


dev_app = typer.Typer(no_args_is_help=True, help="Developer tools (driver servers, stack).")


db_app = typer.Typer(no_args_is_help=True, help="The catalog database and its migrations.")


api_app = typer.Typer(no_args_is_help=True, help="The REST API for services without Temporal.")
app.add_typer(server_app, name="server")
app.add_typer(backup_app, name="backup")
app.add_typer(task_app, name="task")
app.add_typer(dev_app, name="dev")
app.add_typer(db_app, name="db")
app.add_typer(api_app, name="api")
app.add_typer(policy_app, name="policy")
app.add_typer(quota_app, name="quota")
app.add_typer(catalog_app, name="catalog")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
dev_app.add_typer(dev_server_app, name="server")


@app.callback()
def _global_options(
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            envvar="CSBS_PROJECT",
            help="The project to act in; default CSBS_PROJECT or 'default'.",
        ),
    ] = None,
) -> None:
    """Cloud Server Backup Service"""
    if project is not None:
        ui.overrides["project"] = project


@server_app.command("list")
def server_list(limit: ui.LimitOpt = None, as_json: JsonOpt = False) -> None:
    """List the servers of the project, by id."""
    page = ui.guarded(lambda: ui.facade(ui.settings()).servers_page(ui.rows_for(limit, as_json)))
    servers = page.items
    ui.emit([ui._server_json(s) for s in servers], as_json, lambda: ui._server_table(servers))
    ui.note_more(page, as_json)


# -- tasks ----------------------------------------------------------------------------------


@task_app.command("list")
def task_list(
    kind: Annotated[TaskKind | None, typer.Option(help="backup, restore, delete or verify")] = None,
    status: Annotated[TaskStatus | None, typer.Option(help="running, succeeded or failed")] = None,
    limit: ui.LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List task records, newest first."""
    f = ui.facade(ui.settings())
    page = f.tasks_page(kind=kind, status=status, limit=ui.rows_for(limit, as_json))
    rows = page.items
    ui.emit(rows, as_json, lambda: ui._task_table(rows))
    ui.note_more(page, as_json)


@task_app.command("show")
def task_show(task_id: ui.TaskId, as_json: JsonOpt = False) -> None:
    """Show one task, with its failure reason."""
    f = ui.facade(ui.settings())
    row = ui.guarded(lambda: f.task(task_id))
    ui.emit(row, as_json, lambda: ui._task_table([row]))


@task_app.command("delete")
def task_delete(
    task_ids: Annotated[
        list[str] | None,
        typer.Argument(callback=ui._resolver("task"), help="Failed tasks (ids or prefixes)."),
    ] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed task.")] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete failed task records (T2): some by id, or all failed ones."""
    f = ui.facade(ui.settings())
    if bool(task_ids) == all_failed:
        ui.fail("give task ids or --all-failed (not both)")
    ids = ui.guarded(lambda: f.deletable_tasks(task_ids, all_failed))
    if ids:
        ui.confirm(f"Delete {len(ids)} failed task record(s)?", yes)
    deleted = ui.guarded(lambda: f.delete_tasks(task_ids, all_failed))
    ui.emit(
        {"deleted": deleted},
        as_json,
        lambda: ui.console.print(f"deleted {len(deleted)} task record(s)"),
    )


# -- catalog database -----------------------------------------------------------------------
def _db_state(url: str) -> dict[str, Any]:
    import sqlalchemy as sa

    from csbs.catalog import make_engine
    from csbs.schema import SCHEMA_HEAD, current_revision

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
    except sa.exc.OperationalError as exc:
        ui.fail(f"cannot open the catalog at {_safe_url(url)}: {exc.orig}")
    finally:
        engine.dispose()
    return {
        "url": _safe_url(url),
        "revision": rev,
        "head": SCHEMA_HEAD,
        "current": rev == SCHEMA_HEAD,
    }


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """Show the catalog's schema revision and the newest one (changes nothing)."""
    state = _db_state(ui.settings().effective_database_url)
    ui.emit(
        state,
        as_json,
        lambda: ui.console.print(
            f"{state['url']}: revision {state['revision'] or 'none (empty)'}, newest "
            f"{state['head']}" + ("" if state["current"] else " (run csbs db upgrade)"),
            highlight=False,
        ),
    )


@db_app.command("upgrade")
def db_upgrade(as_json: JsonOpt = False) -> None:
    """Migrate the catalog to the newest schema (every csbs process also does this when it
    opens the catalog; this does it now, and says what it did)."""
    from csbs.catalog import make_engine
    from csbs.schema import upgrade_catalog

    url = ui.settings().effective_database_url
    engine = make_engine(url)
    try:
        before = upgrade_catalog(engine)
    finally:
        engine.dispose()
    state = {**_db_state(url), "before": before}
    ui.emit(
        state,
        as_json,
        lambda: ui.console.print(
            f"{state['url']}: {state['before'] or 'empty'} -> {state['revision']}", highlight=False
        ),
    )


# -- REST API --------------------------------------------------------------------------------
@api_app.command("serve")
def api_serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless proxied).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
) -> None:
    """Serve the REST API (OpenAPI at /openapi.json, docs at /docs) until interrupted."""
    import uvicorn

    from starter.api import create_app

    uvicorn.run(create_app(ui.settings()), host=host, port=port, log_level="info")


# -- dev: driver servers ---------------------------------------------------------------------
@app.command("doctor")
def doctor(as_json: JsonOpt = False) -> None:
    """Check Temporal (search attributes, a worker), S3, the catalog and the hypervisor,
    and say what is wrong. Exits 1 when a check fails; changes nothing."""
    from starter.doctor import run_checks

    checks = asyncio.run(run_checks(ui.settings()))

    def render() -> None:
        for c in checks:
            mark = ("ok  ", "green") if c.ok else ("FAIL", "red")
            ui.console.print(Text.assemble(mark, f" {c.name:18} {c.detail}"), highlight=False)

    ui.emit([c.as_dict() for c in checks], as_json, render)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@dev_app.command("up")
def dev_up(
    demo: Annotated[bool, typer.Option(help="Create the demo server if missing.")] = True,
    api_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the REST API and the console.")
    ] = 8080,
) -> None:
    """Start the embedded stack: Temporal dev server + Web UI, SeaweedFS S3, worker, the
    API with the console, and the demo server; print the console's URL and a token."""
    from starter import stack

    stack.up(ui.settings(), demo=demo, api_port=api_port)


@dev_app.command("down")
def dev_down() -> None:
    """Stop everything ``csbs dev up`` started (state under var/ stays)."""
    from starter import stack

    stack.down(ui.settings())


def main() -> None:
    """Run the CLI, then leave without interpreter teardown: the Temporal SDK's threads can
    abort a normal exit ("PyGILState_Release", sdk-python #300)."""
    from csbs.telemetry import TelemetryConfigError, setup_tracing, shutdown_tracing

    code: int = 0
    try:
        setup_tracing("csbs-api" if sys.argv[1:3] == ["api", "serve"] else "csbs-cli")
        app()
    except TelemetryConfigError as exc:
        ui.say("error:", "red", str(exc))
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    shutdown_tracing()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
