"""File-level restore (``csbs backup files``, issue 18): list and extract files from a
backed-up disk without restoring it, reading only the chunks the filesystem's metadata
and the chosen files occupy.

The disk is read through ``BackupDiskReader`` (random access over its manifest); its
partition table (MBR or GPT, or none) gives the volumes, and ``csbs.fs`` reads the ext4,
xfs, NTFS or FAT filesystem of the one chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from csbs.errors import InvalidInput
from csbs.fs import Entry, Filesystem, FsError, Reader
from csbs.fs.probe import open_filesystem, volumes


@dataclass
class Volume:
    """One volume of a disk and the filesystem found on it (None, with the reason)."""

    name: str
    size: int
    fs: Filesystem | None
    problem: str = ""


def find_volumes(read: Reader, disk_size: int) -> list[Volume]:
    """Every volume of the disk (each partition, or the whole disk without a partition
    table), each with its filesystem when one csbs reads is on it."""
    found = []
    for name, sub, size in volumes(read, disk_size):
        try:
            found.append(Volume(name, size, open_filesystem(sub, size)))
        except FsError as exc:
            found.append(Volume(name, size, None, str(exc)))
    return found


def choose_volume(found: list[Volume], partition: str | None) -> Volume:
    """The volume asked for, or the only one holding a filesystem; refused with the
    choice otherwise."""
    listing = ", ".join(
        f"{v.name} ({v.fs.type_name if v.fs else 'no filesystem csbs reads'})" for v in found
    )
    if partition is not None:
        for volume in found:
            if volume.name == partition:
                if volume.fs is None:
                    raise FsError(f"partition {partition}: {volume.problem}")
                return volume
        raise InvalidInput(f"partition: {partition} is not on the disk (it has {listing})")
    readable = [v for v in found if v.fs is not None]
    if len(readable) == 1:
        return readable[0]
    if not readable:
        problems = "; ".join(f"{v.name}: {v.problem}" for v in found)
        raise FsError(f"no ext4, xfs, NTFS or FAT filesystem on the disk ({problems})")
    raise InvalidInput(f"partition: the disk has {listing}; choose one with --partition")


def entry_json(entry: Entry) -> dict[str, object]:
    return {
        "name": entry.name,
        "path": entry.path,
        "kind": entry.kind,
        "size": entry.size,
        "mtime": entry.mtime,
        "mode": entry.mode,
    }


@dataclass
class Extracted:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: int = 0


def extract(fs: Filesystem, path: str, output: Path) -> Extracted:
    """Copy the file, symlink or directory tree at ``path`` to ``output`` (which must not
    exist; its parent must). Nothing existing is overwritten."""
    entry = fs.stat(path)
    if output.exists() or output.is_symlink():
        raise InvalidInput(f"output: {output} exists; name a new file or folder")
    if not output.parent.is_dir():
        raise InvalidInput(f"output: folder {output.parent} does not exist")
    done = Extracted()
    _extract(fs, entry, output, done)
    return done


def _extract(fs: Filesystem, entry: Entry, output: Path, done: Extracted) -> None:
    if entry.kind == "file":
        with open(output, "xb") as f:
            for piece in fs.read_file(entry.path):
                f.write(piece)
                done.bytes += len(piece)
        _times(output, entry)
        done.files += 1
    elif entry.kind == "symlink":
        os.symlink(fs.readlink(entry.path), output)
        done.symlinks += 1
    elif entry.kind == "dir":
        output.mkdir()
        for child in fs.listdir(entry.path):
            if child.name in (".", ".."):
                continue
            _extract(fs, child, output / child.name, done)
        _times(output, entry)
        done.dirs += 1
    else:
        done.skipped += 1


def _times(path: Path, entry: Entry) -> None:
    if entry.mode is not None:
        os.chmod(path, entry.mode & 0o7777)
    if entry.mtime is not None:
        os.utime(path, (entry.mtime, entry.mtime))
