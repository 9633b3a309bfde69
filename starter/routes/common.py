"""What every router shares: the façade as a dependency, and request references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request

from csbs.errors import InvalidInput, NotFound
from starter.api_models import PolicyOut, Started, _responses
from starter.facade import Facade, StartFailed


def _facade(request: Request) -> Facade:
    facade: Facade = request.app.state.facade
    return facade


#: The façade of the application's project, as a route parameter.
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
