"""What every console page shares: the signed-in visitor (session cookie, token, role,
project, language), rendering with the security headers, CSRF checks, roles, and the
one-line messages a page shows after a change ("flash").

The console is server-rendered (FastAPI + Jinja2) with one small script for live progress
and local times: it installs with the Python package, needs no Node toolchain and no CDN,
and every page works from the keyboard and without the script.
"""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from csbs.audit import ACTOR
from csbs.auth import Role, Sessions
from csbs.catalog.rows import ApiTokenRow, ConsoleSessionRow
from csbs.units import format_size
from starter.console import i18n
from starter.facade import Facade

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "csbs_session"
LOGIN_CSRF_COOKIE = "csbs_login_csrf"
FLASH_COOKIE = "csbs_flash"

#: No script, style or frame from anywhere but the console itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(value: str | None) -> str:
    """An ISO time as the page shows it before the script makes it local: UTC, to the
    minute."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["when"] = _when
templates.env.filters["size"] = format_size
templates.env.globals["languages"] = i18n.LANGUAGES


class LoginRequired(Exception):
    """No valid session: the page sends the browser to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class PageForbidden(Exception):
    """The visitor's role may not do this (a 403 page); ``need`` None: the form did not
    carry the session's CSRF value."""

    def __init__(self, need: Role | None) -> None:
        super().__init__(need.name if need else "csrf")
        self.need = need


@dataclass
class Visitor:
    """Who is looking: their session, their token (project, role) and language."""

    token: ApiTokenRow
    session: ConsoleSessionRow
    facade: Facade
    lang: str

    @property
    def role(self) -> Role:
        return Role.parse(self.token.role)

    def can(self, name: str) -> bool:
        """Whether the visitor's role is at least ``name`` (viewer, operator, admin)."""
        return self.role >= Role[name]

    def need(self, name: str) -> None:
        if not self.can(name):
            raise PageForbidden(Role[name])


def language(request: Request) -> str:
    return i18n.choose(request.cookies.get(i18n.COOKIE), request.headers.get("accept-language"))


def sessions(request: Request) -> Sessions:
    state = request.app.state
    found: Sessions = state.sessions
    return found


async def visitor(request: Request) -> Visitor:
    """The signed-in visitor (else the sign-in page). An async dependency, so that the
    operation log names the token for every change the page makes."""
    found = sessions(request).find(request.cookies.get(SESSION_COOKIE))
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    session, token = found
    ACTOR.set(f"console, token {token.name} ({token.id})")
    facade: Facade = request.app.state.facade_for(token.project)
    return Visitor(token, session, facade, language(request))


async def checked_form(request: Request, who: Visitor) -> dict[str, Any]:
    """The posted form, once its CSRF value matches the session's (else 403): a page of
    another site cannot make a signed-in browser change anything."""
    form = await request.form()
    given = str(form.get("csrf") or "")
    if not hmac.compare_digest(given.encode(), who.session.csrf.encode()):
        raise PageForbidden(None)
    data: dict[str, Any] = {}
    for key in form:
        values = form.getlist(key)
        data[key] = values if len(values) > 1 else values[0]
    return data


def listed(data: dict[str, Any], key: str) -> list[str]:
    """A form field that may be given several times, as a list."""
    value = data.get(key)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def flash(response: Response, kind: str, text: str) -> Response:
    """A message for the next page the browser shows (``ok`` or ``error``)."""
    raw = json.dumps({"kind": kind, "text": text[:1000]}, ensure_ascii=False).encode()
    response.set_cookie(
        FLASH_COOKIE,
        base64.urlsafe_b64encode(raw).decode(),
        max_age=60,
        httponly=True,
        samesite="strict",
        path="/",
    )
    return response


def take_flash(request: Request) -> dict[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") not in ("ok", "error"):
        return None
    return {"kind": str(doc["kind"]), "text": str(doc.get("text", ""))}


def back(path: str, kind: str, text: str) -> Response:
    """Redirect after a change (303: the browser then GETs the page) with its message."""
    return flash(RedirectResponse(path, status_code=303), kind, text)


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a path of this site only."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/backups"
    return path


def render(
    request: Request,
    template: str,
    who: Visitor | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page in the visitor's language, with the security headers."""
    lang = who.lang if who else language(request)
    t = i18n.Translator(lang)
    message = take_flash(request)
    ui = who.facade.settings.temporal_ui() if who and who.can("admin") else None
    namespace = who.facade.settings.namespace if who else ""
    response = templates.TemplateResponse(
        request,
        template,
        {
            "t": t,
            "lang": t.lang,
            "who": who,
            "flash": message,
            "csrf": who.session.csrf if who else "",
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            "temporal": (
                (lambda wid: f"{ui}/namespaces/{namespace}/workflows/{quote(wid, safe='')}")
                if ui
                else None
            ),
            **context,
        },
        status_code=status_code,
    )
    response.headers.update(SECURITY_HEADERS)
    if message is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response
