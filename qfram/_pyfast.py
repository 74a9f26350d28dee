"""Pure-Python twin of qfram's core (``qfram/_fast.pyx``), for differential tests.

Selected only by ``QFRAM_PURE_PYTHON=1``.  It runs the same algorithm on the same
addresses — buffer exports taken through the C API with ctypes, iovecs as (address,
length), ``os.writev`` on views of raw memory, ``madvise`` from libc — so its byte
stream, flush points and release behaviour are the extension's, only slower.
"""
from __future__ import annotations

import ctypes
import errno
import io
import os
import select
import zlib
from typing import Any, List, Optional, Tuple

from qfram import fileargs
from qfram.errors import FormatError, StreamEnded, raised_in
from qfram.wire import (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_CONTINUE,
                        RAM_CONTROL_HOOK, RAM_SAVE_CONTROL_NOT_SUPP,
                        RAM_SAVE_CONTROL_DELAYED, DEFAULT_IOV_MAX, DEFAULT_BUF_SIZE,
                        DEFAULT_RELEASE_MIN)

_IOV_MAX = os.sysconf("SC_IOV_MAX")
_PIN_LIMIT = 4096
_HOST_PAGE = os.sysconf("SC_PAGESIZE")
_MADV_DONTNEED = 4
_MADV_REMOVE = 9
_ZEROS = bytes(4096)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PyBUF_SIMPLE = 0
_PyBUF_WRITABLE = 1


class _Export:
    """One buffer export (PyObject_GetBuffer) and the address it gave."""

    __slots__ = ("view", "addr", "len", "live", "obj")

    def __init__(self, obj: Any, writable: bool = False) -> None:
        self.obj = obj
        self.view = _PyBuffer()
        _get_buffer(obj, ctypes.byref(self.view), _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE)
        self.addr = self.view.buf or 0
        self.len = self.view.len
        self.live = True

    def release(self) -> None:
        if self.live:
            self.live = False
            _release_buffer(ctypes.byref(self.view))

    def __del__(self) -> None:
        self.release()


def _raw(addr: int, length: int) -> memoryview:
    """A byte view of raw memory (what the C core's iovecs point at)."""
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def _all_zero(view: memoryview) -> bool:
    n = len(view)
    pos = 0
    while pos < n:
        chunk = min(4096, n - pos)
        if view[pos:pos + chunk] != _ZEROS[:chunk]:
            return False
        pos += chunk
    return True


def _advance(views: List[memoryview], first: int, sent: int) -> int:
    """Step a gather list over ``sent`` bytes written: past the whole views, then into the
    next one.  Returns the index of the first view still to write."""
    while first < len(views) and sent >= len(views[first]):
        sent -= len(views[first])
        first += 1
    if sent > 0:
        views[first] = views[first][sent:]
    return first


def _check_range(size: int, offset: int, length: int) -> int:
    if length < 0:
        length = size - offset
    if offset < 0 or length < 0 or offset > size or size - offset < length:
        raise ValueError(f"range offset={offset} length={length} is outside a buffer of "
                         f"{size} bytes")
    return length


def is_zero(buf: Any, offset: int = 0, length: int = -1) -> bool:
    """True when every byte of ``buf[offset:offset+length]`` is zero."""
    view = memoryview(buf).cast("B")
    length = _check_range(len(view), offset, length)
    return _all_zero(view[offset:offset + length])


def _check_int(v: int, low: int, high: int) -> None:
    """The C core converts to a C integer type: same range, same error."""
    if not low <= v < high:
        raise OverflowError(f"{v} is out of range for this put")


