# The core's C face: QEMUFile's state, the page loops' parameters, and the GIL-free entry
# points other Cython modules use to read a stream (see _fast.pyx for what each does).

from libc.stdint cimport uint64_t, int64_t
from posix.uio cimport iovec


# A run of bytes [base, base + length) that may be handed back to the kernel.
cdef struct Run:
    char *base
    size_t length


# The batch being built: the gather list (iovecs into the staging buffer and into the
# caller's memory), the may_free runs to release once it is written, and the buffer
# exports held until their bytes are written and released.
cdef struct Batch:
    iovec *iov
    unsigned char *may_free     # per iovec
    int count
    int cap                     # flush at this many iovecs
    Run *runs
    Py_ssize_t nruns
    Py_ssize_t runs_cap
    Py_buffer *pins
    Py_ssize_t npins
    Py_ssize_t pins_cap


# A byte transport the core reads and writes without the GIL, for channels that are not a
# plain fd (TLS: qfram._tls).  read/write move up to n bytes: > 0 moved; 0 the peer
# closed; -1 with errno (EAGAIN: poll `fd` for *wait, then call again with the same bytes).
ctypedef ssize_t (*TransportIO)(void *ctx, void *buf, size_t n, short *wait) noexcept nogil

cdef struct Transport:
    void *ctx
    TransportIO read
    TransportIO write
    int fd


# What a save loop emits and where it stopped.
cdef struct PageLoop:
    const unsigned char *base
    size_t page_size
    Py_ssize_t first
    Py_ssize_t end
    uint64_t header_base
    uint64_t flags
    bint may_free
    bint detect_zero
    bint stop_when_rate_limited
    unsigned char *dirty
    unsigned char *claimed          # optional: bit set for every page emitted
    const unsigned char *idstr
    int idstr_len
    Py_ssize_t next_page
    uint64_t pages
    uint64_t zeros


# Where a load loop's pages go: with no sink they are copied into `base`; a sink gets
# each page (`page` NULL: a zero page) and returns 0, or -1 to stop the loop.
ctypedef int (*PageSink)(void *ctx, uint64_t offset, const unsigned char *page) noexcept nogil

# Where a load loop places pages, and how it ended.
cdef struct LoadLoop:
    unsigned char *base
    size_t length
    size_t page_size
    PageSink sink
    void *sink_ctx
    bint have_header
    uint64_t header
    int64_t header_pos
    uint64_t pages
    uint64_t zeros
    int status           # 0: stopped at `header`; -1: I/O error or end; -2: format error;
                         # -3: the sink stopped it
    int64_t bad_pos
    uint64_t bad_value
    int reason           # format error: 1 page past the block, 2 non-zero ZERO fill byte
    unsigned char *touched   # optional: bit i set = page i's memory was written (clear:
                             # still new zero memory, a ZERO record needs no write)
    unsigned char *received  # optional: bit i set for every page a record placed
    int64_t short_pos    # status -1: where the short read started, what it wanted, got
    Py_ssize_t short_wanted
    Py_ssize_t short_got


