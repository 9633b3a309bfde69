"""The tenant console's pages (issue 16), as in the guide's chapter 3: backups (3.1),
policies (3.2), task status (3.3) and the servers, on the same façade as the CLI and the
REST API. Every change goes through a façade method, so it is checked by the same rules
and written to the operation log; every page shows only the signed-in token's project.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import ValidationError

from csbs.auth import TooManyAttempts, Unauthorized
from csbs.catalog import backup_json, task_json
from csbs.errors import CsbsError, NotFound
from csbs.model import BackupStatus, RestoreServerInput, TaskKind, TaskStatus
from csbs.policy import PolicySpec
from csbs.rules import BackupQuery
from starter.api_models import _validation_errors
from starter.console import i18n
from starter.console.web import (
    LOGIN_CSRF_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    Visitor,
    back,
    checked_form,
    language,
    listed,
    render,
    safe_next,
    sessions,
    visitor,
)
from starter.facade import backup_filter

router = APIRouter(include_in_schema=False)
VisitorDep = Annotated[Visitor, Depends(visitor)]

#: Rows on a page of the console's lists.
PAGE_ROWS = 25
#: The guide's search fields of the backup list (3.1.1 c).
SEARCH_FIELDS = ("server_name", "server_id", "name", "server_type", "id")
STATUSES = [s.value for s in BackupStatus]
INTERMEDIATE = {BackupStatus.CREATING, BackupStatus.RESTORING, BackupStatus.DELETING}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
KEEP_PRESETS = (30, 90, 180, 365)


def reason(exc: Exception) -> str:
    """The one line a person reads of a refused change."""
    if isinstance(exc, ValidationError):
        return _validation_errors(exc.errors())[0]
    return str(exc) or type(exc).__name__


async def act(
    request: Request,
    who: Visitor,
    role: str,
    action: Callable[[], Awaitable[Any]],
    ok_path: str,
    ok_text: Callable[[i18n.Translator, Any], str],
) -> Response:
    """A change from a button: the role it needs, the form's CSRF value, then the façade
    call; back to ``ok_path`` saying what happened, or why it was refused."""
    who.need(role)
    await checked_form(request, who)
    t = i18n.Translator(who.lang)
    try:
        result = await action()
    except (CsbsError, ValidationError) as exc:
        return back(ok_path, "error", t("common.error", reason=reason(exc)))
    return back(ok_path, "ok", ok_text(t, result))


async def now(fn: Callable[[], Any]) -> Any:
    """A synchronous façade call as an action of :func:`act`."""
    return fn()


def next_link(request: Request, cursor: str | None) -> Any:
    """The URL of a list's next page (None on the last)."""
    return request.url.include_query_params(cursor=cursor) if cursor else None


# -- signing in -----------------------------------------------------------------------------
@router.get("/")
def home() -> Response:
    return RedirectResponse("/backups", status_code=303)


