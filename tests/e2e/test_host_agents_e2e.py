"""Host agents (issue 13): ``python worker.py --host NAME`` serves the data plane of its
host's servers on the host's own queue; the central worker runs the workflows.

Two agents on two hosts (each with its own servers, which only it can reach) and a central
worker on the default host: a policy run across both hosts, with one agent killed -9 in
the middle and started again (its servers' backups resume; the other host's succeed), and
a host with no agent at all (its backup waits a bounded time, then fails naming it)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.testing import WorkflowEnvironment

from csbs.drivers.local import LocalDriver
from csbs.model import BackupServerInput, RunPolicyInput, Server
from starter.client import CsbsClient
from starter.stack import SeaweedS3
from tests.conftest import (
    MIB,
    ROOT,
    Stack,
    kill9,
    make_settings,
    max_attempt,
    running_stack,
)

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(loop_scope="session")
async def central(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """The central worker: workflows, bookkeeping and the (empty) default host. A silent
    step is retried after 3 s; a step for a host waits up to 60 s for its agent."""
    settings = make_settings(tmp_path, s3, heartbeat_timeout=3.0, host_wait_seconds=60)
    async with running_stack(temporal, settings) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="session")
async def impatient(
    tmp_path: Path, s3: SeaweedS3, temporal: WorkflowEnvironment
) -> AsyncIterator[Stack]:
    """A central worker whose steps wait only 4 s for a host's agent."""
    settings = make_settings(tmp_path, s3, heartbeat_timeout=3.0, host_wait_seconds=4)
    async with running_stack(temporal, settings) as st:
        yield st


def agent(st: Stack, host: str, servers_dir: Path) -> subprocess.Popen[bytes]:
    """``python worker.py --host HOST`` as its own process group, reporting every 0.3 s."""
    env = dict(
        st.env,
        CSBS_SERVERS_DIR=str(servers_dir),
        CSBS_INVENTORY_SECONDS="0.3",
        CSBS_HEARTBEAT_TIMEOUT="3",
    )
    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py"), "--host", host],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def host_servers(tmp_path: Path, host: str) -> tuple[Path, list[Server]]:
    folder = tmp_path / f"servers-{host}"
    drv = LocalDriver(folder, host=host)
    servers = []
    for i in range(2):
        server = drv.create_server(f"{host}-vm{i}", [48 * MIB])
        drv.write(server.id, server.disks[0].id, 0, os.urandom(40 * MIB))
        servers.append(server)
    return folder, servers


async def listed(st: Stack, count: int) -> list[dict[str, Any]]:
    """``csbs server list --json`` once the agents have reported ``count`` servers."""
    deadline = time.monotonic() + 60
    while True:
        servers: list[dict[str, Any]] = (await st.cli("server", "list", "--json")).json()
        if len(servers) >= count:
            return servers
        assert time.monotonic() < deadline, f"the agents never reported: {servers}"
        await asyncio.sleep(0.3)


async def started_on(st: Stack, ids: set[str], pid: int) -> bool:
    """Whether the agent process ``pid`` runs a step of a backup of a server in ``ids``
    (Temporal shows it as a started pending activity whose worker is that process)."""
    for task in st.catalog.list_tasks(kind="backup"):
        if task.server_id not in ids or task.workflow_id is None:
            continue
        desc = await st.client.get_workflow_handle(task.workflow_id).describe()
        for pending in desc.raw_description.pending_activities:
            if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED and (
                pending.last_worker_identity.startswith(f"{pid}@")
            ):
                return True
    return False


