"""The REST API's documents: request and response models, and errors as RFC 9457 problem
details (one line a person can act on, errors by field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator
from starlette.routing import Match

from csbs.catalog.views import BackupDetailView, BackupView, TaskView
from csbs.model import ID_PATTERN
from csbs.naming import NAME_RE
from csbs.policy import RetentionKind

PROBLEM = "application/problem+json"


Id = Annotated[str, Path(pattern=ID_PATTERN, max_length=64, description="An id.")]


BodyId = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=64)]


#: ISO 8601 date or date and time, as ``csbs backup list --since`` takes it.
ISO_TIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"


#: HTTP status of each core error type (also of a workflow's typed ApplicationError).
STATUS = {
    "InvalidInput": 422,
    "ValidationError": 422,
    "NotFound": 404,
    "InvalidState": 409,
    "Conflict": 409,
    "QuotaExceeded": 409,
    "GarbageCollectionRunning": 503,
    "StorageUnavailable": 503,
    "StorageError": 503,
    "DriverError": 503,
    "DiskUnavailable": 409,
    "CorruptData": 409,
    "Unavailable": 503,
    "Unauthorized": 401,
    "Forbidden": 403,
    "TooManyAttempts": 429,
}


#: Request bodies refuse unknown fields.
REQUEST = ConfigDict(extra="forbid")

#: Numbers and flags of a request body take only their own JSON type:
#: ``"retention_value": true`` is not the integer 1, as the OpenAPI document says.
Int = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


# -- documents ----------------------------------------------------------------------------------
class Problem(BaseModel):
    """An error (RFC 9457): ``detail`` says what is wrong and what to do."""

    type: str = Field(description="urn:csbs:problem:<error type>")
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Each invalid field, for a validation problem."
    )


class DiskOut(BaseModel):
    id: str
    name: str
    size_bytes: int
    role: Literal["system", "data"]
    shared: bool


class ServerOut(BaseModel):
    id: str
    name: str
    type: str
    state: str
    disks: list[DiskOut]


#: Backups and tasks answer with the core's view models, as ``--json`` prints them.
BackupOut = BackupView
BackupDetail = BackupDetailView
TaskOut = TaskView


class BackupCreate(BaseModel):
    model_config = REQUEST

    server_ids: list[BodyId] = Field(min_length=1, max_length=64)
    name: str | None = None
    description: str | None = None
    offline: Flag = False
    #: Bind the servers to this policy instead of backing up now (guide 2.2, automatic
    #: backup): the answer is the policy's servers, and no backup starts.
    policy_id: BodyId | None = None

    @model_validator(mode="after")
    def _policy_alone(self) -> BackupCreate:
        if self.policy_id is not None:
            given = [f for f in ("name", "description") if getattr(self, f)]
            given += ["offline"] if self.offline else []
            if given:
                raise ValueError(
                    f"policy_id binds the servers and backs up nothing now: drop {', '.join(given)}"
                )
        return self


class RestoreRequest(BaseModel):
    model_config = REQUEST

    disk_mapping: dict[BodyId, BodyId] = Field(default_factory=dict)
    disk_ids: list[BodyId] = Field(default_factory=list)
    power_on: Flag = True
    #: Read and check every chunk before the server is stopped or a disk written.
    verify: Flag = False
    #: Write every chunk, even where the disk already holds the backup's data.
    full: Flag = False
    #: Run the server from the backup at once and copy its disks in the background (qemu
    #: driver); the task runs until the copy has finished.
    instant: Flag = False
    #: Read the backup from the second site (issue 17), e.g. while the primary is down.
    from_replica: Flag = False

    @model_validator(mode="after")
    def _instant_runs(self) -> RestoreRequest:
        if self.instant and not self.power_on:
            raise ValueError("instant: an instant restore runs the server; power_on must be true")
        return self


class DeleteRequest(BaseModel):
    model_config = REQUEST

    backup_ids: list[BodyId] = Field(min_length=1, max_length=100)


class Started(BaseModel):
    """A workflow that was started and has recorded its task."""

    workflow_id: str
    task_id: str | None = None
    status: str


class PolicyOut(BaseModel):
    id: str
    name: str
    enabled: bool
    times: list[str]
    weekdays: list[str] | None
    every_days: int | None
    timezone: str
    retention: RetentionKind
    retention_value: int | None
    lock_days: int | None = None
    replicate: bool = False
    server_ids: list[str]
    created_at: str | None
    updated_at: str | None
    next_runs: list[str] | None = None


Name = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]


TimeOfDay = Annotated[str, StringConstraints(pattern=r"^([01]?[0-9]|2[0-3]):[0-5][0-9]$")]


Weekday = Literal["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


class PolicyCreate(BaseModel):
    """A new policy (P1-P3): times at least an hour apart; weekdays or every_days; keep
    by count, by days, or forever. The rules the schema cannot say are checked too. What
    is left out takes the console's default (guide 3.2.1): 00:00, every 3 days, 6 months."""

    model_config = REQUEST

    name: Name = "backup_policy"
    enabled: Flag = True
    times: list[TimeOfDay] = Field(default_factory=lambda: ["00:00"], min_length=1, max_length=24)
    weekdays: list[Weekday] | None = Field(default=None, min_length=1, max_length=7)
    every_days: Int | None = Field(default=None, ge=1, le=30)
    timezone: str = "UTC"
    #: Neither retention nor retention_value: keep 6 months (guide 3.2.1); a value alone
    #: keeps that many backups.
    retention: RetentionKind | None = None
    retention_value: Int | None = Field(default=None, ge=1, le=99999)
    #: S3 Object Lock days of its backups (issue 17); None: CSBS_OBJECT_LOCK_DAYS alone.
    lock_days: Int | None = Field(default=None, ge=1, le=36500)
    #: Replicate each backup it makes to the second site (issue 17).
    replicate: Flag = False


