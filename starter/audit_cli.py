"""``csbs audit list``: the operation log (issue 16)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from csbs.audit import AuditLog
from csbs.errors import InvalidInput
from starter import cli_common as cli
from starter.cli_common import JsonOpt
from starter.routes.audit import audit_json

audit_app = typer.Typer(no_args_is_help=True, help="The operation log: who changed what, when.")


def parse_since(value: str | None) -> datetime | None:
    """``24h``, ``7d``, ``30m`` ago, or an ISO date or time (local time when it has no
    zone)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d{1,5})([dhm])", value.strip())
    if match:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"since must be like 24h, 7d, 30m, 2026-11-01 or 2026-11-01T08:00 (got {value!r})"
        ) from None
    return when if when.tzinfo else when.astimezone()


@audit_app.command("list")
def audit_list(
    since: Annotated[str | None, typer.Option(help="24h, 7d, or a date or time.")] = None,
    limit: cli.LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every change made in the project through the API, the console or the CLI, newest
    first: who, what, on what, when, and how it ended."""
    when = cli.guarded(lambda: parse_since(since))
    facade = cli.facade(cli.settings())
    page = AuditLog(facade.catalog).page(when, cli.rows_for(limit, as_json), None)
    data = [audit_json(r) for r in page.items]

    def table() -> None:
        t = Table("when", "who", "action", "target", "result", "reason")
        for r in data:
            t.add_row(
                cli.local_time(r["at"]), r["actor"], r["action"], r["target"], r["result"],
                r["reason"] or "",
            )  # fmt: skip
        cli.console.print(t)

    cli.emit(data, as_json, table)
    cli.note_more(page, as_json)