def _error_copy(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and type(exc) is not StreamEnded:
        return type(exc)(*exc.args)
    return exc


class QEMUFile:
    """Pure-Python twin of :class:`qfram._fast.QEMUFile` (same API, same bytes)."""

    def __init__(self, channel: Any, mode: str, *, iov_max: int = DEFAULT_IOV_MAX,
                 buf_size: int = DEFAULT_BUF_SIZE, release_min: int = DEFAULT_RELEASE_MIN,
                 timeout: Optional[float] = None) -> None:
        self._writable, self._fd = fileargs.check(channel, mode, iov_max, buf_size,
                                                  release_min, _IOV_MAX)
        self.channel = channel
        self._iov_max = iov_max
        self._cap = buf_size
        self._release_min = release_min
        self._cbuf = ctypes.create_string_buffer(buf_size)
        self._base = ctypes.addressof(self._cbuf)
        self._buf = memoryview(self._cbuf).cast("B")
        self._index = 0
        self._fill = 0
        self._iov: List[List[int]] = []          # [address, length]
        self._may_free: List[bool] = []
        self._pins: List[_Export] = []
        self._batch_runs: List[List[int]] = []   # [address, length]
        self._open_run = [0, 0]
        self._total = 0
        self._rate_max = 0
        self._rate_used = 0
        self._error = 0
        self._at_eof = False
        self._exc: Optional[BaseException] = None
        self._pending: Optional[BaseException] = None
        self._shutdown = False
        self._closed = False
        self._busy = False
        self._timeout_ms = -1
        self.writev_calls = 0
        self.read_calls = 0
        self.released_bytes = 0
        self.release_calls = 0
        self.release_failures = 0
        self._hooks: dict = {}
        self.set_timeout(timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("writing" if self._writable else "reading")
        return f"<qfram QEMUFile (pure Python) {state} channel={self.channel!r}>"

    def __enter__(self) -> "QEMUFile":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- guards and errors ------------------------------------------------------------------

    def _enter(self, want_write: Optional[bool]) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed QEMUFile")
        if self._busy:
            raise RuntimeError("QEMUFile is in use by another thread")
        if want_write is True and not self._writable:
            raise io.UnsupportedOperation("this QEMUFile is open for reading")
        if want_write is False and self._writable:
            raise io.UnsupportedOperation("this QEMUFile is open for writing")
        self._busy = True

    def _leave(self) -> None:
        self._busy = False
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    def _record(self, err: int, exc: BaseException) -> None:
        if self._error == 0:
            self._error = -err if err > 0 else -errno.EIO
            self._exc = exc

    def _fail_errno(self, err: int, what: str) -> int:
        if self._error == 0:
            self._record(err, OSError(err, f"{what} on fd {self._fd}: {os.strerror(err)}"))
        return -1

    def get_error(self) -> int:
        return self._error

    def set_error(self, ret: int, message: Optional[str] = None) -> None:
        if ret > 0:
            raise ValueError("errors are negative errno values")
        if ret == 0 or self._error != 0:
            return
        self._record(-ret, OSError(-ret, message if message is not None else os.strerror(-ret)))

    @property
    def error(self) -> Optional[BaseException]:
        if self._error == 0:
            return None
        if self._at_eof:
            return StreamEnded(self._read_pos(), 1, 0)
        if self._exc is not None:
            return _error_copy(self._exc)
        return OSError(-self._error, os.strerror(-self._error))

    def _raise_error(self) -> None:
        exc = self.error
        if exc is not None:
            raise exc

    def _raise_short(self, start: int, wanted: int, got: int, what: str) -> None:
        if self._pending is not None:
            return
        if self._at_eof or self._error == 0:
            raise StreamEnded(start, wanted, got, what)
        raise self.error  # type: ignore[misc]

    def set_timeout(self, timeout: Optional[float]) -> None:
        if timeout is None:
            self._timeout_ms = -1
        elif timeout < 0:
            raise ValueError("timeout cannot be negative")
        else:
            self._timeout_ms = int(min(timeout * 1000.0, 2147483647.0))

    def _wait(self, events: int) -> int:
        poller = select.poll()
        poller.register(self._fd, events)
        try:
            ready = poller.poll(self._timeout_ms)
        except OSError as exc:
            return self._fail_errno(exc.errno or errno.EIO, "poll")
        if not ready:
            return self._fail_errno(errno.ETIMEDOUT, "poll (timed out)")
        return 0

    # -- write side: gather list ---------------------------------------------------------

    def _add_to_iovec(self, addr: int, size: int, may_free: bool) -> int:
        if self._iov:
            last = self._iov[-1]
            if last[0] + last[1] == addr and may_free == self._may_free[-1]:
                last[1] += size
                if len(self._iov) >= self._iov_max:
                    self._flush_batch()
                    return 1
                return 0
        if len(self._iov) >= self._iov_max:
            return 1
        self._iov.append([addr, size])
        self._may_free.append(may_free)
        if len(self._iov) >= self._iov_max:
            self._flush_batch()
            return 1
        return 0

    def _add_buf_to_iovec(self, length: int) -> None:
        if not self._add_to_iovec(self._base + self._index, length, False):
            self._index += length
            if self._index == self._cap:
                self._flush_batch()

    def _put_byte(self, v: int) -> None:
        if self._error:
            return
        self._buf[self._index] = v & 0xFF
        self._rate_used += 1
        self._add_buf_to_iovec(1)

    def _put_be(self, v: int, nbytes: int) -> None:
        for shift in range(8 * (nbytes - 1), -8, -8):
            self._put_byte((v >> shift) & 0xFF)

    def _put_bytes(self, data: memoryview) -> None:
        pos = 0
        n = len(data)
        while n > 0 and not self._error:
            chunk = min(self._cap - self._index, n)
            self._buf[self._index:self._index + chunk] = data[pos:pos + chunk]
            self._rate_used += chunk
            self._add_buf_to_iovec(chunk)
            pos += chunk
            n -= chunk

    def _note_release(self, addr: int, n: int) -> None:
        if self._batch_runs:
            last = self._batch_runs[-1]
            if last[0] + last[1] == addr:
                last[1] += n
                return
        self._batch_runs.append([addr, n])

    # -- write side: flushing and releasing -----------------------------------------------

    def _flush_batch(self) -> int:
        if not self._writable:
            return 0
        if self._error == 0 and self._iov:
            total = sum(length for _, length in self._iov)
            rc = self._write_iov() if self._fd >= 0 else self._write_iov_python()
            if rc == 0:
                self._total += total
                self._commit_release()
        self._batch_runs = []
        self._index = 0
        self._iov = []
        self._may_free = []
        if self._error:
            self._release_open_run()
        self._drop_pins_if_idle()
        return -1 if self._error else 0

    def _write_iov(self) -> int:
        views = [_raw(addr, length) for addr, length in self._iov]
        first = 0
        while first < len(views):
            try:
                n = os.writev(self._fd, views[first:first + _IOV_MAX])
            except BlockingIOError:
                if self._wait(select.POLLOUT) < 0:
                    return -1
                continue
            except OSError as exc:
                return self._fail_errno(exc.errno or errno.EIO, "writev")
            except BaseException as exc:  # a signal handler raised: stop, as the core does
                self._record(errno.EINTR, raised_in(errno.EINTR, "a signal handler", exc))
                self._pending = exc
                return -1
            self.writev_calls += 1
            if n == 0:
                return self._fail_errno(errno.EIO, "writev (no progress)")
            first = _advance(views, first, n)
        return 0

    def _write_iov_python(self) -> int:
        views = [_raw(addr, length) for addr, length in self._iov]
        first = 0
        try:
            try:
                while first < len(views):
                    result = self.channel.writev(views[first:])
                    self.writev_calls += 1
                    if result is None or result <= 0:
                        raise OSError(errno.EIO, f"{self.channel!r}.writev made no progress")
                    first = _advance(views, first, result)
            finally:
                for view in views:
                    view.release()
        except OSError as exc:
            self._record(exc.errno or errno.EIO, exc)
            return -1
        except BaseException as exc:
            self._record(errno.EIO, raised_in(errno.EIO, repr(self.channel), exc))
            self._pending = exc
            return -1
        return 0

    def _commit_release(self) -> None:
        for base, length in self._batch_runs:
            if self._open_run[1] and self._open_run[0] + self._open_run[1] == base:
                self._open_run[1] += length
            else:
                self._release_open_run()
                self._open_run = [base, length]
        self._batch_runs = []
        if self._open_run[1] and self._open_run[1] >= self._release_min:
            self._release_open_run()

    def _release_open_run(self) -> None:
        if self._open_run[1]:
            self._release_run(*self._open_run)
            self._open_run = [0, 0]

    def _release_run(self, base: int, length: int) -> None:
        start = (base + _HOST_PAGE - 1) & ~(_HOST_PAGE - 1)
        end = (base + length) & ~(_HOST_PAGE - 1)
        if end <= start:
            return
        if _libc.madvise(start, end - start, _MADV_REMOVE) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.EACCES, errno.EOPNOTSUPP) or \
                    _libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
                self.release_failures += 1
                return
        self.released_bytes += end - start
        self.release_calls += 1

    def _drop_pins_if_idle(self) -> None:
        if not self._pins or self._iov:
            return
        if self._open_run[1] and len(self._pins) < _PIN_LIMIT:
            return
        self._release_open_run()
        for pin in self._pins:
            pin.release()
        self._pins = []

    # -- write side: public puts ---------------------------------------------------------

    def _put_int(self, v: int, nbytes: int) -> None:
        """A guarded big-endian put of the low ``nbytes`` of ``v`` (the put_* methods)."""
        self._enter(True)
        try:
            self._put_be(v & ((1 << (8 * nbytes)) - 1), nbytes)
        finally:
            self._leave()

    def put_byte(self, v: int) -> None:
        _check_int(v, -(1 << 31), 1 << 31)
        self._put_int(v, 1)

    def put_be16(self, v: int) -> None:
        _check_int(v, 0, 1 << 32)
        self._put_int(v, 2)

    def put_be32(self, v: int) -> None:
        _check_int(v, 0, 1 << 32)
        self._put_int(v, 4)

    def put_be64(self, v: int) -> None:
        _check_int(v, 0, 1 << 64)
        self._put_int(v, 8)

    def put_buffer(self, buf: Any) -> None:
        self._enter(True)
        try:
            if self._error:
                return
            self._put_bytes(memoryview(buf).cast("B"))
        finally:
            self._leave()

    def put_buffer_async(self, buf: Any, may_free: bool = False, offset: int = 0,
                         length: int = -1) -> None:
        self._enter(True)
        try:
            if self._error:
                return
            if self._pins and self._pins[-1].obj is buf:
                export = self._pins[-1]
                length = _check_range(export.len, offset, length)
            else:
                export = _Export(buf)
                try:
                    length = _check_range(export.len, offset, length)
                except ValueError:
                    export.release()
                    raise
                self._pins.append(export)
            if length == 0:
                return
            addr = export.addr + offset
            self._rate_used += length
            if may_free:
                self._note_release(addr, length)
            self._add_to_iovec(addr, length, bool(may_free))
        finally:
            self._leave()

    def put_counted_string(self, s: Any) -> None:
        data = s.encode() if isinstance(s, str) else bytes(s)
        if len(data) > 255:
            raise ValueError(f"a counted string holds at most 255 bytes, not {len(data)}")
        self._enter(True)
        try:
            self._put_byte(len(data))
            self._put_bytes(memoryview(data))
        finally:
            self._leave()

    def put_compression_data(self, data: Any, level: int = 1) -> int:
        compressed = zlib.compress(bytes(data), level)
        self.put_be32(len(compressed))
        self.put_buffer(compressed)
        return len(compressed) + 4

    def put_qemu_file(self, src: "QEMUFile") -> int:
        if src is self:
            raise ValueError("cannot move a file into itself")
        self._enter(True)
        try:
            if not src._writable:
                raise io.UnsupportedOperation("put_qemu_file needs a writing source")
            moved = 0
            for addr, length in src._iov:
                self._put_bytes(_raw(addr, length))
                moved += length
            src._iov = []
            src._may_free = []
            src._index = 0
            src._batch_runs = []
            src._drop_pins_if_idle()
            return moved
        finally:
            self._leave()

    def flush(self) -> None:
        self._enter(True)
        try:
            self._flush_batch()
            self._release_open_run()
            self._drop_pins_if_idle()
            self._raise_error()
        finally:
            self._leave()

    # -- write side: the page loop --------------------------------------------------------

    def save_pages(self, region: Any, first_page: int = 0, count: int = -1,
                   header_base: int = 0, flags: int = 0, may_free: bool = False, *,
                   idstr: Any = None, page_size: int = 4096, dirty: Any = None,
                   detect_zero: bool = True, stop_when_rate_limited: bool = False,
                   block_offset: int = 0, claimed: Any = None) -> Tuple[int, int, int]:
        self._enter(True)
        try:
            if page_size < 512 or page_size & (page_size - 1):
                raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
            if flags & ~(page_size - 1):
                raise ValueError("flags must fit below the page size")
            if header_base & (page_size - 1):
                raise ValueError("header_base must be page aligned")
            name = None
            if idstr is not None:
                name = idstr.encode() if isinstance(idstr, str) else bytes(idstr)
                if len(name) > 255:
                    raise ValueError("a block name holds at most 255 bytes")
            if self._error:
                return (0, 0, first_page)
            export = _Export(region)
            npages = export.len // page_size
            if count < 0:
                count = npages - first_page
            if first_page < 0 or count < 0 or first_page + count > npages:
                export.release()
                raise ValueError(f"pages {first_page}..{first_page + count} are outside a "
                                 f"region of {npages} pages")
            bits = None
            if dirty is not None:
                bits = memoryview(dirty).cast("B")
                if bits.readonly:
                    export.release()
                    raise BufferError("the dirty bitmap must be writable")
                if len(bits) * 8 < first_page + count:
                    export.release()
                    raise ValueError("the dirty bitmap is shorter than the page range")
            sent = None
            if claimed is not None:
                sent = memoryview(claimed).cast("B")
                if sent.readonly or len(sent) * 8 < first_page + count:
                    export.release()
                    raise ValueError("the claimed bitmap is read-only or shorter than the "
                                     "page range")
            try:
                return self._save_loop(export, first_page, count, header_base, flags,
                                       may_free, name, page_size, bits, detect_zero,
                                       stop_when_rate_limited, block_offset, sent)
            finally:
                # the loop's export kept the region alive; keep it while bytes are pending
                if self._iov or self._batch_runs or self._open_run[1]:
                    self._pins.append(export)
                else:
                    export.release()
        finally:
            self._leave()

    def _save_loop(self, export: _Export, first_page: int, count: int, header_base: int,
                   flags: int, may_free: bool, name: Optional[bytes], page_size: int,
                   bits: Optional[memoryview], detect_zero: bool,
                   stop_when_rate_limited: bool, block_offset: int,
                   sent: Optional[memoryview] = None) -> Tuple[int, int, int]:
        pages = zeros = 0
        hooked = self._hooks.get("save_page") is not None
        for i in range(first_page, first_page + count):
            if bits is not None and not (bits[i >> 3] >> (i & 7)) & 1:
                continue
            if self._error or (stop_when_rate_limited and self._rate_limited()):
                return (pages, zeros, i)
            if hooked:
                ret, _ = self._control_save_page(block_offset, header_base + i * page_size,
                                                 page_size)
                if ret != RAM_SAVE_CONTROL_NOT_SUPP:
                    if bits is not None:
                        bits[i >> 3] &= ~(1 << (i & 7))
                    continue
            addr = export.addr + i * page_size
            page = _raw(addr, page_size)
            zero = detect_zero and _all_zero(page)
            header = (header_base + i * page_size) | flags
            header |= RAM_SAVE_FLAG_ZERO if zero else RAM_SAVE_FLAG_PAGE
            if sent is not None:
                sent[i >> 3] |= 1 << (i & 7)
            if name is not None:
                self._put_be(header & ~RAM_SAVE_FLAG_CONTINUE, 8)
                self._put_byte(len(name))
                self._put_bytes(memoryview(name))
                name = None
                flags |= RAM_SAVE_FLAG_CONTINUE
            else:
                self._put_be(header, 8)
            if zero:
                self._put_byte(0)
                if may_free and not self._error:
                    self._note_release(addr, page_size)
                zeros += 1
            elif not self._error:
                self._rate_used += page_size
                if may_free:
                    self._note_release(addr, page_size)
                self._add_to_iovec(addr, page_size, bool(may_free))
                pages += 1
            if bits is not None:
                bits[i >> 3] &= ~(1 << (i & 7))
        return (pages, zeros, first_page + count)

    # -- read side ------------------------------------------------------------------------

    def _read_pos(self) -> int:
        return self._total - (self._fill - self._index)

    def _fill_buffer(self) -> int:
        pending = self._fill - self._index
        if pending > 0 and self._index > 0:
            self._buf[:pending] = self._buf[self._index:self._fill]
        self._index = 0
        self._fill = pending
        if self._error or pending >= self._cap:
            return 0
        room = self._buf[pending:]
        if self._fd >= 0:
            while True:
                try:
                    n = os.readv(self._fd, [room])
                    break
                except BlockingIOError:
                    if self._wait(select.POLLIN) < 0:
                        return 0
                except OSError as exc:
                    self._fail_errno(exc.errno or errno.EIO, "read")
                    return 0
                except BaseException as exc:
                    self._record(errno.EINTR, raised_in(errno.EINTR, "a signal handler", exc))
                    self._pending = exc
                    return 0
        else:
            try:
                n = self.channel.readinto(room)
                if n is None:
                    raise OSError(errno.EAGAIN, f"{self.channel!r}.readinto would block")
                if n < 0 or n > len(room):
                    raise OSError(errno.EIO, f"{self.channel!r}.readinto returned {n}")
            except OSError as exc:
                self._record(exc.errno or errno.EIO, exc)
                return 0
            except BaseException as exc:
                self._record(errno.EIO, raised_in(errno.EIO, repr(self.channel), exc))
                self._pending = exc
                return 0
        self.read_calls += 1
        if n == 0:
            if self._error == 0:
                self._error = -errno.EIO
                self._at_eof = True
            return 0
        self._fill += n
        self._total += n
        return n

    def _peek(self, size: int, offset: int) -> int:
        pending = self._fill - self._index - offset
        while pending < size:
            if self._fill_buffer() <= 0:
                break
            pending = self._fill - self._index - offset
        if pending <= 0:
            return 0
        return min(size, pending)

    def _get_into(self, dst: memoryview) -> int:
        done = 0
        size = len(dst)
        while done < size:
            res = self._peek(min(size - done, self._cap), 0)
            if res == 0:
                break
            dst[done:done + res] = self._buf[self._index:self._index + res]
            self._index += res
            done += res
        return done

    def _get_be(self, nbytes: int, what: str) -> int:
        start = self._read_pos()
        got = self._peek(nbytes, 0)
        if got < nbytes:
            self._index += got
            self._raise_short(start, nbytes, got, what)
            return 0
        v = int.from_bytes(self._buf[self._index:self._index + nbytes], "big")
        self._index += nbytes
        return v

    def _get(self, nbytes: int, what: str) -> int:
        self._enter(False)
        try:
            return self._get_be(nbytes, what)
        finally:
            self._leave()

    def get_byte(self) -> int:
        return self._get(1, "get_byte")

    def get_be16(self) -> int:
        return self._get(2, "get_be16")

    def get_be32(self) -> int:
        return self._get(4, "get_be32")

    def get_be64(self) -> int:
        return self._get(8, "get_be64")

    def peek_byte(self, offset: int = 0) -> int:
        self._enter(False)
        try:
            if not 0 <= offset < self._cap:
                raise ValueError(f"peek offset must be in [0, {self._cap})")
            start = self._read_pos()
            if self._fill - self._index <= offset:
                self._peek(1, offset)
                if self._fill - self._index <= offset:
                    self._raise_short(start, offset + 1, self._fill - self._index, "peek_byte")
                    return 0
            return self._buf[self._index + offset]
        finally:
            self._leave()

    def peek_buffer(self, size: int, offset: int = 0) -> bytes:
        self._enter(False)
        try:
            if offset < 0 or size < 0 or offset + size > self._cap:
                raise ValueError(f"peek_buffer needs 0 <= offset and offset + size <= {self._cap}")
            start = self._read_pos()
            got = self._peek(size, offset)
            if got < size:
                self._raise_short(start, offset + size, offset + got, "peek_buffer")
                return b""
            return bytes(self._buf[self._index + offset:self._index + offset + size])
        finally:
            self._leave()

    def get_buffer(self, size: int) -> bytes:
        self._enter(False)
        try:
            if size < 0:
                raise ValueError("size cannot be negative")
            start = self._read_pos()
            out = bytearray(size)
            got = self._get_into(memoryview(out))
            if got < size:
                self._raise_short(start, size, got, "get_buffer")
                return b""
            return bytes(out)
        finally:
            self._leave()

    def get_buffer_into(self, buf: Any) -> int:
        self._enter(False)
        try:
            view = memoryview(buf).cast("B")
            if view.readonly:
                raise BufferError("get_buffer_into needs a writable buffer")
            start = self._read_pos()
            got = self._get_into(view)
            if got < len(view):
                self._raise_short(start, len(view), got, "get_buffer_into")
            return got
        finally:
            self._leave()

    def get_buffer_in_place(self, size: int) -> memoryview:
        if size < 0:
            raise ValueError("size cannot be negative")
        if size >= self._cap:
            return memoryview(self.get_buffer(size))
        self._enter(False)
        try:
            start = self._read_pos()
            if self._peek(size, 0) < size:
                self._raise_short(start, size, self._fill - self._index, "get_buffer_in_place")
                return memoryview(b"")
            view = self._buf[self._index:self._index + size].toreadonly()
            self._index += size
            return view
        finally:
            self._leave()

    def _skip(self, size: int) -> int:
        done = 0
        while done < size:
            res = self._peek(min(size - done, self._cap), 0)
            if res == 0:
                break
            self._index += res
            done += res
        return done

    def skip(self, size: int) -> None:
        self._enter(False)
        try:
            start = self._read_pos()
            done = self._skip(size)
            if done < size:
                self._raise_short(start, size, done, "skip")
        finally:
            self._leave()

    def get_counted_string(self) -> bytes:
        return self.get_buffer(self.get_byte())

    # -- read side: the page loop ---------------------------------------------------------

    def load_pages(self, region: Any, header: Optional[int] = None, *, page_size: int = 4096,
                   header_pos: int = -1, touched: Any = None,
                   received: Any = None) -> Tuple[int, int, int]:
        self._enter(False)
        try:
            if page_size < 512 or page_size & (page_size - 1):
                raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
            if isinstance(region, int):      # count and check only
                if region < 0:
                    raise ValueError("a block length cannot be negative")
                target = None
                length = region
            else:
                target = memoryview(region).cast("B")
                if target.readonly:
                    raise BufferError("load_pages needs a writable region")
                length = len(target)
            written = memoryview(touched).cast("B") if touched is not None else None
            got_bits = memoryview(received).cast("B") if received is not None else None
            for bits in (written, got_bits):
                if bits is not None and bits.readonly:
                    raise BufferError("a page bitmap must be writable")
                if bits is not None and len(bits) * 8 < length // page_size:
                    raise ValueError("a page bitmap is shorter than the region")
            mask = page_size - 1
            pages = zeros = 0
            have_header = header is not None
            if header is None:
                header_pos = self._read_pos()
                header = self._get_be(8, "load_pages")
            hdr: int = header
            while True:
                flags = hdr & mask
                offset = hdr & ~mask
                if not have_header and not flags & RAM_SAVE_FLAG_CONTINUE:
                    break
                flags &= ~RAM_SAVE_FLAG_CONTINUE
                if flags not in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
                    break
                have_header = False
                if offset > length or length - offset < page_size:
                    self._fail_format(FormatError(
                        f"page at offset {offset:#x} lies outside its block of {length:#x} "
                        f"bytes", header_pos))
                page = target[offset:offset + page_size] if target is not None else None
                index = offset // page_size
                was_fresh = written is not None and not _bit(written, index)
                if got_bits is not None:
                    _set_bit(got_bits, index, True)
                if flags == RAM_SAVE_FLAG_PAGE and written is not None:
                    _set_bit(written, index, True)
                if flags == RAM_SAVE_FLAG_PAGE:
                    start = self._read_pos()       # counting only: the page is skipped
                    got = self._skip(page_size) if page is None else self._get_into(page)
                    if got < page_size:
                        self._raise_short(start, page_size, got, "load_pages")
                        return (hdr, pages, zeros)
                    pages += 1
                else:
                    ch = self._get_be(1, "load_pages")
                    if ch != 0:
                        self._fail_format(FormatError(
                            f"zero page record with fill byte {ch:#x} (must be 0)",
                            self._read_pos() - 1))
                    if page is not None and not was_fresh and not _all_zero(page):
                        page[:] = bytes(page_size)
                    zeros += 1
                header_pos = self._read_pos()
                hdr = self._get_be(8, "load_pages")
            return (hdr, pages, zeros)
        finally:
            self._leave()

    def _fail_format(self, exc: FormatError) -> None:
        if self._error == 0:
            self._error = -errno.EINVAL
        self._exc = exc
        raise exc

    # -- position, rate limiting ----------------------------------------------------------

    def tell(self) -> int:
        if self._writable and not self._closed:
            self._enter(True)
            try:
                self._flush_batch()
            finally:
                self._leave()
            return self._total
        return self._read_pos()

    def set_offset(self, offset: int) -> None:
        if self._fd < 0:
            raise io.UnsupportedOperation("set_offset needs a channel with an fd")
        self._enter(self._writable)
        try:
            if self._writable:
                self._flush_batch()
                self._raise_error()
            else:
                self._index = 0
                self._fill = 0
            os.lseek(self._fd, offset, os.SEEK_SET)
            self._total = offset
        finally:
            self._leave()

    def tell_fast(self) -> int:
        if not self._writable:
            return self._read_pos()
        return self._total + sum(length for _, length in self._iov)

    def update_position(self, size: int) -> None:
        self._total += size

    @property
    def pending_iovecs(self) -> int:
        return len(self._iov)

    @property
    def pending_pins(self) -> int:
        return len(self._pins)

    @property
    def iov_max(self) -> int:
        return self._iov_max

    @property
    def buf_size(self) -> int:
        return self._cap

    @property
    def release_min(self) -> int:
        return self._release_min

    def _rate_limited(self) -> bool:
        if self._shutdown or self._error:
            return True
        return self._rate_max > 0 and self._rate_used > self._rate_max

    def rate_limited(self) -> bool:
        return self._rate_limited()

    def set_rate_limit(self, limit: int) -> None:
        self._rate_max = limit

    def get_rate_limit(self) -> int:
        return self._rate_max

    def reset_rate_limit(self) -> None:
        self._rate_used = 0

    def acct_rate_limit(self, size: int) -> None:
        self._rate_used += size

    @property
    def rate_limit_used(self) -> int:
        return self._rate_used

    # -- channel state --------------------------------------------------------------------

    def is_writable(self) -> bool:
        return self._writable

    def shutdown(self) -> bool:
        self._shutdown = True
        if self._error == 0:
            self._record(errno.EIO, OSError(errno.EIO, "QEMUFile was shut down"))
        shut = getattr(self.channel, "shutdown", None)
        if shut is None:
            return False
        return bool(shut())

    def get_return_path(self) -> Optional["QEMUFile"]:
        make = getattr(self.channel, "return_path", None)
        back = make() if make is not None else None
        if back is None:
            return None
        return QEMUFile(back, "rb" if self._writable else "wb", iov_max=self._iov_max,
                        buf_size=self._cap, release_min=self._release_min,
                        timeout=None if self._timeout_ms < 0 else self._timeout_ms / 1000.0)

    def set_blocking(self, block: bool) -> None:
        setter = getattr(self.channel, "set_blocking", None)
        if setter is not None:
            setter(block)
        elif self._fd >= 0:
            os.set_blocking(self._fd, block)

    def close(self) -> None:
        if self._closed:
            return
        if self._busy:
            raise RuntimeError("QEMUFile is in use by another thread")
        self._busy = True
        try:
            if self._writable:
                self._flush_batch()
                self._release_open_run()
            self._iov = []
            self._may_free = []
            self._open_run = [0, 0]
            self._drop_pins_if_idle()
            closer = getattr(self.channel, "close", None)
            if closer is not None:
                try:
                    closer()
                except OSError as exc:
                    self._record(exc.errno or errno.EIO, exc)
        finally:
            self._closed = True
            self._busy = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending
        self._raise_error()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- hooks ----------------------------------------------------------------------------

    def set_hooks(self, *, before_ram_iterate: Any = None, after_ram_iterate: Any = None,
                  hook_ram_load: Any = None, save_page: Any = None) -> None:
        self._hooks = {"before_ram_iterate": before_ram_iterate,
                       "after_ram_iterate": after_ram_iterate,
                       "hook_ram_load": hook_ram_load, "save_page": save_page}

    def _call_hook(self, name: str, *args: Any) -> Any:
        try:
            return self._hooks[name](self, *args)
        except BaseException as exc:
            self._record(errno.EIO, raised_in(errno.EIO, f"the hook {self._hooks[name]!r}", exc))
            raise

    def ram_control_before_iterate(self, flags: int) -> None:
        if self._hooks.get("before_ram_iterate") is not None:
            ret = self._call_hook("before_ram_iterate", flags, None)
            if ret is not None and ret < 0:
                self.set_error(ret)

    def ram_control_after_iterate(self, flags: int) -> None:
        if self._hooks.get("after_ram_iterate") is not None:
            ret = self._call_hook("after_ram_iterate", flags, None)
            if ret is not None and ret < 0:
                self.set_error(ret)

    def ram_control_load_hook(self, flags: int, data: Any = None) -> None:
        if self._hooks.get("hook_ram_load") is not None:
            ret = self._call_hook("hook_ram_load", flags, data)
            if ret is not None and ret < 0:
                self.set_error(ret)
        elif flags == RAM_CONTROL_HOOK:
            self.set_error(-errno.EINVAL, "the stream asks for a RAM load hook; none is set")

    def ram_control_save_page(self, block_offset: int, offset: int, size: int) -> Tuple[int, int]:
        return self._control_save_page(block_offset, offset, size)

    def _control_save_page(self, block_offset: int, offset: int, size: int) -> Tuple[int, int]:
        if self._hooks.get("save_page") is None:
            return (RAM_SAVE_CONTROL_NOT_SUPP, 0)
        ret, sent = self._call_hook("save_page", block_offset, offset, size)
        if ret != RAM_SAVE_CONTROL_NOT_SUPP:
            self._rate_used += size
        if ret not in (RAM_SAVE_CONTROL_DELAYED, RAM_SAVE_CONTROL_NOT_SUPP):
            if sent and sent > 0:
                self._total += sent
            elif ret < 0:
                self.set_error(ret)
        return (ret, sent)


# ---------------------------------------------------------------------------------------
# discard and pages at fixed file offsets (the mapped layout)
# ---------------------------------------------------------------------------------------

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _advise_free(base: int, length: int) -> int:
    start = (base + _HOST_PAGE - 1) & ~(_HOST_PAGE - 1)
    end = (base + length) & ~(_HOST_PAGE - 1)
    if end <= start:
        return 0
    if _libc.madvise(start, end - start, _MADV_REMOVE) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.EACCES, errno.EOPNOTSUPP):
            raise OSError(err, f"madvise (discard) failed: {os.strerror(err)}")
        if _libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise (discard) failed: {os.strerror(err)}")
    return end - start


