"""The csbs REST API (FastAPI) for services that don't speak Temporal.

The same operations as the CLI, on the same core: workflows are started through Temporal
with the same ids, search attributes and summaries, and records come from the catalog.
The tenant console (``starter.console``) is served at ``/`` by the same app. Errors are
RFC 9457 problem documents (``application/problem+json``) whose ``detail`` is
the one line the CLI would print. Run it with ``csbs api serve``. Every ``/v1`` route
but ``/v1/health`` needs ``Authorization: Bearer <token>`` (``csbs token create``): the
token decides the project and the role (``csbs.auth``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from csbs.auth import LoginLimiter, Tokens, TooManyAttempts, Unauthorized
from csbs.config import Settings
from csbs.errors import CsbsError
from starter.api_models import (
    STATUS,
    _allowed,
    _problem_media_type,
    _validation_errors,
    problem,
)
from starter.console import install as install_console
from starter.facade import Facade
from starter.routes import ROUTERS

log = logging.getLogger(__name__)


# -- the application ------------------------------------------------------------------------
def create_app(settings: Settings | None = None, facade: Facade | None = None) -> FastAPI:
    """The API over one project's catalog, driver and Temporal namespace: error handlers
    and the routers of ``starter.routes``, each calling the façade."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:  # connect now, so that the metrics endpoint is up; else at the first request
            await state.client()
        except RuntimeError as exc:
            log.warning("Temporal is not reachable yet: %s", exc)
        yield
        for each in facades.values():
            each.catalog.dispose()

    app = FastAPI(
        title="csbs",
        version="1",
        description="Cloud Server Backup Service: back up and restore whole servers.",
        lifespan=lifespan,
    )
    state = facade or Facade(settings or Settings(), serve_metrics=True)
    app.state.facade = state
    app.state.tokens = Tokens(state.catalog)
    app.state.limiter = LoginLimiter(state.settings.api_failed_logins_per_minute)
    facades: dict[str, Facade] = {state.settings.project: state}
    facades_lock = threading.Lock()

    def facade_for(project: str) -> Facade:
        """One façade per project, made on its first request; they share one client."""
        with facades_lock:
            found = facades.get(project)
            if found is None:
                found = Facade(state.settings.for_project(project), client=state._client)
                facades[project] = found
            return found

    app.state.facade_for = facade_for

    @app.exception_handler(CsbsError)
    async def _csbs_error(_: Request, exc: CsbsError) -> JSONResponse:
        name = getattr(exc, "cause_type", None) or exc.type_name
        response = problem(STATUS.get(name, 409), name, str(exc))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="csbs"'
        if isinstance(exc, TooManyAttempts):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ValidationError)
    async def _model_error(_: Request, exc: ValidationError) -> JSONResponse:
        detail, items = _validation_errors(exc.errors())
        return problem(422, "ValidationError", detail, items)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_errors(exc.errors())
        return problem(422, "ValidationError", detail, items)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        title = "NotFound" if exc.status_code == 404 else f"HTTP{exc.status_code}"
        response = problem(exc.status_code, title, detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed(app, request))
        return response

    @app.exception_handler(RuntimeError)
    async def _temporal_down(_: Request, exc: RuntimeError) -> JSONResponse:
        if "connect" in str(exc).lower():
            return problem(
                503, "Unavailable", f"cannot reach Temporal at {state.settings.temporal_address}"
            )
        raise exc

    for router in ROUTERS:
        app.include_router(router)
    _problem_media_type(app)
    install_console(app)
    return app
