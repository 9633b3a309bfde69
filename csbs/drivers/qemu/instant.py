"""Instant restore on the ``qemu`` driver (issue 18; the guide's 即时恢复).

Each disk to restore is replaced by a new qcow2 image whose backing file is the backup's
disk, served read-only over NBD by csbs on a Unix socket (``reconnect-delay``: while the
serving worker restarts, the guest's reads wait instead of failing). The server runs at
once; a ``block-stream`` job per disk copies what the guest has not written yet into the
image in the background. When a job finishes, QEMU drops the backing file from the image
and the disk no longer depends on csbs.

``instant.json`` in the server's directory records the restore in progress (backup, and
each disk's socket and export): a retried step finds the disks attached already and only
resumes the copy, so a guest's writes since the server started are never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from csbs.drivers.base import InstantSource, StreamState
from csbs.drivers.common import InstantRecords, runtime_base, write_json
from csbs.drivers.qemu.qmp import _Qmp, _short, node_name
from csbs.drivers.qemu.snapshots import QemuSnapshots
from csbs.errors import InvalidState
from csbs.model import ServerState

#: How long the guest's reads wait for the NBD export to come back (a worker restart).
RECONNECT_DELAY = 300


def backing_spec(socket: str, export: str) -> str:
    """The backing file name of an instantly restored image: QEMU's ``json:`` pseudo
    protocol for an NBD export on a Unix socket that is reconnected when it drops."""
    nbd = {
        "driver": "nbd",
        "server": {"type": "unix", "path": socket},
        "export": export,
        "reconnect-delay": RECONNECT_DELAY,
    }
    spec = {"driver": "raw", "file": nbd}
    return "json:" + json.dumps(spec, separators=(",", ":"))


def stream_job(disk_id: str) -> str:
    return f"stream-{_short(disk_id)}"


class QemuInstant(InstantRecords, QemuSnapshots):
    """Instant restore: disks read through to csbs's NBD exports while they stream."""

    def instant_support(self) -> str | None:
        return None

    def instant_backup(self, server_id: str) -> str | None:
        with self._lock(server_id, exclusive=True):
            record = self._instant(server_id)
        return None if record is None else str(record["backup_id"])

    def instant_socket(self, server_id: str, disk_id: str) -> str:
        with self._lock(server_id, exclusive=True):
            record = self._instant(server_id)
        if record is not None and disk_id in record["disks"]:
            return str(record["disks"][disk_id]["socket"])
        key = hashlib.sha1(str(self._dir(server_id).resolve()).encode()).hexdigest()[:12]
        return str(runtime_base() / f"instant-{key}-{_short(disk_id)}.sock")

    def instant_attach(self, server_id: str, backup_id: str, sources: list[InstantSource]) -> None:
        """Replace each disk by an image backed by its export and run the server. Done
        already for this backup: nothing to do (the guest may have written since)."""
        with self._lock(server_id, exclusive=True):
            record = self._instant(server_id)
            if record is not None:
                if record["backup_id"] == backup_id:
                    return
                raise InvalidState(
                    f"server {server_id} is being restored instantly from backup "
                    f"{record['backup_id']}; wait until its disks are copied"
                )
            server = self._server(server_id)
            if server.state == ServerState.RUNNING:
                raise InvalidState(f"server {server_id} is running; stop it before restoring")
            self._refuse_while_snapshot(server_id, "restore it")
            pid = self._pid(server_id)
            if pid is not None:
                # The images are replaced under it: the process must let go of them.
                with self._session(server_id) as qmp:
                    self._quit(server_id, qmp, pid)
            for source in sources:
                disk = self._find_disk(server, source.disk_id)
                path = self._disk_path(server_id, source.disk_id)
                fresh = path.with_suffix(".instant.qcow2")
                self._img(
                    "create", "-q", "-u", "-f", "qcow2",
                    "-b", backing_spec(source.socket, source.export), "-F", "raw",
                    str(fresh), str(source.size_bytes),
                )  # fmt: skip
                fresh.replace(path)
                disk.size_bytes = source.size_bytes
                self._set_cbt(
                    server_id, source.disk_id, None, f"restored instantly from backup {backup_id}"
                )
            write_json(
                self._instant_path(server_id),
                {
                    "backup_id": backup_id,
                    "disks": {s.disk_id: s.model_dump() for s in sources},
                },
            )
            server.state = ServerState.RUNNING
            self._save(server)
            self._launch(server, paused=False)

    def instant_stream(self, server_id: str) -> list[StreamState]:
        """Start each disk's copy if it is not running (a job that failed, say while the
        export was away longer than the reconnect delay, is started again: it copies only
        what the image does not hold yet), and report. A disk whose copy concluded is
        recorded as finished at once. When every disk is finished the record goes and the
        server is on its own.

        Only ``query-jobs`` is asked while jobs run: QEMU 7.2 crashes on
        ``query-named-block-nodes`` during a ``block-stream``."""
        with self._lock(server_id, exclusive=True):
            record = self._instant(server_id)
            if record is None:
                return []
            server = self._server(server_id)
            self._ensure(server)  # a QEMU that died is started again (paused if stopped)
            finished: list[str] = record.setdefault("finished", [])
            states = []
            with self._session(server_id) as qmp:
                jobs = {j["id"]: j for j in qmp.cmd("query-jobs")}
                for disk_id in record["disks"]:
                    if disk_id in finished:
                        states.append(StreamState(disk_id=disk_id, finished=True))
                        continue
                    state = self._stream_disk(qmp, disk_id, jobs.get(stream_job(disk_id)))
                    if state.finished:
                        finished.append(disk_id)
                        self._save_instant(server_id, record)
                    states.append(state)
            if all(s.finished for s in states):
                self._instant_path(server_id).unlink(missing_ok=True)
                self._settle(server_id)
            return states

    def _stream_disk(self, qmp: _Qmp, disk_id: str, job: dict[str, Any] | None) -> StreamState:
        job_id = stream_job(disk_id)
        error = None
        if job is not None and job["status"] == "concluded":
            qmp.cmd("job-dismiss", id=job_id)
            error = job.get("error")
            if error is None:
                return StreamState(disk_id=disk_id, finished=True)
            job = None
        if job is not None:
            return StreamState(
                disk_id=disk_id,
                done=int(job.get("current-progress", 0)),
                total=int(job.get("total-progress", 0)),
            )
        qmp.cmd(
            "block-stream",
            **{"job-id": job_id, "device": node_name(disk_id), "auto-dismiss": False},
            speed=self.stream_speed,
        )
        return StreamState(disk_id=disk_id, error=error)

    def _settle(self, server_id: str) -> None:
        """Never quit QEMU while an instant restore copies a disk."""
        if self._instant_path(server_id).exists():
            return
        super()._settle(server_id)