async def kill_mid_step(st: Stack, servers: list[Server], proc: subprocess.Popen[bytes]) -> None:
    """Kill -9 the agent ``proc`` while it runs a step of one of ``servers``' backups.

    The agent is frozen (SIGSTOP) before the last look, so the step Temporal still shows
    as started on it cannot finish between that look and the kill."""
    ids = {s.id for s in servers}
    deadline = time.monotonic() + 60
    while True:
        if await started_on(st, ids, proc.pid):
            os.killpg(proc.pid, signal.SIGSTOP)
            await asyncio.sleep(0.3)  # a completion already on the wire lands first
            if await started_on(st, ids, proc.pid):
                kill9(proc)
                return
            os.killpg(proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the agent never ran a step of its servers"
        await asyncio.sleep(0.02)


async def test_a_policy_run_across_two_hosts_survives_an_agent_killed_mid_run(
    central: Stack, tmp_path: Path
) -> None:
    st = central
    dirs = {}
    servers: dict[str, list[Server]] = {}
    for host in ("h1", "h2"):
        dirs[host], servers[host] = host_servers(tmp_path, host)
    agents = {host: agent(st, host, dirs[host]) for host in dirs}
    try:
        seen = await listed(st, 4)
        assert sorted((s["name"], s["host"]) for s in seen) == [
            ("h1-vm0", "h1"), ("h1-vm1", "h1"), ("h2-vm0", "h2"), ("h2-vm1", "h2"),
        ]  # fmt: skip
        table = (await st.cli("server", "list")).stdout
        assert "h1-vm0" in table and "h2" in table
        doctor = (await st.cli("doctor", check=False)).stdout
        assert "h1" in doctor and "h2" in doctor and "agent" in doctor

        pid = (
            await st.cli("policy", "create", "--name", "cross", "--time", "02:00",
                         "--every-days", "1", "--keep-count", "5", "--json")
        ).json()["id"]  # fmt: skip
        everyone = [s.id for host in servers for s in servers[host]]
        await st.cli("policy", "bind", pid, *everyone)
        client = CsbsClient(st.client, st.settings)
        handle = await client.start_policy_run(
            RunPolicyInput(policy_id=pid, trigger="manual"), f"runpolicy-{pid}-x"
        )
        # Kill h1's agent while it runs a step of one of its servers' backups (mid-backup).
        h1 = LocalDriver(dirs["h1"], host="h1")
        await kill_mid_step(st, servers["h1"], agents["h1"])
        await asyncio.sleep(4)  # its step goes silent; h2's backups go on meanwhile
        agents["h1"] = agent(st, "h1", dirs["h1"])
        result: Any = await handle.result()
        outcomes = result["backups"]
        assert {sid: o["outcome"] for sid, o in outcomes.items()} == dict.fromkeys(
            everyone, "available"
        )
        for sid in everyone:
            record = st.catalog.get_backup(outcomes[sid]["backup_id"])
            assert record.status == "available"
        # The kill cut a step of h1 short: it was tried again once the agent was back.
        attempts = []
        for server in servers["h1"]:
            (task,) = [t for t in st.catalog.list_tasks(kind="backup") if t.server_id == server.id]
            assert task.workflow_id is not None
            attempts.append(await max_attempt(st.client.get_workflow_handle(task.workflow_id)))
        assert max(attempts) >= 2, attempts
        # Nothing is left held on either host.
        assert not any(h1.snapshots(s.id) for s in servers["h1"])
    finally:
        for proc in agents.values():
            kill9(proc)


async def test_a_host_without_an_agent_fails_its_backup_naming_the_host(
    impatient: Stack, tmp_path: Path
) -> None:
    """Its backup waits the bounded time (4 s here), then fails with the host's name; a
    server on another host is not affected."""
    folder, (lonely, _) = host_servers(tmp_path, "h3")
    # h3's agent reported its servers once, then went away.
    st = impatient
    st.catalog.record_inventory("h3", "local", LocalDriver(folder, host="h3").list_servers())
    client = CsbsClient(st.client, st.settings)
    _, handle = await client.start_backup(BackupServerInput(server_id=lonely.id))
    with pytest.raises(Exception) as failed:
        await handle.result()
    assert "host h3 has no agent" in str(failed.value.__cause__ or failed.value)
    (task,) = [t for t in st.catalog.list_tasks(kind="backup") if t.server_id == lonely.id]
    assert task.status == "failed" and "host h3 has no agent" in (task.reason or "")
    backups = [b for b in st.catalog.list_backups() if b.server_id == lonely.id]
    assert [b.status for b in backups] == ["error"]
    # The default host's own servers are not affected.
    mine = st.compute.create_server("here", [4 * MIB])
    _, handle = await client.start_backup(BackupServerInput(server_id=mine.id))
    result: Any = await handle.result()
    assert result["status"] == "available"
