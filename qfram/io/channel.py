"""Where a QEMUFile's bytes go: channels, and the entry points that wrap them in a file.

A channel with an ``fd`` lets the core make the syscalls itself (GIL released); the
others are called from the core through ``writev(views)`` / ``readinto(view)``.

* :class:`FdChannel` — any fd: regular file, pipe (grown to 1 MiB by default), tty...
* :class:`SocketChannel` — a socket: shutdown, and a return path over the same socket.
* :class:`BufferChannel` — growable memory (what QEMU's PACKAGED command is built in).
* :class:`ObjectChannel` — any Python object with ``writev``/``write`` and
  ``readinto``/``recv_into``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from typing import Any, Iterable, Optional

from qfram import backend
from qfram.errors import OptionError

# A default 64 KiB pipe with its reader on the other core moves ~0.45 GB/s here, the same
# pipe at 1 MiB ~2.2 GB/s: wake-ups, not copies, are the cost.
DEFAULT_PIPE_SIZE = 1 << 20
# Socket buffers: bigger ones mean fewer, larger skbs and fewer wake-ups per writev
# (measured here on a unix socketpair: ~+15% for qfram's 1024-iovec batches).
DEFAULT_SOCKET_BUFFER = 4 << 20


def _file_class(file_class):
    return backend.QEMUFile if file_class is None else file_class


def grow_pipe(fd: int, size: int) -> int:
    """Grow the pipe behind ``fd`` to at least ``size`` bytes when the kernel allows;
    never shrink it.  Returns the pipe's size afterwards (0 if ``fd`` is not a pipe)."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return 0
    current = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if current < size:
        try:
            current = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass            # over /proc/sys/fs/pipe-max-size, or busy: keep what we have
    return current


def grow_socket_buffers(fd: int, size: int) -> None:
    """Grow a socket's send and receive buffers to at least ``size`` (never shrink)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return
    sock = socket.socket(fileno=os.dup(fd))
    try:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            if sock.getsockopt(socket.SOL_SOCKET, opt) < size:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except OSError:
                    pass        # over net.core.[rw]mem_max for an unprivileged user
    finally:
        sock.close()


class FdChannel:
    """A plain file descriptor.  ``owned``: closing the channel closes the fd.
    A pipe is grown to ``pipe_size``, a socket's buffers to ``socket_buffer`` (None:
    leave them)."""

    def __init__(self, fd: int, *, owned: bool = True,
                 pipe_size: Optional[int] = DEFAULT_PIPE_SIZE,
                 socket_buffer: Optional[int] = DEFAULT_SOCKET_BUFFER) -> None:
        if fd < 0:
            raise OptionError(f"not a file descriptor: {fd}")
        self.fd = fd
        self.owned = owned
        if pipe_size:
            grow_pipe(fd, pipe_size)
        if socket_buffer:
            grow_socket_buffers(fd, socket_buffer)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0 and self.owned:
            os.close(fd)

    def set_blocking(self, block: bool) -> None:
        os.set_blocking(self.fd, block)

    def shutdown(self) -> bool:
        return False

    def return_path(self) -> None:
        return None

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0 and self.owned:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<FdChannel fd={self.fd}>"


class SocketChannel:
    """A connected socket; ``return_path()`` reads or writes its other direction."""

    def __init__(self, sock: socket.socket,
                 socket_buffer: Optional[int] = DEFAULT_SOCKET_BUFFER) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        if socket_buffer:
            grow_socket_buffers(self.fd, socket_buffer)

    def close(self) -> None:
        self.fd = -1
        self.sock.close()

    def set_blocking(self, block: bool) -> None:
        self.sock.setblocking(block)

    def shutdown(self) -> bool:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        return True

    def return_path(self) -> "SocketChannel":
        # a dup of the same socket: each direction closes its own fd
        return SocketChannel(self.sock.dup(), socket_buffer=None)

    def __repr__(self) -> str:
        return f"<SocketChannel fd={self.fd}>"


class BufferChannel:
    """Growable in-memory bytes: writes append, reads consume from the front."""

    fd = -1

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.read_pos = 0

    def writev(self, views: Iterable[memoryview]) -> int:
        total = 0
        for view in views:
            self.data += view
            total += len(view)
        return total

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.read_pos)
        view[:n] = self.data[self.read_pos:self.read_pos + n]
        self.read_pos += n
        return n

    def getvalue(self) -> bytes:
        return bytes(self.data)

    def return_path(self) -> "BufferChannel":
        return self

    def __repr__(self) -> str:
        return f"<BufferChannel {len(self.data)} bytes>"


class ObjectChannel:
    """Adapter for any object with ``writev(views)`` or ``write(b)``, and
    ``readinto(b)`` or ``recv_into(b)`` (io objects, sockets, user classes).
    With ``owned``, closing the channel closes the object."""

    fd = -1

    def __init__(self, obj: Any, *, owned: bool = False) -> None:
        self.obj = obj
        self.owned = owned

    def writev(self, views: list) -> int:
        if hasattr(self.obj, "writev"):
            return self.obj.writev(views)
        total = 0
        for view in views:
            n = self.obj.write(view)
            n = len(view) if n is None else n
            total += n
            if n < len(view):
                break
        return total

    def readinto(self, view: memoryview) -> int:
        if hasattr(self.obj, "readinto"):
            return self.obj.readinto(view)
        return self.obj.recv_into(view)

    def close(self) -> None:
        if self.owned and hasattr(self.obj, "close"):
            self.obj.close()

    def __repr__(self) -> str:
        return f"<ObjectChannel {self.obj!r}>"


def fdopen(fd: int, mode: str, *, owned: bool = True,
           pipe_size: Optional[int] = DEFAULT_PIPE_SIZE,
           socket_buffer: Optional[int] = DEFAULT_SOCKET_BUFFER, file_class=None, **params):
    """A QEMUFile over ``fd`` (``mode`` ``"wb"`` or ``"rb"``); closing it closes ``fd``
    unless ``owned=False``.  A pipe is grown to ``pipe_size``, a socket's buffers to
    ``socket_buffer`` (None: leave them as they are).
    ``params``: QEMUFile's ``iov_max``, ``buf_size``, ``release_min``, ``timeout``."""
    cls = _file_class(file_class)
    channel = FdChannel(fd, owned=owned, pipe_size=pipe_size, socket_buffer=socket_buffer)
    return cls(channel, mode, **params)


def socket_file(sock: socket.socket, mode: str, *,
                socket_buffer: Optional[int] = DEFAULT_SOCKET_BUFFER, file_class=None,
                **params):
    """A QEMUFile over a connected socket; ``get_return_path()`` gives the other way."""
    cls = _file_class(file_class)
    return cls(SocketChannel(sock, socket_buffer=socket_buffer), mode, **params)


def buffer_file(data: Optional[bytes] = None, mode: Optional[str] = None, *,
                file_class=None, **params):
    """A QEMUFile over memory: a writer when ``data`` is None (read the bytes back with
    ``f.channel.getvalue()``, or ``f.get_return_path()`` for a reader), else a reader of
    ``data``."""
    cls = _file_class(file_class)
    if mode is None:
        mode = "wb" if data is None else "rb"
    return cls(BufferChannel(data or b""), mode, **params)


def object_file(obj: Any, mode: str, *, owned: bool = False, file_class=None, **params):
    """A QEMUFile over any Python object with writev/write or readinto/recv_into."""
    cls = _file_class(file_class)
    return cls(ObjectChannel(obj, owned=owned), mode, **params)