@router.get("/login")
def login_page(request: Request, next: str | None = None, error: str | None = None) -> Response:
    import secrets

    value = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        None,
        status_code=401 if error else 200,
        next=safe_next(next),
        login_csrf=value,
        error=error,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE, value, httponly=True, samesite="strict", path="/login", max_age=3600
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Sign in with a token: a session cookie (HttpOnly, SameSite=Strict) replaces it.
    Failed attempts count against the client like the API's."""
    import hmac

    form = await request.form()
    t = i18n.Translator(language(request))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    given = str(form.get("csrf") or "")
    next_path = safe_next(str(form.get("next") or ""))
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        return login_page(request, next_path, t("login.failed", reason="the form expired"))
    state = request.app.state
    client = request.client.host if request.client else "unknown"
    try:
        state.limiter.check(client)
        try:
            token = state.tokens.authenticate(str(form.get("token") or ""))
        except Unauthorized:
            state.limiter.failed(client)
            raise
    except (Unauthorized, TooManyAttempts) as exc:
        return login_page(request, next_path, t("login.failed", reason=str(exc)))
    secret, _ = sessions(request).open(token)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=int(sessions(request).hours * 3600),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request, who: VisitorDep) -> Response:
    await checked_form(request, who)
    sessions(request).close(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/lang/{code}")
def switch_language(code: str, next: str | None = None) -> Response:
    """The language switch: remembered in a cookie for a year."""
    response = RedirectResponse(safe_next(next), status_code=303)
    if code in i18n.LANGUAGES:
        response.set_cookie(
            i18n.COOKIE, code, max_age=365 * 86400, samesite="strict", path="/", httponly=True
        )
    return response


# -- backups (guide 3.1) --------------------------------------------------------------------
def _backup_query(params: dict[str, str]) -> tuple[BackupQuery, dict[str, str]]:
    """The guide's filters: status, creation time range, and one search field."""
    shown = {k: params.get(k, "") for k in ("status", "since", "until", "field", "q")}
    values: dict[str, Any] = {}
    if shown["status"] in STATUSES:
        values["status"] = shown["status"]
    for key in ("since", "until"):
        if shown[key]:
            values[key] = (
                shown[key]
                if "T" in shown[key]
                else (shown[key] + ("T00:00:00" if key == "since" else "T23:59:59.999999"))
            )
    if shown["q"].strip():
        field = shown["field"] if shown["field"] in SEARCH_FIELDS else "server_name"
        shown["field"] = field
        values[field] = shown["q"].strip()
    return BackupQuery.model_validate(values), shown


@router.get("/backups")
def backups_page(request: Request, who: VisitorDep) -> Response:
    params = dict(request.query_params)
    facade = who.facade
    error = None
    try:
        query, shown = _backup_query(params)
        if query.id:  # a backup id may be given by its unique prefix, as in the CLI
            with contextlib.suppress(CsbsError):
                query = query.model_copy(update={"id": facade.resolve("backup", query.id)})
        page = facade.catalog.backups_page(
            backup_filter(query), PAGE_ROWS, params.get("cursor") or None
        )
    except (CsbsError, ValidationError) as exc:
        error = reason(exc)
        shown = {k: params.get(k, "") for k in ("status", "since", "until", "field", "q")}
        page = facade.catalog.backups_page(None, PAGE_ROWS, None)
    ids = [r.id for r in page.items]
    disks = facade.catalog.disk_backups_of(ids)
    tasks = facade.catalog.tasks_of(ids)
    rows = [
        {
            **backup_json(r, disks[r.id]),
            "tasks": [task_json(x) for x in tasks[r.id]],
            "live": r.status in INTERMEDIATE,
        }
        for r in page.items
    ]
    return render(
        request,
        "backups.html",
        who,
        rows=rows,
        shown=shown,
        statuses=STATUSES,
        fields=SEARCH_FIELDS,
        next_url=next_link(request, page.next_cursor),
        first_url=request.url.remove_query_params("cursor") if params.get("cursor") else None,
        error=error,
        status_code=422 if error else 200,
    )


@router.get("/console/progress")
def progress(request: Request, ids: str = "") -> Response:
    """Status and progress of the listed backups, for the page's live progress bars."""
    found = sessions(request).find(request.cookies.get(SESSION_COOKIE))
    if found is None:
        return JSONResponse({"detail": "sign in again"}, status_code=401)
    _, token = found
    facade = request.app.state.facade_for(token.project)
    t = i18n.Translator(language(request))
    answer: dict[str, Any] = {}
    for backup_id in ids.split(",")[: PAGE_ROWS * 2]:
        row = facade.catalog.find_backup(backup_id.strip())
        if row is not None:  # another project's backups are not there
            answer[row.id] = {
                "status": row.status,
                "label": t(f"status.{row.status}"),
                "progress": row.progress,
                "live": row.status in INTERMEDIATE,
            }
    response = JSONResponse(answer)
    response.headers.update(SECURITY_HEADERS)
    return response


def _restore_form(who: Visitor, backup_id: str) -> dict[str, Any]:
    """What the restore dialog offers (R4): each backed-up disk, and the server's disks it
    may go onto (its own by default; never a data disk onto the system disk, never onto a
    smaller disk)."""
    facade = who.facade
    backup = facade.backup_view(backup_id)
    server = facade.driver.get_server(backup["server_id"])
    choices = []
    for disk in backup["disks"]:
        targets = [
            d
            for d in server.disks
            if d.id == disk["disk_id"]
            or (
                d.size_bytes >= disk["size_bytes"]
                and not (disk["role"] == "data" and d.role.value == "system")
            )
        ]
        own = next((d.id for d in server.disks if d.id == disk["disk_id"]), None)
        if own is None and len(backup["disks"]) == 1 and len(server.disks) == 1:
            own = server.disks[0].id  # guide 3.1.2: one disk goes onto the one disk
        choices.append({"disk": disk, "targets": targets, "default": own or ""})
    return {"backup": backup, "server": server, "choices": choices}


@router.get("/backups/{backup_id}/restore")
def restore_dialog(request: Request, backup_id: str, who: VisitorDep) -> Response:
    who.need("operator")
    try:
        form = _restore_form(who, backup_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    return render(request, "restore.html", who, **form, error=None, posted=None, chosen=None)


@router.post("/backups/{backup_id}/restore")
async def restore(request: Request, backup_id: str, who: VisitorDep) -> Response:
    who.need("operator")
    data = await checked_form(request, who)
    t = i18n.Translator(who.lang)
    try:
        form = _restore_form(who, backup_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    chosen = listed(data, "disk")
    all_disks = [c["disk"]["disk_id"] for c in form["choices"]]
    mapping = {}
    for disk_id in chosen:
        target = str(data.get(f"target_{disk_id}") or "")
        if target and target != disk_id:
            mapping[disk_id] = target
    try:
        if not chosen:
            raise ValueError(t("restore.none_chosen"))
        inp = RestoreServerInput(
            backup_id=backup_id,
            disk_mapping=mapping,
            power_on=data.get("power_on") == "on",
            disk_ids=[] if sorted(chosen) == sorted(all_disks) else chosen,
        )
        await who.facade.restore(inp)
    except (CsbsError, ValidationError, ValueError) as exc:
        return render(
            request, "restore.html", who, 422, **form, error=reason(exc), posted=data, chosen=chosen
        )
    return back("/backups", "ok", t("restore.started", id=backup_id))


@router.get("/backups/{backup_id}/delete")
def delete_dialog(request: Request, backup_id: str, who: VisitorDep) -> Response:
    who.need("admin")
    try:
        backup = who.facade.backup_view(backup_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    return render(request, "confirm_delete.html", who, backup=backup)


@router.post("/backups/{backup_id}/delete")
async def delete_backup(request: Request, backup_id: str, who: VisitorDep) -> Response:
    return await act(
        request, who, "admin", lambda: who.facade.delete_backups([backup_id]), "/backups",
        lambda t, _: t("backups.deleting", id=backup_id),
    )  # fmt: skip


@router.post("/backups/{backup_id}/verify")
async def verify_backup(request: Request, backup_id: str, who: VisitorDep) -> Response:
    return await act(
        request, who, "operator", lambda: who.facade.verify(backup_id), "/backups",
        lambda t, _: t("backups.verify_started", id=backup_id),
    )  # fmt: skip


# -- servers --------------------------------------------------------------------------------
def _policy_of_servers(who: Visitor) -> dict[str, dict[str, Any]]:
    return {s: p for p in who.facade.policy_views() for s in p["server_ids"]}


@router.get("/servers")
def servers_page(request: Request, who: VisitorDep) -> Response:
    page = who.facade.servers_page(PAGE_ROWS, request.query_params.get("cursor") or None)
    return render(
        request,
        "servers.html",
        who,
        servers=page.items,
        policy_of=_policy_of_servers(who),
        next_url=next_link(request, page.next_cursor),
    )


@router.post("/servers/{server_id}/backup")
async def back_up_now(request: Request, server_id: str, who: VisitorDep) -> Response:
    return await act(
        request, who, "operator", lambda: who.facade.create_backups([server_id]), "/backups",
        lambda t, ids: t("backups.started", id=", ".join(ids)),
    )  # fmt: skip


# -- policies (guide 3.2) -------------------------------------------------------------------
async def _next_runs(who: Visitor, policy: dict[str, Any]) -> list[str]:
    """The policy's next run times from its Temporal Schedule, in its own time zone."""
    try:
        runs = await who.facade.next_runs(policy["id"])
    except Exception:  # Temporal unreachable or no schedule: the page still shows
        return []
    zone = ZoneInfo(policy.get("timezone") or "UTC")
    return [datetime.fromisoformat(r).astimezone(zone).strftime("%Y-%m-%d %H:%M") for r in runs[:3]]


@router.get("/policies")
async def policies_page(request: Request, who: VisitorDep) -> Response:
    policies = who.facade.policy_views()
    for p in policies:
        p["next"] = await _next_runs(who, p)
    return render(request, "policies.html", who, policies=policies)


def _spec_from_form(data: dict[str, Any]) -> dict[str, Any]:
    """A policy as the form sets it (guide 3.2.1), for PolicySpec to validate."""
    spec: dict[str, Any] = {
        "name": str(data.get("name", "")).strip(),
        "enabled": data.get("enabled") == "on",
        "times": [x.strip() for x in str(data.get("times", "")).split(",") if x.strip()],
        "timezone": str(data.get("timezone") or "UTC").strip(),
        "retention": str(data.get("retention") or "days"),
        "replicate": data.get("replicate") == "on",
    }
    if data.get("period") == "week":
        spec["weekdays"] = listed(data, "weekdays")
        spec["every_days"] = None
    else:
        spec["every_days"] = _int(data.get("every_days"), "every_days")
        spec["weekdays"] = None
    if spec["retention"] == "days":
        preset = str(data.get("keep_preset") or "")
        spec["retention_value"] = _int(
            data.get("keep_days") if preset == "custom" else preset, "retention_value"
        )
    elif spec["retention"] == "count":
        spec["retention_value"] = _int(data.get("keep_count"), "retention_value")
    else:
        spec["retention_value"] = None
    lock = str(data.get("lock_days") or "").strip()
    spec["lock_days"] = _int(lock, "lock_days") if lock else None
    return spec


def _int(value: Any, field: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{field}: must be a whole number, got {value!r}") from None


def _policy_form(
    request: Request,
    who: Visitor,
    policy: dict[str, Any],
    action: str,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    return render(
        request,
        "policy_form.html",
        who,
        status_code,
        policy=policy,
        action=action,
        error=error,
        weekdays=WEEKDAYS,
        presets=KEEP_PRESETS,
        replica=who.facade.settings.has_replica,
    )


@router.get("/policies/new")
def new_policy(request: Request, who: VisitorDep) -> Response:
    who.need("admin")
    defaults = PolicySpec().model_dump(mode="json")  # the guide's defaults (3.2.1)
    return _policy_form(request, who, defaults, "/policies/new")


@router.post("/policies/new")
async def create_policy(request: Request, who: VisitorDep) -> Response:
    who.need("admin")
    data = await checked_form(request, who)
    t = i18n.Translator(who.lang)
    try:
        spec = _spec_from_form(data)
        made = await who.facade.create_policy(PolicySpec.model_validate(spec))
    except (CsbsError, ValidationError, ValueError) as exc:
        shown = {**PolicySpec().model_dump(mode="json"), **_safe_spec(data)}
        return _policy_form(request, who, shown, "/policies/new", reason(exc), 422)
    return back("/policies", "ok", t("policies.created", name=made["name"]))


def _safe_spec(data: dict[str, Any]) -> dict[str, Any]:
    """What was typed, to show the form again after a refusal."""
    try:
        return _spec_from_form(data)
    except ValueError:
        return {"name": data.get("name", "")}


@router.get("/policies/{policy_id}/edit")
def edit_policy(request: Request, policy_id: str, who: VisitorDep) -> Response:
    who.need("admin")
    try:
        policy = who.facade.policies.view(policy_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    return _policy_form(request, who, policy, f"/policies/{policy_id}/edit")


@router.post("/policies/{policy_id}/edit")
async def save_policy(request: Request, policy_id: str, who: VisitorDep) -> Response:
    who.need("admin")
    data = await checked_form(request, who)
    t = i18n.Translator(who.lang)
    try:
        spec = _spec_from_form(data)
        saved = await who.facade.update_policy(policy_id, spec)
    except (CsbsError, ValidationError, ValueError) as exc:
        shown = {"id": policy_id, **_safe_spec(data)}
        return _policy_form(request, who, shown, f"/policies/{policy_id}/edit", reason(exc), 422)
    return back("/policies", "ok", t("policies.saved", name=saved["name"]))


def _policy_name(who: Visitor, policy_id: str) -> str:
    try:
        return str(who.facade.policies.view(policy_id)["name"])
    except CsbsError:
        return policy_id


@router.get("/policies/{policy_id}/delete")
def delete_policy_dialog(request: Request, policy_id: str, who: VisitorDep) -> Response:
    who.need("admin")
    try:
        policy = who.facade.policies.view(policy_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    return render(request, "confirm_policy_delete.html", who, policy=policy)


@router.get("/policies/{policy_id}/servers")
def bind_dialog(request: Request, policy_id: str, who: VisitorDep) -> Response:
    who.need("admin")
    try:
        policy = who.facade.policies.view(policy_id)
    except NotFound as exc:
        return render(request, "message.html", who, 404, text=str(exc))
    return render(
        request,
        "bind.html",
        who,
        policy=policy,
        servers=who.facade.servers(),
        policy_of=_policy_of_servers(who),
        error=None,
    )


@router.post("/policies/{policy_id}/servers")
async def bind(request: Request, policy_id: str, who: VisitorDep) -> Response:
    """Bind the checked servers and unbind the others (guide 3.2.6, 3.2.7)."""
    who.need("admin")
    data = await checked_form(request, who)
    t = i18n.Translator(who.lang)
    facade = who.facade
    try:
        policy = facade.policies.view(policy_id)
        wanted = listed(data, "server_ids")
        now = set(policy["server_ids"])
        gone = [s for s in policy["server_ids"] if s not in wanted]
        new = [s for s in wanted if s not in now]
        if len(set(wanted)) > 64:
            raise ValueError(
                f"server_ids: a policy binds at most 64 servers, {len(set(wanted))} chosen"
            )
        if gone:
            facade.unbind(policy_id, gone)
        try:
            after = facade.bind(policy_id, new) if new else wanted
        except CsbsError:
            if gone:  # nothing changes when a bind is refused
                facade.bind(policy_id, gone)
            raise
    except (CsbsError, ValidationError, ValueError) as exc:
        return render(
            request,
            "bind.html",
            who,
            422,
            policy=facade.policies.view(policy_id),
            servers=facade.servers(),
            policy_of=_policy_of_servers(who),
            error=reason(exc),
        )
    return back("/policies", "ok", t("bind.saved", name=policy["name"], count=len(after)))


@router.post("/policies/{policy_id}/{switch}")
async def switch_policy(request: Request, policy_id: str, switch: str, who: VisitorDep) -> Response:
    """Enable, disable, run now (立即备份) or delete a policy (registered after the
    other policy routes, which it would otherwise shadow)."""
    facade = who.facade
    name = _policy_name(who, policy_id)
    if switch == "run":
        return await act(
            request, who, "operator", lambda: facade.run_policy(policy_id), "/policies",
            lambda t, _: t("policies.run_started", name=name),
        )  # fmt: skip
    if switch == "delete":
        return await act(
            request, who, "admin", lambda: facade.delete_policy(policy_id), "/policies",
            lambda t, _: t("policies.deleted", name=name),
        )  # fmt: skip
    if switch in ("enable", "disable"):
        return await act(
            request, who, "admin",
            lambda: facade.set_policy_enabled(policy_id, switch == "enable"), "/policies",
            lambda t, view: t("policies.saved", name=view["name"]),
        )  # fmt: skip
    return render(request, "message.html", who, 404, text=f"no such action: {switch}")


# -- tasks (guide 3.3) ----------------------------------------------------------------------
@router.get("/tasks")
def tasks_page(
    request: Request,
    who: VisitorDep,
    kind: str = "",
    status: str = "",
    cursor: str | None = None,
) -> Response:
    kinds = [k.value for k in TaskKind]
    statuses = [s.value for s in TaskStatus]
    error = None
    try:
        page = who.facade.tasks_page(
            TaskKind(kind) if kind in kinds else None,
            TaskStatus(status) if status in statuses else None,
            limit=PAGE_ROWS,
            cursor=cursor or None,
        )
    except CsbsError as exc:
        error = str(exc)
        page = who.facade.tasks_page(limit=PAGE_ROWS)
    return render(
        request,
        "tasks.html",
        who,
        422 if error else 200,
        tasks=page.items,
        kinds=kinds,
        statuses=statuses,
        kind=kind,
        status=status,
        next_url=next_link(request, page.next_cursor),
        error=error,
    )


@router.post("/tasks/{task_id}/delete")
async def delete_task(request: Request, task_id: str, who: VisitorDep) -> Response:
    return await act(
        request, who, "admin", lambda: now(lambda: who.facade.delete_tasks([task_id])), "/tasks",
        lambda t, ids: t("tasks.deleted", count=len(ids)),
    )  # fmt: skip


@router.post("/tasks:delete-failed")
async def delete_failed_tasks(request: Request, who: VisitorDep) -> Response:
    return await act(
        request, who, "admin", lambda: now(lambda: who.facade.delete_tasks(None, all_failed=True)),
        "/tasks?status=failed", lambda t, ids: t("tasks.deleted", count=len(ids)),
    )  # fmt: skip
