"""Client-side encryption at rest: AES-256-GCM for chunks, manifests and backup
descriptors, and chunk ids keyed per project (docs/format.md, "Encryption").

One master key (32 bytes, from ``CSBS_ENCRYPTION_KEY_FILE`` or ``CSBS_ENCRYPTION_KEY``)
serves every project; HKDF-SHA256 derives each project's own keys from it:

- the chunk-id key: chunk ids are keyed BLAKE3, so equal data has different ids in
  different projects and an id says nothing about the data without the key;
- the AEAD key: every object is sealed as ``CSBE`` + version + a random 96-bit nonce +
  AES-256-GCM(ciphertext and tag), with the object's name inside the repository as
  associated data, so an object moved to another name does not open;
- a key check, kept in the repository's ``config.json``, so a wrong key is refused with a
  clear error before anything is read or written.

The master key never leaves the process: it is not a workflow input or result, not logged,
and ``repr`` of the key objects hides it.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from csbs.errors import CorruptData, CsbsError

KEY_SIZE = 32
NONCE_SIZE = 12
SEALED_MAGIC = b"CSBE"
SEALED_VERSION = 1
CIPHER_NAME = "aes-256-gcm"
_HEADER = struct.Struct(">4sB3x")  # magic, version, reserved


class EncryptionKeyError(CsbsError):
    """The encryption key is missing, malformed, or not the repository's: a person must
    fix the configuration; retrying cannot help."""


def parse_key(raw: bytes, source: str, allow_raw: bool = False) -> bytes:
    """A 32-byte key: 64 hex digits or base64 text (whitespace ignored), or, from a file
    only, 32 raw bytes that are not all printable (a passphrase is not a key)."""
    if allow_raw and len(raw) == KEY_SIZE and not all(32 <= b < 127 for b in raw):
        return raw
    text = raw.strip()
    decoders = (binascii.unhexlify, lambda t: base64.b64decode(t, validate=True))
    for decode in decoders:
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(key) == KEY_SIZE:
            return key
    raise EncryptionKeyError(
        f"{source} must hold a 32-byte key: 32 raw bytes, 64 hex digits or base64 "
        f"(`openssl rand -hex 32` makes one)"
    )


def load_master_key(key: str | None, key_file: Path | None) -> bytes | None:
    """The master key from the settings, or None when encryption is off."""
    if key and key_file:
        raise EncryptionKeyError("give CSBS_ENCRYPTION_KEY or CSBS_ENCRYPTION_KEY_FILE, not both")
    if key_file is not None:
        try:
            raw = Path(key_file).read_bytes()
        except OSError as exc:
            raise EncryptionKeyError(
                f"CSBS_ENCRYPTION_KEY_FILE: cannot read {key_file} ({exc.strerror})"
            ) from None
        return parse_key(raw, "CSBS_ENCRYPTION_KEY_FILE", allow_raw=True)
    if key:
        return parse_key(key.encode(), "CSBS_ENCRYPTION_KEY")
    return None


def _derive(master: bytes, purpose: str, project: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=f"csbs/{purpose}/v1/{project}".encode(),
    ).derive(master)


class ProjectKeys:
    """One project's keys, derived from the master key."""

    def __init__(self, master: bytes, project: str) -> None:
        self.project = project
        self.id_key = _derive(master, "chunk-id", project)
        self._aead = AESGCM(_derive(master, "aead", project))
        #: Stored in config.json: tells a wrong key from the right one, reveals nothing.
        self.check = _derive(master, "key-check", project)[:16].hex()

    def __repr__(self) -> str:
        return f"ProjectKeys(project={self.project!r}, keys=<hidden>)"

    def seal(self, plaintext: bytes, name: str) -> bytes:
        """Encrypt an object stored under ``name`` (its key within the repository); the
        header and the name are authenticated with it."""
        nonce = os.urandom(NONCE_SIZE)
        header = _HEADER.pack(SEALED_MAGIC, SEALED_VERSION)
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + name.encode())

    def open(self, blob: bytes, name: str) -> bytes:
        """Decrypt an object; CorruptData when it was changed, moved or sealed by another key."""
        start = _HEADER.size + NONCE_SIZE
        if not is_sealed(blob) or len(blob) < start + 16:
            raise CorruptData(f"{name}: not an encrypted object, in an encrypted repository")
        header = blob[: _HEADER.size]
        if _HEADER.unpack(header)[1] != SEALED_VERSION:
            raise CorruptData(f"{name}: unsupported encryption version {header[4]}")
        nonce = blob[_HEADER.size : start]
        try:
            return self._aead.decrypt(nonce, blob[start:], header + name.encode())
        except InvalidTag:
            raise CorruptData(
                f"{name}: does not decrypt (the object is damaged, or was sealed with another key)"
            ) from None


def is_sealed(blob: bytes) -> bool:
    return blob[:4] == SEALED_MAGIC
