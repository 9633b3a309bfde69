"""A small synchronous NBD client: the subset of the protocol csbs needs from QEMU.

Why our own: libnbd's Python binding is the maintained client, but it is not on PyPI (the
PyPI name ``nbd`` is an unrelated notebook tool) and Debian's ``python3-libnbd`` installs
into the system interpreter only, which would tie our venv to Debian's Python. The part of
the protocol we use is small and stable, so it lives here, tested against ``qemu-nbd`` and
QEMU's own NBD server (tests/integration/test_nbd.py).

What it speaks (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):

- fixed newstyle handshake over a Unix socket, ``NBD_OPT_STRUCTURED_REPLY``,
  ``NBD_OPT_SET_META_CONTEXT`` (``base:allocation`` and ``qemu:dirty-bitmap:<name>``) and
  ``NBD_OPT_GO`` with the export and block-size info;
- ``READ`` (structured replies: data and hole chunks), ``WRITE``, ``WRITE_ZEROES``,
  ``FLUSH``, ``BLOCK_STATUS`` and ``DISC``.

One request is in flight at a time per connection (a lock guards it); open one connection
per reader thread for parallel reads.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7

CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2

REPLY_FLAG_DONE = 1
REPLY_NONE = 0
REPLY_OFFSET_DATA = 1
REPLY_OFFSET_HOLE = 2
REPLY_BLOCK_STATUS = 5
REPLY_ERROR_BIT = 1 << 15

#: ``base:allocation`` flags of an extent.
STATE_HOLE = 1
STATE_ZERO = 2
#: ``qemu:dirty-bitmap:`` flag of an extent.
STATE_DIRTY = 1

ALLOCATION = "base:allocation"
#: The largest single request we send (QEMU accepts up to 32 MiB).
MAX_REQUEST = 32 * 1024 * 1024
#: The largest single WRITE_ZEROES / BLOCK_STATUS length we ask for.
MAX_RANGE = 1 << 30
#: The longest option reply we accept (export names, descriptions, meta contexts).
MAX_OPTION_REPLY = 64 * 1024
#: The longest structured-reply chunk that is not data: errors, holes, block status
#: (a descriptor of 8 bytes per extent; QEMU sends far fewer than this allows).
MAX_META_CHUNK = 1 << 20


class NbdError(Exception):
    """The server refused an option or a command, or the connection broke."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def dirty_bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


@dataclass
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST
    #: Meta context name -> id, for the contexts the server agreed to.
    contexts: dict[str, int] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)


def check_coverage(pieces: list[tuple[int, int]], base: int, length: int) -> None:
    """The chunks of one read reply must cover ``base..base+length`` exactly once: an
    overlap or a gap would leave part of the read silently zero."""
    at = base
    for offset, size in sorted(pieces):
        if offset < at:
            raise NbdError(f"NBD read reply chunks overlap at {offset}")
        if offset > at:
            raise NbdError(f"NBD read reply leaves {at}..{offset} uncovered")
        at = offset + size
    if at != base + length:
        raise NbdError(f"NBD read at {base} covered {at - base} of {length} bytes")


