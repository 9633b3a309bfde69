"""Tracing and metrics end to end: a worker process and the CLI, configured only by the
standard ``OTEL_*`` variables and ``CSBS_METRICS_BIND``, export one trace per backup to
a real OTLP/HTTP receiver, and the worker's Prometheus endpoint counts the bytes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from starter.stack import free_port
from tests.conftest import ROOT, Stack

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    )
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            receiver.spans.append(
                                {
                                    "name": span.name,
                                    "service": service,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.server.shutdown()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.eE+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_one_backup_is_one_trace_and_the_metrics_count_its_bytes(
    stack: Stack, receiver: OtlpReceiver
) -> None:
    drv = stack.driver
    server = drv.create_server("web-1", [8 * MIB, 8 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(3 * MIB))
    drv.write(server.id, server.disks[1].id, MIB, os.urandom(2 * MIB))
    metrics_port = free_port()
    env = {
        **stack.env,
        "CSBS_TASK_QUEUE": f"csbs-otel-{uuid.uuid4().hex[:6]}",
        "CSBS_METRICS_BIND": f"127.0.0.1:{metrics_port}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        cwd=ROOT,
        env={**env, "OTEL_SERVICE_NAME": "csbs-worker-test"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        created = await stack.cli("backup", "create", server.id, "--wait", "--json", env=env)
        backup = created.json()
        assert backup["status"] == "available"
        # One chunk written since the backup: the (delta) restore writes back just that.
        drv.write(server.id, server.disks[0].id, 0, os.urandom(4096))
        await stack.cli("backup", "restore", backup["id"], "--yes", "--wait", "--json", env=env)

        text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        read = sum(d["bytes_read"] for d in backup["disks"])
        assert read >= 5 * MIB
        assert metric(text, "csbs_bytes_read", operation="backup") == read
        assert metric(text, "csbs_chunks_uploaded", operation="backup") == sum(
            d["chunks_uploaded"] for d in backup["disks"]
        )
        assert metric(text, "csbs_bytes_written", operation="restore") == MIB
        assert metric(text, "csbs_backups_committed") == 1
        assert metric(text, "csbs_backup_duration_seconds_count") == 1
        assert "temporal_workflow_completed" in text  # the SDK's own metrics, same endpoint
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err.decode()[-2000:]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        s["name"] == "csbs.restore" for s in receiver.spans
    ):
        time.sleep(0.2)
    start = next(s for s in receiver.spans if s["name"] == "StartWorkflow:BackupServer")
    assert start["service"] == "csbs-cli"
    trace = [s for s in receiver.spans if s["trace_id"] == start["trace_id"]]
    names = {s["name"] for s in trace}
    assert {
        "RunWorkflow:BackupServer",
        "RunActivity:prepare_backup",
        "RunActivity:take_snapshot",
        "csbs.snapshot",
        "RunActivity:backup_disk",
        "csbs.transfer",
        "RunActivity:commit_backup",
    } <= names, names
    assert {s["service"] for s in trace} == {"csbs-cli", "csbs-worker-test"}
    transfers = [s for s in trace if s["name"] == "csbs.transfer"]
    assert sorted(s["attributes"]["csbs.disk_id"] for s in transfers) == sorted(
        d.id for d in server.disks
    )
    assert sum(s["attributes"]["csbs.bytes_read"] for s in transfers) == read
    assert all(s["attributes"]["csbs.chunks_uploaded"] >= 1 for s in transfers)
    by_id = {s["span_id"]: s for s in trace}
    for span in transfers:  # each transfer nests in its activity's span
        assert by_id[span["parent"]]["name"] == "RunActivity:backup_disk"
    snapshot = next(s for s in trace if s["name"] == "csbs.snapshot")
    assert snapshot["attributes"]["csbs.disks"] == 2
    restores = [s for s in receiver.spans if s["name"] == "csbs.restore"]
    # One span per disk; only the disk written since the backup had a chunk to write back.
    written = sorted(s["attributes"].get("csbs.bytes_written", 0) for s in restores)
    assert written == [0, MIB]


def test_a_bad_otel_setting_is_one_clear_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "starter.cli", "server", "list"],
        cwd=ROOT,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: OTEL_TRACES_EXPORTER must be one of none, console, otlp (got 'zipkin')"
    ]
