"""Read-only filesystem readers for file-level restore (``csbs backup files``).

Each reader works over a ``Reader``: a callable ``read(offset, length) -> bytes`` on one
volume (a partition, or a whole disk without a partition table). Offsets are relative to
the volume's first byte. A reader never writes, and reads only the metadata blocks it
needs and the data blocks of the files asked for, so that a file restore fetches a small
fraction of a backed-up disk's chunks.

The readers are our own (pure Python, Apache-2.0 like the rest of csbs): the ``dissect.*``
modules are AGPL-3.0, which an Apache-2.0 service cannot ship; the ``ext4`` package pins
``typing-extensions`` to a version that breaks ``anyio``. See the README.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from csbs.errors import CsbsError

#: ``read(offset, length)``: the bytes of a volume at ``offset``; shorter only at its end.
Reader = Callable[[int, int], bytes]

Kind = Literal["file", "dir", "symlink", "other"]


class FsError(CsbsError):
    """A path that does not exist or is not what was asked for, or a damaged or
    unsupported filesystem structure. The message names the path or the structure."""


@dataclass(frozen=True)
class Entry:
    """One directory entry. ``path`` is absolute, ``/``-separated, within the volume."""

    name: str
    path: str
    kind: Kind
    size: int
    #: Seconds since the epoch (UTC), or None when the filesystem keeps none.
    mtime: float | None = None
    #: POSIX permission bits (``0o755``), or None when the filesystem keeps none.
    mode: int | None = None


class Filesystem(Protocol):
    """What every reader offers. Paths are absolute, ``/``-separated; ``/`` is the root."""

    #: "ext4", "xfs", "ntfs", "fat" (FAT12/16/32).
    type_name: str

    def stat(self, path: str) -> Entry:
        """The entry at ``path``; FsError when it does not exist."""
        ...

    def listdir(self, path: str) -> list[Entry]:
        """The entries of the directory ``path`` (without ``.`` and ``..``), sorted by
        name; FsError when it does not exist or is not a directory."""
        ...

    def read_file(self, path: str, block: int = 1 << 20) -> Iterator[bytes]:
        """The content of the regular file ``path``, in pieces of at most ``block`` bytes;
        holes and unwritten extents read as zeros. FsError when it is not a file."""
        ...

    def readlink(self, path: str) -> str:
        """The target of the symbolic link ``path``; FsError when it is not one."""
        ...


def split_path(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``; FsError for a relative path or ``..``."""
    if not path.startswith("/"):
        raise FsError(f"path {path!r} must be absolute (start with /)")
    parts = [p for p in posixpath.normpath(path).split("/") if p]
    if ".." in parts:
        raise FsError(f"path {path!r} must not contain ..")
    return parts


def join_path(parent: str, name: str) -> str:
    return "/" + "/".join([*split_path(parent), name])


class InodeTree:
    """The path walk and the ``Filesystem`` protocol over a filesystem of numbered
    records (inodes, MFT records): a reader supplies the root, an entry's metadata, a
    directory's (name, number) pairs, a file's content and a link's target."""

    type_name = ""
    #: Names match case-insensitively (NTFS, as on Windows).
    casefold = False

    def _root(self) -> int:
        raise NotImplementedError

    def _entry(self, number: int, name: str, path: str) -> Entry:
        raise NotImplementedError

    def _children(self, number: int) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def _file(self, number: int, entry: Entry, block: int) -> Iterator[bytes]:
        raise NotImplementedError

    def _link(self, number: int, entry: Entry) -> str:
        raise FsError(f"{entry.path}: not a symbolic link")

    def _hidden(self, number: int, name: str) -> bool:
        """Entries a listing leaves out (NTFS's metadata files in its root)."""
        return False

    def _find(self, number: int, part: str) -> tuple[str, int] | None:
        wanted = part.casefold() if self.casefold else part
        for name, child in self._children(number):
            if (name.casefold() if self.casefold else name) == wanted:
                return name, child
        return None

    def _lookup(self, path: str) -> tuple[int, Entry]:
        number, current, name = self._root(), "/", ""
        for part in split_path(path):
            if self._entry(number, name, current).kind != "dir":
                raise FsError(f"{current}: not a directory")
            found = self._find(number, part)
            if found is None:
                raise FsError(f"{join_path(current, part)}: no such file or directory")
            name, number = found
            current = join_path(current, name)
        return number, self._entry(number, name, current)

    def stat(self, path: str) -> Entry:
        return self._lookup(path)[1]

    def listdir(self, path: str) -> list[Entry]:
        number, entry = self._lookup(path)
        if entry.kind != "dir":
            raise FsError(f"{entry.path}: not a directory")
        seen: dict[str, Entry] = {}
        for name, child in self._children(number):
            if name not in seen and not self._hidden(number, name):
                seen[name] = self._entry(child, name, join_path(entry.path, name))
        return sorted(seen.values(), key=lambda e: e.name)

    def read_file(self, path: str, block: int = 1 << 20) -> Iterator[bytes]:
        number, entry = self._lookup(path)
        if entry.kind != "file":
            raise FsError(f"{entry.path}: not a regular file (it is a {entry.kind})")
        return self._file(number, entry, block)

    def readlink(self, path: str) -> str:
        number, entry = self._lookup(path)
        if entry.kind != "symlink":
            raise FsError(f"{entry.path}: not a symbolic link")
        return self._link(number, entry)
