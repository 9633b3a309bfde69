"""What every router shares: the façade as a dependency, and request references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from csbs.audit import ACTOR
from csbs.auth import Forbidden, Role, Unauthorized
from csbs.catalog.rows import ApiTokenRow
from csbs.errors import InvalidInput, NotFound
from csbs.paging import DEFAULT_LIMIT, MAX_LIMIT, Page
from starter.api_models import PolicyOut, Started, _responses
from starter.facade import Facade, StartFailed

#: Routes that need no token.
OPEN_ROUTES = {("GET", "/v1/health")}
#: Reads only an admin may make.
ADMIN_READS = {("GET", "/v1/audit")}
#: Routes an operator may call (back up, restore, verify, replicate, run a policy now);
#: every other change needs an admin, every read a viewer.
OPERATOR_ROUTES = {
    ("POST", "/v1/backups"),
    ("POST", "/v1/backups/{backup_id}/restore"),
    ("POST", "/v1/backups/{backup_id}/verify"),
    ("POST", "/v1/backups/{backup_id}/replicate"),
    ("POST", "/v1/policies/{policy_id}/run"),
}


def needed_role(method: str, path: str) -> Role | None:
    """The least role a route needs (None: open to all)."""
    if (method, path) in OPEN_ROUTES:
        return None
    if method in ("GET", "HEAD") and (method, path) not in ADMIN_READS:
        return Role.viewer
    return Role.operator if (method, path) in OPERATOR_ROUTES else Role.admin


_bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `csbs token create` (it names its project and role).",
)


def principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiTokenRow:
    """The token the request carries, checked: 401 without a valid one, 429 after too many
    failed attempts from one client, 403 when its role may not call this route."""
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    state = request.app.state
    client = request.client.host if request.client else "unknown"
    state.limiter.check(client)
    if creds is None or creds.scheme.lower() != "bearer":
        raise Unauthorized("a valid API token is required (Authorization: Bearer <token>)")
    try:
        row: ApiTokenRow = state.tokens.authenticate(creds.credentials)
    except Unauthorized:
        state.limiter.failed(client)
        raise
    need = needed_role(request.method, path)
    if need is not None and Role.parse(row.role) < need:
        raise Forbidden(
            f"token {row.id} has role {row.role}; {request.method} {path} needs {need.name}"
        )
    request.state.principal = row
    return row


PrincipalDep = Annotated[ApiTokenRow, Depends(principal)]


async def _facade(request: Request, who: PrincipalDep) -> Facade:
    """The façade of the token's project: a request never chooses its project. The
    operation log names the token as who made this request's changes (an async
    dependency, so that the route runs in the context it sets)."""
    ACTOR.set(f"token {who.name} ({who.id})")
    facade: Facade = request.app.state.facade_for(who.project)
    return facade


#: The façade of the caller's project, as a route parameter (it requires a token).
FacadeDep = Annotated[Facade, Depends(_facade)]


@contextlib.contextmanager
def body_references() -> Iterator[None]:
    """A server, disk or backup named in a request body that does not exist makes the
    request unprocessable (422); 404 is kept for the resource the URL names."""
    try:
        yield
    except NotFound as exc:
        raise InvalidInput(str(exc)) from exc
    except StartFailed as exc:
        if exc.cause_type == "NotFound":
            raise InvalidInput(str(exc)) from exc
        raise


#: A request that starts a workflow: 202 with its id (and task), or why it could not start.
STARTS: dict[str, Any] = {
    "status_code": 202,
    "response_model": Started,
    "responses": _responses(404, 409, 422, 503),
}

#: A request that answers with one policy.
ONE_POLICY: dict[str, Any] = {"response_model": PolicyOut, "responses": _responses(404, 422, 503)}


# -- pages of lists (issue 16) ------------------------------------------------------------
class PageParams:
    """``?limit=&cursor=`` of every list route."""

    def __init__(
        self,
        limit: Annotated[
            int,
            Query(
                ge=1,
                le=MAX_LIMIT,
                description="Rows in the page (the next page's cursor is in the `Link` "
                "and `X-Next-Cursor` headers).",
            ),
        ] = DEFAULT_LIMIT,
        cursor: Annotated[
            str | None,
            Query(
                max_length=1000,
                description="Where the page begins: the `X-Next-Cursor` of the page before.",
            ),
        ] = None,
    ) -> None:
        self.limit = limit
        self.cursor = cursor


PageDep = Annotated[PageParams, Depends()]

#: The headers of a page, in the OpenAPI document.
PAGE_HEADERS = {
    "Link": {
        "description": 'The next page, as `<URL>; rel="next"` (absent on the last page).',
        "schema": {"type": "string"},
    },
    "X-Next-Cursor": {
        "description": "The cursor of the next page (absent on the last page).",
        "schema": {"type": "string"},
    },
}


def paged(request: Request, response: Response, page: Page[Any]) -> list[Any]:
    """The rows of a page, with the next page in the ``Link`` (RFC 8288) and
    ``X-Next-Cursor`` headers: the body stays the JSON array it always was."""
    if page.next_cursor is not None:
        url = request.url.include_query_params(cursor=page.next_cursor)
        response.headers["Link"] = f'<{url}>; rel="next"'
        response.headers["X-Next-Cursor"] = page.next_cursor
    return page.items


def page_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The responses of a list route: its page headers on 200, and ``codes``."""
    responses = _responses(*codes)
    responses[200] = {"headers": PAGE_HEADERS}
    return responses
