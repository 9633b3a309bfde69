"""Instant restore's plain parts (issue 18): the request's rule, the drivers that refuse
it with the reason, and the backing file an instantly restored image reads through to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from csbs.drivers.local import LocalDriver
from csbs.drivers.qemu.instant import RECONNECT_DELAY, backing_spec
from csbs.errors import InvalidState
from csbs.model import RestoreServerInput


def test_an_instant_restore_cannot_leave_the_server_powered_off() -> None:
    with pytest.raises(ValidationError, match="instant: an instant restore runs the server"):
        RestoreServerInput(backup_id="bk-1", instant=True, power_on=False)
    assert RestoreServerInput(backup_id="bk-1", instant=True).power_on


def test_the_local_driver_refuses_an_instant_restore_with_the_reason(tmp_path: Path) -> None:
    drv = LocalDriver(tmp_path)
    reason = drv.instant_support()
    assert reason is not None and "qemu driver" in reason
    with pytest.raises(InvalidState, match="no hypervisor"):
        drv.instant_attach("srv-1", "bk-1", [])
    assert drv.instant_backup("srv-1") is None


def test_the_backing_file_reads_the_export_and_waits_for_it_to_come_back() -> None:
    spec = backing_spec("/run/x/instant.sock", "bk-1/disk-1")
    assert spec.startswith("json:")
    parsed = json.loads(spec[len("json:") :])
    assert parsed["driver"] == "raw"
    assert parsed["file"] == {
        "driver": "nbd",
        "server": {"type": "unix", "path": "/run/x/instant.sock"},
        "export": "bk-1/disk-1",
        "reconnect-delay": RECONNECT_DELAY,
    }
