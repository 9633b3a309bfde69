"""Settings of a csbs deployment, read from ``CSBS_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where the embedded stack keeps its state unless told otherwise (git-ignored).
DEFAULT_VAR_DIR = Path("var")

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of csbs. All optional: the defaults run the embedded stack.

    S3 credentials are deliberately *not* settings: boto3's normal chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) supplies
    them, so they never pass through our models, logs or workflow inputs.
    """

    model_config = SettingsConfigDict(env_prefix="CSBS_", extra="ignore")

    var_dir: Path = DEFAULT_VAR_DIR
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    task_queue: str = "csbs"
    database_url: str = ""
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_bucket: str = "csbs"
    s3_region: str = "us-east-1"
    s3_prefix: str = "csbs"
    compute_driver: Literal["local", "qemu", "libvirt"] = "local"
    servers_dir: Path | None = None
    #: The QEMU binaries the ``qemu`` and ``libvirt`` drivers run (names on PATH or
    #: absolute paths).
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    qemu_storage_daemon: str = "qemu-storage-daemon"
    #: The libvirt connection of the ``libvirt`` driver.
    libvirt_uri: str = "qemu:///system"
    #: The hypervisor host this process serves (``python worker.py --host NAME``); the
    #: default host is served by the plain worker.
    host: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    #: How long a data-plane step of a server on another host waits for that host's agent
    #: to take it before the operation fails, naming the host.
    host_wait_seconds: int = Field(default=300, ge=1, le=86400)
    #: How often a worker reports its host's servers to the catalog (the inventory).
    inventory_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: How long a graceful shutdown (the power button) may take before a server is
    #: powered off (offline backup B12, restore R3).
    shutdown_timeout: float = Field(default=90.0, gt=0, le=480)
    #: The most bytes per second an instant restore's background copy reads from csbs
    #: per disk, so that it leaves the guest's own reads room; 0 is no limit.
    instant_stream_speed: int = Field(default=0, ge=0, le=1 << 40)
    project: str = "default"
    #: Projects a worker serves, comma-separated; empty = just ``project``. Each
    #: gets its own task queue (see ``queue``), catalog view, S3 prefix and servers.
    projects: str = ""
    chunk_size: int = Field(default=4 * MIB, ge=64 * 1024, le=64 * MIB)
    #: Chunks hashed/compressed/uploaded (or fetched on restore) at once per disk.
    transfer_concurrency: int = Field(default=8, ge=1, le=64)
    #: The most chunk GETs a restore keeps in flight per disk: from
    #: ``transfer_concurrency`` it adapts to their latency up to this (``csbs.adaptive``).
    transfer_concurrency_max: int = Field(default=16, ge=1, le=64)
    #: Worker threads for blocking activities.
    max_concurrent_activities: int = Field(default=16, ge=1, le=256)
    zstd_level: int = Field(default=1, ge=1, le=19)
    #: Default quotas of a tenant (B15, guide 4.2 Q4) when it has none of its own
    #: (``csbs quota set``): most disk backups kept (a server backup counts one per disk),
    #: most chunk bytes stored; None = no limit. ``quota_backups`` is the old name of
    #: ``quota_disk_backups``, still read.
    quota_disk_backups: int | None = Field(default=None, ge=1)
    quota_backups: int | None = Field(default=None, ge=1)
    quota_bytes: int | None = Field(default=None, ge=1)
    #: Daily retention cleanup (P5): time of day and time zone of its schedule.
    retention_time: str = "00:00"
    retention_timezone: str = "UTC"
    #: Client-side encryption at rest (csbs.crypto): a 32-byte master key in a file, or
    #: in this variable (hex or base64). Unset = no encryption. Never logged or passed on.
    encryption_key: SecretStr | None = None
    encryption_key_file: Path | None = None
    #: The verify schedule (``VerifyBackups``): time of day, time zone, and how old a
    #: backup's last verification may be before it is verified again. "off": no schedule.
    verify_time: str = "03:00"
    verify_timezone: str = "UTC"
    verify_max_age_days: int = Field(default=7, ge=0, le=3650)
    #: ``host:port`` where the worker and the API serve Prometheus metrics (Temporal SDK
    #: metrics and csbs's own counters); unset = no endpoint. Tracing is configured by the
    #: standard ``OTEL_*`` variables instead (see csbs.telemetry).
    metrics_bind: str | None = None
    #: The daily ``CollectGarbage`` schedule (reconcile closed runs, then sweep): time of
    #: day and time zone, or "off".
    gc_time: str = "01:00"
    gc_timezone: str = "UTC"
    #: How long a sweep's lease lasts unrenewed (it renews every few seconds in every
    #: phase); another sweep may take it over after twice this. Worker clocks must agree
    #: to well within it (NTP).
    gc_lease_seconds: float = Field(default=60.0, ge=1.0, le=3600.0)
    #: S3 Object Lock, compliance mode (issue 17): every object a backup needs is locked
    #: at least this many days after the backup's creation; 0 is no lock. The bucket
    #: must have Object Lock (and so versioning) enabled (``csbs doctor`` checks).
    object_lock_days: int = Field(default=0, ge=0, le=36500)
    #: Chunks are locked to generation boundaries this many days apart, so that the
    #: backups of that many days reuse them without extending their locks (``csbs.locks``).
    object_lock_slack_days: int = Field(default=10, ge=1, le=365)
    #: The most chunk ids a garbage-collection sweep holds in memory at once (~100 bytes
    #: each); a larger repository is swept in shards of key directories, its marked ids
    #: spilled to temporary files (32 bytes each) in ``TMPDIR``.
    gc_shard_chunks: int = Field(default=2_000_000, ge=1)
    #: Replication to a second site (issue 17): another S3 endpoint and bucket, with its
    #: own credentials (boto3's chain when unset). No endpoint: no replica.
    replica_endpoint: str = ""
    replica_bucket: str = "csbs-replica"
    replica_region: str = "us-east-1"
    #: The replica's key prefix; empty: the primary's ``s3_prefix``.
    replica_prefix: str = ""
    replica_access_key_id: SecretStr | None = None
    replica_secret_access_key: SecretStr | None = None
    #: The replica keeps a copy at least this many days after the backup was made, even
    #: once the primary deleted it; 0 keeps it as long as the primary keeps the backup.
    replica_retention_days: int = Field(default=0, ge=0, le=36500)
    #: Which site the ``s3_*`` settings name: ``replica()`` sets "replica", so that its
    #: client signs with the replica's credentials. Not meant to be set by hand.
    s3_site: Literal["primary", "replica"] = "primary"
    #: Failed token attempts one client may make per minute before the API refuses it
    #: (429) for the rest of that minute (issue 16).
    api_failed_logins_per_minute: int = Field(default=10, ge=1, le=1_000_000)
    #: How long a console sign-in lasts (hours); it ends sooner with its token.
    console_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    #: The Temporal Web UI the console links each run to, for admins (default: port 8233
    #: on the host of ``temporal_address``; empty string: no links).
    temporal_ui_url: str | None = None
    #: How long a data transfer may stay silent before Temporal gives it up and retries it,
    #: resuming from its last checkpoint, on any worker (seconds). Lower it where workers
    #: die often and must be replaced fast; the fault suite sets 3.
    heartbeat_timeout: float = Field(default=30.0, ge=1.0, le=3600.0)
    #: Log level of the worker (DEBUG, INFO, WARNING, ERROR).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: How often a running disk backup saves its resume point (staging manifest) to S3.
    checkpoint_seconds: float = Field(default=10.0, ge=0.0, le=3600.0)

    @field_validator("chunk_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("chunk_size must be a power of two")
        return value

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        from csbs.model import check_id

        return check_id(value, "project")

    @property
    def queue(self) -> str:
        """The task queue of this settings' project: ``task_queue`` for the ``default``
        project, ``<task_queue>.<project>`` for any other, so that a project's workflows only
        ever run on workers serving that project."""
        return self.task_queue if self.project == "default" else f"{self.task_queue}.{self.project}"

    def host_queue(self, host: str) -> str:
        """The task queue of a host's agent for this settings' project."""
        return f"{self.queue}@{host}"

    def project_list(self) -> list[str]:
        """The projects a worker serves."""
        from csbs.model import check_id

        names = [p.strip() for p in self.projects.split(",") if p.strip()] or [self.project]
        return [check_id(p, "projects") for p in dict.fromkeys(names)]

    def temporal_ui(self) -> str | None:
        """The Temporal Web UI's base URL (None: the console shows no links to it)."""
        if self.temporal_ui_url is not None:
            return self.temporal_ui_url.rstrip("/") or None
        host = self.temporal_address.rpartition(":")[0] or "127.0.0.1"
        return f"http://{host}:8233"

    @property
    def has_replica(self) -> bool:
        return bool(self.replica_endpoint)

    def replica(self) -> Settings:
        """These settings pointed at the replica: its endpoint, bucket, region and prefix
        in place of the primary's (``ChunkStore(settings.replica())`` is the replica)."""
        from csbs.errors import InvalidState

        if not self.has_replica:
            raise InvalidState(
                "no replica is configured: set CSBS_REPLICA_ENDPOINT and CSBS_REPLICA_BUCKET "
                "(and CSBS_REPLICA_ACCESS_KEY_ID, CSBS_REPLICA_SECRET_ACCESS_KEY)"
            )
        return self.model_copy(
            update={
                "s3_endpoint": self.replica_endpoint,
                "s3_bucket": self.replica_bucket,
                "s3_region": self.replica_region,
                "s3_prefix": self.replica_prefix or self.s3_prefix,
                "s3_site": "replica",
            }
        )

    def s3_credentials(self) -> dict[str, str]:
        """Explicit credentials for this site's S3 client (the replica's own, when set);
        empty: boto3's chain."""
        if self.s3_site != "replica" or self.replica_access_key_id is None:
            return {}
        secret = self.replica_secret_access_key
        return {
            "aws_access_key_id": self.replica_access_key_id.get_secret_value(),
            "aws_secret_access_key": secret.get_secret_value() if secret else "",
        }

    def for_project(self, project: str) -> Settings:
        return self.model_copy(update={"project": project})

    @property
    def effective_database_url(self) -> str:
        """The catalog URL; SQLite under ``var_dir`` by default."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'catalog.db').as_posix()}"

    @property
    def effective_servers_dir(self) -> Path:
        """Where the compute driver keeps its servers."""
        return self.servers_dir if self.servers_dir is not None else self.var_dir / "servers"

    def master_key(self) -> bytes | None:
        """The encryption master key (None: encryption off); EncryptionKeyError if bad."""
        from csbs.crypto import load_master_key

        key = self.encryption_key.get_secret_value() if self.encryption_key else None
        return load_master_key(key, self.encryption_key_file)