class NbdClient:
    """One connection to one export. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        path: str,
        export: str,
        meta_contexts: list[str] | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._cookie = 0
        self._closed = False
        try:
            self._sock.connect(path)
            self.info = self._handshake(export, meta_contexts or [])
        except (OSError, struct.error) as exc:
            self._sock.close()
            raise NbdError(f"cannot connect to NBD export {export!r}: {exc}") from exc
        except BaseException:
            self._sock.close()
            raise

    # -- low-level I/O ------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise NbdError("the NBD server closed the connection")
            got += k
        return bytes(buf)

    def _send(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            if len(part):
                self._sock.sendall(part)

    # -- handshake ----------------------------------------------------------------------
    def _option(self, option: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, option, len(data)), data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdError(f"bad option reply (magic {magic:#x}, option {opt})")
        if length > MAX_OPTION_REPLY:
            raise NbdError(
                f"NBD option {option} reply of {length} bytes is longer than {MAX_OPTION_REPLY}"
            )
        data = self._recv(length) if length else b""
        if rtype & REP_FLAG_ERROR:
            text = data.decode(errors="replace") or f"error {rtype & ~REP_FLAG_ERROR}"
            raise NbdError(f"NBD option {option} refused: {text}")
        return rtype, data

    def _handshake(self, export: str, meta_contexts: list[str]) -> ExportInfo:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed-newstyle NBD server")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY, b"")
        rtype, _ = self._option_reply(OPT_STRUCTURED_REPLY)
        if rtype != REP_ACK:
            raise NbdError("the NBD server does not offer structured replies")
        name = export.encode()
        contexts: dict[str, int] = {}
        if meta_contexts:
            queries = b"".join(
                struct.pack(">I", len(q.encode())) + q.encode() for q in meta_contexts
            )
            self._option(
                OPT_SET_META_CONTEXT,
                struct.pack(">I", len(name))
                + name
                + struct.pack(">I", len(meta_contexts))
                + queries,
            )
            while True:
                rtype, data = self._option_reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT:
                    (ctx_id,) = struct.unpack(">I", data[:4])
                    contexts[data[4:].decode()] = ctx_id
            missing = [q for q in meta_contexts if q not in contexts]
            if missing:
                raise NbdError(f"export {export!r} offers no meta context {', '.join(missing)}")
        self._option(
            OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        )
        info = ExportInfo(size=-1, flags=0, contexts=contexts)
        while True:
            rtype, data = self._option_reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO:
                (kind,) = struct.unpack(">H", data[:2])
                if kind == INFO_EXPORT:
                    info.size, info.flags = struct.unpack(">QH", data[2:12])
                elif kind == INFO_BLOCK_SIZE:
                    info.min_block, info.preferred_block, info.max_block = struct.unpack(
                        ">III", data[2:14]
                    )
        if info.size < 0:
            raise NbdError(f"export {export!r}: the server did not say its size")
        return info

    # -- transmission -------------------------------------------------------------------
    def _request(
        self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes | memoryview = b""
    ) -> int:
        self._cookie += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._cookie, offset, length)
        if data:
            self._send(header, data)
        else:
            self._send(header)
        return self._cookie

    def _replies(self, cookie: int, what: str, data_limit: int = 0) -> list[tuple[int, bytes]]:
        """Read every reply chunk of one request: [(chunk type, payload)]. No chunk may be
        longer than the request allows (``data_limit`` payload bytes for a read's data
        chunks plus their offset, ``MAX_META_CHUNK`` for the others): a server's length
        field never decides how much we allocate."""
        chunks: list[tuple[int, bytes]] = []
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                self._check_cookie(got, cookie)
                if error:
                    raise NbdError(f"NBD {what} failed (errno {error})", error)
                return chunks
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, got, length = struct.unpack(">HHQI", self._recv(16))
            self._check_cookie(got, cookie)
            limit = 8 + data_limit if rtype == REPLY_OFFSET_DATA else MAX_META_CHUNK
            if length > limit:
                raise NbdError(
                    f"NBD {what} reply chunk of {length} bytes is longer than the request "
                    f"allows ({limit})"
                )
            payload = self._recv(length) if length else b""
            if rtype & REPLY_ERROR_BIT:
                if len(payload) < 6:
                    raise NbdError(f"NBD {what} error reply is truncated")
                error, msg_len = struct.unpack(">IH", payload[:6])
                message = payload[6 : 6 + msg_len].decode(errors="replace")
                raise NbdError(f"NBD {what} failed (errno {error}): {message}", error)
            if rtype != REPLY_NONE:
                chunks.append((rtype, payload))
            if flags & REPLY_FLAG_DONE:
                return chunks

    @staticmethod
    def _check_cookie(got: int, want: int) -> None:
        if got != want:
            raise NbdError(f"NBD reply for request {got}, expected {want}")

    def _call(
        self,
        cmd: int,
        offset: int,
        length: int,
        what: str,
        flags: int = 0,
        data: bytes | memoryview = b"",
    ) -> list[tuple[int, bytes]]:
        with self._lock:
            if self._closed:
                raise NbdError("the NBD connection is closed")
            try:
                cookie = self._request(cmd, offset, length, flags, data)
                return self._replies(cookie, what, length if cmd == CMD_READ else 0)
            except BaseException as exc:
                # Part of a reply may still be unread: the stream cannot be trusted any
                # more, so the connection is closed (the caller reconnects or gives up).
                self._closed = True
                self._sock.close()
                if isinstance(exc, NbdError):
                    raise
                if isinstance(exc, OSError | struct.error):
                    raise NbdError(f"NBD {what} failed: {exc}") from exc
                raise

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise NbdError(
                f"range {offset}+{length} is outside the export ({self.info.size} bytes)"
            )

    @property
    def max_request(self) -> int:
        return max(self.info.min_block, min(MAX_REQUEST, self.info.max_block))

    def read(self, offset: int, length: int, whole: bool = False) -> bytearray:
        """Read a range; holes the server reports come back as zeros.

        ``whole`` asks the server not to fragment the reply (NBD_CMD_FLAG_DF), so it sends
        the bytes it reads instead of deciding holes from block status; QEMU reads those
        serialised with copy-before-write, which matters when reading a fleecing image.
        """
        self._check_range(offset, length)
        out = bytearray(length)
        flags = CMD_FLAG_DF if whole and self.info.flags & TFLAG_SEND_DF else 0
        pos = 0
        while pos < length:
            n = min(self.max_request, length - pos)
            base = offset + pos
            pieces: list[tuple[int, int]] = []  # (offset, length) each chunk covered
            for rtype, payload in self._call(CMD_READ, base, n, "read", flags=flags):
                if rtype == REPLY_OFFSET_DATA:
                    if len(payload) < 8:
                        raise NbdError("NBD read data reply is truncated")
                    (at,) = struct.unpack(">Q", payload[:8])
                    size = len(payload) - 8
                    if at < base or at + size > base + n:
                        raise NbdError("NBD read reply outside the requested range")
                    out[at - offset : at - offset + size] = memoryview(payload)[8:]
                elif rtype == REPLY_OFFSET_HOLE:
                    if len(payload) != 12:
                        raise NbdError(f"NBD hole reply of {len(payload)} bytes, not 12")
                    at, size = struct.unpack(">QI", payload)
                    if at < base or at + size > base + n:
                        raise NbdError("NBD hole reply outside the requested range")
                    # ``out`` starts zeroed.
                else:
                    continue
                pieces.append((at, size))
            check_coverage(pieces, base, n)
            pos += n
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            piece = view[pos : pos + self.max_request]
            self._call(CMD_WRITE, offset + pos, len(piece), "write", data=piece)
            pos += len(piece)

    def write_zeroes(self, offset: int, length: int, allow_hole: bool = True) -> None:
        """Make a range read as zeros; with ``allow_hole`` the server may deallocate it."""
        self._check_range(offset, length)
        if not self.info.flags & TFLAG_SEND_WRITE_ZEROES:
            pos = 0
            while pos < length:
                n = min(self.max_request, length - pos)
                self.write(offset + pos, bytes(n))
                pos += n
            return
        flags = 0 if allow_hole else CMD_FLAG_NO_HOLE
        pos = 0
        while pos < length:
            n = min(MAX_RANGE, length - pos)
            self._call(CMD_WRITE_ZEROES, offset + pos, n, "write-zeroes", flags=flags)
            pos += n

    def flush(self) -> None:
        if self.info.flags & TFLAG_SEND_FLUSH:
            self._call(CMD_FLUSH, 0, 0, "flush")

    def extents(
        self, context: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, int]]:
        """(offset, length, flags) extents of one negotiated meta context over a range."""
        ctx_id = self.info.contexts.get(context)
        if ctx_id is None:
            raise NbdError(f"meta context {context!r} was not negotiated")
        end = self.info.size if length is None else offset + length
        self._check_range(offset, end - offset)
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            n = min(MAX_RANGE, end - pos)
            progressed = False
            for rtype, payload in self._call(CMD_BLOCK_STATUS, pos, n, "block-status"):
                if rtype != REPLY_BLOCK_STATUS:
                    continue
                if len(payload) < 12 or (len(payload) - 4) % 8:
                    raise NbdError(f"NBD block status reply of {len(payload)} bytes is malformed")
                (got_id,) = struct.unpack(">I", payload[:4])
                if got_id != ctx_id:
                    continue
                at = pos
                for i in range(4, len(payload), 8):
                    ext_len, ext_flags = struct.unpack(">II", payload[i : i + 8])
                    ext_len = min(ext_len, end - at)
                    if ext_len <= 0:
                        break
                    if out and out[-1][2] == ext_flags and out[-1][0] + out[-1][1] == at:
                        out[-1] = (out[-1][0], out[-1][1] + ext_len, ext_flags)
                    else:
                        out.append((at, ext_len, ext_flags))
                    at += ext_len
                progressed = at > pos
                pos = at
            if not progressed:
                raise NbdError(f"NBD block status for {context!r} made no progress at {pos}")
        return out

    def ranges(self, context: str, want: int, mask: int) -> list[tuple[int, int]]:
        """(offset, length) ranges whose ``flags & mask == want`` in a meta context."""
        return [(o, n) for o, n, f in self.extents(context) if f & mask == want]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._request(CMD_DISC, 0, 0)
            except OSError:
                pass
            finally:
                self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