def discard(buf: Any, offset: int = 0, length: int = -1) -> int:
    export = _Export(buf)
    try:
        length = _check_range(export.len, offset, length)
        return _advise_free(export.addr + offset, length)
    finally:
        export.release()


def _bit(bits: memoryview, i: int) -> bool:
    return bool((bits[i >> 3] >> (i & 7)) & 1)


def _set_bit(bits: memoryview, i: int, value: bool) -> None:
    if value:
        bits[i >> 3] |= 1 << (i & 7)
    else:
        bits[i >> 3] &= ~(1 << (i & 7))


def _mapped_range(region_len: int, present: memoryview, file_offset: int, first: int,
                  count: int, page_size: int) -> int:
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
    if file_offset < 0 or file_offset & (page_size - 1):
        raise ValueError("file_offset must be page aligned")
    npages = region_len // page_size
    if count < 0:
        count = npages - first
    if first < 0 or count < 0 or first + count > npages:
        raise ValueError(f"pages {first}..{first + count} are outside a region of "
                         f"{npages} pages")
    if len(present) * 8 < npages:
        raise ValueError("the present bitmap is shorter than the region")
    return first + count


def write_pages_at(fd: int, region: Any, file_offset: int, present: Any, first_page: int = 0,
                   count: int = -1, *, page_size: int = 4096, old: Any = None,
                   dirty: Any = None, release: bool = False) -> Tuple[int, int, int, int]:
    view = memoryview(region).cast("B")
    bits = memoryview(present).cast("B")
    end = _mapped_range(len(view), bits, file_offset, first_page, count, page_size)
    old_view = memoryview(old).cast("B") if old is not None else None
    if old_view is not None and len(old_view) < len(view) // page_size * page_size:
        raise ValueError("`old` is shorter than the region")
    dirty_bits = memoryview(dirty).cast("B") if dirty is not None else None
    if dirty_bits is not None and len(dirty_bits) * 8 < end:
        raise ValueError("the dirty bitmap is shorter than the page range")
    written = zeros = unchanged = released = 0
    for i in range(first_page, end):
        if dirty_bits is not None:
            if not _bit(dirty_bits, i):
                continue
            _set_bit(dirty_bits, i, False)
        page = view[i * page_size:(i + 1) * page_size]
        offset = file_offset + i * page_size
        if _all_zero(page):
            zeros += 1
            if _bit(bits, i):
                if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset,
                                   page_size) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"fallocate at file offset {offset}: {os.strerror(err)}")
                _set_bit(bits, i, False)
        elif (old_view is not None and _bit(bits, i)
              and old_view[i * page_size:(i + 1) * page_size] == page):
            unchanged += 1
        else:
            done = 0
            while done < page_size:
                try:
                    done += os.pwrite(fd, page[done:], offset + done)
                except OSError as exc:
                    raise OSError(exc.errno, f"pwrite at file offset {offset + done}: "
                                             f"{os.strerror(exc.errno or 0)}") from None
            _set_bit(bits, i, True)
            written += 1
        if release:
            released += discard(view, i * page_size, page_size)
    return (written, zeros, unchanged, released)


