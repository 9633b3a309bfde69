"""The tenant console (issue 16): server-rendered pages at ``/`` of ``csbs api serve``.

``install(app)`` adds its pages, its static files and the two answers every page may give
instead of itself: the sign-in page (no valid session) and a 403 page (a role too low).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from csbs.auth import Sessions
from starter.console import i18n
from starter.console.web import HERE, LoginRequired, PageForbidden, language, render


def install(app: FastAPI) -> None:
    """Serve the console from ``app`` (its façades, tokens and limiter are the API's)."""
    from urllib.parse import quote

    from starter.console.pages import router

    state = app.state
    state.sessions = Sessions(state.facade.catalog, state.facade.settings.console_session_hours)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(LoginRequired)
    async def _login(_: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(PageForbidden)
    async def _forbidden(request: Request, exc: PageForbidden) -> Response:
        from starter.console.web import visitor

        t = i18n.Translator(language(request))
        try:
            who = await visitor(request)
        except LoginRequired:
            who = None
        role = t(f"role.{who.token.role}") if who else "-"
        if exc.need is None:
            text = t("common.csrf")
        else:
            text = t("common.forbidden", role=role, need=t(f"role.{exc.need.name}"))
        return render(request, "message.html", who, 403, text=text)
