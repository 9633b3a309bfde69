"""Bad input, generated (issue 7): hypothesis pushes more than 10,000 inputs through names,
descriptions, policy times and periods, retention values, disk mappings and ids. Each is
accepted or refused with a clear one-line error naming the field; none raises anything
else; a refusal changes nothing; no id used in a path leaves its directory.

The figure for the README is the sum of ``EXAMPLES`` (each test checks it ran them all).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from csbs.catalog import Catalog
from csbs.chunkstore import ChunkStore
from csbs.config import Settings
from csbs.drivers.local import LocalDriver
from csbs.errors import CsbsError
from csbs.model import (
    ID_PATTERN,
    BackedUpDisk,
    BackupServerInput,
    Disk,
    DiskRole,
    RestoreServerInput,
    Server,
    ServerState,
    check_id,
)
from csbs.naming import check_description, check_name, numbered
from csbs.policy import PolicySpec
from csbs.policy_service import PolicyService
from csbs.rules import plan_disk_mapping

#: 11,600 generated inputs take about 30 s: CI runs them; the quick loop does not.
pytestmark = pytest.mark.slow

MIB = 1024 * 1024
#: Inputs per test; their sum is the "inputs tried" figure.
EXAMPLES = {
    "names_and_descriptions": 2000,
    "backup_inputs": 2000,
    "policy_specs": 2500,
    "restore_inputs": 1500,
    "disk_mappings": 1500,
    "ids_in_paths": 1500,
    "policies_change_nothing_when_refused": 300,
    "servers_change_nothing_when_refused": 300,
}

#: Characters that break paths, parsers or eyes: separators, dots, NUL and control
#: characters, and look-alikes of '/', '.', '-' and Latin letters.
NASTY = [
    "/",
    "\\",
    ".",
    "..",
    "\x00",
    "\n",
    "\r",
    "\t",
    " ",
    "%2F",
    "~",
    "$",
    "'",
    '"',
    ";",
    "\u2215",
    "\uff0f",
    "\u2044",
    "\u29f8",
    "\uff0e",
    "\u2024",
    "\u2010",
    "\u2212",
    "\uff0d",
    "\u0430",
    "\u0435",
    "\u043e",
    "\u0440",
    "\u200b",
    "\u202e",
    "\ufeff",
    "中",
    "文",
    "_",
    "-",
]
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(NASTY) | st.text(max_size=3), max_size=12).map("".join),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=600),
    st.sampled_from(["..", "../etc", "a/../../b", ".", "", " ", "x" * 256, "中" * 255]),
)
#: A valid id or name with a line ending or a space after it: ``re.match`` with ``$``
#: accepted "srv-1\n" (issue 14); every check must take a full match.
ended = st.tuples(
    st.from_regex(ID_PATTERN, fullmatch=True) | st.sampled_from(["srv-1", "中文", "a"]),
    st.sampled_from(["\n", "\r\n", "\r", " ", "\n\n", "\x00"]),
).map("".join)
texts = st.one_of(texts, ended)
ids = st.one_of(texts, ended, st.from_regex(ID_PATTERN, fullmatch=True))


def one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        message = "; ".join(lines)
    else:
        message = str(exc)
    assert message and "\n" not in message, message
    assert "Traceback" not in message
    return message


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def run(name: str, check: Callable[..., None], *strategies: Any) -> None:
    """Run ``check`` on EXAMPLES[name] generated inputs and assert that many ran."""
    seen = Counter()

    @settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.tuples(*strategies))
    def prop(args: tuple[Any, ...]) -> None:
        seen()
        check(*args)

    prop()
    assert seen.n >= EXAMPLES[name] * 0.9, f"{name}: only {seen.n} inputs ran"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        # Guide 2.2 and 3.2.1 (B7): Chinese characters, letters, digits, '_' and '-', 1-255.
        ("backup_policy", True),
        ("manualbk_a1b2", True),
        ("数据库备份-01", True),
        ("Web_服务器_2026", True),
        ("a", True),
        ("x" * 255, True),
        ("备" * 255, True),
        ("", False),
        ("x" * 256, False),
        ("nightly backup", False),  # a space
        ("db.backup", False),
        ("备份！", False),  # a full-width exclamation mark is no Chinese character
        ("ünïcode", False),
        ("tab\there", False),
        ("line\n", False),
        ("a/b", False),
    ],
)
def test_names_follow_the_guide(name: str, ok: bool) -> None:
    """B7: independent examples of the guide's naming rule, each accepted or refused with
    the rule in one line."""
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(ValueError) as info:
            check_name(name)
        assert one_line(info.value).startswith("name must be 1-255 characters")


def test_descriptions_follow_the_guide() -> None:
    """B7: a description is any text of at most 255 characters."""
    for text in ("", "nightly, before the upgrade!", "说明 " * 85, "d" * 255):
        assert check_description(text) == text
    with pytest.raises(ValueError, match="at most 255 characters"):
        check_description("d" * 256)


def test_batch_names_fit_in_255_characters() -> None:
    """B7: a batch of servers numbers its names -0001, -0002, ...; a name too long for the
    suffix is cut so that it fits, never refused."""
    assert numbered("nightly", 0, 1) == "nightly"
    assert [numbered("nightly", i, 3) for i in range(3)] == [
        "nightly-0001",
        "nightly-0002",
        "nightly-0003",
    ]
    long = "备" * 255
    cut = numbered(long, 11, 12)
    assert cut == "备" * 250 + "-0012" and len(cut) == 255 and check_name(cut) == cut
    assert numbered("x" * 252, 0, 2) == "x" * 250 + "-0001"


def test_names_and_descriptions_never_break() -> None:
    """Any text at all is accepted or refused with a one-line error naming the field."""

    def check(name: str, description: str) -> None:
        try:
            assert check_name(name) == name
        except ValueError as exc:
            assert one_line(exc).startswith("name must be 1-255 characters")
        try:
            assert check_description(description) == description
        except ValueError as exc:
            assert one_line(exc).startswith("description must be at most 255")

    run("names_and_descriptions", check, texts, texts)


def test_backup_inputs() -> None:
    def check(server_id: str, name: str, description: str) -> None:
        try:
            inp = BackupServerInput(server_id=server_id, name=name, description=description)
        except ValidationError as exc:
            fields = {str(e["loc"][0]) for e in exc.errors()}
            assert fields <= {"server_id", "name", "description"}
            one_line(exc)
            return
        assert re.fullmatch(ID_PATTERN, inp.server_id)
        assert check_name(inp.name or "") == inp.name

    run("backup_inputs", check, ids, texts, texts)


times = st.one_of(
    st.from_regex(r"[0-2]?[0-9]:[0-5][0-9]", fullmatch=True),
    texts,
    st.sampled_from(["24:00", "23:60", "-1:00", "1:5", "01:00:00", "٠١:٠٠", "１２:００"]),
)
weekdays = st.one_of(
    st.none(),
    st.lists(
        st.sampled_from(["mon", "TUE", "wed ", "thu", "fri", "sat", "sun", "xyz"]) | texts,
        max_size=9,
    ),
)
ints = st.one_of(
    st.none(), st.integers(-(10**6), 10**6), st.sampled_from([0, 1, 30, 31, 99999, 100000])
)


def test_policy_specs() -> None:
    def check(
        name: str, tlist: list[str], days: Any, every: Any, tz: str, retention: str, value: Any
    ) -> None:
        try:
            spec = PolicySpec(
                name=name,
                times=tlist,
                weekdays=days,
                every_days=every,
                timezone=tz,
                retention=retention,
                retention_value=value,
            )
        except ValidationError as exc:
            one_line(exc)
            return
        minutes = [int(t[:2]) * 60 + int(t[3:]) for t in spec.times]
        assert all(re.fullmatch(r"\d\d:\d\d", t) for t in spec.times)
        assert all(0 <= m < 24 * 60 for m in minutes)
        ring = [*minutes[1:], minutes[0] + 24 * 60]
        assert len(minutes) == 1 or all(b - a >= 60 for a, b in zip(minutes, ring, strict=True))
        assert (spec.weekdays is None) != (spec.every_days is None)
        assert spec.every_days is None or 1 <= spec.every_days <= 30
        if spec.retention.value == "forever":
            assert spec.retention_value is None
        else:
            assert spec.retention_value is not None and 1 <= spec.retention_value <= 99999

    run(
        "policy_specs",
        check,
        texts | st.just("nightly"),
        st.lists(times, max_size=5),
        weekdays,
        ints,
        st.sampled_from(["UTC", "Asia/Shanghai", "Europe/Berlin", "", "Mars/Olympus", "../etc"])
        | texts,
        st.sampled_from(["count", "days", "forever", "weeks", ""]),
        ints,
    )


def test_restore_inputs() -> None:
    def check(backup_id: str, mapping: dict[str, str], only: list[str]) -> None:
        try:
            inp = RestoreServerInput(backup_id=backup_id, disk_mapping=mapping, disk_ids=only)
        except ValidationError as exc:
            one_line(exc)
            return
        for value in [inp.backup_id, *inp.disk_mapping, *inp.disk_mapping.values(), *inp.disk_ids]:
            assert re.fullmatch(ID_PATTERN, value)

    run(
        "restore_inputs",
        check,
        ids,
        st.dictionaries(ids, ids, max_size=4),
        st.lists(ids, max_size=4),
    )


SERVER = Server(
    id="srv-1",
    name="web-1",
    type="local",
    state=ServerState.RUNNING,
    disks=[
        Disk(id="vda", name="system", size_bytes=10 * MIB, role=DiskRole.SYSTEM),
        Disk(id="vdb", name="data", size_bytes=20 * MIB, role=DiskRole.DATA),
        Disk(id="vdc", name="data2", size_bytes=5 * MIB, role=DiskRole.DATA),
    ],
)
BACKED_UP = [
    BackedUpDisk(disk_id="vda", role=DiskRole.SYSTEM, size_bytes=10 * MIB),
    BackedUpDisk(disk_id="vdb", role=DiskRole.DATA, size_bytes=20 * MIB),
    BackedUpDisk(disk_id="vdx", role=DiskRole.DATA, size_bytes=1 * MIB),
]
disk_ids = st.sampled_from(["vda", "vdb", "vdc", "vdx", "vdz"]) | ids


def test_disk_mappings() -> None:
    def check(mapping: dict[str, str], only: list[str]) -> None:
        try:
            items, warnings = plan_disk_mapping(SERVER, BACKED_UP, mapping, only)
        except CsbsError as exc:
            assert one_line(exc).startswith("disk_mapping: ")
            return
        sizes = {d.id: d for d in SERVER.disks}
        targets = [i.target_disk_id for i in items]
        assert len(targets) == len(set(targets))  # each target once
        for item in items:
            source = next(d for d in BACKED_UP if d.disk_id == item.source_disk_id)
            if item.create:  # R5: removed since the backup, re-created as it was
                assert item.target_disk_id == source.disk_id not in sizes
                continue
            target = sizes[item.target_disk_id]
            assert item.target_disk_id == source.disk_id or target.size_bytes >= source.size_bytes
            assert not (source.role == "data" and target.role == DiskRole.SYSTEM)
        assert all("\n" not in w for w in warnings)

    run(
        "disk_mappings",
        check,
        st.dictionaries(disk_ids, disk_ids, max_size=3),
        st.lists(disk_ids, max_size=3),
    )


def test_ids_in_paths_never_leave_their_directory(tmp_path: Path) -> None:
    root = (tmp_path / "servers").resolve()
    driver = LocalDriver(root)
    store = ChunkStore(
        Settings(s3_endpoint="http://127.0.0.1:1", s3_prefix="csbs", project="p1"),
    )

    def check(server_id: str, disk_id: str, backup_id: str) -> None:
        try:
            path = driver._disk_path(server_id, disk_id)
        except ValueError as exc:
            assert re.match(r"(server_id|disk_id) must be", one_line(exc))
        else:
            assert path.resolve().is_relative_to(root)
            assert path.parent.parent.parent == root
        try:
            key = store.manifest_key(backup_id, disk_id)
        except ValueError as exc:
            assert one_line(exc).startswith("id must be")
        else:
            assert key.startswith("csbs/p1/manifests/")
            assert ".." not in key.split("/") and key.count("/") == 4
        try:
            check_id(server_id, "server_id")
        except ValueError:
            return
        assert not any(c in server_id for c in "/\\.\x00\n\r ") and server_id[0] != "-"

    run("ids_in_paths", check, ids, ids, ids)


def test_refused_policies_change_nothing(tmp_path: Path) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}", project="p1")
    svc = PolicyService(catalog, LocalDriver(tmp_path / "servers"))

    def check(name: str, tlist: list[str], every: Any, value: Any) -> None:
        before = [p.id for p in svc.policies.all()]
        try:
            spec = PolicySpec(name=name, times=tlist, every_days=every, retention_value=value)
            row = svc.create(spec)
        except (ValidationError, CsbsError) as exc:
            one_line(exc)
            assert [p.id for p in svc.policies.all()] == before
            return
        after = [p.id for p in svc.policies.all()]
        assert sorted(after) == sorted([*before, row.id])
        svc.delete(row.id)  # keep below the 32-policy limit

    run(
        "policies_change_nothing_when_refused",
        check,
        texts,
        st.lists(times, max_size=3),
        ints,
        ints,
    )
    catalog.dispose()


def test_refused_servers_change_nothing(tmp_path: Path) -> None:
    root = tmp_path / "servers"
    driver = LocalDriver(root)
    sizes = st.lists(
        st.one_of(st.integers(-MIB, 64 * MIB), st.sampled_from([0, 1, 511, 512, 4 * 2**40 + 1])),
        max_size=3,
    )

    def check(name: str, disks: list[int]) -> None:
        before = sorted(p.name for p in root.iterdir()) if root.exists() else []
        try:
            server = driver.create_server(name, disks)
        except (CsbsError, ValueError) as exc:
            one_line(exc)
            after = sorted(p.name for p in root.iterdir()) if root.exists() else []
            assert after == before
            return
        assert server.name == name and [d.size_bytes for d in server.disks] == disks

    run("servers_change_nothing_when_refused", check, texts, sizes)
