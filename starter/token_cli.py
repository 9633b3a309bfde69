"""``csbs token create|list|revoke``: API tokens of the REST API and the console
(issue 16). The token is printed once; the catalog keeps only its hash."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from csbs.audit import AuditLog
from csbs.auth import Role, Tokens, parse_expires
from csbs.catalog import Catalog
from csbs.catalog.rows import ApiTokenRow
from starter import cli_common as cli
from starter.cli_common import JsonOpt

token_app = typer.Typer(no_args_is_help=True, help="API tokens: who may call the API and console.")


def _tokens() -> tuple[Tokens, Catalog]:
    s = cli.settings()
    catalog = Catalog(s.effective_database_url, s.project)
    return Tokens(catalog), catalog


def _log(catalog: Catalog, project: str, action: str, row: ApiTokenRow) -> None:
    """Token changes go to the operation log of the token's project."""
    AuditLog(catalog).record(action, f"{row.id} ({row.role}, {row.name})", True, project=project)


def _json(row: ApiTokenRow) -> dict[str, Any]:
    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "project": row.project,
        "name": row.name,
        "role": row.role,
        "created_at": when(row.created_at),
        "expires_at": when(row.expires_at),
        "revoked_at": when(row.revoked_at),
        "last_used_at": when(row.last_used_at),
    }


@token_app.command("create")
def token_create(
    role: Annotated[
        str,
        typer.Option(
            help="viewer (read), operator (also back up, restore, verify), admin (everything)."
        ),
    ],
    project: Annotated[
        str | None, typer.Option(help="The project it acts in; default the global --project.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Who or what holds it.")] = None,
    expires: Annotated[
        str, typer.Option(help="How long it lives: 90d, 12h, 30m, or never.")
    ] = "90d",
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it, once: only its hash is kept."""
    tokens, catalog = _tokens()
    try:
        proj = project or cli.settings().project
        row, token = cli.guarded(
            lambda: tokens.create(
                proj, Role.parse(role), name or f"{role}@{proj}", parse_expires(expires)
            )
        )
        _log(catalog, proj, "token.create", row)
    finally:
        catalog.dispose()
    out = {**_json(row), "token": token}
    cli.emit(
        out,
        as_json,
        lambda: cli.console.print(
            f"token {row.id} ({row.role} of project {row.project}, "
            f"{'expires ' + out['expires_at'] if row.expires_at else 'never expires'}):\n"
            f"{token}\nIt is shown only now: keep it safe.",
            highlight=False,
            soft_wrap=True,
        ),
    )


@token_app.command("list")
def token_list(
    project: Annotated[str | None, typer.Option(help="Only this project's tokens.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every token (never its secret): project, role, expiry, last use, revocation."""
    tokens, catalog = _tokens()
    try:
        rows = tokens.list(project)
    finally:
        catalog.dispose()
    data = [_json(r) for r in rows]

    def table() -> None:
        t = Table("id", "project", "role", "name", "expires", "last used", "revoked")
        for r in data:
            t.add_row(
                r["id"], r["project"], r["role"], r["name"],
                cli.local_time(r["expires_at"]) or "never",
                cli.local_time(r["last_used_at"]) or "-",
                cli.local_time(r["revoked_at"]) or "-",
            )  # fmt: skip
        cli.console.print(t)

    cli.emit(data, as_json, table)


@token_app.command("revoke")
def token_revoke(token_id: str, as_json: JsonOpt = False) -> None:
    """Revoke a token: every request with it is refused from now on."""
    tokens, catalog = _tokens()
    try:
        row = cli.guarded(lambda: tokens.revoke(token_id))
        _log(catalog, row.project, "token.revoke", row)
    finally:
        catalog.dispose()
    cli.emit(
        _json(row), as_json, lambda: cli.console.print(f"token {row.id} revoked", highlight=False)
    )
