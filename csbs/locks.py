"""Immutable backups with S3 Object Lock in compliance mode (issue 17).

A locked backup's manifests and descriptor are locked until the backup's lock date
(``CSBS_OBJECT_LOCK_DAYS`` or the policy's ``--lock-days`` after its creation, whichever
is longer). Its chunks must stay at least that long, but most of them are shared with
the backups before and after it; extending every reused chunk's lock at every backup
would cost a request per chunk per backup. So chunks are locked in *generations*
(Veeam's "block generation"): a chunk's lock runs to a generation boundary (every
``CSBS_OBJECT_LOCK_SLACK_DAYS``, 10 by default, from the epoch at 00:00 UTC) at or after
the date it must reach. A disk backup records the generation all its chunks reach; the
next backup of the disk extends its reused chunks only when that falls short of its own
lock date, once per generation, all in one parallel pass.

With versioning on (Object Lock needs it) a delete only hides an object behind a delete
marker, and an overwrite only adds a version: the locked version is still there. Reads
fall back to the newest older version that verifies (``VersionedBucket``), so a backup
restores bit-identical after either; deletes that must free space (a sweep, a backup
deleted after its lock date) remove every version of a key, and a version still locked
is left in place and counted, never an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from csbs.errors import InvalidState, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Parallel lock extensions (PutObjectRetention) and version deletes.
LOCK_CONCURRENCY = 16


def as_utc(when: datetime) -> datetime:
    """A catalog time as an aware UTC time (SQLite gives them back naive)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def lock_until(created_at: datetime, days: int) -> datetime | None:
    """A backup's lock date: ``days`` after its creation (None: not locked)."""
    return created_at + timedelta(days=days) if days > 0 else None


def generation(need: datetime, slack_days: int) -> datetime:
    """The first generation boundary at or after ``need``: chunks locked to it need no
    extension by the backups of the next ``slack_days`` days."""
    step = timedelta(days=slack_days)
    count = -(-(as_utc(need) - EPOCH) // step)  # ceiling division of timedeltas
    return EPOCH + count * step


def chunks_to_extend(
    ids: set[bytes],
    uploaded: set[bytes],
    parent_ids: set[bytes] | None,
    parent_until: datetime | None,
    need: datetime,
) -> set[bytes]:
    """The chunks of a disk backup whose lock may fall short of ``need``: none that this
    backup uploaded (locked to its generation already) and, while the parent's generation
    reaches ``need``, none that the parent references either."""
    todo = ids - uploaded
    if parent_ids is not None and parent_until is not None and as_utc(parent_until) >= as_utc(need):
        todo -= parent_ids
    return todo


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class VersionedBucket:
    """The versions and locks of a bucket's objects."""

    def __init__(self, s3: S3Client, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self._versioned: bool | None = None
        self._lock = threading.Lock()

    def enabled(self) -> bool:
        """Whether the bucket keeps versions (asked once)."""
        with self._lock:
            if self._versioned is None:
                try:
                    status = self.s3.get_bucket_versioning(Bucket=self.bucket).get("Status")
                except (ClientError, BotoCoreError):
                    status = None
                self._versioned = status == "Enabled"
            return self._versioned

    def status(self) -> tuple[bool, str]:
        """(Object Lock enabled, versioning status) of the bucket, for ``csbs doctor``."""
        try:
            versioning = str(self.s3.get_bucket_versioning(Bucket=self.bucket).get("Status") or "")
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"object store: versioning of {self.bucket}: {exc}") from exc
        try:
            config = self.s3.get_object_lock_configuration(Bucket=self.bucket)
            locked = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError:
            locked = False
        return locked, versioning or "never enabled"

    def versions(self, key: str) -> list[str]:
        """The version ids of ``key`` itself (not delete markers), newest first."""
        found: list[tuple[datetime, str]] = []
        try:
            pages = self.s3.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=key
            )
            for page in pages:
                for v in page.get("Versions", []):
                    if v.get("Key") == key and v.get("VersionId"):
                        found.append((v["LastModified"], str(v["VersionId"])))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"object store: versions of {key}: {exc}") from exc
        return [vid for _, vid in sorted(found, reverse=True)]

    def get(self, key: str, version_id: str) -> bytes:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key, VersionId=version_id)["Body"]
            return body.read()
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"object store: GET {key} version {version_id}: {exc}") from exc

    def extend(self, keys: list[str], until: datetime) -> tuple[int, int]:
        """Lock the current version of every key until ``until`` (compliance mode), in
        parallel. Returns (extended, already locked longer: S3 refuses to shorten)."""
        counts = [0, 0]
        counts_lock = threading.Lock()

        def one(key: str) -> None:
            try:
                self.s3.put_object_retention(
                    Bucket=self.bucket,
                    Key=key,
                    Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until},
                )
                slot = 0
            except ClientError as exc:
                if _code(exc) != "AccessDenied":
                    raise StorageError(f"object store: lock {key}: {exc}") from exc
                slot = 1  # its lock already runs past ``until``
            except BotoCoreError as exc:
                raise StorageError(f"object store: lock {key}: {exc}") from exc
            with counts_lock:
                counts[slot] += 1

        with ThreadPoolExecutor(LOCK_CONCURRENCY, thread_name_prefix="csbs-lock") as pool:
            for future in [pool.submit(one, k) for k in keys]:
                future.result()
        return counts[0], counts[1]

    def listing(self, prefix: str) -> Iterator[tuple[str, str, int, bool]]:
        """(key, version id, size, is a delete marker) of every version under ``prefix``."""
        try:
            pages = self.s3.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for v in page.get("Versions", []):
                    yield v["Key"], str(v["VersionId"]), int(v.get("Size", 0)), False
                for m in page.get("DeleteMarkers", []):
                    yield m["Key"], str(m["VersionId"]), 0, True
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"object store: versions under {prefix}: {exc}") from exc

    def delete_all(self, keys: list[str]) -> list[str]:
        """Delete every version (and delete marker) of these keys; return the keys of
        which a locked version was left in place."""
        targets = [(k, vid) for key in keys for k, vid, _, _ in self.listing(key) if k == key]
        return self.delete_versions(targets)

    def delete_versions(self, targets: list[tuple[str, str]]) -> list[str]:
        """Delete these (key, version id); return the keys of versions S3 refused to
        delete because they are still locked."""
        locked: set[str] = set()
        for start in range(0, len(targets), 1000):
            batch = [{"Key": k, "VersionId": v} for k, v in targets[start : start + 1000]]
            try:
                reply = self.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": batch},  # type: ignore[typeddict-item]
                )
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"object store: DELETE: {exc}") from exc
            for error in reply.get("Errors", []):
                if error.get("Code") == "AccessDenied":
                    locked.add(str(error.get("Key")))
                else:
                    raise StorageError(
                        f"object store: DELETE {error.get('Key')}: {error.get('Code')} "
                        f"{error.get('Message')}"
                    )
        return sorted(locked)


class ObjectLocked(InvalidState):
    """A locked backup cannot be deleted before its lock date."""
