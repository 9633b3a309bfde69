"""docker/: what can be checked without a Docker engine (this machine has none).

- hadolint lints the Dockerfile;
- docker-compose 1.29 (Debian's, installed by .ci/run) validates compose.yaml against the
  Compose schema and resolves it; the resolved file is checked for what the deployment
  needs (services, pinned images, loopback ports, start order, shared settings);
- the wheel the image installs carries the migrations, and the commands the compose file
  runs exist in this very installation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret-1", "S3_ACCESS_KEY": "ak-1", "S3_SECRET_KEY": "sk-1"}
CSBS_SERVICES = {"s3", "setup", "worker-1", "worker-2", "api", "agent"}


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [exe, "-f", str(DOCKER / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    out = compose("config", env=SECRETS)
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout))


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    exe = Path(sys.executable).parent / "hadolint"
    out = subprocess.run(
        [str(exe), "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dockerfile_copies_what_exists_and_pins_its_base_and_version() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: no such file"
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        assert re.match(r"^python:\d+\.\d+\.\d+-slim-\w+$", base), base
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG CSBS_VERSION={version}" in text
    assert f"csbs:{version}" in (DOCKER / "compose.yaml").read_text()


def test_compose_validates_and_refuses_to_start_without_its_secrets() -> None:
    assert compose("config", "-q", env=SECRETS).returncode == 0
    missing = compose("config", "-q")
    assert missing.returncode != 0
    assert "set POSTGRES_PASSWORD" in missing.stderr or "set S3_ACCESS_KEY" in missing.stderr
    text = (DOCKER / "compose.yaml").read_text()
    for value in SECRETS.values():
        assert value not in text


def test_compose_is_the_multi_node_deployment(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"postgresql", "temporal", "temporal-ui"} | CSBS_SERVICES
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        for port in svc.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:"
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {port}"
        if name != "setup":
            assert svc.get("restart") == "unless-stopped", name
    # One image for every csbs role, built from this repository.
    assert {services[s]["image"] for s in CSBS_SERVICES} == {"csbs:0.1.0"}
    # Start order: the database before Temporal; setup (search attributes, migrations)
    # before the workers and the API.
    assert services["temporal"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
    for name in ("worker-1", "worker-2", "api"):
        dep = services[name]["depends_on"]["setup"]["condition"]
        assert dep == "service_completed_successfully", name
    setup = " ".join(services["setup"]["command"])
    for attribute in ("CsbsServerId", "CsbsBackupId", "CsbsPolicyId", "CsbsOperation"):
        assert attribute in setup
    assert "csbs db upgrade" in setup
    # The workers and the API share one catalog, Temporal, S3 and servers volume.
    envs = [services[n]["environment"] for n in ("worker-1", "worker-2", "api", "setup")]
    for key in (
        "CSBS_DATABASE_URL",
        "CSBS_TEMPORAL_ADDRESS",
        "CSBS_S3_ENDPOINT",
        "CSBS_TASK_QUEUE",
    ):
        assert len({e[key] for e in envs}) == 1, key
    assert envs[0]["CSBS_DATABASE_URL"].startswith(
        "postgresql+psycopg://csbs:pg-secret-1@postgresql"
    )
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "postgresql"
    assert services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    for name in ("worker-1", "worker-2"):
        assert services[name]["command"] == ["python", "-m", "worker"]
        assert services[name]["healthcheck"]["test"][0] == "CMD"
        assert any("servers" in str(v) for v in services[name]["volumes"])


def test_the_host_agent_serves_its_hosts_libvirt_vms(resolved: dict[str, Any]) -> None:
    agent = resolved["services"]["agent"]
    assert agent["profiles"] == ["libvirt"]  # only where there is a libvirt host
    assert agent["command"] == ["python", "-m", "worker", "--host", "kvm-1"]
    env = agent["environment"]
    assert env["CSBS_COMPUTE_DRIVER"] == "libvirt"
    worker = resolved["services"]["worker-1"]["environment"]
    for key in (
        "CSBS_DATABASE_URL",
        "CSBS_TEMPORAL_ADDRESS",
        "CSBS_S3_ENDPOINT",
        "CSBS_TASK_QUEUE",
    ):
        assert env[key] == worker[key], key
    mounts = " ".join(str(v) for v in agent["volumes"])
    for path in ("/var/run/libvirt", "/var/lib/libvirt/images", "/run/csbs-libvirt"):
        assert path in mounts, path


@pytest.mark.slow
def test_the_commands_compose_runs_exist_in_this_installation() -> None:
    bin_dir = Path(sys.executable).parent
    for args in (
        [str(bin_dir / "csbs"), "api", "serve", "--help"],
        [str(bin_dir / "csbs"), "db", "upgrade", "--help"],
        [str(bin_dir / "temporal"), "operator", "search-attribute", "create", "--help"],
        [str(bin_dir / "temporal"), "operator", "cluster", "health", "--help"],
        [str(bin_dir / "weed"), "mini", "-h"],
        [sys.executable, "-c", "import worker; assert callable(worker.main)"],
        [sys.executable, str(ROOT / "worker.py"), "--help"],
    ):
        out = subprocess.run(args, capture_output=True, text=True, cwd="/")
        assert out.returncode in (0, 2) and "Error" not in out.stderr[:200], (args, out.stderr)


@pytest.mark.slow
def test_the_wheel_the_image_installs_carries_the_migrations(tmp_path: Path) -> None:
    # Build from a copy of what the Dockerfile copies, as the image's build stage does.
    src = tmp_path / "src"
    src.mkdir()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.M)
    for name in (path for line in copied for path in line.split()):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("csbs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "csbs/migrations/env.py",
        "csbs/migrations/script.py.mako",
        "csbs/migrations/versions/0001_baseline_catalog.py",
        "csbs/migrations/versions/0002_disk_read_note.py",
        "starter/api.py",
        "runtime/connection.py",
        "runtime/schedules.py",
        "worker.py",
    ):
        assert needed in names, needed