class PolicyPatch(BaseModel):
    """Fields to change; the whole policy is validated again (P7)."""

    model_config = REQUEST

    name: Name | None = None
    times: list[TimeOfDay] | None = Field(default=None, min_length=1, max_length=24)
    weekdays: list[Weekday] | None = Field(default=None, min_length=1, max_length=7)
    every_days: Int | None = Field(default=None, ge=1, le=30)
    timezone: str | None = None
    retention: RetentionKind | None = None
    retention_value: Int | None = Field(default=None, ge=1, le=99999)
    lock_days: Int | None = Field(default=None, ge=1, le=36500)
    replicate: Flag | None = None


class ServerIds(BaseModel):
    model_config = REQUEST

    server_ids: list[BodyId] = Field(min_length=1, max_length=64)


class Bound(BaseModel):
    policy_id: str
    server_ids: list[str]


class Deleted(BaseModel):
    deleted: list[str]


class QuotaItem(BaseModel):
    used: int
    #: None: no limit.
    limit: int | None
    #: ``project``: the tenant's own limit; ``default``: from CSBS_QUOTA_*.
    source: Literal["project", "default"]


class QuotaOut(BaseModel):
    """A tenant's quota (B15): disk backups and stored chunk bytes, used and allowed."""

    project: str
    disk_backups: QuotaItem
    bytes: QuotaItem


#: Limits as ``csbs quota set`` takes them: a number, ``unlimited`` or ``default``.
Keyword = Literal["unlimited", "default"]
CountLimit = Annotated[int, Strict(), Field(ge=1, le=2**31 - 1)] | Keyword
ByteLimit = Annotated[int, Strict(), Field(ge=1, le=2**63 - 1)] | Keyword


class QuotaPatch(BaseModel):
    """The tenant's own limits to change; one left out keeps what it is."""

    model_config = REQUEST

    disk_backups: CountLimit | None = None
    #: A number of bytes, or a size string like "500GiB".
    bytes: (
        ByteLimit | Annotated[str, StringConstraints(pattern=r"^[0-9]{1,15} ?[KMGT]i?B?$")] | None
    ) = None


class Health(BaseModel):
    status: Literal["ok"]


# -- errors ---------------------------------------------------------------------------------
class AuditOut(BaseModel):
    """One entry of the operation log."""

    at: str
    actor: str
    action: str
    target: str
    result: str
    reason: str | None = None


def problem(status: int, type_name: str, detail: str, errors: Any = None) -> JSONResponse:
    body = Problem(
        type=f"urn:csbs:problem:{type_name}",
        title=type_name,
        status=status,
        detail=detail,
        errors=errors,
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM)


def _validation_errors(errors: Any) -> tuple[str, list[dict[str, Any]]]:
    items = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "input"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        items.append({"field": loc, "message": msg})
    return "; ".join(f"{i['field']}: {i['message']}" for i in items), items


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem, "description": "A problem document."} for code in codes}


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves on this path (FastAPI has one route per method, so
    Starlette's own 405 names only the first)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute):
            match, _ = route.matches(request.scope)
            if match in (Match.FULL, Match.PARTIAL):
                methods |= route.methods or set()
    return sorted(methods)


def _problem_media_type(app: FastAPI) -> None:
    """Document error responses as ``application/problem+json``, which is what they are;
    a request body that is not JSON at all is a 400; links let a client (and schemathesis's
    stateful tests) follow a created policy or backup to its other operations."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                responses = op.get("responses", {})
                if op.get("security"):
                    for code, why in (
                        ("401", "No valid API token."),
                        ("403", "The token's role may not do this."),
                        ("429", "Too many failed attempts from this client."),
                    ):
                        responses.setdefault(
                            code,
                            {"description": why, "content": {PROBLEM: {"schema": PROBLEM_REF}}},
                        )
                if "requestBody" in op and "400" not in responses:
                    responses["400"] = {
                        "description": "The body is not JSON.",
                        "content": {"application/json": {"schema": PROBLEM_REF}},
                    }
                for code, response in responses.items():
                    content = response.get("content", {})
                    if code.startswith(("4", "5")) and "application/json" in content:
                        content[PROBLEM] = content.pop("application/json")
        _links(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


#: Operations that create something, and where the id is in their response.
_CREATES = {
    "/v1/policies/{policy_id}": ("/v1/policies", "201", "policy_id", "$response.body#/id"),
    "/v1/backups/{backup_id}": ("/v1/backups", "202", "backup_id", "$response.body#/0/id"),
}


def _links(schema: dict[str, Any]) -> None:
    """OpenAPI links from each create operation to every operation on what it created."""
    paths = schema["paths"]
    for path, item in paths.items():
        for prefix, (source, code, param, expr) in _CREATES.items():
            if not path.startswith(prefix):
                continue
            links = paths[source]["post"]["responses"][code].setdefault("links", {})
            for op in item.values():
                links[op["operationId"]] = {
                    "operationId": op["operationId"],
                    "parameters": {param: expr},
                }
