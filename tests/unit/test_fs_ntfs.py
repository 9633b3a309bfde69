"""The NTFS reader against real images made without kernel mounts: ``mkntfs`` formats an
image file, then ntfs-3g (FUSE, in the foreground) fills it with what ``ntfscp`` cannot
make: folders, a sparse file with an initialized size below its size, a file fragmented
enough to need an ``$ATTRIBUTE_LIST``, an LZNT1-compressed file, hard links, a DOS 8.3
alias, a named stream, Interix symlinks (ntfs-3g's own) and, through its
``system.ntfs_reparse_data`` attribute, a Windows symlink, a junction, a WOF-compressed
file and another reparse point. The root holds 200 long unicode names, so its index is a
B+tree of several ``INDX`` blocks. ``ntfsinfo`` confirms the image has those shapes.
Three more geometries (512-byte and 64 KiB clusters, 4 KiB sectors) and an image filled by
``ntfscp`` alone are read too.

Every file read back is byte for byte what was written; listings, kinds, sizes and times
match; lookups descend the index rather than walk it; errors name the path or the
damaged structure; and reading one file reads little more than the file."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csbs.fs import FsError, Reader
from csbs.fs.ntfs import Ntfs

pytestmark = pytest.mark.slow

MIB = 1 << 20
IMAGE_MIB = 64
#: 2024-01-02 03:04:05.25 UTC, set as the modification time of one file.
MTIME = 1704164645.25
#: Names long enough (and in enough scripts, one beyond the BMP) to need several INDX blocks.
ROOT_NAMES = [f"{i:03} {'a long name ' * (i % 4 + 1)}é ü ✓ 日本語 🙂.txt" for i in range(200)]
#: Pieces of the fragmented file: each a data run and a hole, ~150 runs per MFT record.
FRAGMENTS = 400
REPARSE_SYMLINK, REPARSE_MOUNT_POINT = 0xA000000C, 0xA0000003
REPARSE_WOF, REPARSE_APPEXECLINK = 0x80000017, 0x8000001B


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def mkntfs(image: Path, *options: str) -> None:
    with open(image, "wb") as f:
        f.truncate(IMAGE_MIB * MIB)
    run("mkntfs", "-F", "-Q", "-q", *options, str(image))


@contextmanager
def mounted(image: Path) -> Iterator[Path]:
    """The image mounted by ntfs-3g; it has written everything back once this ends."""
    mnt = image.with_suffix(".mnt")
    mnt.mkdir()
    proc = subprocess.Popen(
        ["ntfs-3g", "-o", "no_detach", str(image), str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.skip(f"ntfs-3g cannot mount here (no FUSE?): {proc.stderr.read().strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ntfs-3g did not mount the image within 10 s")
        time.sleep(0.005)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        proc.wait(timeout=30)


def file_reader(path: Path) -> tuple[Reader, list[int]]:
    """A reader over an image file, and a list that counts the bytes it read."""
    f = open(path, "rb")  # noqa: SIM115 - closed with the test's process
    count = [0]

    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        data = f.read(length)
        count[0] += len(data)
        return data

    return read, count


def open_ntfs(image: Path) -> Ntfs:
    return Ntfs(file_reader(image)[0])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reparse(tag: str | int, data: bytes) -> bytes:
    """A reparse point as ``system.ntfs_reparse_data`` takes it: tag, length, data."""
    return struct.pack("<IHH", int(tag), len(data), 0) + data


def link_reparse(tag: int, substitute: str, printed: str, flags: int | None) -> bytes:
    """A Windows symlink (with ``flags``) or junction (without) reparse point."""
    sub, pr = substitute.encode("utf-16-le"), printed.encode("utf-16-le")
    head = struct.pack("<4H", 0, len(sub), len(sub), len(pr))
    if flags is not None:
        head += struct.pack("<I", flags)
    return reparse(tag, head + sub + pr)


def attributes(image: Path, *where: str) -> list[tuple[str, int, str]]:
    """(type, MFT record, ntfsinfo's lines) of each attribute of a file."""
    out = run("ntfsinfo", *where, str(image))
    pattern = r"Dumping attribute (\S+) \(0x\w+\) from mft record (\d+) \(0x\w+\)\n(.*?)(?=Dump|\Z)"
    return [(m[1], int(m[2]), m[3]) for m in re.finditer(pattern, out, re.S)]


def number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return int(found[1])


@dataclass
class Volume:
    """An image and what was written to it, by absolute path."""

    image: Path
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: {"/"})
    links: dict[str, str] = field(default_factory=dict)
    others: set[str] = field(default_factory=set)


