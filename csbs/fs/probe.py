"""Which filesystem a volume holds, and the volumes of a disk.

A filesystem is recognised by its own signature: ext2/3/4's superblock magic 0xEF53 at
byte 1080, XFS's ``XFSB`` at 0, NTFS's OEM id at 3, and FAT's boot sector (signature, a
sane BPB and its type label). The XFS and NTFS readers are imported only when needed.
When nothing matches, the error says what the volume seems to hold instead (LVM, LUKS,
swap, exFAT, btrfs), so an operator knows why its files cannot be listed.
"""

from __future__ import annotations

import struct

from csbs.fs import Filesystem, FsError, Reader
from csbs.fs.ext4 import MAGIC as EXT_MAGIC
from csbs.fs.ext4 import SUPERBLOCK_AT, Ext4
from csbs.fs.fat import Fat, is_fat_boot_sector
from csbs.fs.partitions import partitions, sub_reader

#: Enough of a volume's start for every signature looked for (the swap one ends at 4096).
HEAD = 4096
EXT_MAGIC_AT = SUPERBLOCK_AT + 0x38
#: Things a volume may hold that csbs does not read: (offset, signature, what it is).
OTHERS = (
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (512 + 24, b"LVM2 001", "an LVM physical volume"),
    (3, b"EXFAT   ", "exFAT"),
    (4086, b"SWAPSPACE2", "Linux swap"),
    (4086, b"SWAP-SPACE", "Linux swap"),
    (65536 + 64, b"_BHRfS_M", "btrfs"),
)


def open_filesystem(read: Reader, size: int) -> Filesystem:
    """The reader of the ext2/3/4, xfs, NTFS or FAT filesystem on a volume of ``size``
    bytes; FsError when none is there."""
    head = read(0, HEAD)
    if (
        len(head) >= EXT_MAGIC_AT + 2
        and struct.unpack_from("<H", head, EXT_MAGIC_AT)[0] == EXT_MAGIC
    ):
        return Ext4(read)
    if head[:4] == b"XFSB":
        from csbs.fs.xfs import Xfs

        return Xfs(read)
    if head[3:11] == b"NTFS    ":
        from csbs.fs.ntfs import Ntfs

        return Ntfs(read)
    if is_fat_boot_sector(head):
        return Fat(read)
    raise FsError(f"no ext4, xfs, NTFS or FAT filesystem found ({_what_else(read, head, size)})")


def _what_else(read: Reader, head: bytes, size: int) -> str:
    """A few words on what a volume holds, for the error that no filesystem was found."""
    for offset, signature, what in OTHERS:
        end = offset + len(signature)
        if end <= len(head):
            found = head[offset:end]
        else:
            found = read(offset, len(signature)) if end <= size else b""
        if found == signature:
            return f"the volume of {size} bytes holds {what}, which csbs does not read"
    if not head.strip(b"\0"):
        return f"the first {len(head)} bytes of the volume of {size} bytes are zeros"
    return f"the volume of {size} bytes has no signature csbs knows"


def volumes(read: Reader, disk_size: int) -> list[tuple[str, Reader, int]]:
    """(name, reader, size) of every partition ("1", "2", ... as Linux numbers them), or
    of the whole disk ("whole") when it has no partition table."""
    found = partitions(read, disk_size)
    if not found:
        return [("whole", read, disk_size)]
    return [(str(p.number), sub_reader(read, p.start, p.size), p.size) for p in found]
