"""The repository in S3: chunk objects, manifests and backup descriptors of one project.

Layout (docs/format.md)::

    <prefix>/<project>/config.json
    <prefix>/<project>/chunks/<id[0:2]>/<id>
    <prefix>/<project>/manifests/<backup_id>/<disk_id>
    <prefix>/<project>/staging/<backup_id>/<disk_id>      (resume checkpoints of running backups)
    <prefix>/<project>/backups/<backup_id>.json
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from csbs.config import Settings
from csbs.crypto import CIPHER_NAME, EncryptionKeyError, ProjectKeys, is_sealed
from csbs.errors import (
    CorruptData,
    CsbsError,
    InvalidInput,
    InvalidState,
    NotFound,
    StorageError,
    StorageUnavailable,
)
from csbs.format import (
    FORMAT_VERSION,
    HASH_NAME,
    MIN_CHUNK_OBJECT,
    BackupDescriptor,
    Manifest,
    PolicyCopy,
    chunk_digest,
    decode_chunk,
    encode_chunk,
)
from csbs.locks import ObjectLocked, VersionedBucket
from csbs.model import check_id

T = TypeVar("T")

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_s3_client(settings: Settings, max_pool: int = 32, sign_payload: bool = True) -> S3Client:
    """A boto3 S3 client for the configured endpoint; credentials from boto3's own chain.

    ``sign_payload=False`` sends ``UNSIGNED-PAYLOAD`` instead of the body's SHA-256 in the
    SigV4 signature (the request itself stays signed). csbs uses it for chunk uploads only:
    a chunk's key is the BLAKE3 digest of its content, which every read verifies, so the
    extra SHA-256 pass over each uploaded byte buys nothing.
    """
    config = Config(
        max_pool_connections=max_pool,
        retries={"max_attempts": 5, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path", "payload_signing_enabled": sign_payload},
        connect_timeout=5,
        read_timeout=60,
    )
    credentials = settings.s3_credentials()
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint or None,
        region_name=settings.s3_region,
        config=config,
        aws_access_key_id=credentials.get("aws_access_key_id"),
        aws_secret_access_key=credentials.get("aws_secret_access_key"),
    )
    # botocore asks for "100 Continue" before every PUT body, one more round trip per
    # chunk; our bodies are at most a chunk, so a refused PUT wastes little.
    client.meta.events.register_last("before-call.s3", _no_expect_continue)
    return client


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _not_found(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


#: S3 error codes that a retry will not cure: a person must fix bucket or credentials.
_PERMANENT_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}


def _storage_error(action: str, exc: Exception) -> CsbsError:
    code = ""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        detail = f"{code}: {err.get('Message', '')}".rstrip(": ")
    else:
        detail = str(exc)
    message = f"object store: {action} failed ({detail})"
    if code in _PERMANENT_CODES:
        return StorageUnavailable(message)
    return StorageError(message)


class ChunkStore:
    """Reads and writes one project's repository; safe to share between threads."""

    def __init__(self, settings: Settings, client: S3Client | None = None) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.chunk_size = settings.chunk_size
        self.project = check_id(settings.project, "project")
        self.root = f"{settings.s3_prefix.strip('/')}/{self.project}".lstrip("/")
        pool = 4 * settings.transfer_concurrency
        self.s3 = client or make_s3_client(settings, max_pool=pool)
        #: Chunk uploads: content-addressed and verified on read, so the payload is not signed.
        self.chunk_s3 = client or make_s3_client(settings, max_pool=pool, sign_payload=False)
        self._checked_config = False
        self._config_lock = threading.Lock()
        #: Versions and Object Lock (issue 17, ``csbs.locks``).
        self.versions = VersionedBucket(self.s3, self.bucket)
        self._object_lock: tuple[bool, str] | None = None
        master = settings.master_key()
        self.keys = ProjectKeys(master, self.project) if master else None
        self._id_key = self.keys.id_key if self.keys else None

    # -- keys ---------------------------------------------------------------------------
    def chunk_key(self, chunk_id: bytes) -> str:
        hexid = chunk_id.hex()
        return f"{self.root}/chunks/{hexid[:2]}/{hexid}"

    def manifest_key(self, backup_id: str, disk_id: str) -> str:
        return f"{self.root}/manifests/{check_id(backup_id)}/{check_id(disk_id)}"

    def staging_key(self, backup_id: str, disk_id: str) -> str:
        return f"{self.root}/staging/{check_id(backup_id)}/{check_id(disk_id)}"

    def descriptor_key(self, backup_id: str) -> str:
        return f"{self.root}/backups/{check_id(backup_id)}.json"

    # -- encryption -----------------------------------------------------------------------
    def _name(self, key: str) -> str:
        """An object's name inside the repository: what its seal is bound to."""
        return key.removeprefix(f"{self.root}/")

    def _seal(self, key: str, body: bytes) -> bytes:
        return self.keys.seal(body, self._name(key)) if self.keys else body

    def _open(self, key: str, blob: bytes) -> bytes:
        if self.keys is not None:
            return self.keys.open(blob, self._name(key))
        if is_sealed(blob):
            raise EncryptionKeyError(
                f"repository {self.root} is encrypted: set CSBS_ENCRYPTION_KEY_FILE or "
                f"CSBS_ENCRYPTION_KEY to its key"
            )
        return blob

    def chunk_id(self, data: bytes | bytearray) -> bytes:
        """The id of a chunk: BLAKE3 of its plaintext, keyed per project when encrypted."""
        return chunk_digest(data, self._id_key)

    # -- object access, behind the repository check ---------------------------------------
    @property
    def config_key(self) -> str:
        return f"{self.root}/config.json"

    def _put(
        self,
        key: str,
        body: bytes,
        client: S3Client | None = None,
        lock_until: datetime | None = None,
    ) -> None:
        """Write an object (locked in compliance mode until ``lock_until``); the first
        write creates or checks the repository's config."""
        self.ensure_config()
        self._raw_put(key, body, client, lock_until)

    def _get(self, key: str) -> bytes:
        """Read an object; the first read checks the key against the repository's config.
        In a versioned bucket an object hidden by a delete marker is read from its newest
        version (``csbs.locks``)."""
        self._check_existing_config()
        try:
            return self._raw_get(key)
        except NotFound:
            if not self.versions.enabled():
                raise
            versions = self.versions.versions(key)
            if not versions:
                raise
            return self.versions.get(key, versions[0])

    def _check_existing_config(self) -> None:
        """Check our key against the config, if the repository has one yet (reads of an
        empty repository find nothing either way)."""
        if self._checked_config:
            return
        try:
            config = json.loads(self._raw_get(self.config_key))
        except NotFound:
            return
        self._check_config(config)

    # -- raw object access ----------------------------------------------------------------
    def _raw_put(
        self,
        key: str,
        body: bytes,
        client: S3Client | None = None,
        lock_until: datetime | None = None,
    ) -> None:
        lock: dict[str, Any] = {}
        if lock_until is not None:
            lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": lock_until}
        try:
            (client or self.s3).put_object(Bucket=self.bucket, Key=key, Body=body, **lock)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"PUT {key}", exc) from exc

    def _raw_get(self, key: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _not_found(exc):
                raise NotFound(f"object store: {key} does not exist") from exc
            raise _storage_error(f"GET {key}", exc) from exc
        except BotoCoreError as exc:
            raise _storage_error(f"GET {key}", exc) from exc

    def _head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        self._check_existing_config()
        return self._raw_head(key)

    def _raw_head(self, key: str) -> int | None:
        try:
            return int(self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise _storage_error(f"HEAD {key}", exc) from exc
        except BotoCoreError as exc:
            raise _storage_error(f"HEAD {key}", exc) from exc

    def _delete(self, keys: list[str]) -> None:
        """Delete objects; in a versioned bucket every version of them (a delete marker
        alone frees nothing), refusing with the keys that S3 Object Lock still holds."""
        self._check_existing_config()
        if self.versions.enabled():
            locked = self.versions.delete_all(keys)
            if locked:
                raise ObjectLocked(
                    f"object store: {len(locked)} objects are still locked (S3 Object Lock), "
                    f"e.g. {locked[0]}; they can be deleted once their lock runs out"
                )
            return
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})  # type: ignore[typeddict-item]
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error("DELETE", exc) from exc

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``<root>/<prefix>``."""
        for key, _size in self.list_objects(prefix):
            yield key

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``<root>/<prefix>``."""
        self._check_existing_config()
        yield from self._raw_list(f"{self.root}/{prefix}")

    def _raw_list(self, full_prefix: str, limit: int | None = None) -> Iterator[tuple[str, int]]:
        if limit is not None:
            try:
                page = self.s3.list_objects_v2(
                    Bucket=self.bucket, Prefix=full_prefix, MaxKeys=limit
                )
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error(f"LIST {full_prefix}", exc) from exc
            for obj in page.get("Contents", [])[:limit]:
                yield obj["Key"], obj.get("Size", 0)
            return
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj.get("Size", 0)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"LIST {full_prefix}", exc) from exc

    # -- repository config --------------------------------------------------------------
    def ensure_config(self) -> None:
        """Create the repository's config.json, or check it matches our chunk size, hash
        and key. Never creates one over existing data (a lost config must be restored, or
        every key would be accepted)."""
        if self._checked_config:
            return
        with self._config_lock:
            if self._checked_config:
                return
            key = self.config_key
            try:
                config = json.loads(self._raw_get(key))
            except NotFound:
                others = [k for k, _ in self._raw_list(f"{self.root}/", limit=2) if k != key]
                if others:
                    try:  # another writer may have just created it
                        config = json.loads(self._raw_get(key))
                    except NotFound:
                        raise EncryptionKeyError(
                            f"repository {self.root} holds objects but no config.json: "
                            f"restore config.json from a copy; a new one would not match "
                            f"the data"
                        ) from None
                else:
                    config = {
                        "format_version": FORMAT_VERSION,
                        "hash": HASH_NAME,
                        "chunk_size": self.chunk_size,
                        "encryption": CIPHER_NAME if self.keys else None,
                        "key_check": self.keys.check if self.keys else None,
                    }
                    self._raw_put(key, json.dumps(config, indent=2).encode())
            self._check_config(config)

    def _check_config(self, config: dict[str, Any]) -> None:
        if config.get("chunk_size") != self.chunk_size or config.get("hash") != HASH_NAME:
            raise InvalidInput(
                f"repository {self.root} uses chunk_size={config.get('chunk_size')} "
                f"hash={config.get('hash')}; settings ask for chunk_size={self.chunk_size}"
            )
        self.check_key(config)
        self._checked_config = True

    def check_key(self, config: dict[str, Any]) -> None:
        encrypted = config.get("encryption") is not None
        if encrypted and config.get("encryption") != CIPHER_NAME:
            raise EncryptionKeyError(
                f"repository {self.root} uses cipher {config.get('encryption')!r}, which this "
                f"csbs does not know"
            )
        if encrypted and self.keys is None:
            raise EncryptionKeyError(
                f"repository {self.root} is encrypted: set CSBS_ENCRYPTION_KEY_FILE or "
                f"CSBS_ENCRYPTION_KEY to its key"
            )
        if not encrypted and self.keys is not None:
            raise EncryptionKeyError(
                f"repository {self.root} is not encrypted, but an encryption key is set: "
                f"unset it, or use a new CSBS_S3_PREFIX for an encrypted repository"
            )
        if self.keys is not None and config.get("key_check") != self.keys.check:
            raise EncryptionKeyError(
                f"the encryption key does not match repository {self.root} (its key check "
                f"differs): use the key the repository was created with"
            )

    # -- chunks ---------------------------------------------------------------------------
    def has_chunk(self, chunk_id: bytes) -> bool:
        """Whether the store holds the chunk. An object too short to be a chunk does not
        count: SeaweedFS keeps an empty object when a PUT's connection drops before its
        body, and such a stub must be uploaded over, never referenced."""
        size = self._head(self.chunk_key(chunk_id))
        return size is not None and size >= MIN_CHUNK_OBJECT

    def put_chunk(
        self, chunk_id: bytes, data: bytes | bytearray, lock_until: datetime | None = None
    ) -> int:
        """Store a chunk (locked until ``lock_until``); return the bytes written."""
        key = self.chunk_key(chunk_id)
        blob = self._seal(key, encode_chunk(data, self.settings.zstd_level))
        self._put(key, blob, self.chunk_s3, lock_until)
        return len(blob)

    def put_chunk_blob(
        self, chunk_id: bytes, blob: bytes, lock_until: datetime | None = None
    ) -> None:
        """Store a chunk object as another site stores it (replication): its seal binds
        its name inside the repository, which is the same on every site."""
        self._put(self.chunk_key(chunk_id), blob, self.chunk_s3, lock_until)

    def get_chunk(self, chunk_id: bytes) -> tuple[bytes, int]:
        """Fetch and verify a chunk; return (plaintext, stored bytes)."""
        try:
            blob = self.fetch_chunk(chunk_id)
            return self.open_chunk(chunk_id, blob), len(blob)
        except CorruptData:
            recovered = self.recover_chunk(chunk_id)
            if recovered is None:
                raise
            return recovered

    def recover_chunk(self, chunk_id: bytes) -> tuple[bytes, int] | None:
        """A chunk whose current object is missing or damaged, from the newest version
        that verifies (a versioned bucket keeps a locked chunk's version however it was
        deleted or overwritten since); None when there is none."""
        key = self.chunk_key(chunk_id)
        if self.versions.enabled():
            for version_id in self.versions.versions(key):
                blob = self.versions.get(key, version_id)
                with contextlib.suppress(CorruptData):
                    return self.open_chunk(chunk_id, blob), len(blob)
        return None

    def has_version(self, chunk_id: bytes) -> bool:
        """Whether a versioned bucket still holds a version of a chunk that a listing
        does not show (hidden by a delete marker)."""
        return self.versions.enabled() and bool(self.versions.versions(self.chunk_key(chunk_id)))

    def require_object_lock(self, days: int) -> None:
        """Refuse a locked backup (``days`` of S3 Object Lock) into a bucket without
        Object Lock, before anything is written (asked once per store)."""
        if self._object_lock is None:
            self._object_lock = self.versions.status()
        locked, versioning = self._object_lock
        if not (locked and versioning == "Enabled"):
            raise InvalidState(
                f"backups are to be locked {days} days (S3 Object Lock), but bucket "
                f"{self.bucket} has Object Lock {'enabled' if locked else 'not enabled'} and "
                f"versioning {versioning.lower()}: use a bucket created with Object Lock, or "
                f"set CSBS_OBJECT_LOCK_DAYS=0 and no policy --lock-days (csbs doctor says more)"
            )

    def extend_chunk_locks(self, chunk_ids: set[bytes], until: datetime) -> tuple[int, int]:
        """Lock these chunks until ``until``; (extended, already locked longer)."""
        return self.versions.extend([self.chunk_key(c) for c in sorted(chunk_ids)], until)

    def fetch_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's object as stored (the network half of ``get_chunk``)."""
        try:
            return self._get(self.chunk_key(chunk_id))
        except NotFound as exc:
            raise CorruptData(f"chunk {chunk_id.hex()} is missing from the object store") from exc

    def open_chunk(self, chunk_id: bytes, blob: bytes) -> bytes:
        """Decrypt, decompress and verify a fetched chunk (the CPU half of ``get_chunk``)."""
        try:
            plain = self._open(self.chunk_key(chunk_id), blob)
        except CorruptData:
            raise CorruptData(
                f"chunk {chunk_id.hex()}: digest mismatch (stored data is damaged or does not "
                f"decrypt with this key)"
            ) from None
        return decode_chunk(plain, chunk_id, self._id_key, self.chunk_size)

    def delete_chunks(self, chunk_ids: list[bytes]) -> None:
        if chunk_ids:
            self._delete([self.chunk_key(c) for c in chunk_ids])

    def delete_keys(self, keys: list[str]) -> None:
        """Delete objects by key (a sweep's batch)."""
        if keys:
            self._delete(keys)

    def list_chunk_versions(self, firsts: range) -> Iterator[tuple[bytes, str, str, int]]:
        """(id, key, version id, size) of every version and delete marker of the chunks
        in the key directories ``chunks/<first:02x>/`` (a versioned bucket)."""
        self._check_existing_config()
        for first in firsts:
            for key, version_id, size, _marker in self.versions.listing(
                f"{self.root}/chunks/{first:02x}/"
            ):
                try:
                    chunk_id = bytes.fromhex(key.rsplit("/", 1)[-1])
                except ValueError:
                    continue
                if chunk_id:
                    yield chunk_id, key, version_id, size

    def chunk_index(self, limit: int) -> set[bytes] | None:
        """Every chunk id in the repository, or None when there are more than ``limit``.

        A backup holding its slot may use it in place of an existence check per chunk:
        garbage collection, the only thing that deletes chunks, never overlaps a backup."""
        ids: set[bytes] = set()
        for chunk_id in self.list_chunk_ids():
            ids.add(chunk_id)
            if len(ids) > limit:
                return None
        return ids

    def list_chunk_ids(self) -> Iterator[bytes]:
        """Ids of the chunks the store holds (stubs too short to be a chunk left out)."""
        for chunk_id, size in self.list_chunks():
            if size >= MIN_CHUNK_OBJECT:
                yield chunk_id

    def list_chunks(self, firsts: range | None = None) -> Iterator[tuple[bytes, int]]:
        """(id, stored size) of every chunk object (only those whose id's first byte is in
        ``firsts``: the key directories ``chunks/<first:02x>/``)."""
        prefixes = ["chunks/"] if firsts is None else [f"chunks/{b:02x}/" for b in firsts]
        for prefix in prefixes:
            for key, size in self.list_objects(prefix):
                name = key.rsplit("/", 1)[-1]
                try:
                    chunk_id = bytes.fromhex(name)
                except ValueError:
                    continue
                if chunk_id:
                    yield chunk_id, size

    # -- manifests and descriptors ---------------------------------------------------------
    def put_manifest(
        self, manifest: Manifest, staging: bool = False, lock_until: datetime | None = None
    ) -> str:
        key = (self.staging_key if staging else self.manifest_key)(
            manifest.backup_id, manifest.disk_id
        )
        self._put(key, self._seal(key, manifest.encode()), lock_until=lock_until)
        return key

    def get_manifest(self, backup_id: str, disk_id: str, staging: bool = False) -> Manifest:
        key = (self.staging_key if staging else self.manifest_key)(backup_id, disk_id)
        manifest = self._read_verified(key, lambda blob: Manifest.decode(self._open(key, blob)))
        if manifest.backup_id != backup_id or manifest.disk_id != disk_id:
            raise CorruptData(f"manifest at {key} belongs to another backup or disk")
        if manifest.chunk_size != self.chunk_size:
            raise CorruptData(
                f"manifest at {key} uses chunk size {manifest.chunk_size}, the repository "
                f"{self.chunk_size}"
            )
        return manifest

    def _read_verified(self, key: str, parse: Callable[[bytes], T]) -> T:
        """Read and parse an object; in a versioned bucket, when the current version does
        not parse (overwritten with garbage), the newest older version that does."""
        blob = self._get(key)
        try:
            return parse(blob)
        except CorruptData:
            if not self.versions.enabled():
                raise
            for version_id in self.versions.versions(key):
                with contextlib.suppress(CorruptData):
                    return parse(self.versions.get(key, version_id))
            raise

    def put_descriptor(
        self, descriptor: BackupDescriptor, lock_until: datetime | None = None
    ) -> None:
        key = self.descriptor_key(descriptor.backup_id)
        self._put(key, self._seal(key, descriptor.encode()), lock_until=lock_until)

    def get_descriptor(self, backup_id: str) -> BackupDescriptor:
        key = self.descriptor_key(backup_id)
        descriptor = self._read_verified(
            key, lambda blob: BackupDescriptor.decode(self._open(key, blob))
        )
        if descriptor.backup_id != backup_id:
            raise CorruptData(f"descriptor at {key} belongs to another backup")
        return descriptor

    # -- the projects beside this one ------------------------------------------------------
    def sibling_projects(self) -> list[str]:
        """Names of the folders under the prefix (each project's repository is one)."""
        parent = self.root.rsplit("/", 1)[0] + "/" if "/" in self.root else ""
        names: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=parent, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(parent) :].rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"LIST {parent}", exc) from exc
        return sorted(n for n in names if n)

    def has_config(self, project: str) -> bool:
        """Whether the project beside this one has a repository config."""
        parent = self.root.rsplit("/", 1)[0] + "/" if "/" in self.root else ""
        return self._raw_head(f"{parent}{project}/config.json") is not None

    # -- policy copies ----------------------------------------------------------------------
    def policy_key(self, policy_id: str) -> str:
        return f"{self.root}/policies/{check_id(policy_id)}.json"

    def put_policy(self, copy: PolicyCopy) -> None:
        key = self.policy_key(copy.id)
        self._put(key, self._seal(key, copy.encode()))

    def get_policy(self, policy_id: str) -> PolicyCopy:
        key = self.policy_key(policy_id)
        copy = self._read_verified(key, lambda blob: PolicyCopy.decode(self._open(key, blob)))
        if copy.id != policy_id:
            raise CorruptData(f"policy copy at {key} belongs to another policy")
        return copy

    def _json_ids(self, folder: str) -> list[str]:
        """The ids of the ``<folder>/<id>.json`` objects of the repository."""
        return sorted(
            key.rsplit("/", 1)[-1].removesuffix(".json")
            for key in self.list_keys(f"{folder}/")
            if key.endswith(".json")
        )

    def policy_ids(self) -> list[str]:
        """Ids of the policies with a copy in the repository."""
        return self._json_ids("policies")

    def delete_policies(self, policy_ids: list[str]) -> None:
        if policy_ids:
            self._delete([self.policy_key(p) for p in policy_ids])

    def backup_ids(self) -> list[str]:
        """Ids of the backups with a descriptor (committed) in the repository."""
        return self._json_ids("backups")

    def delete_staging(self, backup_id: str) -> None:
        self._delete(list(self.list_keys(f"staging/{check_id(backup_id)}/")))

    def delete_backup_objects(
        self, backup_id: str, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Delete a backup's manifests, staging objects and, last, its descriptor (not its
        chunks); ``progress(done, total)`` after each object."""
        keys = list(self.list_keys(f"manifests/{check_id(backup_id)}/"))
        keys += list(self.list_keys(f"staging/{backup_id}/"))
        keys.append(self.descriptor_key(backup_id))
        if progress is None:
            self._delete(keys)
            return len(keys)
        progress(0, len(keys))
        for done, key in enumerate(keys, start=1):
            self._delete([key])
            progress(done, len(keys))
        return len(keys)

    def list_manifest_refs(self, staging: bool = False) -> Iterator[tuple[str, str]]:
        """(backup_id, disk_id) of every committed (or staging) manifest."""
        for key in self.list_keys("staging/" if staging else "manifests/"):
            parts = key.rsplit("/", 2)
            yield parts[-2], parts[-1]

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (development and tests)."""
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.s3.create_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error(f"create bucket {self.bucket}", exc) from exc
