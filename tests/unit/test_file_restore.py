"""Choosing the volume of a file-level restore (issue 18): the one asked for, or the only
one holding a filesystem csbs reads; otherwise a one-line refusal that lists them."""

from __future__ import annotations

from typing import Any, cast

import pytest

from csbs.errors import InvalidInput
from csbs.file_restore import Volume, choose_volume
from csbs.fs import Filesystem, FsError


class _Fs:
    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def fs(type_name: str) -> Filesystem:
    return cast(Filesystem, cast(Any, _Fs(type_name)))


def test_the_only_readable_volume_is_chosen() -> None:
    found = [Volume("1", 1, None, "no ext4, xfs, NTFS or FAT"), Volume("2", 1, fs("ext4"))]
    assert choose_volume(found, None).name == "2"


def test_several_filesystems_need_a_partition_and_the_refusal_lists_them() -> None:
    found = [Volume("1", 1, fs("fat")), Volume("2", 1, fs("ext4"))]
    with pytest.raises(InvalidInput, match=r"partition: the disk has 1 \(fat\), 2 \(ext4\)"):
        choose_volume(found, None)
    assert choose_volume(found, "1").fs is found[0].fs


def test_a_missing_or_unreadable_partition_is_refused_with_the_reason() -> None:
    found = [Volume("1", 1, None, "swap space"), Volume("2", 1, fs("ext4"))]
    with pytest.raises(InvalidInput, match="partition: 3 is not on the disk"):
        choose_volume(found, "3")
    with pytest.raises(FsError, match="partition 1: swap space"):
        choose_volume(found, "1")
    with pytest.raises(FsError, match="no ext4, xfs, NTFS or FAT filesystem on the disk"):
        choose_volume([Volume("whole", 1, None, "blank")], None)
