"""Policy CRUD and bindings on SQLite and PostgreSQL with the local driver (P1, P6, P7, P9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from csbs.catalog import Catalog
from csbs.drivers.local import LocalDriver
from csbs.errors import InvalidInput, InvalidState, NotFound, QuotaExceeded
from csbs.model import ServerState
from csbs.policy import PolicySpec
from csbs.policy_service import PolicyService

MIB = 1024 * 1024


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def svc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PolicyService]:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    cat = Catalog(url)
    yield PolicyService(cat, LocalDriver(tmp_path / "servers"))
    cat.dispose()


def weekly(**kw: object) -> PolicySpec:
    values: dict[str, object] = {"times": ["01:00"], "weekdays": ["sun"], "retention_value": 3}
    values.update(kw)
    return PolicySpec.model_validate(values)


def test_crud_and_limits(svc: PolicyService) -> None:
    """P1 defaults, P6 at most 32 per project, P7 edit (validated whole) and delete."""
    first = svc.create(weekly())
    view = svc.view(first.id)
    assert (view["name"], view["enabled"], view["times"]) == ("backup_policy", True, ["01:00"])
    for i in range(31):
        svc.create(weekly(name=f"p{i}"))
    with pytest.raises(QuotaExceeded, match="at most 32 policies"):
        svc.create(weekly(name="p33"))
    assert len(svc.policies.all()) == 32
    svc.update(first.id, {"times": ["01:00", "03:00"], "name": "nightly"})
    assert svc.view(first.id)["times"] == ["01:00", "03:00"]
    with pytest.raises(ValidationError, match="1 hour apart"):
        svc.update(first.id, {"times": ["01:00", "01:30"]})
    assert svc.view(first.id)["name"] == "nightly"  # nothing changed by the refusal
    assert svc.set_enabled(first.id, False).enabled is False
    svc.delete(first.id)
    with pytest.raises(NotFound):
        svc.view(first.id)


def test_bindings(svc: PolicyService) -> None:
    """P6: one policy per server (binding moves it), 64 per policy, only running/stopped
    servers without shared disks; P9: unbinding."""
    drv = svc.driver
    assert isinstance(drv, LocalDriver)
    a, b = svc.create(weekly(name="a")), svc.create(weekly(name="b"))
    servers = [drv.create_server(f"s{i}", [MIB]) for i in range(65)]
    shared = drv.create_server("shared", [MIB], [MIB])
    faulty = drv.create_server("faulty", [MIB])
    drv.set_state(faulty.id, ServerState.FAULT)
    for bad, message in [
        ([shared.id], "shared disk"),
        ([faulty.id], "only running or stopped"),
        (["srv-missing"], "does not exist"),
    ]:
        with pytest.raises((InvalidInput, NotFound), match=message):
            svc.bind(a.id, [servers[0].id, *bad])
        assert svc.policies.bindings(a.id) == []  # all or nothing
    ids = [s.id for s in servers]
    assert len(svc.bind(a.id, ids[:64])) == 64
    with pytest.raises(QuotaExceeded, match="at most 64"):
        svc.bind(a.id, [ids[64]])
    assert svc.bind(b.id, [ids[0]]) == [ids[0]]  # moved from a to b
    assert ids[0] not in svc.view(a.id)["server_ids"]
    assert svc.unbind(a.id, ids[1:3]) == ids[3:64]
    with pytest.raises(InvalidInput, match="not bound"):
        svc.unbind(a.id, [ids[1]])


def test_back_up_now_needs_a_bound_server(svc: PolicyService) -> None:
    """P7 (guide 3.2.4): "立即备份" is refused with the reason while no server is bound; a
    scheduled run of such a policy backs up nothing, and fails nothing."""
    drv = svc.driver
    assert isinstance(drv, LocalDriver)
    policy = svc.create(weekly(name="empty"))
    with pytest.raises(InvalidState, match="no servers bound: bind at least one server"):
        svc.plan_run(policy.id, "manual")
    assert svc.plan_run(policy.id, "scheduled").server_ids == []
    server = drv.create_server("s", [MIB])
    svc.bind(policy.id, [server.id])
    assert svc.plan_run(policy.id, "manual").server_ids == [server.id]


def test_retention_leaves_a_locked_backup_and_says_until_when(svc: PolicyService) -> None:
    """Issue 17: an expired backup still under S3 Object Lock is not deleted by retention
    (its objects could not be); the plan keeps it with the date, and once the lock has
    run out the same cleanup deletes it."""
    from datetime import UTC, datetime, timedelta

    from csbs.catalog.rows import BackupRow

    assert isinstance(svc.driver, LocalDriver)
    server = svc.driver.create_server("web", [MIB])
    policy = svc.create(weekly(retention_value=1))
    svc.bind(policy.id, [server.id])
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    for i, lock in enumerate([now + timedelta(days=3), None]):
        svc.policies.catalog.add_backup(
            BackupRow(
                id=f"bk-{i:016x}",
                project=svc.policies.project,
                name=f"autobk_{i}",
                server_id=server.id,
                status="available",
                kind="scheduled",
                policy_id=policy.id,
                created_at=now - timedelta(days=10 - i),
                locked_until=lock,
            )
        )
    plan = svc.retention(policy.id, now)
    assert plan.expired == []  # bk-0 is the older one, past the count, but locked
    assert "locked until 2026-12-01 12:00 UTC (S3 Object Lock)" in plan.kept["bk-0000000000000000"]
    assert svc.retention(policy.id, now + timedelta(days=4)).expired == ["bk-0000000000000000"]
