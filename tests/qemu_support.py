"""Whether QEMU is here; tests that need it are skipped loudly where it is not."""

from __future__ import annotations

import shutil
import subprocess

import pytest

QEMU_BINARIES = ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "qemu-io")
MISSING = [name for name in QEMU_BINARIES if shutil.which(name) is None]
QEMU_AVAILABLE = not MISSING
SKIP_REASON = (
    f"QEMU IS NOT INSTALLED ({', '.join(MISSING)} missing): the qemu driver tests are "
    f"SKIPPED. Install it with: apt-get install qemu-system-x86 qemu-utils"
)
QEMU_SKIP = pytest.mark.skipif(not QEMU_AVAILABLE, reason=SKIP_REASON)


def qemu_version() -> str:
    if not QEMU_AVAILABLE:
        return SKIP_REASON
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    )
    return out.stdout.splitlines()[0] if out.stdout else "unknown version"
