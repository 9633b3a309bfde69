"""The REST API end to end: ``csbs api serve`` as a real process over the real stack, then
schemathesis against the API's own OpenAPI document."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from starter.stack import free_port
from tests.conftest import ROOT, Stack

pytestmark = pytest.mark.slow
MIB = 1024 * 1024
PROBLEM = "application/problem+json"


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.http = httpx.AsyncClient(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}
        )

    async def wait_for(self, path: str, done: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = (await self.http.get(path)).json()
            if done(body):
                return dict(body)
            assert time.monotonic() < deadline, f"{path} never got there: {body}"
            await asyncio.sleep(0.3)


@pytest_asyncio.fixture(loop_scope="session")
async def api(stack: Stack, tmp_path: Path) -> AsyncIterator[Api]:
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "starter.cli", "api", "serve", "--port", str(port)],
        cwd=ROOT,
        # schemathesis tries many bad tokens on purpose: no lock-out here (tested apart).
        env={**stack.env, "CSBS_API_FAILED_LOGINS_PER_MINUTE": "1000000"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    admin = (await stack.cli("token", "create", "--role", "admin", "--json")).json()
    client = Api(f"http://127.0.0.1:{port}", admin["token"])
    try:
        for _ in range(100):
            try:
                if (await client.http.get("/v1/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            await asyncio.sleep(0.1)
        yield client
    finally:
        await client.http.aclose()
        proc.terminate()
        proc.wait(10)
        log.close()


def assert_problem(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = dict(resp.json())
    assert body["status"] == status and body["title"] and body["type"].startswith("urn:csbs:")
    for word in words:
        assert word in body["detail"], body
    return body


async def test_backup_restore_delete_and_policies_over_rest(stack: Stack, api: Api) -> None:
    """B1, R1, D1, P1, P6, P8 through the REST API; errors are problem documents."""
    drv = stack.driver
    server = drv.create_server("web-1", [8 * MIB, 8 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(3 * MIB))
    drv.write(server.id, server.disks[1].id, 2 * MIB, os.urandom(MIB + 5))
    before = drv.checksum(server.id)
    http = api.http

    servers = (await http.get("/v1/servers")).json()
    assert [(s["id"], s["name"], len(s["disks"])) for s in servers] == [(server.id, "web-1", 2)]

    created = await http.post("/v1/backups", json={"server_ids": [server.id], "name": "api_bk"})
    assert created.status_code == 202, created.text
    (bk,) = created.json()
    assert (bk["name"], bk["server_id"]) == ("api_bk", server.id)
    # Its record as the request found it: a small backup may already have finished.
    assert bk["status"] in ("creating", "available")
    done = await api.wait_for(f"/v1/backups/{bk['id']}", lambda b: b["status"] != "creating")
    assert done["status"] == "available", done
    assert [t["kind"] for t in done["tasks"]] == ["backup"]
    listed = (await http.get("/v1/backups", params={"server_id": server.id})).json()
    assert [b["id"] for b in listed] == [bk["id"]]

    verifying = await http.post(f"/v1/backups/{bk['id']}/verify")
    assert verifying.status_code == 202, verifying.text
    task = await api.wait_for(
        f"/v1/tasks/{verifying.json()['task_id']}", lambda t: t["status"] != "running"
    )
    assert (task["kind"], task["status"]) == ("verify", "succeeded")
    assert (await http.get(f"/v1/backups/{bk['id']}")).json()["verify_status"] == "ok"

    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    restored = await http.post(f"/v1/backups/{bk['id']}/restore", json={"power_on": False})
    assert restored.status_code == 202, restored.text
    task_id = restored.json()["task_id"]
    task = await api.wait_for(f"/v1/tasks/{task_id}", lambda t: t["status"] != "running")
    assert task["status"] == "succeeded", task
    assert drv.checksum(server.id) == before
    assert drv.get_server(server.id).state.value == "stopped"

    # Errors: one line naming the field or the thing, as the CLI says it.
    assert_problem(await http.get("/v1/backups/bk-nope"), 404, "bk-nope")
    assert_problem(await http.get("/v1/backups/-x"), 422, "backup_id")
    assert_problem(await http.get("/v1/backups/..%2F..%2Fetc"), 404)
    assert_problem(await http.get("/v1/nothing-here"), 404)
    bad = assert_problem(
        await http.post("/v1/backups", json={"server_ids": [server.id], "name": "a/b"}), 422
    )
    assert "name" in bad["detail"]
    assert_problem(
        await http.post("/v1/backups", json={"server_ids": ["srv-missing"]}),
        422,
        "server srv-missing does not exist",
    )
    assert_problem(
        await http.post("/v1/backups", content=b"{", headers={"content-type": "application/json"}),
        422,
    )
    assert_problem(await http.delete(f"/v1/tasks/{task_id}"), 422, "only failed")

    # Policies: create (with schedule), bind, run now, change, disable, delete.
    policy = await http.post(
        "/v1/policies",
        json={"name": "nightly", "times": ["02:00"], "every_days": 1, "retention_value": 3},
    )
    assert policy.status_code == 201, policy.text
    pid = policy.json()["id"]
    shown = (await http.get(f"/v1/policies/{pid}")).json()
    assert shown["next_runs"] and shown["enabled"] is True
    assert (
        await http.post(f"/v1/policies/{pid}/servers", json={"server_ids": [server.id]})
    ).json()["server_ids"] == [server.id]
    run = await http.post(f"/v1/policies/{pid}/run")
    assert run.status_code == 202, run.text
    result = await stack.client.get_workflow_handle(run.json()["workflow_id"]).result()
    assert result["backups"][server.id]["outcome"] == "available"
    patched = await http.patch(f"/v1/policies/{pid}", json={"weekdays": ["mon", "fri"]})
    assert (patched.json()["weekdays"], patched.json()["every_days"]) == (["mon", "fri"], None)
    assert_problem(
        await http.patch(f"/v1/policies/{pid}", json={"times": ["02:00", "02:30"]}),
        422,
        "1 hour apart",
    )
    # Guide 3.2.1: what a new policy leaves out is the console's default.
    made = await http.post("/v1/policies", json={"name": "defaults"})
    assert made.status_code == 201, made.text
    other = made.json()
    assert (other["times"], other["every_days"], other["retention"], other["retention_value"]) == (
        ["00:00"],
        3,
        "days",
        180,
    )
    # Guide 2.2: creating a backup with a policy binds the server there (moved from the
    # first policy) and backs up nothing now.
    count = len((await http.get("/v1/backups")).json())
    bound = await http.post(
        "/v1/backups", json={"server_ids": [server.id], "policy_id": other["id"]}
    )
    assert bound.status_code == 200, bound.text
    assert bound.json() == {"policy_id": other["id"], "server_ids": [server.id]}
    assert (await http.get(f"/v1/policies/{pid}")).json()["server_ids"] == []
    assert len((await http.get("/v1/backups")).json()) == count
    assert_problem(
        await http.post(
            "/v1/backups",
            json={"server_ids": [server.id], "policy_id": other["id"], "offline": True},
        ),
        422,
        "drop offline",
    )
    assert_problem(
        await http.post("/v1/backups", json={"server_ids": [server.id], "policy_id": "pol-x"}),
        404,
        "pol-x",
    )
    # B15: the tenant's quota, as csbs quota show|set.
    quota = (await http.get("/v1/quota")).json()
    assert quota["disk_backups"] == {"used": 4, "limit": None, "source": "default"}
    assert quota["bytes"]["used"] > 0 and quota["bytes"]["source"] == "default"
    changed = await http.patch("/v1/quota", json={"disk_backups": 50, "bytes": "10GiB"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["disk_backups"] == {"used": 4, "limit": 50, "source": "project"}
    assert changed.json()["bytes"]["limit"] == 10 * 1024**3
    assert_problem(await http.patch("/v1/quota", json={}), 422, "give disk_backups or bytes")
    assert_problem(await http.patch("/v1/quota", json={"disk_backups": 0}), 422, "disk_backups")
    reset = await http.patch("/v1/quota", json={"disk_backups": "default", "bytes": "unlimited"})
    assert reset.json()["disk_backups"]["source"] == "default"
    assert reset.json()["bytes"] == {**reset.json()["bytes"], "limit": None, "source": "project"}
    # Guide 1.6: every server backup is also a disk backup per disk.
    disks = (await http.get("/v1/disk-backups", params={"id": bk["id"]})).json()
    assert [(d["backup_id"], d["disk_id"], d["role"]) for d in disks] == [
        (bk["id"], server.disks[0].id, "system"),
        (bk["id"], server.disks[1].id, "data"),
    ]
    # Issue 16: every list comes a page at a time, the next page in the Link header (and
    # X-Next-Cursor); following it gives every row once, in order.
    for path, limit in [("/v1/disk-backups", 3), ("/v1/backups", 1), ("/v1/tasks", 2)]:
        every = (await http.get(path, params={"limit": 1000})).json()
        assert len(every) > limit, path
        walked: list[Any] = []
        resp = await http.get(path, params={"limit": limit})
        while True:
            assert resp.status_code == 200, resp.text
            walked += resp.json()
            if "next" not in resp.links:
                assert "X-Next-Cursor" not in resp.headers
                break
            assert resp.headers["X-Next-Cursor"] in resp.links["next"]["url"]
            resp = await http.get(resp.links["next"]["url"])
        assert walked == every, path
    assert_problem(await http.get("/v1/backups", params={"limit": 0}), 422, "limit")
    assert_problem(await http.get("/v1/tasks", params={"cursor": "nope"}), 422, "cursor")
    backups_cursor = (await http.get("/v1/backups", params={"limit": 1})).headers["X-Next-Cursor"]
    assert_problem(
        await http.get("/v1/tasks", params={"cursor": backups_cursor}), 422, "another list"
    )
    assert (await http.delete(f"/v1/policies/{other['id']}")).json() == {"deleted": [other["id"]]}
    assert (await http.post(f"/v1/policies/{pid}/disable")).json()["enabled"] is False
    assert (await http.delete(f"/v1/policies/{pid}")).json() == {"deleted": [pid]}
    assert_problem(await http.get(f"/v1/policies/{pid}"), 404, pid)

    deleting = await http.delete(f"/v1/backups/{bk['id']}")
    assert deleting.status_code == 202, deleting.text
    await stack.client.get_workflow_handle(deleting.json()["workflow_id"]).result()
    assert_problem(await http.get(f"/v1/backups/{bk['id']}"), 404)


async def test_schemathesis_finds_nothing_against_the_openapi_document(
    stack: Stack, api: Api, tmp_path: Path
) -> None:
    """Every operation, generated inputs (valid and invalid): no server error, every status
    code, content type, header and body as the OpenAPI document says."""
    drv = stack.driver
    server = drv.create_server("web-1", [4 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{api.base}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-time",
        "40",
        "--workers",
        "1",
        "--seed",
        "7",
        "--suppress-health-check",
        "too_slow",
        "--no-color",
        "-H",
        f"Authorization: Bearer {api.token}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**stack.env, "SCHEMATHESIS_HOOKS": ""},
        cwd=str(tmp_path),
    )
    out, _ = await proc.communicate()
    text = out.decode()
    (tmp_path / "schemathesis.txt").write_text(text)
    # The generated policies' schedules go with them (the namespace is shared).
    for policy in (await api.http.get("/v1/policies")).json():
        await api.http.delete(f"/v1/policies/{policy['id']}")
    assert proc.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text, text[-3000:]
