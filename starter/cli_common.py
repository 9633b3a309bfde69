"""What every ``csbs`` command shares: output (never markup), errors as one line, settings,
the dev driver and the façade, waiting with progress. No command lives here."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from csbs import ids as id_prefix
from csbs.config import Settings
from csbs.drivers import DevServers, make_dev_servers
from csbs.errors import CsbsError
from csbs.model import (
    Server,
)
from csbs.paging import Page
from csbs.units import format_size
from starter.facade import Facade, workflow_error

#: Output never interprets markup: names, descriptions and reasons are user text, and
#: "[/x]" must print as it is, never crash or restyle the output. Colour comes from
#: ``Text`` styles instead (see ``say``).
console = Console(markup=False)


err_console = Console(stderr=True, markup=False)


def say(label: str, style: str, message: str, to: Console | None = None) -> None:
    """Print ``label: message`` with the label coloured and the message literal."""
    (to or err_console).print(
        Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True
    )


T = TypeVar("T")


#: Rows a list shows in a table unless --limit says otherwise (issue 16).
TABLE_ROWS = 100
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        min=1,
        help=f"At most this many rows, newest first (default: {TABLE_ROWS} in a table, all "
        "with --json).",
    ),
]


def rows_for(limit: int | None, as_json: bool) -> int | None:
    """How many rows a list command reads: ``--limit``, else a table's 100 or all JSON."""
    if limit is not None:
        return limit
    return None if as_json else TABLE_ROWS


def note_more(page: Page[Any], as_json: bool) -> None:
    """Say on stderr that a table shows only the first rows (JSON stays just the rows)."""
    if page.next_cursor is not None and not as_json:
        err_console.print(
            f"(the first {len(page.items)} rows; see more with --limit N, or all with --json)"
        )


WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until it finishes, with progress.")]


YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line and exit non-zero."""
    say("error:", "red", message)
    raise typer.Exit(code)


#: What the command line chose over the environment (``--project``); set once by the
#: app's callback, read by ``settings()``.
overrides: dict[str, Any] = {}


def settings() -> Settings:
    """The settings from the environment, with what the command line chose over it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        fail(_validation_message(exc))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def dev_servers(s: Settings) -> DevServers:
    """The driver's dev servers (``csbs dev``), or one line saying why there are none."""
    return guarded(lambda: make_dev_servers(s))


_facades: dict[str, Facade] = {}


def facade(s: Settings) -> Facade:
    """The façade of the settings' project (one per command: the id resolvers and the
    command share it)."""
    if s.project not in _facades:
        _facades[s.project] = Facade(s)
    return _facades[s.project]


def _resolver(kind: str) -> Callable[[Any], Any]:
    """A typer callback that turns a typed id, or a unique prefix of one (at least the
    shown 8 characters, as in the tables), into the whole id (issue 16)."""

    def resolve(value: Any) -> Any:
        if value is None or (isinstance(value, list) and not value):
            return value
        f = facade(settings())
        if isinstance(value, list):
            return [guarded(lambda v=v: f.resolve(kind, v)) for v in value]  # type: ignore[misc]
        return guarded(lambda: f.resolve(kind, value))

    return resolve


BackupId = Annotated[
    str, typer.Argument(callback=_resolver("backup"), help="A backup id, or a unique prefix.")
]
BackupIds = Annotated[
    list[str],
    typer.Argument(callback=_resolver("backup"), help="Backup ids, or unique prefixes."),
]
PolicyId = Annotated[
    str, typer.Argument(callback=_resolver("policy"), help="A policy id, or a unique prefix.")
]
ServerIds = Annotated[
    list[str],
    typer.Argument(callback=_resolver("server"), help="Server ids, or unique prefixes."),
]
TaskId = Annotated[
    str, typer.Argument(callback=_resolver("task"), help="A task id, or a unique prefix.")
]


async def guarded_async(coro: Awaitable[T]) -> T:
    """Await an operation, turning domain errors into one line and a non-zero exit."""
    try:
        return await coro
    except CsbsError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(_validation_message(exc))


def keep_whole(table: Table, column: int, values: Any) -> None:
    """Never cut the cells of a column (ids): narrow terminals squeeze the others."""
    col = table.columns[column]
    col.no_wrap = True
    col.min_width = max((len(str(v)) for v in values), default=0) or None


def local_time(value: str | None) -> str | None:
    """An ISO time as tables show it: in the local time zone, to the minute."""
    if not value:
        return None
    from datetime import UTC, datetime

    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def say_lines(lines: list[str]) -> None:
    """Print a readable summary, a line each (never markup, never highlighted)."""
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def emit(data: Any, as_json: bool, render: Callable[[], None] | None = None) -> None:
    if as_json or render is None:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        render()


def run_async(coro: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await coro

    try:
        return asyncio.run(wrapped())
    except RuntimeError as exc:
        if "Failed client connect" in str(exc) or "connection" in str(exc).lower():
            fail(f"cannot reach Temporal at {settings().temporal_address}: {exc}")
        raise


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body, turning domain errors into one line and a non-zero exit."""
    try:
        return fn()
    except CsbsError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(_validation_message(exc))
    except ValueError as exc:
        fail(str(exc))


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question} needs confirmation: pass --yes")
    if not typer.confirm(question):
        fail("cancelled", code=2)


def _progress_bar(label: str, get: Callable[[], tuple[int, bool]], interval: float = 0.5) -> None:
    """Show a progress bar fed by ``get() -> (percent, finished)`` until finished."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=100)
        while True:
            pct, finished = get()
            bar.update(task, completed=pct)
            if finished:
                return
            time.sleep(interval)


# -- servers --------------------------------------------------------------------------------
def _server_table(servers: list[Server]) -> None:
    table = Table("id", "name", "host", "type", "state", "disks")
    short = id_prefix.short_ids(s.id for s in servers)
    keep_whole(table, 0, short.values())
    for s in servers:
        disks = ", ".join(
            f"{d.id} ({d.role.value}{', shared' if d.shared else ''}, {format_size(d.size_bytes)}"
            f"{', not backed up: ' + d.unsupported if d.unsupported else ''})"
            for d in s.disks
        )
        table.add_row(short[s.id], s.name, s.host, s.type, s.state.value, disks)
    console.print(table)


def _server_json(s: Server) -> dict[str, Any]:
    return s.model_dump(mode="json", exclude={"project"})


def _task_table(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "kind", "status", "backup", "server", "started", "finished", "reason")
    short = facade(settings()).short_ids("task")
    keep_whole(table, 0, [short.get(t["id"], t["id"]) for t in rows])
    for t in rows:
        table.add_row(
            short.get(t["id"], t["id"]),
            t["kind"],
            t["status"],
            t["backup_name"] or t["backup_id"] or "",
            t["server_name"] or t["server_id"] or "",
            local_time(t["started_at"]) or "",
            local_time(t["finished_at"]) or "",
            t["reason"] or "",
        )
    console.print(table)


__all__ = ["workflow_error"]
