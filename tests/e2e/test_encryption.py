"""Encryption at rest (issue 7): AES-256-GCM for chunks, manifests and descriptors with a
key from a file or the environment; chunk ids keyed per project; a wrong or missing key
fails with a clear error and changes nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from csbs.crypto import EncryptionKeyError, ProjectKeys, is_sealed, load_master_key
from csbs.errors import CorruptData
from csbs.format import chunk_digest
from tests.conftest import Stack, backup, make_settings, restore, running_stack

MIB = 1024 * 1024
KEY = bytes(range(32))


def test_keys_from_file_or_environment_and_clear_errors(tmp_path: Path) -> None:
    raw = tmp_path / "raw.key"
    raw.write_bytes(KEY)
    hexed = tmp_path / "hex.key"
    hexed.write_text(KEY.hex() + "\n")
    assert load_master_key(None, raw) == KEY == load_master_key(None, hexed)
    import base64

    assert load_master_key(base64.b64encode(KEY).decode(), None) == KEY
    assert load_master_key(None, None) is None
    with pytest.raises(EncryptionKeyError, match=r"cannot read .*missing\.key"):
        load_master_key(None, tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_text("abcd")
    with pytest.raises(EncryptionKeyError, match="must hold a 32-byte key"):
        load_master_key(None, short)
    with pytest.raises(EncryptionKeyError, match="not both"):
        load_master_key(KEY.hex(), raw)


def test_sealed_objects_open_only_with_their_key_and_name() -> None:
    a, b = ProjectKeys(KEY, "p1"), ProjectKeys(KEY, "p2")
    blob = a.seal(b"manifest bytes", "manifests/bk-1/vda")
    assert is_sealed(blob) and b"manifest bytes" not in blob
    assert a.open(blob, "manifests/bk-1/vda") == b"manifest bytes"
    with pytest.raises(CorruptData, match="does not decrypt"):
        b.open(blob, "manifests/bk-1/vda")  # another project's key
    with pytest.raises(CorruptData, match="does not decrypt"):
        a.open(blob, "manifests/bk-2/vda")  # moved to another name
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(CorruptData, match="does not decrypt"):
        a.open(bytes(damaged), "manifests/bk-1/vda")
    # Chunk ids are keyed per project: equal data, unrelated ids.
    data = os.urandom(4096)
    ids = {chunk_digest(data), chunk_digest(data, a.id_key), chunk_digest(data, b.id_key)}
    assert len(ids) == 3
    assert "hidden" in repr(a) and KEY.hex() not in repr(a)


def all_objects(stack: Stack) -> dict[str, bytes]:
    """Every object of the repository, read straight from S3 (whatever key the stack has)."""
    s3, bucket = stack.store.s3, stack.store.bucket
    keys = [key for key, _ in stack.store._raw_list(f"{stack.store.root}/")]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.slow
async def test_an_encrypted_repository_end_to_end(tmp_path: Path, s3: Any, temporal: Any) -> None:
    key_file = tmp_path / "csbs.key"
    key_file.write_text(KEY.hex())
    settings = make_settings(tmp_path, s3, encryption_key_file=key_file)
    async with running_stack(temporal, settings) as stack:
        drv = stack.driver
        server = drv.create_server("web-1", [8 * MIB, 8 * MIB])
        text = b"TOP SECRET customer record " * 40000  # compressible, recognisable
        drv.write(server.id, server.disks[0].id, 0, text)
        drv.write(server.id, server.disks[1].id, MIB, os.urandom(2 * MIB))
        before = drv.checksum(server.id)
        bk = await backup(stack, server.id, name="enc_bk", description="payroll server")
        objects = all_objects(stack)
        config_key = next(k for k in objects if k.endswith("/config.json"))
        for key, blob in objects.items():
            if key == config_key:
                continue
            assert is_sealed(blob), key  # chunks, manifests, the descriptor
            assert b"TOP SECRET" not in blob and b"payroll" not in blob and b"enc_bk" not in blob
        assert (
            b'"aes-256-gcm"' in objects[config_key]
            and KEY.hex().encode() not in objects[config_key]
        )
        # Chunk ids are keyed: the plain BLAKE3 of the data names no object.
        plain_id = chunk_digest(text[: 1 * MIB]).hex()
        assert not any(plain_id in k for k in objects)

        drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
        await restore(stack, bk["id"])
        assert drv.checksum(server.id) == before
        verified = await stack.cli("backup", "verify", bk["id"], "--wait", "--json")
        assert verified.json()["ok"] is True

        # A worker and the CLI without the key, or with another, are refused clearly.
        other = tmp_path / "other.key"
        other.write_text(os.urandom(32).hex())
    async with running_stack(
        temporal, settings.model_copy(update={"encryption_key_file": other})
    ) as wrong:
        with pytest.raises(WorkflowFailureError) as info:
            await backup(wrong, server.id)
        assert "encryption key does not match" in str(info.value.cause)
        with pytest.raises(WorkflowFailureError) as info:
            await restore(wrong, bk["id"])
        assert "encryption key does not match" in str(info.value.cause)
    async with running_stack(
        temporal, settings.model_copy(update={"encryption_key_file": None})
    ) as missing:
        with pytest.raises(WorkflowFailureError) as info:
            await restore(missing, bk["id"])
        assert "is encrypted: set CSBS_ENCRYPTION_KEY_FILE or CSBS_ENCRYPTION_KEY" in str(
            info.value.cause
        )
        bad = await missing.cli("backup", "verify", bk["id"], "--wait", check=False)
        assert bad.code == 1 and "is encrypted: set CSBS_ENCRYPTION_KEY_FILE" in bad.stderr
        assert all_objects(missing).keys() == objects.keys()  # nothing written
    assert drv.checksum(server.id) == before


def test_a_passphrase_is_not_a_key_and_the_header_is_authenticated(tmp_path: Path) -> None:
    phrase = tmp_path / "phrase.key"
    phrase.write_text("correct horse battery staple 123")  # 32 printable bytes
    with pytest.raises(EncryptionKeyError, match="must hold a 32-byte key"):
        load_master_key(None, phrase)
    with pytest.raises(EncryptionKeyError, match="must hold a 32-byte key"):
        load_master_key("x" * 32, None)
    keys = ProjectKeys(KEY, "p1")
    blob = bytearray(keys.seal(b"data", "chunks/ab/ab"))
    blob[5] ^= 1  # a reserved header byte
    with pytest.raises(CorruptData, match="does not decrypt"):
        keys.open(bytes(blob), "chunks/ab/ab")
    blob[5] ^= 1
    blob[4] = 9  # an unknown version
    with pytest.raises(CorruptData, match="unsupported encryption version"):
        keys.open(bytes(blob), "chunks/ab/ab")


def test_every_store_access_checks_the_key_first(tmp_path: Path, s3: Any) -> None:
    """Whatever step a worker runs first (not only the snapshot), a missing or wrong key is
    refused before anything is read or written; a repository that lost its config is
    never re-created over its data."""
    from csbs.chunkstore import ChunkStore

    key_file, other = tmp_path / "a.key", tmp_path / "b.key"
    key_file.write_text(KEY.hex())
    other.write_text(os.urandom(32).hex())
    settings = make_settings(tmp_path, s3, encryption_key_file=key_file)
    store = ChunkStore(settings)
    data = os.urandom(4096)
    chunk_id = store.chunk_id(data)
    store.put_chunk(chunk_id, data)
    before = sorted(store.list_keys(""))
    no_key = ChunkStore(settings.model_copy(update={"encryption_key_file": None}))
    wrong = ChunkStore(settings.model_copy(update={"encryption_key_file": other}))
    refused: list[Callable[[], object]] = [
        lambda: no_key.get_chunk(chunk_id),
        lambda: no_key.put_chunk(chunk_id, data),
        lambda: no_key.has_chunk(chunk_id),
        lambda: list(no_key.list_chunk_ids()),
    ]
    for attempt in refused:
        with pytest.raises(EncryptionKeyError, match="is encrypted: set CSBS_ENCRYPTION_KEY"):
            attempt()
    mismatched: list[Callable[[], object]] = [
        lambda: wrong.get_chunk(chunk_id),
        lambda: wrong.put_chunk(os.urandom(32), data),
        lambda: wrong.delete_chunks([chunk_id]),
    ]
    for attempt in mismatched:
        with pytest.raises(EncryptionKeyError, match="does not match"):
            attempt()
    assert sorted(store.list_keys("")) == before  # nothing written or deleted
    store.s3.delete_object(Bucket=store.bucket, Key=store.config_key)
    fresh = ChunkStore(settings.model_copy(update={"encryption_key_file": other}))
    with pytest.raises(EncryptionKeyError, match=r"holds objects but no config\.json"):
        fresh.put_chunk(os.urandom(32), data)
