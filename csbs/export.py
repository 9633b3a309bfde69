"""Images from backups (the guide's 备份创建镜像): one disk of a backup written out as a
standalone, sparse raw or qcow2 image that needs nothing of csbs to be used.

The chunks come from the object store through the restore path (fetched in parallel,
each checked against its digest); zero positions stay holes. A qcow2 image is made from
the sparse raw one by ``qemu-img convert``, which keeps the holes unallocated. The output
appears only when it is whole: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from csbs.chunkstore import ChunkStore
from csbs.drivers.common import run_qemu_img
from csbs.errors import InvalidInput
from csbs.format import Manifest
from csbs.model import TransferStats
from csbs.transfer import ProgressFn, restore_disk

ImageFormat = Literal["raw", "qcow2"]
FORMATS: tuple[ImageFormat, ...] = ("raw", "qcow2")


class _SparseFile:
    """A restore target that is a new, sparse file: zeros are already holes."""

    def __init__(self, fd: int, size_bytes: int) -> None:
        self.fd, self.size_bytes = fd, size_bytes

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: a new file reads as zeros where nothing was written."""

    def close(self) -> None:
        os.fsync(self.fd)


@dataclass(frozen=True)
class Exported:
    path: Path
    format: ImageFormat
    size_bytes: int
    allocated_bytes: int
    stats: TransferStats


def check_output(output: Path, fmt: str) -> Path:
    """Refuse a format csbs cannot write, an output that exists, or a missing folder."""
    if fmt not in FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    output = output.expanduser().absolute()
    if output.exists() or output.is_symlink():
        raise InvalidInput(f"output {output} exists; choose another path or remove it")
    if not output.parent.is_dir():
        raise InvalidInput(f"output: folder {output.parent} does not exist")
    return output


def export_disk(
    store: ChunkStore,
    manifest: Manifest,
    output: Path,
    fmt: ImageFormat,
    qemu_img: str = "qemu-img",
    concurrency: int = 8,
    progress: ProgressFn | None = None,
) -> Exported:
    """Write the disk of ``manifest`` to ``output`` as a sparse ``fmt`` image."""
    output = check_output(output, fmt)
    raw = output.with_name(f".{output.name}.csbs-partial")
    done = output.with_name(f".{output.name}.csbs-done")
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, manifest.size_bytes)
            writer = _SparseFile(fd, manifest.size_bytes)
            stats = restore_disk(
                store, manifest, writer, concurrency=concurrency, progress=progress
            )
            writer.close()
        finally:
            os.close(fd)
        if fmt == "qcow2":
            run_qemu_img(qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(done))
            raw.unlink()
        else:
            raw.rename(done)
        os.chmod(done, 0o644)
        if output.exists():
            raise InvalidInput(f"output {output} appeared while the image was written; kept it")
        done.rename(output)
    finally:
        for leftover in (raw, done):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return Exported(
        path=output,
        format=fmt,
        size_bytes=manifest.size_bytes,
        allocated_bytes=output.stat().st_blocks * 512,
        stats=stats,
    )
