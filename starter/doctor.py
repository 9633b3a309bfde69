"""``csbs doctor``: check that everything csbs depends on is reachable and sane, and say
what is wrong in words an operator can act on. Read-only: it changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from csbs.config import Settings


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


async def check_temporal(settings: Settings, timeout: float = 5.0) -> list[Check]:
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    from workflows.common import SEARCH_ATTRIBUTES

    where = f"{settings.temporal_address} namespace {settings.namespace}"
    try:
        client = await asyncio.wait_for(
            Client.connect(settings.temporal_address, namespace=settings.namespace), timeout
        )
        await asyncio.wait_for(client.service_client.check_health(), timeout)
    except Exception as exc:
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        return [Check("temporal", False, f"cannot reach Temporal at {where}: {why}")]
    checks = [Check("temporal", True, f"reachable at {where}")]
    attrs = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=settings.namespace)
    )
    missing = [a.name for a in SEARCH_ATTRIBUTES if a.name not in attrs.custom_attributes]
    checks.append(
        Check(
            "search attributes",
            not missing,
            "registered"
            if not missing
            else f"missing {', '.join(missing)}: create them with `temporal operator "
            f"search-attribute create --name NAME --type Keyword`",
        )
    )
    queue = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=settings.namespace,
            task_queue=TaskQueue(name=settings.queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    pollers = len(queue.pollers)
    checks.append(
        Check(
            "worker",
            pollers > 0,
            f"{pollers} worker(s) polling task queue {settings.queue}"
            if pollers
            else f"no worker polls task queue {settings.queue}: start one with "
            f"`python worker.py` (same CSBS_* settings)",
        )
    )
    for name, seen in _hosts(settings):
        if name == settings.host:
            continue  # the default host is the worker's own (above)
        agents = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=settings.namespace,
                task_queue=TaskQueue(name=settings.host_queue(name)),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            )
        )
        count = len(agents.pollers)
        checks.append(
            Check(
                f"host {name}",
                count > 0,
                f"{count} agent(s) polling; servers last reported {seen}"
                if count
                else f"no agent: its servers cannot be backed up or restored (last reported "
                f"{seen}); run `python worker.py --host {name}` on that host",
            )
        )
    return checks


def _hosts(settings: Settings) -> list[tuple[str, str]]:
    """The hosts whose agents reported servers, with when they last did."""
    from csbs.catalog import Catalog

    try:
        catalog = Catalog(settings.effective_database_url, settings.project)
    except Exception:
        return []  # the catalog check says why
    try:
        return [
            (h.name, h.seen_at.isoformat(timespec="seconds") if h.seen_at else "never")
            for h in catalog.hosts()
        ]
    finally:
        catalog.dispose()


def check_s3(settings: Settings, name: str = "s3") -> Check:
    from botocore.exceptions import BotoCoreError, ClientError

    from csbs.chunkstore import make_s3_client

    where = f"bucket {settings.s3_bucket} at {settings.s3_endpoint or 'AWS'}"
    s3 = make_s3_client(settings)
    try:
        s3.head_bucket(Bucket=settings.s3_bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        hint = {
            "404": "the bucket does not exist: create it",
            "NoSuchBucket": "the bucket does not exist: create it",
            "403": "access denied: check "
            + (
                "CSBS_REPLICA_ACCESS_KEY_ID / CSBS_REPLICA_SECRET_ACCESS_KEY"
                if settings.s3_site == "replica"
                else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ),
        }.get(str(code), str(exc))
        return Check(name, False, f"{where}: {hint}")
    except BotoCoreError as exc:
        return Check(name, False, f"cannot reach {where}: {exc}")
    root = f"{settings.s3_prefix.strip('/')}/{settings.project}".lstrip("/")
    try:
        body = s3.get_object(Bucket=settings.s3_bucket, Key=f"{root}/config.json")["Body"].read()
    except ClientError:
        return Check(name, True, f"{where} reachable; repository {root} not created yet")
    config = json.loads(body)
    if config.get("chunk_size") != settings.chunk_size:
        return Check(
            name,
            False,
            f"repository {root} uses chunk_size={config.get('chunk_size')}, the settings "
            f"ask for {settings.chunk_size}: set CSBS_CHUNK_SIZE to match",
        )
    from csbs.chunkstore import ChunkStore
    from csbs.errors import CsbsError

    try:
        ChunkStore(settings, client=s3).check_key(config)
    except CsbsError as exc:
        return Check(name, False, str(exc))
    encrypted = f", encrypted ({config['encryption']})" if config.get("encryption") else ""
    return Check(
        name,
        True,
        f"{where} reachable; repository {root} format {config.get('format_version')}{encrypted}",
    )


def check_replica(settings: Settings) -> Check:
    """Issue 17: the second site (``CSBS_REPLICA_*``) is reachable with its own
    credentials, and its repository matches this one."""
    if not settings.has_replica:
        return Check(
            "replica",
            True,
            "no replica configured (CSBS_REPLICA_ENDPOINT): backups are kept at one site only",
        )
    check = check_s3(settings.replica(), "replica")
    if check.ok:
        days = settings.replica_retention_days
        keep = f"keeps deleted backups {days} days" if days else "keeps what the primary keeps"
        return Check("replica", True, f"{check.detail}; {keep}")
    return check


def check_object_lock(settings: Settings) -> Check:
    """Issue 17: with locked backups (``CSBS_OBJECT_LOCK_DAYS``, or a policy's
    ``--lock-days``) the bucket needs Object Lock and versioning."""
    from csbs.chunkstore import make_s3_client
    from csbs.errors import CsbsError
    from csbs.locks import VersionedBucket

    try:
        locked, versioning = VersionedBucket(make_s3_client(settings), settings.s3_bucket).status()
    except CsbsError as exc:
        return Check("object lock", False, str(exc))
    days = settings.object_lock_days
    state = (
        f"bucket {settings.s3_bucket}: Object Lock {'enabled' if locked else 'not enabled'}, "
        f"versioning {versioning.lower()}"
    )
    if locked and versioning == "Enabled":
        wanted = f"backups locked {days} days (compliance mode)" if days else "no lock set"
        return Check("object lock", True, f"{state}; {wanted}")
    if not days:
        return Check(
            "object lock",
            True,
            f"{state}; backups are not locked (CSBS_OBJECT_LOCK_DAYS=0), so an S3 or csbs "
            f"admin credential can delete them",
        )
    fix = (
        "Object Lock can only be turned on when a bucket is created: create a new bucket "
        "with Object Lock enabled (aws s3api create-bucket --object-lock-enabled-for-bucket) "
        "and point CSBS_S3_BUCKET at it"
        if not locked
        else "enable versioning on it (aws s3api put-bucket-versioning --versioning-configuration "
        "Status=Enabled)"
    )
    return Check(
        "object lock", False, f"{state}, but CSBS_OBJECT_LOCK_DAYS={days} needs both: {fix}"
    )


def check_catalog(settings: Settings) -> Check:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    url = make_url(settings.effective_database_url)
    shown = url.render_as_string(hide_password=True)
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        engine.dispose()
    except Exception as exc:
        return Check("catalog", False, f"cannot open {shown}: {str(exc).splitlines()[0]}")
    if "backups" not in tables:
        return Check("catalog", True, f"{shown} reachable; tables not created yet")
    return Check("catalog", True, f"{shown} reachable")


def check_driver(settings: Settings) -> Check:
    servers = settings.effective_servers_dir
    if servers.exists() and not os.access(servers, os.W_OK):
        return Check("hypervisor", False, f"{servers} is not writable")
    if settings.compute_driver == "local":
        return Check("hypervisor", True, f"local driver, servers in {servers}")
    if settings.compute_driver == "libvirt":
        return check_libvirt(settings)
    missing = [b for b in (settings.qemu_binary, settings.qemu_img) if shutil.which(b) is None]
    if missing:
        return Check(
            "hypervisor",
            False,
            f"qemu driver: {', '.join(missing)} not found; install qemu-system-x86 and "
            f"qemu-utils or set CSBS_QEMU_BINARY / CSBS_QEMU_IMG",
        )
    version = subprocess.run(
        [settings.qemu_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    runtime_ok = os.access(tempfile.gettempdir(), os.W_OK)
    return Check(
        "hypervisor",
        runtime_ok,
        f"qemu driver: {version[0] if version else settings.qemu_binary}, servers in {servers}"
        if runtime_ok
        else f"qemu driver: {tempfile.gettempdir()} is not writable (QMP/NBD sockets live there)",
    )


def check_libvirt(settings: Settings) -> Check:
    missing = [
        b for b in (settings.qemu_img, settings.qemu_storage_daemon) if shutil.which(b) is None
    ]
    if missing:
        return Check(
            "hypervisor",
            False,
            f"libvirt driver: {', '.join(missing)} not found; install qemu-utils",
        )
    try:
        import libvirt
    except ImportError:
        return Check(
            "hypervisor",
            False,
            "libvirt driver: libvirt-python is not installed (pip install 'csbs[libvirt]')",
        )
    try:
        conn = libvirt.open(settings.libvirt_uri)
    except libvirt.libvirtError as exc:
        return Check(
            "hypervisor",
            False,
            f"libvirt driver: cannot connect to {settings.libvirt_uri}: "
            f"{exc.get_error_message()} (is libvirtd running?)",
        )
    try:
        domains = len(conn.listAllDomains(0))
        version = conn.getLibVersion()
    finally:
        conn.close()
    return Check(
        "hypervisor",
        True,
        f"libvirt {version // 1000000}.{version // 1000 % 1000} at {settings.libvirt_uri}, "
        f"{domains} domain(s) on host {settings.host}",
    )


async def run_checks(settings: Settings) -> list[Check]:
    checks = await check_temporal(settings)
    checks += [
        check_s3(settings),
        check_object_lock(settings),
        check_replica(settings),
        check_catalog(settings),
        check_driver(settings),
    ]
    return checks