def write(volume: Volume, mnt: Path, path: str, data: bytes) -> Path:
    (mnt / path[1:]).write_bytes(data)
    volume.files[path] = data
    return mnt / path[1:]


def mkdir(volume: Volume, mnt: Path, path: str) -> Path:
    (mnt / path[1:]).mkdir()
    volume.dirs.add(path)
    return mnt / path[1:]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    image = tmp_path_factory.mktemp("ntfs") / "ntfs.img"
    mkntfs(image)
    v = Volume(image)
    with mounted(image) as mnt:
        write(v, mnt, "/big.bin", os.urandom(MIB + 12345))
        write(v, mnt, "/tiny.txt", b"small enough to stay in its MFT record\n" * 10)
        write(v, mnt, "/empty.dat", b"")
        for i, name in enumerate(ROOT_NAMES):
            write(v, mnt, f"/{name}", f"{i}\n".encode() * i)
        # "$Recycle.Bin" is an ordinary folder: only NTFS's own metadata files are hidden.
        for folder in ("/docs", "/docs/deep", "/docs/deep/er", "/compressed", "/junction"):
            mkdir(v, mnt, folder)
        mkdir(v, mnt, "/$Recycle.Bin")
        write(v, mnt, "/docs/deep/er/notes.txt", os.urandom(5000))
        os.link(mnt / "tiny.txt", mnt / "docs/tiny hard link.txt")
        v.files["/docs/tiny hard link.txt"] = v.files["/tiny.txt"]
        streams = write(v, mnt, "/docs/streams.txt", b"the unnamed stream\n")
        os.setxattr(streams, "user.comment", b"a named stream, not the content")
        alias = write(v, mnt, "/docs/A Long File Name.text", b"has an 8.3 alias\n")
        os.setxattr(alias, "system.ntfs_dos_name", b"ALONGF~1.TEX")
        with open(mnt / "hole.bin", "wb") as f:  # holes, and initialized only to 5 MiB + 6
            f.truncate(10 * MIB)
            f.seek(5 * MIB)
            f.write(b"middle")
        v.files["/hole.bin"] = bytes(5 * MIB) + b"middle" + bytes(5 * MIB - 6)
        frag = bytearray()
        with open(mnt / "frag.bin", "wb") as f:  # a run and a hole per piece
            for i in range(FRAGMENTS):
                piece = os.urandom(4096)
                f.seek(i * 16384)
                f.write(piece)
                frag += piece + bytes(16384 - 4096) if i < FRAGMENTS - 1 else piece
        v.files["/frag.bin"] = bytes(frag)
        # New files in a folder marked compressed are compressed (LZNT1, 64 KiB units):
        # some units then compress, one stays stored, one is all zeros.
        os.setxattr(mnt / "compressed", "system.ntfs_attrib_be", (0x800 | 0x10).to_bytes(4))
        # Repeats nearer than they are long make back-references that overlap their copy.
        compressible = b"".join(b"line %d of a compressible text\n" % i for i in range(8000))
        compressible += b"ab" * 5000 + b"xyz" * 5000
        write(v, mnt, "/compressed/c.txt", compressible + os.urandom(140000) + bytes(150000) + b"!")
        os.symlink("docs/deep/er/notes.txt", mnt / "interix link")
        os.symlink("/an/absolute/target", mnt / "docs/absolute link")
        v.links.update({"/interix link": "docs/deep/er/notes.txt"})
        v.links["/docs/absolute link"] = "/an/absolute/target"
        (mnt / "windows link").touch()
        os.setxattr(
            mnt / "windows link",
            "system.ntfs_reparse_data",
            link_reparse(REPARSE_SYMLINK, "docs\\deep", "docs\\deep", flags=1),
        )
        v.links["/windows link"] = "docs/deep"
        os.setxattr(
            mnt / "junction",
            "system.ntfs_reparse_data",
            link_reparse(REPARSE_MOUNT_POINT, "\\??\\C:\\Users", "C:\\Users", flags=None),
        )
        v.dirs.remove("/junction")
        v.links["/junction"] = "C:/Users"
        (mnt / "app").touch()
        os.setxattr(mnt / "app", "system.ntfs_reparse_data", reparse(REPARSE_APPEXECLINK, b"x"))
        v.others.add("/app")
        wof = write(v, mnt, "/wof.dll", b"kept elsewhere" * 10)
        os.setxattr(wof, "system.ntfs_reparse_data", reparse(REPARSE_WOF, bytes(16)))
        os.utime(mnt / "tiny.txt", (MTIME, MTIME))
    return v