cdef class QEMUFile:
    # --- channel ---
    cdef readonly object channel
    cdef int fd                      # >= 0: syscalls straight on this fd, GIL released
    cdef Transport *transport        # or, when set, through this (fd: what to poll)
    cdef unsigned char *gather       # writing through a transport: small iovecs joined
    cdef bint writable
    cdef bint is_shutdown
    cdef bint is_closed
    cdef bint busy                   # a method is running (one thread per file)
    cdef bint gil_free               # never take the GIL (a thread faulting on memory
                                     # this file fills may hold it): fd channels only
    cdef const char *failed_op       # the syscall that failed (first error)
    cdef int timeout_ms              # poll timeout while waiting on a non-blocking fd

    # --- staging buffer (small puts when writing, read-ahead when reading) ---
    cdef unsigned char *buf
    cdef Py_ssize_t buf_cap
    cdef Py_ssize_t buf_index
    cdef Py_ssize_t buf_fill         # reading: bytes valid in buf

    # --- the batch being built, and page release ---
    cdef Batch batch
    cdef Run open_run                # written, not yet released (coalesces across batches)
    cdef size_t min_release

    # --- accounting ---
    cdef int64_t total_transferred   # writing: bytes written; reading: bytes read from channel
    cdef int64_t rate_limit_max
    cdef int64_t rate_used
    cdef readonly uint64_t writev_calls
    cdef readonly uint64_t read_calls
    cdef readonly uint64_t released_bytes
    cdef readonly uint64_t release_calls
    cdef readonly uint64_t release_failures

    # --- errors ---
    cdef int last_error              # negative errno, 0 = none (sticky: the first wins)
    cdef bint at_eof
    cdef object last_exc
    cdef object pending_exc          # a Python exception raised while the GIL was released

    # --- hooks (QEMUFileHooks) ---
    cdef object hook_before_ram_iterate
    cdef object hook_after_ram_iterate
    cdef object hook_ram_load
    cdef object hook_save_page

    # guards and errors (GIL held)
    cdef int _enter(self, int want_write) except -1
    cdef int _leave(self) except -1
    cdef void _record(self, int err, object exc) noexcept
    cdef int _channel_failed(self, BaseException exc) noexcept
    cdef int _raise_error(self) except -1
    cdef int _raise_short(self, int64_t start, Py_ssize_t wanted, Py_ssize_t got,
                          str what) except -1
    cdef bint _may_flush(self, size_t buffered, int iovecs) noexcept
    cdef int _adopt(self, Py_buffer *view) except -1
    cdef Py_ssize_t _need(self, Py_ssize_t size) noexcept
    cdef uint64_t _get_be(self, int nbytes, str what) except? 0xFFFFFFFFFFFFFFFF
    cdef uint64_t _get_int(self, int nbytes, str what) except? 0xFFFFFFFFFFFFFFFF
    cdef int _save_loop_hooked(self, PageLoop *loop, uint64_t block_offset) except -1
    cdef object _call_hook(self, object hook, tuple args)
    cdef tuple _control_save_page(self, uint64_t block_offset, uint64_t offset, size_t size)

    # the machinery (no GIL needed; takes it only for Python channels, signals, pins)
    cdef int _fail_errno(self, int err, const char *what) noexcept nogil
    cdef int _fail_eof(self) noexcept nogil
    cdef int _check_signals(self) noexcept nogil
    cdef int _run_signal_handlers(self) noexcept with gil
    cdef int _wait(self, short events) noexcept nogil
    cdef int _put_byte(self, unsigned char v) noexcept nogil
    cdef int _put_int(self, uint64_t v, int nbytes) except -1
    cdef void _put_be(self, uint64_t v, int nbytes) noexcept nogil
    cdef void _put_be64(self, uint64_t v) noexcept nogil
    cdef void _put_bytes(self, const unsigned char *p, size_t n) noexcept nogil
    cdef int _add_to_iovec(self, const char *p, size_t size, bint may_free) noexcept nogil
    cdef void _add_buf_to_iovec(self, size_t length) noexcept nogil
    cdef int _note_release(self, char *p, size_t n) noexcept nogil
    cdef int _flush_batch(self) noexcept nogil
    cdef int _write_iov(self) noexcept nogil
    cdef int _write_iov_python(self) noexcept nogil
    cdef int _write_iov_transport(self) noexcept nogil
    cdef int _transport_write(self, const unsigned char *p, size_t n) noexcept nogil
    cdef void _commit_release(self) noexcept nogil
    cdef void _release_open_run(self) noexcept nogil
    cdef void _release_run(self, Run run) noexcept nogil
    cdef void _drop_pins_if_idle(self) noexcept nogil
    cdef int64_t _read_pos(self) noexcept nogil
    cdef bint _rate_limited(self) noexcept nogil
    cdef Py_ssize_t _fill_buffer(self) noexcept nogil
    cdef Py_ssize_t _read_python(self, unsigned char *dst, Py_ssize_t room) noexcept nogil
    cdef Py_ssize_t _peek(self, Py_ssize_t size, Py_ssize_t offset) noexcept nogil
    cdef Py_ssize_t _get_into(self, unsigned char *dst, Py_ssize_t size) noexcept nogil
    cdef Py_ssize_t _skip(self, Py_ssize_t size) noexcept nogil


# -- entry points for other Cython modules: read a stream without the GIL -----------------

# Make `f` usable from a GIL-free loop, in its own direction (fd and transport channels
# only; the caller holds the GIL).
cdef int qf_begin_gil_free(QEMUFile f) except -1
cdef void qf_end_gil_free(QEMUFile f) noexcept
# Exactly n bytes into dst: 0, or -1 at the end of the stream or on an error (sticky).
cdef int qf_read(QEMUFile f, unsigned char *dst, Py_ssize_t n) noexcept nogil
cdef int qf_read_be64(QEMUFile f, uint64_t *out) noexcept nogil
cdef int qf_skip(QEMUFile f, Py_ssize_t n) noexcept nogil
# The next byte without consuming it, or -1 at the end.
cdef int qf_peek_byte(QEMUFile f) noexcept nogil
# Bytes consumed so far.
cdef int64_t qf_position(QEMUFile f) noexcept nogil
# The stream's first error as a positive errno (EIO at its end), 0 when there is none.
cdef int qf_errno(QEMUFile f) noexcept nogil
# RAM page records of one block, CONTINUE after the first: see LoadLoop.
cdef void qf_load_records(QEMUFile f, LoadLoop *loop) noexcept nogil
# The records of a page range into a writable file (save_pages' loop, no hook): see
# PageLoop.  The caller flushes (f._flush_batch) and checks f.last_error.
cdef void qf_save_records(QEMUFile f, PageLoop *loop) noexcept nogil
