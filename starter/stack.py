"""The embedded stack for development and tests: Temporal dev server, SeaweedFS S3, worker.

Everything binds to 127.0.0.1 and keeps its state under ``var/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csbs.chunkstore import ChunkStore

#: Search attributes of the public contract, registered on the dev server at start.
SEARCH_ATTRIBUTES = ["CsbsServerId", "CsbsBackupId", "CsbsPolicyId", "CsbsOperation"]

#: Every port `weed mini` opens, so that a second instance (tests) can move all of them.
WEED_PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "s3.debug.port",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def tool(name: str) -> str:
    """Path of a binary shipped by a pip package in this environment (temporal, weed)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the project (pip install -e .)")
    return found


@dataclass
class SeaweedS3:
    """A running ``weed mini`` on loopback."""

    proc: subprocess.Popen[bytes]
    s3_port: int
    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def stop(self) -> None:
        stop_process(self.proc)


def start_seaweed(
    data_dir: Path,
    bucket: str,
    access_key: str,
    secret_key: str,
    log_path: Path | None = None,
    default_ports: bool = False,
    ports: dict[str, int] | None = None,
) -> SeaweedS3:
    """Start SeaweedFS with an S3 endpoint; every port moved unless ``default_ports``
    (``ports`` restarts one on the ports it had)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if ports is None:
        ports = {} if default_ports else {flag: free_port() for flag in WEED_PORT_FLAGS}
    args = [tool("weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    args += ["-master.telemetry=false"]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    env = dict(
        os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, S3_BUCKET=bucket
    )
    log = open(log_path or data_dir / "weed.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    s3_port = ports.get("s3.port", 8333)
    wait_port(s3_port, timeout=90, proc=proc)
    return SeaweedS3(proc=proc, s3_port=s3_port, data_dir=data_dir, ports=ports)


def wait_for_bucket(store: ChunkStore, marker: bool = True, tries: int = 100) -> None:
    """Create the store's bucket as soon as a fresh SeaweedFS takes it (it opens its port
    before its S3 layer answers), and write a ``ready`` object (``marker``)."""
    for _ in range(tries):
        try:
            store.ensure_bucket()
            if marker:
                store.s3.put_object(Bucket=store.bucket, Key="ready", Body=b"")
            return
        except Exception:
            time.sleep(0.3)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def temporal_dev_server_args(db_file: Path, port: int = 7233, ui_port: int = 8233) -> list[str]:
    args = [
        tool("temporal"),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--db-filename",
        str(db_file),
        "--log-level",
        "warn",
    ]
    for name in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{name}=Keyword"]
    return args


# -- the embedded stack of ``csbs dev up`` / ``csbs dev down`` ---------------------------------
def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False


def _spawn(name: str, args: list[str], run_dir: Path, env: dict[str, str] | None = None) -> int:
    log = open(run_dir.parent / "log" / f"{name}.log", "ab")  # noqa: SIM115 - child owns it
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    (run_dir / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def dev_credentials(var_dir: Path) -> tuple[str, str]:
    """Access keys of the embedded S3, made once per checkout and kept under var/."""
    path = var_dir / "s3-credentials"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        # Created private (0600) in one step: never readable by others, not even briefly.
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"csbs-{secrets.token_hex(4)}\n{secrets.token_hex(16)}\n")
    key, secret = path.read_text().split()[:2]
    return key, secret


def stack_env(settings: object) -> dict[str, str]:
    """Environment for processes of the stack (the worker gets the S3 keys here)."""
    var_dir = Path(getattr(settings, "var_dir", "var")).resolve()
    key, secret = dev_credentials(var_dir)
    env = dict(os.environ)
    env.setdefault("AWS_ACCESS_KEY_ID", key)
    env.setdefault("AWS_SECRET_ACCESS_KEY", secret)
    env["CSBS_VAR_DIR"] = str(var_dir)
    return env


def up(settings: object, demo: bool = True, api_port: int = 8080) -> None:
    """Start Temporal (Web UI :8233), SeaweedFS S3 (:8333), a worker and the API with the
    console (:8080); create the demo server and print how to sign in."""
    from csbs.config import Settings

    assert isinstance(settings, Settings)
    var_dir = settings.var_dir.resolve()
    run_dir, log_dir = var_dir / "run", var_dir / "log"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = stack_env(settings)
    _host, _, port = settings.temporal_address.rpartition(":")
    ui_url = settings.temporal_ui() or "http://127.0.0.1:8233"
    ui_port = urllib.parse.urlsplit(ui_url).port or 8233
    if not _pid_alive(run_dir / "temporal.pid"):
        args = temporal_dev_server_args(var_dir / "temporal.db", int(port), ui_port)
        _spawn("temporal", args, run_dir)
    wait_port(int(port), timeout=60)
    print(f"temporal  {settings.temporal_address}   Web UI {ui_url}")
    s3_port = int(settings.s3_endpoint.rsplit(":", 1)[-1].split("/")[0])
    if not _pid_alive(run_dir / "seaweedfs.pid"):
        weed_env = dict(env, S3_BUCKET=settings.s3_bucket)
        args = [
            tool("weed"),
            "mini",
            f"-dir={var_dir / 's3'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.port={s3_port}",
        ]
        if s3_port != 8333:  # not the default: move every other port too (a second stack)
            args += [f"-{flag}={free_port()}" for flag in WEED_PORT_FLAGS if flag != "s3.port"]
        (var_dir / "s3").mkdir(exist_ok=True)
        _spawn("seaweedfs", args, run_dir, weed_env)
    wait_port(s3_port, timeout=90)
    _wait_bucket(settings, env)
    print(
        f"s3        {settings.s3_endpoint}  bucket {settings.s3_bucket} (keys in var/s3-credentials)"
    )
    if not _pid_alive(run_dir / "worker.pid"):
        worker_py = Path(__file__).resolve().parent.parent / "worker.py"
        _spawn("worker", [sys.executable, str(worker_py)], run_dir, env)
    time.sleep(1.0)
    if not _pid_alive(run_dir / "worker.pid"):
        raise RuntimeError(f"the worker exited at start: see {log_dir / 'worker.log'}")
    print(f"worker    task queue {settings.queue}, logs in {log_dir}")
    if not _pid_alive(run_dir / "api.pid"):
        api = [sys.executable, "-m", "starter.cli", "api", "serve", "--port", str(api_port)]
        _spawn("api", api, run_dir, env)
    wait_port(api_port, timeout=60)
    token = console_token(settings)
    print(f"console   http://127.0.0.1:{api_port}/  (REST API under /v1, docs at /docs)")
    print(f"          sign in with this admin token (kept in {var_dir / 'console-token'}):")
    print(f"          {token}")
    if demo and getattr(settings, "compute_driver", "local") == "libvirt":
        print("servers   this host's libvirt domains: csbs server list")
    elif demo:
        from csbs.drivers import make_dev_servers

        drv = make_dev_servers(settings)
        server = next((s for s in drv.list_servers() if s.name == "demo"), None)
        if server is None:
            server = drv.create_server("demo", [256 * 1024 * 1024, 512 * 1024 * 1024])
            rnd = os.urandom
            drv.write(server.id, server.disks[0].id, 0, rnd(24 * 1024 * 1024))
            drv.write(server.id, server.disks[1].id, 64 * 1024 * 1024, rnd(40 * 1024 * 1024))
        print(f"demo      server {server.id} ({', '.join(d.id for d in server.disks)})")


def _wait_bucket(settings: object, env: dict[str, str], timeout: float = 60) -> None:
    import boto3

    from csbs.config import Settings

    assert isinstance(settings, Settings)
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.head_bucket(Bucket=settings.s3_bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def console_token(settings: object) -> str:
    """The admin token ``dev up`` signs the console in with: the one kept under var/ while
    it is valid, else a new one (only its hash is in the catalog)."""
    from csbs.auth import Role, Tokens, Unauthorized
    from csbs.catalog import Catalog
    from csbs.config import Settings

    assert isinstance(settings, Settings)
    path = settings.var_dir.resolve() / "console-token"
    catalog = Catalog(settings.effective_database_url, settings.project)
    try:
        tokens = Tokens(catalog)
        if path.exists():
            with contextlib.suppress(Unauthorized):
                tokens.authenticate(path.read_text().strip())
                return path.read_text().strip()
        _, token = tokens.create(settings.project, Role.admin, "dev-up", None)
        path.write_text(token + "\n")
        path.chmod(0o600)
        return token
    finally:
        catalog.dispose()


def down(settings: object) -> None:
    """Stop the API, the worker, SeaweedFS and Temporal started by :func:`up`."""
    var_dir = Path(getattr(settings, "var_dir", "var")).resolve()
    if getattr(settings, "compute_driver", "local") == "qemu":
        from csbs.config import Settings
        from csbs.drivers import make_dev_servers

        assert isinstance(settings, Settings)
        drv = make_dev_servers(settings)
        for server in drv.list_servers():
            if server.state.value == "running":
                drv.stop(server.id)  # QEMU quits cleanly; its dirty bitmaps are kept
                print(f"stopped QEMU server {server.id}")
    for name in ("api", "worker", "seaweedfs", "temporal"):
        pid_file = var_dir / "run" / f"{name}.pid"
        if not _pid_alive(pid_file):
            pid_file.unlink(missing_ok=True)
            continue
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid_alive(pid_file):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        print(f"stopped {name}")
