"""csbs.drivers.nbd against a real NBD server (``qemu-nbd``): handshake, reads with holes, writes,
zeroes, allocation and dirty-bitmap block status, and clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csbs.drivers.nbd import (
    ALLOCATION,
    STATE_DIRTY,
    STATE_ZERO,
    NbdClient,
    NbdError,
    dirty_bitmap_context,
)

MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="QEMU IS NOT INSTALLED: the NBD client tests need qemu-nbd (apt qemu-utils)",
)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A 16 MiB qcow2 with data at 1 MiB, a bitmap that saw a write at 8 MiB, served by
    qemu-nbd on a Unix socket (writable)."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), str(16 * MIB))
    qemu_io(image, "write -P 0x5a 1M 1M")
    qemu_img("bitmap", "--add", str(image), "since-1")
    qemu_io(image, "write -P 0x77 8M 64k")
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--socket",
            sock,
            "--format",
            "qcow2",
            "--persistent",
            "--shared",
            "4",
            "--export-name",
            "disk",
            "--bitmap",
            "since-1",
            "--discard",
            "unmap",
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    try:
        yield sock, image
    finally:
        proc.terminate()
        proc.wait(10)


def test_reads_holes_as_zeros_and_reports_allocation(served: tuple[str, Path]) -> None:
    sock, _ = served
    with NbdClient(sock, "disk", [ALLOCATION]) as nbd:
        assert nbd.info.size == 16 * MIB
        data = nbd.read(MIB - 10, MIB + 20)
        assert data == bytes(10) + b"\x5a" * MIB + bytes(10)
        assert nbd.read(MIB - 10, MIB + 20, whole=True) == data  # unfragmented reply
        # A read larger than one request is split and reassembled.
        whole = nbd.read(0, 16 * MIB)
        assert (
            whole[MIB : 2 * MIB] == b"\x5a" * MIB
            and whole[8 * MIB : 8 * MIB + 65536] == b"\x77" * 65536
        )
        allocated = nbd.ranges(ALLOCATION, 0, STATE_ZERO)
        assert allocated == [(MIB, MIB), (8 * MIB, 65536)]


def test_dirty_bitmap_context_gives_exact_changed_ranges(served: tuple[str, Path]) -> None:
    sock, _ = served
    ctx = dirty_bitmap_context("since-1")
    with NbdClient(sock, "disk", [ALLOCATION, ctx]) as nbd:
        assert nbd.ranges(ctx, STATE_DIRTY, STATE_DIRTY) == [(8 * MIB, 65536)]
        extents = nbd.extents(ctx)
        assert sum(n for _, n, _ in extents) == 16 * MIB  # covers the whole export


def test_writes_and_zeroes_land_on_the_image(served: tuple[str, Path]) -> None:
    sock, _ = served
    with NbdClient(sock, "disk") as nbd:
        nbd.write(3 * MIB, b"w" * (MIB + 7))
        nbd.write_zeroes(MIB, MIB)
        nbd.flush()
    with NbdClient(sock, "disk", [ALLOCATION]) as nbd:
        assert nbd.read(3 * MIB, MIB + 7) == b"w" * (MIB + 7)
        assert nbd.read(MIB, MIB) == bytes(MIB)


def test_errors_are_clear(served: tuple[str, Path], tmp_path: Path) -> None:
    sock, _ = served
    with pytest.raises(NbdError, match=r"refused|export"):
        NbdClient(sock, "no-such-export")
    with pytest.raises(NbdError, match=r"no meta context|refused"):
        NbdClient(sock, "disk", [dirty_bitmap_context("missing")])
    with NbdClient(sock, "disk") as nbd:
        with pytest.raises(NbdError, match="outside the export"):
            nbd.read(16 * MIB - 1, 2)
        with pytest.raises(NbdError, match="not negotiated"):
            nbd.extents(ALLOCATION)
    with pytest.raises(NbdError, match="cannot connect"):
        NbdClient(str(tmp_path / "absent.sock"), "disk")
