"""``csbs dev server …``: drive servers of the local and qemu drivers (development)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from csbs.model import (
    ServerState,
)
from csbs.units import parse_size
from starter.cli_common import (
    JsonOpt,
    _server_json,
    _server_table,
    console,
    dev_servers,
    emit,
    fail,
    guarded,
    settings,
)

dev_server_app = typer.Typer(no_args_is_help=True, help="Drive servers of the compute driver.")


@dev_server_app.command("create")
def dev_server_create(
    name: Annotated[str, typer.Option(help="Server name.")],
    disk: Annotated[list[str], typer.Option(help="Disk size (first = system disk), e.g. 1GiB.")],
    shared_disk: Annotated[
        list[str] | None, typer.Option(help="Shared (multi-attach) disk size.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a server with the configured driver (running, disks empty and sparse)."""
    sizes = guarded(lambda: [parse_size(d, "disk") for d in disk])
    shared = guarded(lambda: [parse_size(d, "shared-disk") for d in shared_disk or []])
    server = guarded(lambda: dev_servers(settings()).create_server(name, sizes, shared))
    emit(_server_json(server), as_json, lambda: _server_table([server]))


@dev_server_app.command("write")
def dev_server_write(
    server_id: str,
    disk: Annotated[str, typer.Option(help="Disk id.")],
    offset: Annotated[str, typer.Option(help="Byte offset (units allowed).")],
    length: Annotated[str | None, typer.Option(help="Bytes to write (units allowed).")] = None,
    pattern: Annotated[str, typer.Option(help="random, text or zero.")] = "random",
    from_file: Annotated[Path | None, typer.Option(help="Write this file's bytes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random pattern.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write to a disk as the guest would (goes through COW and changed-block tracking)."""
    off = guarded(lambda: parse_size(offset, "offset"))
    if (length is None) == (from_file is None):
        fail("give exactly one of --length or --from-file")
    if from_file is not None:
        try:
            data = from_file.read_bytes()
        except OSError as exc:
            fail(f"from-file: cannot read {from_file} ({exc.strerror})")
    else:
        n = guarded(lambda: parse_size(length or "0", "length"))
        data = guarded(lambda: make_pattern(pattern, n, seed))
    guarded(lambda: dev_servers(settings()).write(server_id, disk, off, data))
    emit(
        {"server_id": server_id, "disk_id": disk, "offset": off, "length": len(data)},
        as_json,
        lambda: console.print(f"wrote {len(data)} bytes at {off} on {disk}"),
    )


def make_pattern(pattern: str, n: int, seed: int | None = None) -> bytes:
    """Bytes for ``dev server write``: random (incompressible), text (compressible) or zero."""
    if pattern == "random":
        import random

        return random.Random(seed).randbytes(n) if seed is not None else _urandom(n)
    if pattern == "text":
        line = b"csbs test data: the quick brown fox jumps over the lazy dog 0123456789\n"
        stamp = str(seed if seed is not None else time.time_ns()).encode() + b" "
        unit = stamp + line
        return (unit * (n // len(unit) + 1))[:n]
    if pattern == "zero":
        return bytes(n)
    raise ValueError(f"pattern must be random, text or zero (got {pattern!r})")


def _urandom(n: int) -> bytes:
    return os.urandom(n)


@dev_server_app.command("add-disk")
def dev_server_add_disk(
    server_id: str,
    size: Annotated[str, typer.Option(help="Size of the new data disk.")],
    as_json: JsonOpt = False,
) -> None:
    """Attach a new empty data disk."""
    n = guarded(lambda: parse_size(size, "size"))
    disk = guarded(lambda: dev_servers(settings()).add_disk(server_id, n))
    emit(disk.model_dump(mode="json"), as_json, lambda: console.print(f"added {disk.id}"))


@dev_server_app.command("resize-disk")
def dev_server_resize_disk(
    server_id: str,
    disk: Annotated[str, typer.Option(help="Disk id.")],
    size: Annotated[str, typer.Option(help="New, larger size.")],
    as_json: JsonOpt = False,
) -> None:
    """Grow a disk."""
    n = guarded(lambda: parse_size(size, "size"))
    grown = guarded(lambda: dev_servers(settings()).resize_disk(server_id, disk, n))
    emit(grown.model_dump(mode="json"), as_json, lambda: console.print(f"resized {disk}"))


@dev_server_app.command("remove-disk")
def dev_server_remove_disk(
    server_id: str, disk: Annotated[str, typer.Option(help="Disk id.")], as_json: JsonOpt = False
) -> None:
    """Detach and delete a data disk."""
    guarded(lambda: dev_servers(settings()).remove_disk(server_id, disk))
    emit(
        {"server_id": server_id, "removed": disk}, as_json, lambda: console.print(f"removed {disk}")
    )


@dev_server_app.command("checksum")
def dev_server_checksum(server_id: str, as_json: JsonOpt = True) -> None:
    """sha256 of every disk of a server, as a JSON object {disk_id: hex}."""
    sums = guarded(lambda: dev_servers(settings()).checksum(server_id))
    emit(sums, True)


@dev_server_app.command("set-state")
def dev_server_set_state(server_id: str, state: ServerState, as_json: JsonOpt = False) -> None:
    """Force a server into a state (to try preconditions: fault, resizing, ...)."""
    server = guarded(lambda: dev_servers(settings()).set_state(server_id, state))
    emit(_server_json(server), as_json, lambda: _server_table([server]))
