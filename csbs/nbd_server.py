"""A backup's disk served read-only over NBD (``csbs backup mount``, issue 18): any NBD
client (``qemu-img``, ``nbdfuse``, a VM) reads the disk as it was at backup time, and
only the chunks it touches are fetched from the object store.

``BackupDiskReader`` is the random-access reader over a manifest: chunks are fetched on
demand, checked against their digest, kept in a small cache and read ahead. ``NbdServer``
speaks the fixed-newstyle NBD protocol (``OPT_GO``/``OPT_INFO``/``OPT_EXPORT_NAME``/
``OPT_LIST``, structured replies when asked) on a Unix socket or a loopback TCP port; a
write is refused with EPERM.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from csbs.chunkstore import ChunkStore
from csbs.drivers.nbd import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_GO,
    OPT_REPLY_MAGIC,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_FLAG_ERROR,
    REP_INFO,
    REPLY_FLAG_DONE,
    REPLY_NONE,
    REPLY_OFFSET_DATA,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_READ_ONLY,
    TFLAG_SEND_FLUSH,
)
from csbs.errors import CorruptData
from csbs.format import Manifest, chunk_span

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO = 1, 2, 3, 6
REP_SERVER = 2
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
TFLAG_HAS_FLAGS = 1
TFLAG_CAN_MULTI_CONN = 1 << 8
REPLY_ERROR = (1 << 15) | 1
EPERM, EIO, EINVAL = 1, 5, 22
#: The largest read a client may ask for (qemu asks for at most 32 MiB).
MAX_READ = 32 * 1024 * 1024


class BackupDiskReader:
    """Reads any byte range of one backed-up disk; thread-safe."""

    def __init__(
        self, store: ChunkStore, manifest: Manifest, cache_chunks: int = 32, readahead: int = 4
    ) -> None:
        self.store, self.manifest = store, manifest
        self.size_bytes = manifest.size_bytes
        self.cache_chunks, self.readahead = max(cache_chunks, readahead + 2), readahead
        self._cache: OrderedDict[int, Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(2, readahead), thread_name_prefix="mount")
        self.chunks_fetched = 0
        self.bytes_fetched = 0

    def _fetch(self, index: int) -> bytes:
        chunk_id = self.manifest.entry(index)
        _, length = chunk_span(index, self.size_bytes, self.manifest.chunk_size)
        if chunk_id is None:
            return bytes(length)
        data, stored = self.store.get_chunk(chunk_id)
        if len(data) != length:
            raise CorruptData(f"chunk {chunk_id.hex()} holds {len(data)} bytes, not {length}")
        with self._lock:
            self.chunks_fetched += 1
            self.bytes_fetched += stored
        return data

    def _chunk(self, index: int, wait: bool = True) -> Future[bytes]:
        with self._lock:
            future = self._cache.get(index)
            if future is not None:
                self._cache.move_to_end(index)
            else:
                future = self._pool.submit(self._fetch, index)
                self._cache[index] = future
                while len(self._cache) > self.cache_chunks:
                    self._cache.popitem(last=False)
        return future

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (the disk as it was at backup time)."""
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise ValueError(f"read of {length} bytes at {offset} is outside the disk")
        cs = self.manifest.chunk_size
        if length == 0:
            return b""
        first, last = offset // cs, (offset + length - 1) // cs
        futures = [self._chunk(i) for i in range(first, last + 1)]
        for ahead in range(last + 1, min(last + 1 + self.readahead, self.manifest.chunk_count)):
            if self.manifest.entry(ahead) is not None:
                self._chunk(ahead)
        out = bytearray()
        for i, future in zip(range(first, last + 1), futures, strict=True):
            data = future.result()
            start = max(offset, i * cs) - i * cs
            end = min(offset + length, i * cs + len(data)) - i * cs
            out += data[start:end]
        return bytes(out)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class NbdServer:
    """One read-only export, on a Unix socket and/or a loopback TCP port."""

    def __init__(
        self,
        reader: BackupDiskReader,
        name: str,
        socket_path: Path | None = None,
        tcp_port: int | None = None,
    ) -> None:
        self.reader, self.name = reader, name
        self.listeners: list[socket.socket] = []
        self.socket_path = socket_path
        self._bound = 0
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(str(socket_path))
            os.chmod(socket_path, 0o600)
            self._bound = os.stat(socket_path).st_ino
            self.listeners.append(unix)
        self.tcp_port = None
        if tcp_port is not None:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", tcp_port))
            self.tcp_port = tcp.getsockname()[1]
            self.listeners.append(tcp)
        for listener in self.listeners:
            listener.listen(8)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def uris(self) -> list[str]:
        out = []
        if self.socket_path is not None:
            out.append(f"nbd+unix:///{self.name}?socket={self.socket_path}")
        if self.tcp_port is not None:
            out.append(f"nbd://127.0.0.1:{self.tcp_port}/{self.name}")
        return out

    def serve_forever(self) -> None:
        threads = [
            threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self.listeners
        ]
        for t in threads:
            t.start()
        self._closed.wait()

    def close(self) -> None:
        """Stop listening and drop every client (a client that reconnects, as QEMU does
        for an instant restore, then finds the next server on the same socket)."""
        self._closed.set()
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                listener.close()
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self.socket_path is not None:
            # Only while the path is still ours: a retry of the same restore may have
            # bound a new server there already (its clients reconnect to that one).
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.socket_path).st_ino == self._bound:
                    self.socket_path.unlink()
        self.reader.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    # -- one connection ----------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        try:
            with conn:
                structured = self._handshake(conn)
                if structured is not None:
                    self._transmit(conn, structured)
        except (OSError, ConnectionError, struct.error):
            return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = conn.recv(n - len(buf))
            if not part:
                raise ConnectionError("the client went away")
            buf += part
        return bytes(buf)

    @staticmethod
    def _reply(conn: socket.socket, option: int, rtype: int, data: bytes = b"") -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, rtype, len(data)) + data)

    def _export_info(self) -> bytes:
        flags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
        return struct.pack(">HQH", INFO_EXPORT, self.reader.size_bytes, flags)

    def _handshake(self, conn: socket.socket) -> bool | None:
        """Negotiate; whether structured replies were agreed, or None (the client left)."""
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self._recv(conn, 4))
        structured = False
        while True:
            magic, option, length = struct.unpack(">QII", self._recv(conn, 16))
            if magic != IHAVEOPT or length > 64 * 1024:
                return None
            data = self._recv(conn, length)
            if option == OPT_EXPORT_NAME:
                if data.decode(errors="replace") not in ("", self.name):
                    return None
                pad = b"" if client_flags & FLAG_NO_ZEROES else bytes(124)
                conn.sendall(self._export_info()[2:] + pad)
                return structured
            if option in (OPT_GO, OPT_INFO):
                (name_len,) = struct.unpack(">I", data[:4])
                name = data[4 : 4 + name_len].decode(errors="replace")
                if name not in ("", self.name):
                    self._reply(conn, option, REP_ERR_UNKNOWN, b"no such export")
                    continue
                self._reply(conn, option, REP_INFO, self._export_info())
                self._reply(conn, option, REP_ACK)
                if option == OPT_GO:
                    return structured
            elif option == OPT_STRUCTURED_REPLY:
                structured = True
                self._reply(conn, option, REP_ACK)
            elif option == OPT_LIST:
                listed = self.name.encode()
                self._reply(conn, option, REP_SERVER, struct.pack(">I", len(listed)) + listed)
                self._reply(conn, option, REP_ACK)
            elif option == OPT_ABORT:
                self._reply(conn, option, REP_ACK)
                return None
            else:
                self._reply(conn, option, REP_ERR_UNSUP)

    def _transmit(self, conn: socket.socket, structured: bool) -> None:
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", self._recv(conn, 28)
            )
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_DISC:
                return
            if cmd == CMD_READ:
                error = 0
                if length > MAX_READ or offset + length > self.reader.size_bytes:
                    error = EINVAL
                else:
                    try:
                        data = self.reader.read(offset, length)
                    except Exception:
                        error = EIO
                if error:
                    self._error(conn, structured, cookie, error)
                elif structured:
                    head = struct.pack(
                        ">IHHQIQ",
                        STRUCTURED_REPLY_MAGIC,
                        REPLY_FLAG_DONE,
                        REPLY_OFFSET_DATA,
                        cookie,
                        8 + len(data),
                        offset,
                    )
                    conn.sendall(head + data)
                else:
                    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + data)
            elif cmd == CMD_FLUSH:
                if structured:
                    conn.sendall(
                        struct.pack(
                            ">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_NONE, cookie, 0
                        )
                    )
                else:
                    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
            else:
                if cmd == 1:  # a write: its payload follows the request
                    self._recv(conn, length)
                self._error(conn, structured, cookie, EPERM)

    @staticmethod
    def _error(conn: socket.socket, structured: bool, cookie: int, error: int) -> None:
        if structured:
            message = b"read-only backup export" if error == EPERM else b"read failed"
            payload = struct.pack(">IH", error, len(message)) + message
            conn.sendall(
                struct.pack(
                    ">IHHQI",
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE,
                    REPLY_ERROR,
                    cookie,
                    len(payload),
                )
                + payload
            )
        else:
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))
