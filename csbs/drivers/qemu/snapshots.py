"""Group snapshots by image fleecing: one QMP transaction over all disks, a persistent dirty
bitmap per checkpoint, overlays exported over NBD; their release."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from csbs.drivers.base import Snapshot, SnapshotDisk
from csbs.drivers.common import (
    refuse_other_snapshots,
    write_json,
)
from csbs.drivers.qemu.io import QemuSnapshotReader
from csbs.drivers.qemu.process import QemuProcesses
from csbs.drivers.qemu.qmp import (
    QEMU_TIMEOUT,
    REASON_FIRST,
    QmpError,
    _Qmp,
    _snap_token,
    node_name,
)
from csbs.errors import (
    DiskUnavailable,
    DriverError,
    InvalidState,
)


class QemuSnapshots(QemuProcesses):
    """Crash-consistent group snapshots of a server's disks."""

    # -- snapshots --------------------------------------------------------------------------
    def _read_record(self, server_id: str, snapshot_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(
                (self._snap_dir(server_id, snapshot_id) / "snapshot.json").read_text()
            )
        except FileNotFoundError:
            return None
        return record

    def _lost(self, server_id: str, snapshot_id: str) -> DiskUnavailable:
        return DiskUnavailable(
            f"snapshot {snapshot_id} of server {server_id} is lost: its QEMU process exited "
            f"while the snapshot was held; back the server up again"
        )

    def group_snapshot(self, server_id: str, snapshot_id: str) -> Snapshot:
        with self._lock(server_id, exclusive=True):
            server = self._server(server_id)
            snap = self._snap_dir(server_id, snapshot_id)
            record = self._read_record(server_id, snapshot_id)
            if record is not None and record.get("complete"):
                if self._pid(server_id) != record["pid"]:
                    raise self._lost(server_id, snapshot_id)
                return Snapshot.model_validate(record["snapshot"])
            refuse_other_snapshots(server_id, snapshot_id, self.snapshots(server_id))
            pid = self._ensure(server)
            with self._session(server_id) as qmp:
                if record is not None and record["pid"] == pid:
                    self._teardown(qmp, server_id, snapshot_id, record, committed=False)
                shutil.rmtree(snap, ignore_errors=True)
                snap.mkdir(parents=True)
                disks = [self._plan_disk(qmp, server_id, d.id, d.size_bytes) for d in server.disks]
                snapshot = Snapshot.taken_now(server_id, snapshot_id, disks)
                record = {
                    "pid": pid,
                    "complete": False,
                    "snapshot": snapshot.model_dump(mode="json"),
                }
                write_json(snap / "snapshot.json", record)
                self._fleece(qmp, server_id, snapshot)
                for disk in disks:
                    self._set_cbt(server_id, disk.disk_id, snapshot_id, None)
                record["complete"] = True
                write_json(snap / "snapshot.json", record)
            return snapshot

    def _plan_disk(self, qmp: _Qmp, server_id: str, disk_id: str, size: int) -> SnapshotDisk:
        """Cross-check the recorded checkpoint with QEMU's bitmaps; drop every bitmap that
        is not the trusted previous checkpoint."""
        node = node_name(disk_id)
        expected, reason = self._cbt(server_id, disk_id)
        bitmaps = {b["name"]: b for b in self._bitmaps(qmp, node)}
        prev = None
        if expected is not None:
            found = bitmaps.get(expected)
            if found is None:
                reason = f"changed-block bitmap {expected} is missing (QEMU exited uncleanly?)"
            elif found.get("inconsistent"):
                reason = f"changed-block bitmap {expected} is inconsistent: QEMU exited uncleanly"
            elif not found.get("recording") or not found.get("persistent"):
                reason = f"changed-block bitmap {expected} was not recording"
            else:
                prev, reason = expected, None
        for name in bitmaps:
            if name != prev:
                qmp.cmd("block-dirty-bitmap-remove", node=node, name=name)
        return SnapshotDisk(
            disk_id=disk_id,
            size_bytes=size,
            changed_since=prev,
            full_read_reason=None if prev else (reason or REASON_FIRST),
        )

    def _fleece(self, qmp: _Qmp, server_id: str, snapshot: Snapshot) -> None:
        snap = self._snap_dir(server_id, snapshot.id)
        for disk in snapshot.disks:
            overlay = snap / f"{disk.disk_id}.qcow2"
            self._img(
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u",
                "-b", str(self._disk_path(server_id, disk.disk_id)),
                str(overlay), str(disk.size_bytes),
            )  # fmt: skip
            qmp.cmd(
                "blockdev-add",
                driver="qcow2",
                file={"driver": "file", "filename": str(overlay)},
                backing=node_name(disk.disk_id),
                **{"node-name": f"ov-{_snap_token(snapshot.id, disk.disk_id)}"},
            )
        actions: list[dict[str, Any]] = []
        for disk in snapshot.disks:
            node, short = node_name(disk.disk_id), _snap_token(snapshot.id, disk.disk_id)
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": snapshot.id, "persistent": True},
                }
            )
            if disk.changed_since:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-disable",
                        "data": {"node": node, "name": disk.changed_since},
                    }
                )
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": node,
                        "target": f"ov-{short}",
                        "sync": "none",
                        "job-id": f"fleece-{short}",
                        "auto-dismiss": True,
                    },
                }
            )
        qmp.cmd("transaction", actions=actions)
        self._nbd_start(qmp, self._nbd_path(server_id))
        for disk in snapshot.disks:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": f"ex-{_snap_token(snapshot.id, disk.disk_id)}",
                "node-name": f"ov-{_snap_token(snapshot.id, disk.disk_id)}",
                "name": f"{snapshot.id}/{disk.disk_id}",
            }
            if disk.changed_since:
                args["bitmaps"] = [disk.changed_since]
            qmp.cmd("block-export-add", **args)

    def _teardown(
        self,
        qmp: _Qmp,
        server_id: str,
        snapshot_id: str,
        record: dict[str, Any],
        committed: bool,
    ) -> None:
        """Remove exports, fleecing jobs and overlays, then settle the bitmaps: on commit the
        previous checkpoint goes; otherwise the new bitmap is merged back into it."""
        disks = [SnapshotDisk.model_validate(d) for d in record["snapshot"]["disks"]]
        for disk in disks:
            self._export_del(qmp, f"ex-{_snap_token(snapshot_id, disk.disk_id)}")
        for disk in disks:
            job = f"fleece-{_snap_token(snapshot_id, disk.disk_id)}"
            qmp.try_cmd("block-job-cancel", device=job, force=True)
            deadline = time.monotonic() + QEMU_TIMEOUT
            while any(j["id"] == job for j in qmp.cmd("query-jobs")):
                if time.monotonic() > deadline:
                    raise DriverError(f"QEMU did not end fleecing job {job}")
                time.sleep(0.01)
            overlay = f"ov-{_snap_token(snapshot_id, disk.disk_id)}"
            deadline = time.monotonic() + QEMU_TIMEOUT
            while True:  # the node stays busy until a hard-deleted export has let go of it
                try:
                    qmp.cmd("blockdev-del", **{"node-name": overlay})
                    break
                except QmpError as exc:
                    if "find" in exc.desc.lower():  # "Failed to find node ...": gone already
                        break
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        for disk in disks:
            node, prev = node_name(disk.disk_id), disk.changed_since
            names = {b["name"] for b in self._bitmaps(qmp, node)}
            if committed:
                if prev in names:
                    qmp.cmd("block-dirty-bitmap-remove", node=node, name=prev)
                continue
            actions: list[dict[str, Any]] = []
            if prev in names and snapshot_id in names:
                actions += [
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": node, "target": prev, "bitmaps": [snapshot_id]},
                    },
                    {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": prev}},
                ]
            if snapshot_id in names:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-remove",
                        "data": {"node": node, "name": snapshot_id},
                    }
                )
            if actions:
                qmp.cmd("transaction", actions=actions)
            if prev in names:
                self._set_cbt(server_id, disk.disk_id, prev, None)
            else:
                self._set_cbt(server_id, disk.disk_id, None, disk.full_read_reason or REASON_FIRST)
        self._nbd_stop_if_idle(qmp)

    def open_snapshot(self, server_id: str, snapshot_id: str, disk_id: str) -> QemuSnapshotReader:
        with self._lock(server_id, exclusive=True):
            record = self._read_record(server_id, snapshot_id)
            disk = Snapshot.disk_of_record(record, server_id, snapshot_id, disk_id)
            assert record is not None
            if self._pid(server_id) != record["pid"]:
                raise self._lost(server_id, snapshot_id)
        return QemuSnapshotReader(self, server_id, snapshot_id, disk)

    def release_snapshot(self, server_id: str, snapshot_id: str, committed: bool) -> None:
        with self._lock(server_id, exclusive=True):
            snap = self._snap_dir(server_id, snapshot_id)
            if not snap.exists():
                self._settle(server_id)  # a snapshot that failed before its record
                return
            self._server(server_id)
            record = self._read_record(server_id, snapshot_id)
            pid = self._pid(server_id)
            if record is not None and pid is not None and pid == record["pid"]:
                with self._session(server_id) as qmp:
                    self._teardown(qmp, server_id, snapshot_id, record, committed)
            shutil.rmtree(snap)
            self._settle(server_id)

    # -- disk changes (R5) ---------------------------------------------------------------
    def _refuse_while_snapshot(self, server_id: str, what: str) -> None:
        if self._active_snapshots(server_id):
            raise InvalidState(
                f"server {server_id} is being backed up (a snapshot is held); {what} when "
                f"the backup has finished"
            )
