"""Unit tests of pure rules: sizes, names (B7), ids, restore disk mapping (R4)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from csbs.errors import InvalidInput
from csbs.format import Manifest
from csbs.model import (
    BackedUpDisk,
    BackupServerInput,
    Disk,
    DiskRole,
    Server,
    ServerState,
    check_id,
)
from csbs.naming import check_description, check_name, default_name, numbered
from csbs.rules import full_read_note, plan_disk_mapping
from csbs.units import parse_size

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64MiB", 64 * MIB),
        ("1GiB", 1 << 30),
        ("512KiB", 512 * 1024),
        ("2G", 2 << 30),
        ("1MB", 10**6),
        (" 7 ", 7),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5GiB", "12XB", "GiB", "1 GiB GiB"])
def test_parse_size_refuses_with_the_field_name(text: str) -> None:
    with pytest.raises(ValueError, match="disk must be"):
        parse_size(text, "disk")


def test_default_names_by_kind() -> None:
    """B7: manualbk_xxxx, autobk_xxxx, backup_xxxx."""
    rng = random.Random(1)
    assert default_name("manual", rng).startswith("manualbk_")
    assert default_name("scheduled", rng).startswith("autobk_")
    name = default_name("policy_manual", rng)
    assert name.startswith("backup_") and len(name) == len("backup_") + 4
    check_name(name)


def test_name_rules() -> None:
    """B7: 1-255 Chinese characters, letters, digits, '_' and '-'."""
    for good in ["a", "备份-1_x", "x" * 255, "数据库备份"]:
        assert check_name(good) == good
    for bad in ["", "x" * 256, "a b", "a/b", "../x", "名字!", "a\x00"]:
        with pytest.raises(ValueError, match="name must be"):
            check_name(bad)
    check_description("d" * 255)
    with pytest.raises(ValueError, match="description"):
        check_description("d" * 256)
    with pytest.raises(ValidationError, match="name must be"):
        BackupServerInput(server_id="srv-1", name="bad name")


def test_numbered_names_for_several_servers() -> None:
    assert numbered("nightly", 0, 1) == "nightly"
    assert [numbered("nightly", i, 3) for i in range(3)] == [
        "nightly-0001",
        "nightly-0002",
        "nightly-0003",
    ]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, ".hidden", "a\x00b", "é"])
def test_ids_cannot_escape_directories(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        check_id(bad)


def _server(*sizes: int) -> Server:
    return Server(
        id="srv-1",
        name="s",
        type="local",
        state=ServerState.RUNNING,
        disks=[
            Disk(
                id=f"d{i}",
                name=f"d{i}",
                size_bytes=s,
                role=DiskRole.SYSTEM if i == 0 else DiskRole.DATA,
            )
            for i, s in enumerate(sizes)
        ],
    )


def _backed_up(*sizes: int) -> list[BackedUpDisk]:
    return [
        BackedUpDisk(
            disk_id=f"d{i}", size_bytes=s, role=DiskRole.SYSTEM if i == 0 else DiskRole.DATA
        )
        for i, s in enumerate(sizes)
    ]


def test_mapping_defaults_to_the_original_disks() -> None:
    items, warnings = plan_disk_mapping(_server(10, 20), _backed_up(10, 20), {})
    assert [(i.source_disk_id, i.target_disk_id) for i in items] == [("d0", "d0"), ("d1", "d1")]
    assert warnings == []


def test_mapping_rules() -> None:
    """R4: capacity not smaller, never data onto system, each target once, known disks."""
    server, disks = _server(40, 20, 30, 5), _backed_up(10, 20)
    items, warnings = plan_disk_mapping(server, disks, {"d1": "d2"})
    assert items[1].target_disk_id == "d2"
    assert "consistent" in warnings[0]
    for mapping, message in [
        ({"d1": "d3"}, "smaller"),
        ({"d1": "d0"}, "system disk"),
        ({"d0": "d2", "d1": "d2"}, "more than once"),
        ({"d1": "nope"}, "not a disk of server"),
        ({"d9": "d1"}, "not in this backup"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            plan_disk_mapping(server, disks, mapping)


def test_servers_over_4_tib_warn() -> None:
    """B8: a server larger than 4 TB is backed up with a warning."""
    from csbs.rules import backup_warnings

    assert backup_warnings(_server(1 << 40, 3 << 40)) == []
    (warning,) = backup_warnings(_server(1 << 40, 3 << 40, 1))
    assert "over 4 TiB" in warning


class _Reader:
    def __init__(self, size: int, since: str | None, reason: str | None = None) -> None:
        self.size_bytes, self.changed_since, self.full_read_reason = size, since, reason

    def allocated_ranges(self) -> list[tuple[int, int]]:
        return []

    def changed_ranges(self) -> list[tuple[int, int]] | None:
        return None

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def close(self) -> None:
        pass


def test_full_read_notes_say_why_changed_blocks_were_not_used() -> None:
    """B3: a backup reads by changed blocks only when they are tracked since its parent;
    otherwise each disk's record says why it was read in full."""
    parent = Manifest("bk-1", "disk-a", 8 * MIB, MIB)
    assert full_read_note(_Reader(8 * MIB, "bk-1"), parent, "bk-1") is None
    cases = [
        (_Reader(8 * MIB, None), None, None, "first backup"),
        (_Reader(8 * MIB, None), None, "bk-1", "not in the parent backup"),
        (_Reader(16 * MIB, "bk-1"), parent, "bk-1", "changed size"),
        (_Reader(8 * MIB, "bk-0"), parent, "bk-1", "tracked since bk-0"),
        (_Reader(8 * MIB, None, "bitmap lost: QEMU exited uncleanly"), parent, "bk-1", "uncleanly"),
    ]
    for reader, manifest, parent_id, needle in cases:
        note = full_read_note(reader, manifest, parent_id)
        assert note is not None and needle in note, (needle, note)
