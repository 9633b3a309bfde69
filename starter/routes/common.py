"""What every router shares: the façade as a dependency, and request references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request

from csbs.errors import InvalidInput, NotFound
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
