"""The boot configuration of a ``qemu`` dev server that runs a real Linux guest.

A server made with ``QemuDriver.create_server(..., boot=QemuBoot(...))`` runs QEMU with
machine ``pc``, ``memory_mib`` of memory, the kernel, initrd and command line below, its
disks attached to the guest as virtio-blk devices in order (the first one is ``vda``), and
its serial console appended to ``<servers_dir>/<server_id>/serial.log``. The configuration
is the driver's own record, ``<servers_dir>/<server_id>/boot.json`` (not part of
``csbs.model.Server``). Servers made without it stay guest-less (machine ``none``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from csbs.errors import InvalidInput

#: A command line that puts the kernel's console on the serial port (``serial.log``).
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 loglevel=3"


class QemuBoot(BaseModel):
    """Kernel, initrd, kernel command line and memory of a guest (direct kernel boot)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path
    initrd: Path | None = None
    #: The whole kernel command line; keep ``console=ttyS0`` to see the guest in serial.log.
    cmdline: str = DEFAULT_CMDLINE
    memory_mib: int = Field(default=256, ge=32, le=16384)

    @field_validator("kernel", "initrd")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        return path

    @classmethod
    def of(cls, value: object) -> QemuBoot:
        """A QemuBoot from itself or its JSON form; InvalidInput naming the field."""
        if isinstance(value, QemuBoot):
            return value
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "boot"
            raise InvalidInput(f"boot.{where}: {first['msg']}") from None