def read_pages_at(fd: int, region: Any, file_offset: int, present: Any, first_page: int = 0,
                  count: int = -1, *, page_size: int = 4096,
                  touched: Any = None) -> Tuple[int, int]:
    view = memoryview(region).cast("B")
    if view.readonly:
        raise BufferError("read_pages_at needs a writable region")
    bits = memoryview(present).cast("B")
    end = _mapped_range(len(view), bits, file_offset, first_page, count, page_size)
    written = memoryview(touched).cast("B") if touched is not None else None
    if written is not None and len(written) * 8 < end:
        raise ValueError("the touched bitmap is shorter than the page range")
    pages = zeros = 0
    for i in range(first_page, end):
        page = view[i * page_size:(i + 1) * page_size]
        if _bit(bits, i):
            offset = file_offset + i * page_size
            data = os.pread(fd, page_size, offset)
            if len(data) < page_size:
                raise FormatError("the file ends inside the pages it claims to hold",
                                  offset + len(data))
            page[:] = data
            pages += 1
        else:
            if written is None or _bit(written, i):
                if not _all_zero(page):
                    page[:] = bytes(page_size)
            zeros += 1
    return (pages, zeros)


def diff_pages(region: Any, old: Any, present: Any, changed: Any, nonzero: Any, *,
               page_size: int = 4096) -> int:
    view = memoryview(region).cast("B")
    old_view = memoryview(old).cast("B")
    held, out, data = (memoryview(b).cast("B") for b in (present, changed, nonzero))
    npages = len(view) // page_size
    if len(old_view) < npages * page_size:
        raise ValueError("`old` is shorter than the region")
    if min(len(held), len(out), len(data)) * 8 < npages:
        raise ValueError("a bitmap is shorter than the region")
    n = 0
    for i in range(npages):
        page = view[i * page_size:(i + 1) * page_size]
        if _all_zero(page):
            if _bit(held, i):
                _set_bit(out, i, True)
                n += 1
        elif not _bit(held, i) or old_view[i * page_size:(i + 1) * page_size] != page:
            _set_bit(out, i, True)
            _set_bit(data, i, True)
            n += 1
    return n


_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
            raise OSError(err, f"sync_file_range at file offset {offset}: {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError("offset and length cannot be negative")
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EOPNOTSUPP:
        raise OSError(err, f"fallocate (punch hole) at file offset {offset}: "
                           f"{os.strerror(err)}")
    while length > 0:
        n = os.pwrite(fd, bytes(min(length, 1 << 20)), offset)
        offset += n
        length -= n


def bitmap_runs(bitmap: Any, npages: int, first: int = 0) -> List[Tuple[int, int]]:
    bits = memoryview(bitmap).cast("B")
    if len(bits) * 8 < npages:
        raise ValueError("the bitmap is shorter than npages")
    runs = []
    i = max(first, 0)
    while i < npages:
        if _bit(bits, i):
            j = i + 1
            while j < npages and _bit(bits, j):
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs
