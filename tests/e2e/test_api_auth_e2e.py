"""Authentication and roles of the REST API (issue 16, part 1), walked over the API's own
OpenAPI document: every ``/v1`` operation but ``/v1/health`` answers 401 without a token,
403 to a role below the one it needs (and changes nothing), and 404 for another project's
ids, exactly as for ids that do not exist. Tokens come from ``csbs token create``; the
catalog keeps only their hash; revoked and expired ones are refused; failed attempts are
rate-limited per client."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from csbs.auth import Role, Tokens
from csbs.catalog.rows import ApiTokenRow
from starter.api import create_app
from starter.facade import Facade
from starter.routes.common import needed_role
from tests.conftest import MIB, Stack

pytestmark = pytest.mark.slow
PROBLEM = "application/problem+json"


@pytest_asyncio.fixture(loop_scope="session")
async def app(stack: Stack) -> AsyncIterator[Any]:
    # The walk tries a forged token on every route: no lock-out here (tested below).
    unlimited = stack.settings.model_copy(update={"api_failed_logins_per_minute": 1_000_000})
    application = create_app(unlimited, Facade(unlimited, client=stack.client))
    yield application
    for project in ("default", "other"):
        application.state.facade_for(project).catalog.dispose()


def client(app: Any, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers
    )


async def token(stack: Stack, role: str, project: str = "default", *extra: str) -> str:
    out = await stack.cli("token", "create", "--role", role, "--project", project, "--json", *extra)
    return str(out.json()["token"])


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
    ]


def fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def body_for(op: dict[str, Any], server_id: str) -> dict[str, Any] | None:
    """A valid body where one is needed (the role check comes before anything else)."""
    if "requestBody" not in op:
        return None
    ref = op["requestBody"]["content"]["application/json"]["schema"].get("$ref", "")
    name = ref.rsplit("/", 1)[-1]
    return {
        "BackupCreate": {"server_ids": [server_id]},
        "ServerIds": {"server_ids": [server_id]},
        "DeleteRequest": {"backup_ids": ["bk-none"]},
    }.get(name, {})


def assert_problem(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["content-type"].startswith(PROBLEM)


async def test_every_route_needs_a_token_of_the_right_role_and_project(
    stack: Stack, app: Any
) -> None:
    drv = stack.driver
    server = drv.create_server("auth-1", [4 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    made = (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()
    policy = (await stack.cli("policy", "create", "--name", "authp", "--json")).json()
    task_id = stack.catalog.list_tasks(backup_id=made["id"])[0].id
    ids = {"backup_id": made["id"], "policy_id": policy["id"], "task_id": task_id}
    viewer, operator = await token(stack, "viewer"), await token(stack, "operator")
    other = await token(stack, "admin", "other")

    async with client(app, None) as anon:
        schema = (await anon.get("/openapi.json")).json()
        assert (await anon.get("/v1/health")).status_code == 200
    ops = [o for o in operations(schema) if o[1] != "/v1/health"]
    assert len(ops) >= 25
    before = [(b.id, b.status, b.name) for b in stack.catalog.list_backups()]
    for method, path, op in ops:
        assert op.get("security"), (method, path)  # documented as needing the token
        url, body = fill(path, ids), body_for(op, server.id)
        async with client(app, None) as anon:
            resp = await anon.request(method, url, json=body)
            assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].startswith("Bearer")
        async with client(app, "csbs_tok-0123456789abcdef_" + "x" * 43) as forged:
            assert_problem(await forged.request(method, url, json=body), 401)
        need = needed_role(method, path)
        assert need is not None
        for holder, role in ((viewer, Role.viewer), (operator, Role.operator)):
            if role < need:
                async with client(app, holder) as weak:
                    resp = await weak.request(method, url, json=body)
                    assert_problem(resp, 403)
                    assert need.name in resp.json()["detail"]
        if "{" in path:  # another project's admin: its ids do not exist there
            async with client(app, other) as stranger:
                resp = await stranger.request(method, url, json=body)
                assert_problem(resp, 404)
    # Nothing any refused request could have changed did change.
    assert [(b.id, b.status, b.name) for b in stack.catalog.list_backups()] == before
    assert [p["id"] for p in (await stack.cli("policy", "list", "--json")).json()] == [policy["id"]]

    # A viewer reads; the project comes from the token alone.
    async with client(app, viewer) as reader:
        listed = (await reader.get("/v1/backups", params={"project": "other"})).json()
        assert [b["id"] for b in listed] == [made["id"]]
        restore = await reader.post(f"/v1/backups/{made['id']}/restore", json={})
        assert_problem(restore, 403)
    async with client(app, other) as stranger:
        assert (await stranger.get("/v1/backups")).json() == []
    # An operator may not bind through POST /v1/backups (that changes a policy).
    async with client(app, operator) as op_client:
        bind = await op_client.post(
            "/v1/backups", json={"server_ids": [server.id], "policy_id": policy["id"]}
        )
        assert_problem(bind, 403)
    assert stack.catalog.get_backup(made["id"]).status == "available"


async def test_tokens_are_stored_hashed_revoked_expire_and_guesses_are_limited(
    stack: Stack, app: Any
) -> None:
    out = (
        await stack.cli("token", "create", "--role", "viewer", "--name", "ci", "--expires",
                        "30m", "--json")
    ).json()  # fmt: skip
    secret = out["token"].split("_", 2)[2]  # csbs_<id>_<secret>; the secret may hold "_"
    with stack.catalog.session() as s:
        row = s.get(ApiTokenRow, out["id"])
        assert row is not None and secret not in str(row.model_dump())
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    listed = (await stack.cli("token", "list", "--json")).json()
    assert out["id"] in [t["id"] for t in listed]
    assert all("token" not in t and "secret_hash" not in t for t in listed)

    async with client(app, out["token"]) as http:
        assert (await http.get("/v1/tasks")).status_code == 200
        await stack.cli("token", "revoke", out["id"])
        revoked = await http.get("/v1/tasks")
        assert_problem(revoked, 401)
        assert "revoked" in revoked.json()["detail"]

    tokens = Tokens(stack.catalog)
    from datetime import timedelta

    from csbs.catalog.rows import utcnow

    _, old = tokens.create("default", Role.viewer, "old", utcnow() - timedelta(seconds=1))
    async with client(app, old) as http:
        expired = await http.get("/v1/tasks")
        assert_problem(expired, 401)
        assert "expired" in expired.json()["detail"]

    bad = await stack.cli("token", "create", "--role", "root", check=False)
    assert bad.code != 0 and "role must be one of viewer, operator, admin" in bad.stderr

    # Ten failed attempts from one client within a minute: it is refused for a while,
    # even with a good token.
    good = await token(stack, "viewer")
    limited = create_app(stack.settings)
    try:
        for i in range(10):
            async with client(limited, f"csbs_tok-{i:016x}_" + "y" * 43) as guess:
                assert_problem(await guess.get("/v1/tasks"), 401)
        async with client(limited, good) as http:
            resp = await http.get("/v1/tasks")
            assert_problem(resp, 429)
            assert int(resp.headers["retry-after"]) > 0
    finally:
        limited.state.facade.catalog.dispose()


async def test_every_change_is_in_the_operation_log(stack: Stack, app: Any) -> None:
    """Changes through the API name the token, through the CLI the local user; refused
    changes are logged with their reason; ``GET /v1/audit`` is for admins."""
    drv = stack.driver
    server = drv.create_server("audit-1", [4 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    made = (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()
    admin, viewer = await token(stack, "admin"), await token(stack, "viewer")
    async with client(app, admin) as http:
        created = await http.post("/v1/policies", json={"name": "audited"})
        assert created.status_code == 201, created.text
        refused = await http.delete(f"/v1/backups/{made['id']}x")
        assert_problem(refused, 404)
        log = (await http.get("/v1/audit", params={"limit": 50})).json()
    async with client(app, viewer) as http:
        assert_problem(await http.get("/v1/audit"), 403)
    by_action = {e["action"]: e for e in reversed(log)}
    assert by_action["backup.create"]["actor"].startswith("local ")
    assert by_action["backup.create"]["target"] == server.id
    assert by_action["token.create"]["result"] == "ok"
    policy = by_action["policy.create"]
    assert policy["actor"].startswith("token admin@default (tok-") and policy["target"] == "audited"
    failed = by_action["backup.delete"]
    assert failed["result"] == "failed" and "does not exist" in (failed["reason"] or "")
    cli_view = (await stack.cli("audit", "list", "--since", "1h", "--json")).json()
    assert [e["action"] for e in cli_view] == [e["action"] for e in log]
