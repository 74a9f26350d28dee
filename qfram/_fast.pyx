"""qfram's core: QEMU's ``migration/qemu-file.c`` in Cython.

A :class:`QEMUFile` stages small puts (headers, counters, strings) in a fixed buffer and
gathers big ones (guest pages) as iovecs that point straight into the caller's memory.
A batch leaves with one ``writev(2)`` when the gather list or the buffer is full; after a
batch is written in full, the pages it marked ``may_free`` are handed back to the kernel.

What it does better than the seed (QEMU 7.x):

* short writes, ``EINTR`` and ``EAGAIN`` are retried (``poll`` on non-blocking fds);
* nothing of a failed batch is released, and the first error is sticky;
* release matches the memory: ``MADV_REMOVE`` (frees shmem/memfd/hugetlbfs/file pages),
  falling back to ``MADV_DONTNEED`` where the kernel says the mapping is private;
  only whole pages inside a run are released, and runs coalesce across batches;
* a zero-copy put keeps its buffer exported until written (``mmap.close()`` raises
  ``BufferError`` meanwhile);
* errors are ``OSError`` subclasses with the real errno and the operation in the message;
* the GIL is released around every syscall and around the page loops.

The core knows file descriptors and iovecs, nothing of files, sockets or formats beyond
the shape of a RAM page record (``be64 offset|flags`` + payload), which its page loops
emit and parse.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport (errno, EINTR, EAGAIN, EINVAL, EIO, EACCES, EOPNOTSUPP, ESPIPE,
                         ETIMEDOUT, ENOMEM)
from libc.stdint cimport uint8_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp, memset
from posix.mman cimport madvise, MADV_DONTNEED, MADV_REMOVE
from posix.uio cimport iovec, writev
from posix.types cimport off_t
from posix.unistd cimport read, pread, pwrite, sysconf, _SC_PAGESIZE

from qfram.includes.bits cimport qf_bit, qf_set_bit, qf_take_bit
from qfram.includes.system cimport (pollfd, poll, POLLIN, POLLOUT, IOV_MAX, strerror,
                                    fallocate, sync_file_range, FALLOC_FL_KEEP_SIZE,
                                    FALLOC_FL_PUNCH_HOLE, SYNC_FILE_RANGE_WRITE)
from qfram.includes cimport wire as cwire
from qfram.includes.wire cimport (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE,
                                  RAM_SAVE_FLAG_CONTINUE)

import io
import os
import zlib

from qfram import fileargs, wire
from qfram.errors import FormatError, StreamEnded, raised_in

cdef extern from "Python.h":
    enum:
        PyBUF_READ
        PyBUF_WRITE

# How many buffer exports a file may hold while a release run is still open before it
# releases early: bounds memory when many tiny may_free puts coalesce.
cdef Py_ssize_t PIN_LIMIT = 4096
# Writing through a transport (TLS), iovecs shorter than this are joined in one buffer
# of this size first: one record each instead of one per header, and one write of many
# records (the transport sends what one write makes in one system call).
cdef size_t GATHER_SIZE = 128 * 1024

cdef size_t HOST_PAGE = <size_t>sysconf(_SC_PAGESIZE)
# Zero pages are found with memcmp against this (fastest measured here: ~19 GB/s on
# zero pages, ~20 ns to reject a non-zero one).
cdef unsigned char ZERO_PAGE[4096]


cdef inline bint _is_zero(const unsigned char *p, size_t n) noexcept nogil:
    cdef size_t chunk
    while n > 0:
        chunk = n if n < 4096 else 4096
        if memcmp(p, ZERO_PAGE, chunk) != 0:
            return False
        p += chunk
        n -= chunk
    return True


def is_zero(buf, Py_ssize_t offset=0, Py_ssize_t length=-1) -> bool:
    """True when every byte of ``buf[offset:offset+length]`` (any buffer-protocol
    object; ``length`` -1: to the end) is zero."""
    cdef Py_buffer view
    cdef bint zero
    cdef const unsigned char *p
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        length = _check_range(view.len, offset, length)
        p = <const unsigned char *>view.buf + offset
        if length < (1 << 20):
            return _is_zero(p, <size_t>length)      # a page: cheaper than dropping the GIL
        with nogil:
            zero = _is_zero(p, <size_t>length)
        return zero
    finally:
        PyBuffer_Release(&view)


def _c_wire():
    """The wire-format values the C loops were compiled with (qfram/includes/wire.pxd),
    by name: a test checks them against qfram/wire.py."""
    return {"RAM_SAVE_FLAG_ZERO": cwire.RAM_SAVE_FLAG_ZERO,
            "RAM_SAVE_FLAG_MEM_SIZE": cwire.RAM_SAVE_FLAG_MEM_SIZE,
            "RAM_SAVE_FLAG_PAGE": cwire.RAM_SAVE_FLAG_PAGE,
            "RAM_SAVE_FLAG_EOS": cwire.RAM_SAVE_FLAG_EOS,
            "RAM_SAVE_FLAG_CONTINUE": cwire.RAM_SAVE_FLAG_CONTINUE,
            "RAM_SAVE_FLAG_XBZRLE": cwire.RAM_SAVE_FLAG_XBZRLE,
            "RAM_SAVE_FLAG_HOOK": cwire.RAM_SAVE_FLAG_HOOK,
            "RAM_SAVE_FLAG_COMPRESS_PAGE": cwire.RAM_SAVE_FLAG_COMPRESS_PAGE,
            "RAM_SAVE_FLAG_MULTIFD_FLUSH": cwire.RAM_SAVE_FLAG_MULTIFD_FLUSH,
            "SECTION_EOF": cwire.SECTION_EOF, "SECTION_PART": cwire.SECTION_PART,
            "SECTION_END": cwire.SECTION_END, "SECTION_COMMAND": cwire.SECTION_COMMAND,
            "SECTION_FOOTER": cwire.SECTION_FOOTER,
            "MIG_RP_MSG_REQ_PAGES_ID": cwire.MIG_RP_MSG_REQ_PAGES_ID,
            "MIG_RP_MSG_REQ_PAGES": cwire.MIG_RP_MSG_REQ_PAGES,
            "TARGET_PAGE_SIZE": cwire.TARGET_PAGE_SIZE}


cdef inline void _advance(iovec **v, int *cnt, size_t sent) noexcept nogil:
    """Step a gather list over `sent` bytes written: past the whole iovecs, then into
    the next one (a short write goes on from there)."""
    while cnt[0] > 0 and sent >= v[0][0].iov_len:
        sent -= v[0][0].iov_len
        v[0] += 1
        cnt[0] -= 1
    if cnt[0] > 0 and sent > 0:
        v[0][0].iov_base = <char *>v[0][0].iov_base + sent
        v[0][0].iov_len -= sent


cdef Py_ssize_t _check_range(Py_ssize_t size, Py_ssize_t offset, Py_ssize_t length) except -1:
    """The length of buf[offset:offset+length] (-1: to the end), or ValueError."""
    if length < 0:
        length = size - offset
    if offset < 0 or length < 0 or offset > size or size - offset < length:
        raise ValueError(f"range offset={offset} length={length} is outside a buffer of "
                         f"{size} bytes")
    return length


cdef int _advise_free(char *base, size_t length, size_t *released) noexcept nogil:
    """Hand the whole pages inside [base, base+length) back to the kernel — never a
    neighbour's bytes.  MADV_REMOVE frees shared and file-backed pages (memfd, /dev/shm,
    hugetlbfs), where MADV_DONTNEED only unmaps them; the kernel refuses it on private
    mappings, which MADV_DONTNEED frees.  0 on success (errno set otherwise)."""
    cdef uintptr_t start = (<uintptr_t>base + HOST_PAGE - 1) & ~(<uintptr_t>HOST_PAGE - 1)
    cdef uintptr_t end = (<uintptr_t>base + length) & ~(<uintptr_t>HOST_PAGE - 1)
    cdef int err
    released[0] = 0
    if end <= start:
        return 0
    if madvise(<void *>start, end - start, MADV_REMOVE) != 0:
        err = errno
        if err != EINVAL and err != EACCES and err != EOPNOTSUPP:
            return -1
        if madvise(<void *>start, end - start, MADV_DONTNEED) != 0:
            return -1
    released[0] = end - start
    return 0


def discard(buf, Py_ssize_t offset=0, Py_ssize_t length=-1):
    """Release the whole pages of ``buf[offset:offset+length]`` with the advice their
    memory needs (see QEMUFile's may_free).  Returns the bytes released."""
    cdef Py_buffer view
    cdef size_t released = 0
    cdef int rc
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        length = _check_range(view.len, offset, length)
        with nogil:
            rc = _advise_free(<char *>view.buf + offset, <size_t>length, &released)
        if rc < 0:
            raise OSError(errno, f"madvise (discard) failed: {os.strerror(errno)}")
        return released
    finally:
        PyBuffer_Release(&view)


cdef int _raise_pending_signals() except -1:
    return PyErr_CheckSignals()


cdef object _error_copy(object exc):
    """A fresh instance of a stored error, so raising it twice keeps tracebacks apart."""
    if isinstance(exc, OSError) and type(exc) is not StreamEnded:
        return type(exc)(*exc.args)
    return exc


cdef class _InPlaceView:
    """Read-only export of a slice of a file's staging buffer (get_buffer_in_place).

    It holds the file, so the memory outlives every view; its bytes are valid until the
    file's next read operation, as in QEMU.
    """
    cdef QEMUFile owner
    cdef Py_ssize_t start
    cdef Py_ssize_t length
    cdef Py_ssize_t shape[1]

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("get_buffer_in_place views are read-only")
        self.shape[0] = self.length
        view.buf = <char *>self.owner.buf + self.start
        view.obj = self
        view.len = self.length
        view.readonly = 1
        view.itemsize = 1
        view.format = NULL
        view.ndim = 1
        view.shape = self.shape
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass


# ---------------------------------------------------------------------------------------
# QEMUFile
# ---------------------------------------------------------------------------------------

cdef class QEMUFile:
    """A buffered, zero-copy migration stream over one channel, in one direction.

    ``channel`` either has an ``fd`` attribute (an int >= 0: the core makes the
    syscalls itself, GIL released), or a ``c_transport`` capsule (a TLS connection: read
    and written through it, GIL released too) or, for custom channels,
    ``writev(views) -> int``
    (bytes written, must not keep the views) for writing and ``readinto(view) -> int``
    (0 at end) for reading.  Optional: ``close()``, ``shutdown() -> bool``,
    ``set_blocking(flag)``, ``return_path() -> channel | None``.

    ``mode`` is ``"wb"`` or ``"rb"``.  ``iov_max``/``buf_size`` set the flush points and
    ``release_min`` the smallest run released at once (``SEED_*`` for QEMU's values).
    ``timeout`` (seconds, None = forever) bounds each wait on a non-blocking fd.

    One thread uses a file at a time (a second one gets ``RuntimeError``), except
    :meth:`shutdown`, which another thread may call to stop a blocked one.
    """

    def __cinit__(self):
        self.fd = -1
        self.timeout_ms = -1
        self.buf = NULL
        self.transport = NULL
        self.gather = NULL
        self.batch.iov = NULL
        self.batch.may_free = NULL
        self.batch.pins = NULL
        self.batch.runs = NULL

    def __init__(self, channel, mode, *, int iov_max=wire.DEFAULT_IOV_MAX,
                 Py_ssize_t buf_size=wire.DEFAULT_BUF_SIZE,
                 release_min=wire.DEFAULT_RELEASE_MIN,
                 timeout=None):
        if self.buf != NULL:
            raise RuntimeError("QEMUFile is already initialised")
        self.writable, self.fd = fileargs.check(channel, mode, iov_max, buf_size,
                                                release_min, IOV_MAX)
        self.channel = channel
        capsule = getattr(channel, "c_transport", None)
        if capsule is not None:
            self.transport = <Transport *>PyCapsule_GetPointer(capsule, "qfram.transport")
            self.fd = self.transport.fd
            if self.writable:
                self.gather = <unsigned char *>malloc(GATHER_SIZE)
                if self.gather == NULL:
                    raise MemoryError()
        self.batch.cap = iov_max
        self.buf_cap = buf_size
        self.min_release = release_min
        self.buf = <unsigned char *>malloc(buf_size)
        self.batch.iov = <iovec *>malloc(iov_max * sizeof(iovec))
        self.batch.may_free = <unsigned char *>malloc(iov_max)
        if self.buf == NULL or self.batch.iov == NULL or self.batch.may_free == NULL:
            raise MemoryError()
        self.set_timeout(timeout)

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.batch.npins):
            PyBuffer_Release(&self.batch.pins[i])
        free(self.batch.pins)
        free(self.batch.runs)
        free(self.buf)
        free(self.gather)
        free(self.batch.iov)
        free(self.batch.may_free)

    def __repr__(self):
        state = "closed" if self.is_closed else ("writing" if self.writable else "reading")
        return f"<qfram QEMUFile {state} channel={self.channel!r}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- guards ---------------------------------------------------------------------------

    cdef int _enter(self, int want_write) except -1:
        if self.is_closed:
            raise ValueError("I/O operation on a closed QEMUFile")
        if self.busy:
            raise RuntimeError("QEMUFile is in use by another thread")
        if want_write == 1 and not self.writable:
            raise io.UnsupportedOperation("this QEMUFile is open for reading")
        if want_write == 0 and self.writable:
            raise io.UnsupportedOperation("this QEMUFile is open for writing")
        self.busy = True
        return 0

    cdef int _leave(self) except -1:
        self.busy = False
        if self.pending_exc is not None:
            exc = self.pending_exc
            self.pending_exc = None
            raise exc
        return 0

    # -- errors ---------------------------------------------------------------------------

    cdef void _record(self, int err, object exc) noexcept:
        """Keep the first error (negative errno in last_error, its exception alongside)."""
        if self.last_error == 0:
            self.last_error = -err if err > 0 else -EIO
            self.last_exc = exc

    cdef int _channel_failed(self, BaseException exc) noexcept:
        """A Python channel raised: its OSError becomes the sticky error; anything else
        is kept to be raised once to the caller, with an OSError saying where."""
        if isinstance(exc, OSError):
            self._record(exc.errno or EIO, exc)
        else:
            self._record(EIO, raised_in(EIO, repr(self.channel), exc))
            self.pending_exc = exc
        return -1

    cdef int _fail_errno(self, int err, const char *what) noexcept nogil:
        # No GIL here (a thread may fault on memory this file fills while holding it):
        # keep the errno and the operation's name; `error` makes the exception.
        if self.last_error == 0:
            self.last_error = -err
            self.failed_op = what
        return -1

    cdef int _fail_eof(self) noexcept nogil:
        if self.last_error == 0:
            self.last_error = -EIO
            self.at_eof = True
        return -1

    cdef int _check_signals(self) noexcept nogil:
        """Run Python signal handlers after EINTR; an exception from one stops the I/O."""
        if self.gil_free:
            return 0                    # handlers run when Python gets control back
        return self._run_signal_handlers()

    cdef int _run_signal_handlers(self) noexcept with gil:
        try:
            _raise_pending_signals()
        except BaseException as exc:
            self._record(EINTR, raised_in(EINTR, "a signal handler", exc))
            self.pending_exc = exc
            return -1
        return 0

    cdef int _wait(self, short events) noexcept nogil:
        cdef pollfd p
        cdef int r
        p.fd = self.fd
        p.events = events
        # a signal that arrived since the last syscall would not interrupt the poll
        if self._check_signals() < 0:
            return -1
        while True:
            p.revents = 0
            r = poll(&p, 1, self.timeout_ms)
            if r > 0:
                return 0        # ready, or an error the next syscall will report
            if r == 0:
                return self._fail_errno(ETIMEDOUT, "poll (timed out)")
            if errno == EINTR:
                if self._check_signals() < 0:
                    return -1
                continue
            return self._fail_errno(errno, "poll")

    def get_error(self):
        """The sticky error as a negative errno, 0 when there is none (qemu_file_get_error)."""
        return self.last_error

    def set_error(self, int ret, message=None):
        """Set the sticky error (negative errno) unless one is set already: the first wins."""
        if ret > 0:
            raise ValueError("errors are negative errno values")
        if ret == 0 or self.last_error != 0:
            return
        text = message if message is not None else os.strerror(-ret)
        self._record(-ret, OSError(-ret, text))

    @property
    def error(self):
        """The sticky error as an exception (None when there is none)."""
        if self.last_error == 0:
            return None
        if self.at_eof:
            return StreamEnded(self._read_pos(), 1, 0)
        if self.last_exc is None and self.failed_op != NULL:
            self.last_exc = OSError(-self.last_error, f"{self.failed_op.decode()} on fd "
                                                      f"{self.fd}: {os.strerror(-self.last_error)}")
        return _error_copy(self.last_exc) if self.last_exc is not None else OSError(
            -self.last_error, os.strerror(-self.last_error))

    cdef int _raise_error(self) except -1:
        exc = self.error
        if exc is not None:
            raise exc
        return 0

    cdef int _raise_short(self, int64_t start, Py_ssize_t wanted, Py_ssize_t got,
                          str what) except -1:
        if self.pending_exc is not None:
            return 0            # _leave() raises it
        if self.at_eof or self.last_error == 0:
            raise StreamEnded(start, wanted, got, what)
        raise self.error

    def set_timeout(self, timeout):
        """Bound each wait on a non-blocking fd to ``timeout`` seconds (None: forever)."""
        if timeout is None:
            self.timeout_ms = -1
        elif timeout < 0:
            raise ValueError("timeout cannot be negative")
        else:
            self.timeout_ms = <int>min(timeout * 1000.0, 2147483647.0)

    # -- write side: gather list ---------------------------------------------------------

    cdef int _add_to_iovec(self, const char *p, size_t size, bint may_free) noexcept nogil:
        """QEMU's add_to_iovec: coalesce with the last iovec when adjacent and the
        may_free bits agree; flush when the list is full.  1 if it flushed."""
        cdef iovec *last
        if self.batch.count > 0:
            last = &self.batch.iov[self.batch.count - 1]
            if (<const char *>last.iov_base + last.iov_len == p
                    and may_free == self.batch.may_free[self.batch.count - 1]):
                last.iov_len += size
                if self.batch.count >= self.batch.cap:
                    self._flush_batch()
                    return 1
                return 0
        if self.batch.count >= self.batch.cap:
            return 1            # only after a failed flush
        self.batch.may_free[self.batch.count] = may_free
        self.batch.iov[self.batch.count].iov_base = <void *>p
        self.batch.iov[self.batch.count].iov_len = size
        self.batch.count += 1
        if self.batch.count >= self.batch.cap:
            self._flush_batch()
            return 1
        return 0

    cdef void _add_buf_to_iovec(self, size_t length) noexcept nogil:
        if not self._add_to_iovec(<const char *>self.buf + self.buf_index, length, False):
            self.buf_index += length
            if self.buf_index == self.buf_cap:
                self._flush_batch()

    cdef int _put_byte(self, unsigned char v) noexcept nogil:
        if self.last_error:
            return -1
        self.buf[self.buf_index] = v
        self.rate_used += 1
        self._add_buf_to_iovec(1)
        return 0

    cdef void _put_be64(self, uint64_t v) noexcept nogil:
        # Byte by byte, as QEMU: a full gather list may flush in the middle of a header,
        # and the seed's flush points are reproduced exactly.
        self._put_be(v, 8)

    cdef void _put_bytes(self, const unsigned char *p, size_t n) noexcept nogil:
        cdef size_t l
        while n > 0 and not self.last_error:
            l = self.buf_cap - self.buf_index
            if l > n:
                l = n
            memcpy(self.buf + self.buf_index, p, l)
            self.rate_used += l
            self._add_buf_to_iovec(l)
            p += l
            n -= l

    cdef bint _may_flush(self, size_t buffered, int iovecs) noexcept:
        """Whether a put of `buffered` staged bytes and up to `iovecs` new iovecs could
        flush, i.e. make a syscall: only then is it worth releasing the GIL."""
        return (self.batch.count + iovecs >= self.batch.cap
                or <size_t>self.buf_index + buffered >= <size_t>self.buf_cap)

    cdef int _adopt(self, Py_buffer *view) except -1:
        """Take over the export `view`: it lives until its bytes are written (and
        released), then _drop_pins_if_idle gives it back."""
        cdef Py_buffer *grown
        cdef Py_ssize_t cap
        if self.batch.npins == self.batch.pins_cap:
            cap = self.batch.pins_cap * 2 if self.batch.pins_cap else 16
            grown = <Py_buffer *>realloc(self.batch.pins, cap * sizeof(Py_buffer))
            if grown == NULL:
                PyBuffer_Release(view)
                raise MemoryError()
            self.batch.pins = grown
            self.batch.pins_cap = cap
        self.batch.pins[self.batch.npins] = view[0]
        self.batch.npins += 1
        return 0

    cdef int _note_release(self, char *p, size_t n) noexcept nogil:
        """Remember that [p, p+n) may be released once the current batch is written."""
        cdef Run *last
        cdef Run *grown
        cdef Py_ssize_t cap
        if self.batch.nruns > 0:
            last = &self.batch.runs[self.batch.nruns - 1]
            if last.base + last.length == p:
                last.length += n
                return 0
        if self.batch.nruns == self.batch.runs_cap:
            cap = self.batch.runs_cap * 2 if self.batch.runs_cap else 64
            grown = <Run *>realloc(self.batch.runs, cap * sizeof(Run))
            if grown == NULL:
                return -1       # not released: wasteful, never unsafe
            self.batch.runs = grown
            self.batch.runs_cap = cap
        self.batch.runs[self.batch.nruns].base = p
        self.batch.runs[self.batch.nruns].length = n
        self.batch.nruns += 1
        return 0

    # -- write side: flushing -------------------------------------------------------------

    cdef int _flush_batch(self) noexcept nogil:
        """Write the batch (all of it, or fail); release its may_free runs only if every
        byte went out.  The batch is dropped either way, as QEMU does."""
        cdef int rc = 0
        cdef size_t total = 0
        cdef int i
        if not self.writable:
            return 0
        if self.last_error == 0 and self.batch.count > 0:
            for i in range(self.batch.count):
                total += self.batch.iov[i].iov_len
            if self.fd >= 0:
                rc = self._write_iov()
            else:
                rc = self._write_iov_python()
            if rc == 0:
                self.total_transferred += total
                self._commit_release()
        self.batch.nruns = 0    # a failed batch releases nothing
        self.buf_index = 0
        self.batch.count = 0
        if self.last_error:
            self._release_open_run()   # those bytes were written before the failure
        self._drop_pins_if_idle()
        return -1 if self.last_error else 0

    cdef int _write_iov(self) noexcept nogil:
        cdef iovec *v = self.batch.iov
        cdef int cnt = self.batch.count
        cdef ssize_t n
        if self.transport != NULL:
            return self._write_iov_transport()
        while cnt > 0:
            n = writev(self.fd, v, cnt if cnt < IOV_MAX else IOV_MAX)
            if n < 0:
                if errno == EINTR:
                    if self._check_signals() < 0:
                        return -1
                    continue
                if errno == EAGAIN:
                    if self._wait(POLLOUT) < 0:
                        return -1
                    continue
                return self._fail_errno(errno, "writev")
            self.writev_calls += 1
            if n == 0:
                return self._fail_errno(EIO, "writev (no progress)")
            _advance(&v, &cnt, <size_t>n)
            # On a blocking fd a short write means a signal arrived: its Python handler
            # must run now, or the next writev could block forever.
            if cnt > 0 and self._check_signals() < 0:
                return -1
        return 0

    cdef int _write_iov_transport(self) noexcept nogil:
        """The batch through the transport: small iovecs (headers, zero-page markers)
        joined in the gather buffer, big ones (pages) written from where they are."""
        cdef size_t held = 0
        cdef size_t length
        cdef int i
        for i in range(self.batch.count):
            length = self.batch.iov[i].iov_len
            if length >= GATHER_SIZE // 4 or held + length > GATHER_SIZE:
                if held and self._transport_write(self.gather, held) < 0:
                    return -1
                held = 0
            if length >= GATHER_SIZE // 4:
                if self._transport_write(<const unsigned char *>self.batch.iov[i].iov_base,
                                         length) < 0:
                    return -1
            else:
                memcpy(self.gather + held, self.batch.iov[i].iov_base, length)
                held += length
        if held and self._transport_write(self.gather, held) < 0:
            return -1
        return 0

    cdef int _transport_write(self, const unsigned char *p, size_t n) noexcept nogil:
        cdef ssize_t k
        cdef short wait = 0
        while n > 0:
            k = self.transport.write(self.transport.ctx, <void *>p, n, &wait)
            if k > 0:
                self.writev_calls += 1
                p += k
                n -= <size_t>k
            elif k < 0 and errno == EAGAIN:
                if self._wait(wait) < 0:
                    return -1
            else:
                return self._fail_errno(errno if k < 0 else EIO, "TLS write")
        return 0

    cdef int _write_iov_python(self) noexcept nogil:
        cdef iovec *v = self.batch.iov
        cdef int cnt = self.batch.count
        cdef int i
        with gil:
            try:
                while cnt > 0:
                    views = [PyMemoryView_FromMemory(<char *>v[i].iov_base, v[i].iov_len,
                                                     PyBUF_READ) for i in range(cnt)]
                    try:
                        result = self.channel.writev(views)
                    finally:
                        for view in views:
                            view.release()
                    self.writev_calls += 1
                    if result is None or result <= 0:
                        raise OSError(EIO, f"{self.channel!r}.writev made no progress")
                    _advance(&v, &cnt, <size_t>result)
            except BaseException as exc:
                return self._channel_failed(exc)
        return 0

    # -- write side: releasing pages -----------------------------------------------------

    cdef void _commit_release(self) noexcept nogil:
        """The batch is written: merge its runs into the open run, release what is done."""
        cdef Py_ssize_t i
        cdef Run r
        for i in range(self.batch.nruns):
            r = self.batch.runs[i]
            if self.open_run.length and self.open_run.base + self.open_run.length == r.base:
                self.open_run.length += r.length
            else:
                self._release_open_run()
                self.open_run = r
        self.batch.nruns = 0
        if self.open_run.length and self.open_run.length >= self.min_release:
            self._release_open_run()

    cdef void _release_open_run(self) noexcept nogil:
        if self.open_run.length:
            self._release_run(self.open_run)
            self.open_run.length = 0
            self.open_run.base = NULL

    cdef void _release_run(self, Run run) noexcept nogil:
        cdef size_t released = 0
        if _advise_free(run.base, run.length, &released) < 0:
            self.release_failures += 1
        elif released:
            self.released_bytes += released
            self.release_calls += 1

    cdef void _drop_pins_if_idle(self) noexcept nogil:
        """Give the buffer exports back once nothing refers to their memory."""
        cdef Py_ssize_t i
        if self.batch.npins == 0 or self.batch.count > 0:
            return
        if self.open_run.length and self.batch.npins < PIN_LIMIT:
            return
        self._release_open_run()
        with gil:
            for i in range(self.batch.npins):
                PyBuffer_Release(&self.batch.pins[i])
            self.batch.npins = 0

    # -- write side: public puts ---------------------------------------------------------

    cdef int _put_int(self, uint64_t v, int nbytes) except -1:
        """Put ``nbytes`` of ``v`` big-endian, byte by byte as QEMU (so a full gather list
        may flush in the middle).  Only a put that may flush takes the busy guard and
        drops the GIL; the others cannot make a syscall."""
        if self.busy or self.is_closed or not self.writable:
            self._enter(1)                  # raises the reason
        if not self._may_flush(nbytes, nbytes):
            self._put_be(v, nbytes)
            return 0
        self._enter(1)
        try:
            with nogil:
                self._put_be(v, nbytes)
        finally:
            self._leave()
        return 0

    cdef void _put_be(self, uint64_t v, int nbytes) noexcept nogil:
        cdef int shift
        for shift in range(8 * (nbytes - 1), -8, -8):
            self._put_byte(<unsigned char>(v >> shift))

    def put_byte(self, int v):
        """Put one byte (the low 8 bits of ``v``)."""
        self._put_int(<unsigned char>v, 1)

    def put_be16(self, unsigned int v):
        self._put_int(v & 0xFFFF, 2)

    def put_be32(self, unsigned int v):
        self._put_int(v, 4)

    def put_be64(self, uint64_t v):
        self._put_int(v, 8)

    def put_buffer(self, buf):
        """Copy ``buf`` (any buffer) into the stream through the staging buffer."""
        cdef Py_buffer view
        self._enter(1)
        try:
            if self.last_error:
                return
            PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
            try:
                if self._may_flush(<size_t>view.len, 1):
                    with nogil:
                        self._put_bytes(<const unsigned char *>view.buf, <size_t>view.len)
                else:
                    self._put_bytes(<const unsigned char *>view.buf, <size_t>view.len)
            finally:
                PyBuffer_Release(&view)
        finally:
            self._leave()

    def put_buffer_async(self, buf, bint may_free=False, Py_ssize_t offset=0,
                         Py_ssize_t length=-1):
        """Queue ``buf[offset:offset+length]`` (``length`` -1: to the end) without
        copying: the iovec points into its memory, which stays exported
        (``mmap.close()`` raises ``BufferError``) until written.  With ``may_free``, its
        whole pages are released once every byte has been written.  Repeated puts from
        the same object share one export (a loop over a region need not slice it)."""
        cdef Py_buffer view
        cdef const char *p
        cdef Py_buffer *last
        if self.busy or self.is_closed or not self.writable:
            self._enter(1)                  # raises the reason
        if self.last_error:
            return
        last = &self.batch.pins[self.batch.npins - 1] if self.batch.npins else NULL
        if last != NULL and last.obj is buf:
            length = _check_range(last.len, offset, length)
            p = <const char *>last.buf + offset
        else:
            PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
            try:
                length = _check_range(view.len, offset, length)
            except ValueError:
                PyBuffer_Release(&view)
                raise
            self._adopt(&view)
            p = <const char *>view.buf + offset
        if length == 0:
            return
        self.rate_used += length
        if may_free:
            self._note_release(<char *>p, <size_t>length)
        if not self._may_flush(0, 1):
            self._add_to_iovec(p, <size_t>length, may_free)
            return
        self._enter(1)
        try:
            with nogil:
                self._add_to_iovec(p, <size_t>length, may_free)
        finally:
            self._leave()

    def put_counted_string(self, s):
        """One length byte, then the bytes (``str`` is UTF-8 encoded); at most 255."""
        data = s.encode() if isinstance(s, str) else bytes(s)
        if len(data) > 255:
            raise ValueError(f"a counted string holds at most 255 bytes, not {len(data)}")
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef size_t n = len(data)
        self._enter(1)
        try:
            with nogil:
                self._put_byte(<unsigned char>n)
                self._put_bytes(p, n)
        finally:
            self._leave()

    def put_compression_data(self, data, int level=1):
        """zlib-deflate ``data`` (QEMU's compress path: zlib format, level 1 by default)
        and put ``be32 length`` + the compressed bytes.  Returns the bytes put."""
        compressed = zlib.compress(bytes(data), level)
        self.put_be32(len(compressed))
        self.put_buffer(compressed)
        return len(compressed) + 4

    def put_qemu_file(self, QEMUFile src not None):
        """Move everything ``src`` has queued into this file; ``src`` is left empty.

        The bytes are copied, so ``src``'s may_free pages are not released (they were
        never written from ``src``).  Returns the number of bytes moved."""
        cdef int i
        cdef size_t moved = 0
        if src is self:
            raise ValueError("cannot move a file into itself")
        self._enter(1)
        try:
            if not src.writable:
                raise io.UnsupportedOperation("put_qemu_file needs a writing source")
            with nogil:
                for i in range(src.batch.count):
                    self._put_bytes(<const unsigned char *>src.batch.iov[i].iov_base,
                                    src.batch.iov[i].iov_len)
                    moved += src.batch.iov[i].iov_len
                src.batch.count = 0
                src.buf_index = 0
                src.batch.nruns = 0
                src._drop_pins_if_idle()
            return moved
        finally:
            self._leave()

    def flush(self):
        """Write everything queued and release every may_free page already written.
        Raises the sticky error, if any."""
        self._enter(1)
        try:
            with nogil:
                self._flush_batch()
                self._release_open_run()
                self._drop_pins_if_idle()
            self._raise_error()
        finally:
            self._leave()

    # -- write side: the page loop --------------------------------------------------------

    def save_pages(self, region, Py_ssize_t first_page=0, Py_ssize_t count=-1,
                   uint64_t header_base=0, uint64_t flags=0, bint may_free=False, *,
                   idstr=None, Py_ssize_t page_size=4096, dirty=None,
                   bint detect_zero=True, bint stop_when_rate_limited=False,
                   uint64_t block_offset=0, claimed=None):
        """Emit RAM page records for pages ``first_page .. first_page+count-1`` of
        ``region`` without Python work per page.

        Page ``i`` gets the header ``(header_base + i*page_size) | flags | kind``: kind is
        ZERO (then one 0 byte) for an all-zero page when ``detect_zero``, else PAGE (then
        the page, zero-copy).  With ``idstr`` the first record drops CONTINUE and carries
        the counted block name, the following ones get CONTINUE, as QEMU's
        save_page_header.  ``dirty`` (a writable bitmap, bit i = page i, LSB first) limits
        the loop to set bits; each page's bit is cleared atomically before its record is
        emitted, so several threads (files) may save from one bitmap: each page goes out
        once; ``claimed`` (a writable bitmap, same indexing) gets the bit of every page
        this call emitted, so a caller knows exactly which ones it sent.  With
        ``may_free`` every emitted page is released once its record is written.
        A ``save_page`` hook, if set, is offered each page first (a Python call per page).

        Returns ``(pages, zero_pages, next_page)``; ``next_page`` is where a loop stopped
        by ``stop_when_rate_limited`` (or an error) would resume.
        """
        cdef Py_buffer rview
        cdef Py_buffer dview
        cdef Py_buffer cview
        cdef PageLoop loop
        cdef Py_ssize_t npages
        cdef bint have_dirty = dirty is not None
        cdef bint have_claimed = claimed is not None
        cdef bytes name = None
        self._enter(1)
        try:
            if page_size < 512 or page_size & (page_size - 1):
                raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
            if flags & ~<uint64_t>(page_size - 1):
                raise ValueError("flags must fit below the page size")
            if header_base & <uint64_t>(page_size - 1):
                raise ValueError("header_base must be page aligned")
            if idstr is not None:
                name = idstr.encode() if isinstance(idstr, str) else bytes(idstr)
                if len(name) > 255:
                    raise ValueError("a block name holds at most 255 bytes")
            memset(&loop, 0, sizeof(loop))
            loop.next_page = first_page
            if self.last_error:
                return (0, 0, first_page)
            PyObject_GetBuffer(region, &rview, PyBUF_SIMPLE)
            npages = rview.len // page_size
            if count < 0:
                count = npages - first_page
            if first_page < 0 or count < 0 or first_page + count > npages:
                PyBuffer_Release(&rview)
                raise ValueError(f"pages {first_page}..{first_page + count} are outside a "
                                 f"region of {npages} pages")
            if have_dirty:
                try:
                    PyObject_GetBuffer(dirty, &dview, PyBUF_WRITABLE)
                except BaseException:
                    PyBuffer_Release(&rview)
                    raise
                if dview.len * 8 < first_page + count:
                    PyBuffer_Release(&dview)
                    PyBuffer_Release(&rview)
                    raise ValueError("the dirty bitmap is shorter than the page range")
                loop.dirty = <unsigned char *>dview.buf
            if have_claimed:
                try:
                    PyObject_GetBuffer(claimed, &cview, PyBUF_WRITABLE)
                except BaseException:
                    if have_dirty:
                        PyBuffer_Release(&dview)
                    PyBuffer_Release(&rview)
                    raise
                if cview.len * 8 < first_page + count:
                    PyBuffer_Release(&cview)
                    if have_dirty:
                        PyBuffer_Release(&dview)
                    PyBuffer_Release(&rview)
                    raise ValueError("the claimed bitmap is shorter than the page range")
                loop.claimed = <unsigned char *>cview.buf
            loop.base = <const unsigned char *>rview.buf
            loop.page_size = page_size
            loop.first = first_page
            loop.end = first_page + count
            loop.header_base = header_base
            loop.flags = flags
            loop.may_free = may_free
            loop.detect_zero = detect_zero
            loop.stop_when_rate_limited = stop_when_rate_limited
            if name is not None:
                loop.idstr = <const unsigned char *>PyBytes_AS_STRING(name)
                loop.idstr_len = len(name)
            else:
                loop.idstr_len = -1
            try:
                if self.hook_save_page is not None:
                    self._save_loop_hooked(&loop, block_offset)
                else:
                    with nogil:
                        _save_loop(self, &loop)
            finally:
                if have_dirty:
                    PyBuffer_Release(&dview)
                if have_claimed:
                    PyBuffer_Release(&cview)
                # The loop's own export kept the region alive while it ran (flushes in
                # the loop give pins back); if bytes or releases are still pending, the
                # region stays exported until they are written.
                if self.batch.count or self.batch.nruns or self.open_run.length:
                    self._adopt(&rview)
                else:
                    PyBuffer_Release(&rview)
            return (loop.pages, loop.zeros, loop.next_page)
        finally:
            self._leave()

    cdef int _save_loop_hooked(self, PageLoop *loop, uint64_t block_offset) except -1:
        cdef Py_ssize_t i
        cdef uint64_t offset
        for i in range(loop.first, loop.end):
            if loop.dirty != NULL and not (loop.dirty[i >> 3] >> (i & 7)) & 1:
                continue
            if self.last_error or (loop.stop_when_rate_limited and self._rate_limited()):
                loop.next_page = i
                return 0
            if loop.dirty != NULL and not qf_take_bit(loop.dirty, i):
                continue                # another thread took it
            offset = loop.header_base + <uint64_t>i * loop.page_size
            ret, _ = self._control_save_page(block_offset, offset, loop.page_size)
            if ret == wire.RAM_SAVE_CONTROL_NOT_SUPP:
                with nogil:
                    _save_one(self, loop, i)
        loop.next_page = loop.end
        return 0

    # -- read side ------------------------------------------------------------------------

    cdef int64_t _read_pos(self) noexcept nogil:
        return self.total_transferred - (self.buf_fill - self.buf_index)

    cdef Py_ssize_t _read_python(self, unsigned char *dst, Py_ssize_t room) noexcept nogil:
        with gil:
            view = PyMemoryView_FromMemory(<char *>dst, room, PyBUF_WRITE)
            try:
                try:
                    n = self.channel.readinto(view)
                finally:
                    view.release()
                if n is None:
                    raise OSError(EAGAIN, f"{self.channel!r}.readinto would block")
                if n < 0 or n > room:
                    raise OSError(EIO, f"{self.channel!r}.readinto returned {n}")
                return n
            except BaseException as exc:
                return self._channel_failed(exc)

    cdef Py_ssize_t _fill_buffer(self) noexcept nogil:
        """QEMU's qemu_fill_buffer: keep the unread bytes, read more after them.
        >0 bytes read; 0 at end or on error (sticky)."""
        cdef Py_ssize_t pending = self.buf_fill - self.buf_index
        cdef ssize_t n
        if pending > 0 and self.buf_index > 0:
            memmove(self.buf, self.buf + self.buf_index, pending)
        self.buf_index = 0
        self.buf_fill = pending
        cdef short wait = 0
        if self.last_error or pending >= self.buf_cap:
            return 0
        if self.transport != NULL:
            while True:
                n = self.transport.read(self.transport.ctx, self.buf + pending,
                                        self.buf_cap - pending, &wait)
                if n >= 0:
                    break
                if errno != EAGAIN:
                    self._fail_errno(errno, "TLS read")
                    return 0
                if self._wait(wait) < 0:
                    return 0
        elif self.fd >= 0:
            while True:
                n = read(self.fd, self.buf + pending, self.buf_cap - pending)
                if n >= 0:
                    break
                if errno == EINTR:
                    if self._check_signals() < 0:
                        return 0
                elif errno == EAGAIN:
                    if self._wait(POLLIN) < 0:
                        return 0
                else:
                    self._fail_errno(errno, "read")
                    return 0
        else:
            n = self._read_python(self.buf + pending, self.buf_cap - pending)
            if n < 0:
                return 0
        self.read_calls += 1
        if n == 0:
            self._fail_eof()
            return 0
        self.buf_fill += n
        self.total_transferred += n
        return n

    cdef Py_ssize_t _peek(self, Py_ssize_t size, Py_ssize_t offset) noexcept nogil:
        """Make `size` bytes at `offset` past the read position available in buf;
        returns how many are (fewer only at the end or on error)."""
        cdef Py_ssize_t pending = self.buf_fill - self.buf_index - offset
        while pending < size:
            if self._fill_buffer() <= 0:
                break
            pending = self.buf_fill - self.buf_index - offset
        if pending <= 0:
            return 0
        return size if size < pending else pending

    cdef Py_ssize_t _get_into(self, unsigned char *dst, Py_ssize_t size) noexcept nogil:
        """Consume `size` bytes into `dst` (NULL: skip them); fewer only at the end or
        on an error."""
        cdef Py_ssize_t done = 0
        cdef Py_ssize_t res
        cdef Py_ssize_t want
        while done < size:
            want = size - done
            if want > self.buf_cap:
                want = self.buf_cap
            res = self._peek(want, 0)
            if res == 0:
                break
            if dst != NULL:
                memcpy(dst + done, self.buf + self.buf_index, res)
            self.buf_index += res
            done += res
        return done

    cdef Py_ssize_t _need(self, Py_ssize_t size) noexcept:
        """Make `size` bytes available, releasing the GIL only if it must read."""
        cdef Py_ssize_t got
        if self.buf_fill - self.buf_index >= size:
            return size
        with nogil:
            got = self._peek(size, 0)
        return got

    cdef uint64_t _get_be(self, int nbytes, str what) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t v = 0
        cdef int i
        cdef int64_t start = self._read_pos()
        cdef Py_ssize_t got = self._need(nbytes)
        if got < nbytes:
            self.buf_index += got
            self._raise_short(start, nbytes, got, what)
            return 0
        for i in range(nbytes):
            v = (v << 8) | self.buf[self.buf_index + i]
        self.buf_index += nbytes
        return v

    cdef uint64_t _get_int(self, int nbytes, str what) except? 0xFFFFFFFFFFFFFFFF:
        """A guarded big-endian read of ``nbytes`` (the public get_* methods)."""
        self._enter(0)
        try:
            return self._get_be(nbytes, what)
        finally:
            self._leave()

    def get_byte(self):
        return <int>self._get_int(1, "get_byte")

    def get_be16(self):
        return <unsigned int>self._get_int(2, "get_be16")

    def get_be32(self):
        return <unsigned int>self._get_int(4, "get_be32")

    def get_be64(self):
        return self._get_int(8, "get_be64")

    def peek_byte(self, Py_ssize_t offset=0):
        """The byte ``offset`` bytes ahead, without consuming anything."""
        cdef int64_t start
        self._enter(0)
        try:
            if not 0 <= offset < self.buf_cap:
                raise ValueError(f"peek offset must be in [0, {self.buf_cap})")
            start = self._read_pos()
            if self.buf_fill - self.buf_index <= offset:
                with nogil:
                    self._peek(1, offset)
                if self.buf_fill - self.buf_index <= offset:
                    self._raise_short(start, offset + 1, self.buf_fill - self.buf_index,
                                      "peek_byte")
                    return 0
            return self.buf[self.buf_index + offset]
        finally:
            self._leave()

    def peek_buffer(self, Py_ssize_t size, Py_ssize_t offset=0):
        """``size`` bytes starting ``offset`` bytes ahead, without consuming them
        (``offset + size`` must fit the buffer, as in QEMU)."""
        cdef Py_ssize_t got
        cdef int64_t start
        self._enter(0)
        try:
            if offset < 0 or size < 0 or offset + size > self.buf_cap:
                raise ValueError(f"peek_buffer needs 0 <= offset and offset + size <= "
                                 f"{self.buf_cap}")
            start = self._read_pos()
            with nogil:
                got = self._peek(size, offset)
            if got < size:
                self._raise_short(start, offset + size, offset + got, "peek_buffer")
                return b""
            return PyBytes_FromStringAndSize(<char *>self.buf + self.buf_index + offset, size)
        finally:
            self._leave()

    def get_buffer(self, Py_ssize_t size):
        """Read exactly ``size`` bytes; a short stream raises StreamEnded."""
        cdef Py_ssize_t got
        cdef int64_t start
        cdef unsigned char *dst
        self._enter(0)
        try:
            if size < 0:
                raise ValueError("size cannot be negative")
            start = self._read_pos()
            out = PyBytes_FromStringAndSize(NULL, size)
            dst = <unsigned char *>PyBytes_AS_STRING(out)
            with nogil:
                got = self._get_into(dst, size)
            if got < size:
                self._raise_short(start, size, got, "get_buffer")
                return b""
            return out
        finally:
            self._leave()

    def get_buffer_into(self, buf):
        """Fill the writable buffer ``buf`` from the stream; returns its length.  A short
        stream raises StreamEnded (``got`` says how many bytes did arrive)."""
        cdef Py_buffer view
        cdef Py_ssize_t got
        cdef int64_t start
        self._enter(0)
        try:
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
            try:
                start = self._read_pos()
                with nogil:
                    got = self._get_into(<unsigned char *>view.buf, view.len)
                if got < view.len:
                    self._raise_short(start, view.len, got, "get_buffer_into")
                return got
            finally:
                PyBuffer_Release(&view)
        finally:
            self._leave()

    def get_buffer_in_place(self, Py_ssize_t size):
        """``size`` bytes as a read-only memoryview: into the staging buffer when they fit
        (no copy; valid until the next read), else a copy."""
        cdef _InPlaceView view
        cdef int64_t start
        if size < 0:
            raise ValueError("size cannot be negative")
        if size >= self.buf_cap:
            return memoryview(self.get_buffer(size))
        self._enter(0)
        try:
            start = self._read_pos()
            if self._need(size) < size:
                self._raise_short(start, size, self.buf_fill - self.buf_index,
                                  "get_buffer_in_place")
                return memoryview(b"")
            view = _InPlaceView.__new__(_InPlaceView)
            view.owner = self
            view.start = self.buf_index
            view.length = size
            self.buf_index += size
            return memoryview(view)
        finally:
            self._leave()

    cdef Py_ssize_t _skip(self, Py_ssize_t size) noexcept nogil:
        return self._get_into(NULL, size)

    def skip(self, Py_ssize_t size):
        """Consume ``size`` bytes."""
        cdef Py_ssize_t done
        cdef int64_t start
        self._enter(0)
        try:
            start = self._read_pos()
            with nogil:
                done = self._skip(size)
            if done < size:
                self._raise_short(start, size, done, "skip")
        finally:
            self._leave()

    def get_counted_string(self):
        """A length byte, then that many bytes (returned as ``bytes``)."""
        cdef Py_ssize_t n = self.get_byte()
        return self.get_buffer(n)

    # -- read side: the page loop ---------------------------------------------------------

    def load_pages(self, region, header=None, *, Py_ssize_t page_size=4096,
                   Py_ssize_t header_pos=-1, touched=None, received=None):
        """Place RAM page records into ``region`` (writable) without Python work per page.

        With ``header`` (already read, together with its block name; ``header_pos`` its
        byte offset, for messages) that record is placed first whatever its CONTINUE
        bit; then records are read while they are ``CONTINUE|PAGE`` or ``CONTINUE|ZERO``.
        A PAGE is read into its place.  A ZERO fills its page only where it is not zero
        already.  ``touched`` (a writable bitmap) says the region is new zero memory
        except where its bit is set: a ZERO on an untouched page is not even read (no
        fault, no page), and every page written gets its bit set.  ``received`` (a
        writable bitmap) gets the bit of every page a record placed, zero or not.  Both
        start all clear, so they cost nothing until pages arrive.  Every offset is
        checked against the region before a byte is written.

        Returns ``(next_header, pages, zero_pages)``: the first record header that is not
        such a page (consumed, its payload not), for the caller's format code.
        Raises FormatError (with the byte offset) on a page outside the region or a
        ZERO record whose fill byte is not 0, StreamEnded at a premature end.
        ``region`` may be an int, a block length: then the records are only checked and
        counted, their payloads skipped (``qfram info``).
        """
        cdef Py_buffer view
        cdef Py_buffer tview
        cdef Py_buffer gview
        cdef LoadLoop loop
        cdef bint have_touched = touched is not None
        cdef bint have_received = received is not None
        self._enter(0)
        try:
            if page_size < 512 or page_size & (page_size - 1):
                raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
            memset(&loop, 0, sizeof(loop))
            loop.page_size = page_size
            if header is not None:
                loop.have_header = True
                loop.header = header
                loop.header_pos = header_pos
            if isinstance(region, int):
                # count and check only: offsets against this length, payloads skipped
                if region < 0:
                    raise ValueError("a block length cannot be negative")
                loop.length = region
                with nogil:
                    _load_loop(self, &loop)
            else:
                PyObject_GetBuffer(region, &view, PyBUF_WRITABLE)
                try:
                    loop.base = <unsigned char *>view.buf
                    loop.length = view.len
                    if have_touched:
                        PyObject_GetBuffer(touched, &tview, PyBUF_WRITABLE)
                        loop.touched = <unsigned char *>tview.buf
                    if have_received:
                        PyObject_GetBuffer(received, &gview, PyBUF_WRITABLE)
                        loop.received = <unsigned char *>gview.buf
                    try:
                        if (have_touched and tview.len * 8 < view.len // page_size) or \
                                (have_received and gview.len * 8 < view.len // page_size):
                            raise ValueError("a page bitmap is shorter than the region")
                        with nogil:
                            _load_loop(self, &loop)
                    finally:
                        if have_touched:
                            PyBuffer_Release(&tview)
                        if have_received:
                            PyBuffer_Release(&gview)
                finally:
                    PyBuffer_Release(&view)
            if loop.status == -2:
                if self.last_error == 0:
                    self.last_error = -EINVAL
                if loop.reason == 1:
                    exc = FormatError(
                        f"page at offset {loop.bad_value:#x} lies outside its block of "
                        f"{loop.length:#x} bytes", loop.bad_pos)
                else:
                    exc = FormatError(
                        f"zero page record with fill byte {loop.bad_value:#x} (must be 0)",
                        loop.bad_pos)
                self.last_exc = exc
                raise exc
            if loop.status == -1:
                self._raise_short(loop.short_pos, loop.short_wanted, loop.short_got,
                                  "load_pages")
            return (loop.header, loop.pages, loop.zeros)
        finally:
            self._leave()

    # -- position, rate limiting ----------------------------------------------------------

    def tell(self):
        """Writing: bytes written to the channel, after flushing the batch (QEMU's
        qemu_file_total_transferred).  Reading: bytes consumed so far."""
        if self.writable and not self.is_closed:
            self._enter(1)
            try:
                with nogil:
                    self._flush_batch()
            finally:
                self._leave()
            return self.total_transferred
        return self._read_pos()

    def set_offset(self, int64_t offset):
        """Reposition an fd channel (QEMU's qemu_set_offset): a writer flushes first, a
        reader drops what it had read ahead; tell() then counts from ``offset``."""
        if self.fd < 0 or self.transport != NULL:
            raise io.UnsupportedOperation("set_offset needs a channel with an fd")
        self._enter(1 if self.writable else 0)
        try:
            if self.writable:
                with nogil:
                    self._flush_batch()
                self._raise_error()
            else:
                self.buf_index = 0
                self.buf_fill = 0
            os.lseek(self.fd, offset, os.SEEK_SET)
            self.total_transferred = offset
        finally:
            self._leave()

    def tell_fast(self):
        """Like tell() without flushing: written plus queued bytes."""
        cdef int64_t total = self.total_transferred
        cdef int i
        if not self.writable:
            return self._read_pos()
        for i in range(self.batch.count):
            total += self.batch.iov[i].iov_len
        return total

    def update_position(self, int64_t size):
        """Credit ``size`` bytes sent by other means (qemu_file_credit_transfer)."""
        self.total_transferred += size

    @property
    def pending_iovecs(self):
        """Entries in the gather list of the batch being built."""
        return self.batch.count

    @property
    def pending_pins(self):
        """Buffer exports held for queued or not yet released bytes."""
        return self.batch.npins

    @property
    def iov_max(self):
        return self.batch.cap

    @property
    def buf_size(self):
        return self.buf_cap

    @property
    def release_min(self):
        return self.min_release

    cdef bint _rate_limited(self) noexcept nogil:
        if self.is_shutdown or self.last_error:
            return True
        return self.rate_limit_max > 0 and self.rate_used > self.rate_limit_max

    def rate_limited(self):
        """True when the file should stop sending for this window: over the limit,
        shut down, or in error (qemu_file_rate_limit)."""
        return self._rate_limited()

    def set_rate_limit(self, int64_t limit):
        """Bytes allowed per window; 0 or less means no limit."""
        self.rate_limit_max = limit

    def get_rate_limit(self):
        return self.rate_limit_max

    def reset_rate_limit(self):
        """Start a new window."""
        self.rate_used = 0

    def acct_rate_limit(self, int64_t size):
        """Count ``size`` bytes sent by other means against the window."""
        self.rate_used += size

    @property
    def rate_limit_used(self):
        return self.rate_used

    # -- channel state --------------------------------------------------------------------

    def is_writable(self):
        return self.writable

    def shutdown(self):
        """Stop the file: set the sticky error first (so no reader mistakes the end for
        data, as QEMU does), then shut the channel down.  Safe from another thread.
        Returns False when the channel cannot be shut down (the error is set anyway)."""
        self.is_shutdown = True
        if self.last_error == 0:
            self._record(EIO, OSError(EIO, "QEMUFile was shut down"))
        shut = getattr(self.channel, "shutdown", None)
        if shut is None:
            return False
        return bool(shut())

    def get_return_path(self):
        """A file in the opposite direction over the same channel (a socket's other
        direction), or None when the channel has no way back."""
        make = getattr(self.channel, "return_path", None)
        back = make() if make is not None else None
        if back is None:
            return None
        return QEMUFile(back, "rb" if self.writable else "wb", iov_max=self.batch.cap,
                        buf_size=self.buf_cap, release_min=self.min_release,
                        timeout=None if self.timeout_ms < 0 else self.timeout_ms / 1000.0)

    def set_blocking(self, bint block):
        """Set the channel's blocking mode (some transports share it with the return
        path).  Non-blocking fds are waited on with poll, bounded by the timeout."""
        setter = getattr(self.channel, "set_blocking", None)
        if setter is not None:
            setter(block)
        elif self.fd >= 0:
            os.set_blocking(self.fd, block)

    def close(self):
        """Flush, release, close the channel; raise the first error of the file's life."""
        if self.is_closed:
            return
        if self.busy:
            raise RuntimeError("QEMUFile is in use by another thread")
        self.busy = True
        try:
            if self.writable:
                with nogil:
                    self._flush_batch()
                    self._release_open_run()
            with nogil:
                self.batch.count = 0
                self.open_run.length = 0
                self._drop_pins_if_idle()
            closer = getattr(self.channel, "close", None)
            if closer is not None:
                try:
                    closer()
                except OSError as exc:
                    self._record(exc.errno or EIO, exc)
        finally:
            self.is_closed = True
            self.busy = False
        pending = self.pending_exc
        if pending is not None:
            self.pending_exc = None
            raise pending
        self._raise_error()

    @property
    def closed(self):
        return self.is_closed

    # -- hooks (QEMUFileHooks) ------------------------------------------------------------

    def set_hooks(self, *, before_ram_iterate=None, after_ram_iterate=None,
                  hook_ram_load=None, save_page=None):
        """Register Python hooks (qemu_file_set_hooks).  The iterate/load hooks are
        called ``hook(file, flags, data)`` and return an int (negative = error);
        ``save_page(file, block_offset, offset, size)`` returns ``(ret, bytes_sent)``
        with ``ret`` wire.RAM_SAVE_CONTROL_NOT_SUPP to let the file send the page itself."""
        self.hook_before_ram_iterate = before_ram_iterate
        self.hook_after_ram_iterate = after_ram_iterate
        self.hook_ram_load = hook_ram_load
        self.hook_save_page = save_page

    cdef object _call_hook(self, object hook, tuple args):
        try:
            return hook(self, *args)
        except BaseException as exc:
            self._record(EIO, raised_in(EIO, f"the hook {hook!r}", exc))
            raise

    def ram_control_before_iterate(self, uint64_t flags):
        if self.hook_before_ram_iterate is not None:
            ret = self._call_hook(self.hook_before_ram_iterate, (flags, None))
            if ret is not None and ret < 0:
                self.set_error(ret)

    def ram_control_after_iterate(self, uint64_t flags):
        if self.hook_after_ram_iterate is not None:
            ret = self._call_hook(self.hook_after_ram_iterate, (flags, None))
            if ret is not None and ret < 0:
                self.set_error(ret)

    def ram_control_load_hook(self, uint64_t flags, data=None):
        if self.hook_ram_load is not None:
            ret = self._call_hook(self.hook_ram_load, (flags, data))
            if ret is not None and ret < 0:
                self.set_error(ret)
        elif flags == wire.RAM_CONTROL_HOOK:
            # the source sent a hook record this side cannot serve
            self.set_error(-EINVAL, "the stream asks for a RAM load hook; none is set")

    def ram_control_save_page(self, uint64_t block_offset, uint64_t offset, size_t size):
        """Offer a page to the save_page hook; returns ``(ret, bytes_sent)``."""
        return self._control_save_page(block_offset, offset, size)

    cdef tuple _control_save_page(self, uint64_t block_offset, uint64_t offset, size_t size):
        if self.hook_save_page is None:
            return (wire.RAM_SAVE_CONTROL_NOT_SUPP, 0)
        ret, sent = self._call_hook(self.hook_save_page, (block_offset, offset, size))
        if ret != wire.RAM_SAVE_CONTROL_NOT_SUPP:
            self.rate_used += size
        if ret != wire.RAM_SAVE_CONTROL_DELAYED and ret != wire.RAM_SAVE_CONTROL_NOT_SUPP:
            if sent and sent > 0:
                self.total_transferred += sent
            elif ret < 0:
                self.set_error(ret)
        return (ret, sent)


# ---------------------------------------------------------------------------------------
# The page loops (nogil)
# ---------------------------------------------------------------------------------------

cdef inline int _save_one(QEMUFile f, PageLoop *loop, Py_ssize_t i) noexcept nogil:
    """Emit the record of page i: ZERO + 0 byte, or PAGE + the page (zero-copy)."""
    cdef unsigned char *page = <unsigned char *>loop.base + <size_t>i * loop.page_size
    cdef bint zero = loop.detect_zero and _is_zero(page, loop.page_size)
    cdef uint64_t header = (loop.header_base + <uint64_t>i * loop.page_size) | loop.flags
    header |= RAM_SAVE_FLAG_ZERO if zero else RAM_SAVE_FLAG_PAGE
    if loop.claimed != NULL:
        loop.claimed[i >> 3] |= <unsigned char>(1 << (i & 7))
    if loop.idstr_len >= 0:
        f._put_be64(header & ~(<uint64_t>RAM_SAVE_FLAG_CONTINUE))
        f._put_byte(<unsigned char>loop.idstr_len)
        f._put_bytes(loop.idstr, loop.idstr_len)
        loop.idstr_len = -1
        loop.flags |= RAM_SAVE_FLAG_CONTINUE
    else:
        f._put_be64(header)
    if zero:
        f._put_byte(0)
        if loop.may_free and not f.last_error:
            f._note_release(<char *>page, loop.page_size)
        loop.zeros += 1
    elif not f.last_error:
        f.rate_used += loop.page_size
        if loop.may_free:
            f._note_release(<char *>page, loop.page_size)
        f._add_to_iovec(<const char *>page, loop.page_size, loop.may_free)
        loop.pages += 1
    return 0


cdef void _save_loop(QEMUFile f, PageLoop *loop) noexcept nogil:
    cdef Py_ssize_t i = loop.first
    cdef const uint64_t *word
    while i < loop.end:
        if loop.dirty != NULL:
            # skip clean pages 64 at a time
            if (i & 63) == 0 and i + 64 <= loop.end:
                word = <const uint64_t *>(loop.dirty + (i >> 3))
                if word[0] == 0:
                    i += 64
                    continue
            if not (loop.dirty[i >> 3] >> (i & 7)) & 1:
                i += 1
                continue
        if f.last_error or (loop.stop_when_rate_limited and f._rate_limited()):
            loop.next_page = i
            return
        if loop.dirty != NULL and not qf_take_bit(loop.dirty, i):
            i += 1                      # another thread took it
            continue
        _save_one(f, loop, i)
        i += 1
    loop.next_page = loop.end


cdef inline int _load_short(QEMUFile f, LoadLoop *loop, int64_t pos, Py_ssize_t wanted,
                            Py_ssize_t got) noexcept nogil:
    loop.status = -1
    loop.short_pos = pos
    loop.short_wanted = wanted
    loop.short_got = got
    return -1


cdef inline int _load_header(QEMUFile f, LoadLoop *loop) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    cdef Py_ssize_t got
    loop.header_pos = f._read_pos()
    if f.buf_fill - f.buf_index < 8:
        got = f._peek(8, 0)
        if got < 8:
            f.buf_index += got
            return _load_short(f, loop, loop.header_pos, 8, got)
    for k in range(8):
        v = (v << 8) | f.buf[f.buf_index + k]
    f.buf_index += 8
    loop.header = v
    return 0


cdef enum:
    # The most a sink's page may be (a page not whole in the staging buffer is read
    # into a scratch page on the stack first).
    MAX_SINK_PAGE = 65536


cdef void _load_loop(QEMUFile f, LoadLoop *loop) noexcept nogil:
    """The one parser of RAM page records: places CONTINUE|PAGE and CONTINUE|ZERO records
    (the first whatever its CONTINUE bit when `have_header`) into `base`, or hands each
    page to the sink, every offset checked first; stops at the first other header."""
    cdef uint64_t mask = loop.page_size - 1
    cdef uint64_t flags, offset
    cdef unsigned char *page
    cdef const unsigned char *src
    cdef unsigned char scratch[MAX_SINK_PAGE]
    cdef int64_t pos
    cdef Py_ssize_t got
    cdef size_t index
    cdef bint fresh
    cdef int ch
    if not loop.have_header and _load_header(f, loop) < 0:
        return
    while True:
        flags = loop.header & mask
        offset = loop.header & ~mask
        if not loop.have_header and not (flags & RAM_SAVE_FLAG_CONTINUE):
            break
        flags &= ~(<uint64_t>RAM_SAVE_FLAG_CONTINUE)
        if flags != RAM_SAVE_FLAG_PAGE and flags != RAM_SAVE_FLAG_ZERO:
            break
        loop.have_header = False
        if offset > loop.length or loop.length - offset < loop.page_size:
            loop.status = -2
            loop.reason = 1
            loop.bad_value = offset
            loop.bad_pos = loop.header_pos
            return
        page = loop.base + offset
        index = offset // loop.page_size
        fresh = loop.touched != NULL and not qf_bit(loop.touched, index)
        if loop.received != NULL:
            qf_set_bit(loop.received, index, True)
        if flags == RAM_SAVE_FLAG_PAGE and loop.sink != NULL:
            if f.buf_fill - f.buf_index >= <Py_ssize_t>loop.page_size:
                src = f.buf + f.buf_index             # straight from the staging buffer
                f.buf_index += loop.page_size
            else:
                pos = f._read_pos()
                got = f._get_into(scratch, loop.page_size)
                if got < <Py_ssize_t>loop.page_size:
                    _load_short(f, loop, pos, loop.page_size, got)
                    return
                src = scratch
            if loop.sink(loop.sink_ctx, offset, src) < 0:
                loop.status = -3
                return
            loop.pages += 1
        elif flags == RAM_SAVE_FLAG_PAGE and loop.base == NULL:
            pos = f._read_pos()
            got = f._skip(loop.page_size)
            if got < <Py_ssize_t>loop.page_size:
                _load_short(f, loop, pos, loop.page_size, got)
                return
            loop.pages += 1
        elif flags == RAM_SAVE_FLAG_PAGE:
            if loop.touched != NULL:
                qf_set_bit(loop.touched, index, True)
            if f.buf_fill - f.buf_index >= <Py_ssize_t>loop.page_size:
                memcpy(page, f.buf + f.buf_index, loop.page_size)
                f.buf_index += loop.page_size
            else:
                pos = f._read_pos()
                got = f._get_into(page, loop.page_size)
                if got < <Py_ssize_t>loop.page_size:
                    _load_short(f, loop, pos, loop.page_size, got)
                    return
            loop.pages += 1
        else:
            if f.buf_fill - f.buf_index < 1 and f._peek(1, 0) < 1:
                _load_short(f, loop, f._read_pos(), 1, 0)
                return
            ch = f.buf[f.buf_index]
            f.buf_index += 1
            if ch != 0:
                loop.status = -2
                loop.reason = 2
                loop.bad_value = ch
                loop.bad_pos = f._read_pos() - 1
                return
            if loop.sink != NULL:
                if loop.sink(loop.sink_ctx, offset, NULL) < 0:
                    loop.status = -3
                    return
            # fresh memory is zero already: do not even read it (no fault, no page)
            elif loop.base != NULL and not fresh and not _is_zero(page, loop.page_size):
                memset(page, 0, loop.page_size)
            loop.zeros += 1
        if _load_header(f, loop) < 0:
            return
    loop.status = 0


# ---------------------------------------------------------------------------------------
# Entry points for other Cython modules (declared in _fast.pxd)
# ---------------------------------------------------------------------------------------

cdef int qf_begin_gil_free(QEMUFile f) except -1:
    if f.fd < 0:
        raise ValueError("GIL-free use needs a QEMUFile over an fd")
    f._enter(f.writable)
    f.gil_free = True
    return 0


cdef void qf_end_gil_free(QEMUFile f) noexcept:
    f.gil_free = False
    f.busy = False


cdef int qf_read(QEMUFile f, unsigned char *dst, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return 0
    if f.buf_fill - f.buf_index >= n:
        memcpy(dst, f.buf + f.buf_index, n)
        f.buf_index += n
        return 0
    return 0 if f._get_into(dst, n) == n else -1


cdef int qf_read_be64(QEMUFile f, uint64_t *out) noexcept nogil:
    cdef unsigned char b[8]
    cdef int i
    if qf_read(f, b, 8) < 0:
        return -1
    out[0] = 0
    for i in range(8):
        out[0] = (out[0] << 8) | b[i]
    return 0


cdef int qf_skip(QEMUFile f, Py_ssize_t n) noexcept nogil:
    return 0 if f._skip(n) == n else -1


cdef int qf_peek_byte(QEMUFile f) noexcept nogil:
    if f.buf_fill - f.buf_index < 1 and f._peek(1, 0) < 1:
        return -1
    return f.buf[f.buf_index]


cdef int64_t qf_position(QEMUFile f) noexcept nogil:
    return f._read_pos()


cdef int qf_errno(QEMUFile f) noexcept nogil:
    return -f.last_error


cdef void qf_load_records(QEMUFile f, LoadLoop *loop) noexcept nogil:
    if loop.sink != NULL and loop.page_size > MAX_SINK_PAGE:
        loop.status = -2
        loop.reason = 1
        return
    _load_loop(f, loop)


cdef void qf_save_records(QEMUFile f, PageLoop *loop) noexcept nogil:
    _save_loop(f, loop)


# ---------------------------------------------------------------------------------------
# Pages at fixed file offsets (the mapped layout), bitmaps
# ---------------------------------------------------------------------------------------

include "_mapped.pxi"
