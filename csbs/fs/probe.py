"""Which filesystem a volume holds, and the volumes of a disk."""

from __future__ import annotations

import struct

from csbs.fs import Filesystem, FsError, Reader
from csbs.fs.partitions import partitions, sub_reader


def open_filesystem(read: Reader, size: int) -> Filesystem:
    """The reader of the ext2/3/4, xfs, NTFS or FAT filesystem on a volume."""
    head = read(0, 2048)
    if len(head) >= 1082 and struct.unpack_from("<H", head, 1080)[0] == 0xEF53:
        from csbs.fs.ext4 import Ext4

        return Ext4(read)
    if head[:4] == b"XFSB":
        from csbs.fs.xfs import Xfs

        return Xfs(read)
    if head[3:11] == b"NTFS    ":
        from csbs.fs.ntfs import Ntfs

        return Ntfs(read)
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and _fat_bpb(head):
        from csbs.fs.fat import Fat

        return Fat(read)
    raise FsError(f"no ext4, xfs, NTFS or FAT filesystem found ({size} bytes)")


def _fat_bpb(boot: bytes) -> bool:
    """A FAT boot sector: its type string, or at least a sane BPB."""
    if boot[82:87] == b"FAT32" or boot[54:59] in (b"FAT12", b"FAT16", b"FAT  "):
        return True
    bps, spc, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    return (
        bps in (512, 1024, 2048, 4096)
        and spc in (1, 2, 4, 8, 16, 32, 64, 128)
        and (reserved > 0 and fats in (1, 2))
    )


def volumes(read: Reader, disk_size: int) -> list[tuple[str, Reader, int]]:
    """(name, reader, size) of every partition ("1", "2", ...), or of the whole disk
    ("whole") when it has no partition table."""
    found = partitions(read, disk_size)
    if not found:
        return [("whole", read, disk_size)]
    return [(str(p.number), sub_reader(read, p.start, p.size), p.size) for p in found]
