"""The ``qemu`` driver: every server is a real QEMU process with qcow2 disks, driven over QMP.

Layout of one server (like ``local``; the sockets live in a short runtime directory because
Unix socket paths are limited to 107 bytes)::

    <servers_dir>/<server_id>/server.json           id, name, type "qemu", state, disks
    <servers_dir>/<server_id>/lock                  flock: one QMP conversation at a time
    <servers_dir>/<server_id>/qemu.json             {pid, qmp}: the process we started
    <servers_dir>/<server_id>/boot.json             kernel, initrd, cmdline, memory (a guest)
    <servers_dir>/<server_id>/serial.log            the guest's serial console, every boot
    <servers_dir>/<server_id>/disks/<disk>.qcow2    the disk images
    <servers_dir>/<server_id>/cbt/<disk>.json       {"checkpoint": bitmap | null, "reason"}
    <servers_dir>/<server_id>/snapshots/<id>/       snapshot.json + fleecing overlays
    $XDG_RUNTIME_DIR/csbs-qemu/<hash>/qmp.sock|nbd.sock   (else $TMPDIR/csbs-qemu-<uid>/)

The socket base directory must belong to us with no access for group or others (and not
be a symlink): one that another local user created first is refused, since whoever
controls it could put their own socket where QEMU's should be. QEMU and qemu-img get a
minimal environment (``child_env``): never the worker's S3 secret or encryption key.

Process model. ``running`` means a QEMU process whose VM runs. ``stopped`` means no
process, or a paused maintenance process (``-S``) while a snapshot, restore or checksum
needs QEMU's block layer; it quits cleanly (persisting the dirty bitmaps) as soon as
nothing needs it. QEMU runs with ``-machine none``: no guest OS, but the real block layer.
Guest writes go through QEMU (``qemu-io`` on the drive over HMP), so QEMU's dirty bitmaps
and copy-before-write see them exactly as they would see a guest's.

A server made with a boot configuration (``QemuBoot``: kernel, initrd, command line,
memory) runs a real Linux guest instead: machine ``pc``, the same drives shown to the guest
as virtio-blk devices (``vda`` first), the serial console in ``serial.log``, and
``-no-shutdown``, so a guest that powers off leaves QEMU in status ``shutdown``. Stopping
it presses the ACPI power button and waits ``shutdown_timeout`` before forcing it off with
a warning (B12); then QEMU quits cleanly like any stopped server's, so its bitmaps stay
trusted. Starting it boots the guest afresh. The block layer (drives, node names, bitmaps,
fleecing, NBD exports, ``qemu-io``) is the same as without a guest.

Group snapshot = one QMP ``transaction`` over all disks: a new persistent dirty bitmap
named after the snapshot, ``block-dirty-bitmap-disable`` of the previous checkpoint's
bitmap (which now holds exactly the changes between the two instants), and
``blockdev-backup sync=none`` into a qcow2 overlay whose backing is the disk (image
fleecing). Each overlay is exported over NBD (Unix socket) with the previous bitmap, so a
reader gets the disk as of the instant, its allocation (``base:allocation``) and what
changed (``qemu:dirty-bitmap:<prev>``).

Never a wrong incremental: the checkpoint a disk's changes are tracked from is recorded
in ``cbt/<disk>.json`` and cross-checked with QEMU's bitmaps at every snapshot. A process
that died without our ``quit`` (kill -9, crash), a missing or inconsistent bitmap, an
added or resized disk: the disk is read in full with chunk diffing, and the reason is
recorded with the backup.
"""

from csbs.drivers.qemu.boot import DEFAULT_CMDLINE, QemuBoot
from csbs.drivers.qemu.driver import QemuDriver
from csbs.drivers.qemu.io import QemuSnapshotReader
from csbs.drivers.qemu.qmp import QmpError, drive_id, node_name

__all__ = [
    "DEFAULT_CMDLINE",
    "QemuBoot",
    "QemuDriver",
    "QemuSnapshotReader",
    "QmpError",
    "drive_id",
    "node_name",
]