def test_the_image_has_the_shapes_read(volume: Volume) -> None:
    image = volume.image
    by_type = {a[0]: a for a in attributes(image, "-F", "/tiny.txt")}
    assert "Resident: \t\t Yes" in by_type["$DATA"][2]
    by_type = {a[0]: a for a in attributes(image, "-F", "/big.bin")}
    assert "Resident: \t\t No" in by_type["$DATA"][2]
    root = {a[0]: a for a in attributes(image, "-i", "5")}
    assert number(r"Data size:\s+(\d+)", root["$INDEX_ALLOCATION"][2]) >= 3 * 4096
    frag = attributes(image, "-F", "/frag.bin")
    assert "$ATTRIBUTE_LIST" in {a[0] for a in frag}
    assert len({record for kind, record, _ in frag if kind == "$DATA"}) >= 3
    hole = {a[0]: a for a in attributes(image, "-F", "/hole.bin")}["$DATA"][2]
    assert number(r"Initialized size:\s+(\d+)", hole) == 5 * MIB + 6
    assert number(r"Data size:\s+(\d+)", hole) == 10 * MIB
    compressed = {a[0]: a for a in attributes(image, "-v", "-F", "/compressed/c.txt")}
    data = compressed["$DATA"][2]
    assert "Attribute flags:\t 0x0001" in data
    assert number(r"Compression unit:\s+(\d+)", data) == 4
    # Clusters stored per 16-cluster unit: compressed (fewer), kept as is (16), zeros (0).
    stored = [0] * (number(r"Highest VCN:\s+(\d+)", data) // 16 + 1)
    for vcn, lcn, count in re.findall(r"0x(\w+)\t+(0x\w+|<HOLE>)\t+0x(\w+)", data):
        for cluster in range(int(vcn, 16), int(vcn, 16) + int(count, 16)):
            stored[cluster // 16] += lcn != "<HOLE>"
    assert {0, 16} < set(stored) and any(0 < s < 16 for s in stored), stored


def test_listings_match_what_was_written(volume: Volume) -> None:
    fs = open_ntfs(volume.image)
    assert fs.type_name == "ntfs"
    everything = {*volume.files, *volume.dirs, *volume.links, *volume.others}
    for folder in sorted(volume.dirs):
        entries = fs.listdir(folder)
        assert [e.name for e in entries] == sorted(e.name for e in entries)
        expected = {p for p in everything if p != "/" and os.path.dirname(p) == folder}
        assert {e.path for e in entries} == expected, folder
        for e in entries:
            assert e.path == folder.rstrip("/") + "/" + e.name
            if e.path in volume.files:
                assert (e.kind, e.size) == ("file", len(volume.files[e.path])), e.path
            elif e.path in volume.dirs:
                assert (e.kind, e.size) == ("dir", 0)
            elif e.path in volume.links:
                assert e.kind == "symlink"
                assert e.size == len(volume.links[e.path].encode())
            else:
                assert e.kind == "other"
            assert e.mode is None
            assert e.mtime == MTIME or abs((e.mtime or 0) - time.time()) < 3600, e.path
    # The metadata files are left out of the root's listing but can still be looked up.
    assert fs.stat("/$MFT").kind == "file"
    assert fs.stat("/$Extend").kind == "dir"
    assert {e.name for e in fs.listdir("/$Extend")} >= {"$ObjId", "$Quota", "$Reparse"}
    assert fs.stat("/").kind == "dir"


def test_files_read_back_byte_for_byte(volume: Volume) -> None:
    fs = open_ntfs(volume.image)
    for path, data in volume.files.items():
        if path == "/wof.dll":
            continue
        assert sha(b"".join(fs.read_file(path))) == sha(data), path
    for path in ("/big.bin", "/hole.bin", "/compressed/c.txt", "/frag.bin", "/tiny.txt"):
        pieces = list(fs.read_file(path, block=100_000))
        assert all(len(p) <= 100_000 for p in pieces)
        assert b"".join(pieces) == volume.files[path]
    assert list(fs.read_file("/empty.dat")) == []


def test_the_modification_time_is_standard_informations(volume: Volume) -> None:
    assert open_ntfs(volume.image).stat("/tiny.txt").mtime == pytest.approx(MTIME, abs=1e-6)


def test_lookups_descend_the_index_and_ignore_case(volume: Volume) -> None:
    fs = open_ntfs(volume.image)
    for name in ROOT_NAMES:
        assert fs._descend(5, name) is not None, name  # found without walking the folder
        assert fs._descend(5, name.upper()) is not None, name
    assert fs.stat("/TINY.TXT").path == "/tiny.txt"
    assert fs.stat("/Docs/DEEP/eR/Notes.TXT").path == "/docs/deep/er/notes.txt"
    fs._upcase_table = tuple(range(65536))  # no upper-casing: the descent misses ...
    assert fs._descend(5, "TINY.TXT") is None
    assert fs.stat("/TINY.TXT").path == "/tiny.txt"  # ... and the walk still finds it
    read, count = file_reader(volume.image)
    fs = Ntfs(read)
    fs.stat(f"/{ROOT_NAMES[0]}")  # reads $UpCase (128 KiB) once
    count[0] = 0
    fs.stat(f"/{ROOT_NAMES[-1]}")
    # Two index blocks (root → node → leaf in a tree of several leaves) and one record.
    assert count[0] <= 2 * 4096 + 1024


def test_links_aliases_and_other_reparse_points(volume: Volume) -> None:
    fs = open_ntfs(volume.image)
    for path, target in volume.links.items():
        assert fs.stat(path).kind == "symlink"
        assert fs.readlink(path) == target
    assert "ALONGF~1.TEX" not in {e.name for e in fs.listdir("/docs")}  # the DOS alias
    assert fs.stat("/docs/tiny hard link.txt").size == len(volume.files["/tiny.txt"])
    assert fs.stat("/app").kind == "other"
    with pytest.raises(FsError, match=r"/app: not a regular file \(it is a other\)"):
        fs.read_file("/app")
    with pytest.raises(
        FsError, match=re.escape("/wof.dll: NTFS WOF-compressed data (unsupported)")
    ):
        fs.read_file("/wof.dll")
    with pytest.raises(FsError, match="/junction: not a directory"):
        fs.listdir("/junction")


def test_errors_name_the_path(volume: Volume) -> None:
    fs = open_ntfs(volume.image)
    with pytest.raises(FsError, match="/docs/nope: no such file or directory"):
        fs.stat("/docs/nope")
    with pytest.raises(FsError, match=r"/docs: not a regular file \(it is a dir\)"):
        fs.read_file("/docs")
    with pytest.raises(FsError, match=re.escape("/tiny.txt: not a directory")):
        fs.listdir("/tiny.txt")
    with pytest.raises(FsError, match=re.escape("/tiny.txt: not a directory")):
        fs.stat("/tiny.txt/below")
    with pytest.raises(FsError, match=re.escape("/tiny.txt: not a symbolic link")):
        fs.readlink("/tiny.txt")
    with pytest.raises(FsError, match="no NTFS boot sector"):
        Ntfs(lambda offset, length: bytes(length))


def test_reading_one_file_reads_little_more_than_it(volume: Volume) -> None:
    read, count = file_reader(volume.image)
    data = b"".join(Ntfs(read).read_file("/big.bin"))
    assert data == volume.files["/big.bin"]
    # The boot sector, a few records and index blocks, and $UpCase (128 KiB).
    assert count[0] < len(data) + 256 * 1024 < 4 * MIB


def record_of(image: bytes, name: str) -> tuple[int, int]:
    """(offset, number) of the MFT record of the file ``name``: the 1 KiB-aligned ``FILE``
    record, other than the root's, that holds the name."""
    for found in re.finditer(re.escape(name.encode("utf-16-le")), image):
        start = found.start() - found.start() % 1024
        (record,) = struct.unpack_from("<I", image, start + 44)
        if image[start : start + 4] == b"FILE" and record != 5:
            return start, record
    raise AssertionError(f"no MFT record holds {name}")


def test_a_torn_record_is_refused_naming_it(volume: Volume, tmp_path: Path) -> None:
    image = bytearray(volume.image.read_bytes())
    start, record = record_of(bytes(image), "tiny.txt")
    image[start + 510 : start + 512] = b"\xde\xad"  # the first stride's sequence number
    damaged = tmp_path / "torn.img"
    damaged.write_bytes(image)
    fs = open_ntfs(damaged)
    with pytest.raises(FsError, match=f"ntfs: MFT record {record} has a bad fixup"):
        fs.stat("/tiny.txt")
    assert fs.stat("/empty.dat").size == 0


def data_attribute(image: bytes, name: str) -> int:
    """Where the $DATA attribute of the file ``name`` starts (in its record's first 510
    bytes, which no fixup touches)."""
    start, _ = record_of(image, name)
    pos: int = struct.unpack_from("<H", image, start + 20)[0]
    while struct.unpack_from("<I", image, start + pos)[0] != 0x80:
        pos += struct.unpack_from("<I", image, start + pos + 4)[0]
    assert pos + 64 < 510
    return start + pos


def test_encrypted_data_is_refused(volume: Volume, tmp_path: Path) -> None:
    """ntfs-3g cannot encrypt: the $DATA attribute's encrypted flag is set by hand."""
    image = bytearray(volume.image.read_bytes())
    image[data_attribute(bytes(image), "big.bin") + 13] |= 0x40  # flags 0x4000
    damaged = tmp_path / "encrypted.img"
    damaged.write_bytes(image)
    with pytest.raises(FsError, match=r"/big.bin: encrypted NTFS data \(EFS, unsupported\)"):
        open_ntfs(damaged).read_file("/big.bin")


def test_bytes_past_the_initialized_size_read_as_zeros(volume: Volume, tmp_path: Path) -> None:
    """The hole file's clusters past its initialized size are sparse anyway: here the
    initialized size of a file whose clusters all hold data is lowered by hand."""
    image = bytearray(volume.image.read_bytes())
    struct.pack_into("<Q", image, data_attribute(bytes(image), "big.bin") + 56, 100_000)
    lowered = tmp_path / "initialized.img"
    lowered.write_bytes(image)
    fs = open_ntfs(lowered)
    data = volume.files["/big.bin"]
    assert fs.stat("/big.bin").size == len(data)
    assert b"".join(fs.read_file("/big.bin")) == data[:100_000] + bytes(len(data) - 100_000)


@pytest.mark.parametrize(
    ("options", "cluster", "record", "codes"),
    [
        # MFT records of 2 clusters, index blocks of 8: both sizes counted in clusters.
        (("-c", "512"), 512, 1024, (2, 8)),
        # Index blocks smaller than a cluster, addressed in 512-byte blocks.
        (("-c", "65536"), 65536, 1024, (-10, -12)),
        # 4 KiB sectors: 4 KiB records, still eight 512-byte fixup strides.
        (("-s", "4096", "-c", "8192"), 8192, 4096, (-12, -12)),
    ],
)
def test_other_geometries(
    tmp_path: Path,
    options: tuple[str, ...],
    cluster: int,
    record: int,
    codes: tuple[int, int],
) -> None:
    image = tmp_path / "ntfs.img"
    mkntfs(image, *options)
    with open(image, "rb") as f:
        assert struct.unpack_from("<b3xb", f.read(512), 64) == codes
    files = {f"/d/e/file {i:03} with a long name ✓": os.urandom(i * 13) for i in range(120)}
    files["/d/big.bin"] = os.urandom(300_000)
    with mounted(image) as mnt:
        (mnt / "d/e").mkdir(parents=True)
        for path, data in files.items():
            (mnt / path[1:]).write_bytes(data)
    fs = open_ntfs(image)
    assert (fs.cluster, fs.record_size) == (cluster, record)
    assert [e.name for e in fs.listdir("/")] == ["d"]
    listed = {e.path: e.size for e in fs.listdir("/d/e")}
    assert listed == {p: len(d) for p, d in files.items() if p.startswith("/d/e/")}
    for path, data in files.items():
        assert b"".join(fs.read_file(path)) == data, path


def test_an_image_filled_by_ntfscp_alone(tmp_path: Path) -> None:
    """Without FUSE: ntfscp copies files into the root (it makes no folders)."""
    image = tmp_path / "ntfs.img"
    mkntfs(image)
    src = tmp_path / "src"
    src.mkdir()
    files = {"big.bin": os.urandom(MIB + 5), "tiny.txt": b"tiny\n", "empty.dat": b""}
    files.update({name: name.encode() for name in ROOT_NAMES[:150]})
    for name, data in files.items():
        (src / name).write_bytes(data)
        run("ntfscp", str(image), str(src / name), name)
    fs = open_ntfs(image)
    assert {e.name: (e.kind, e.size) for e in fs.listdir("/")} == {
        name: ("file", len(data)) for name, data in files.items()
    }
    for name, data in files.items():
        assert sha(b"".join(fs.read_file(f"/{name}"))) == sha(data), name
