# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, auto_pickle=False, autotestdict=False
"""userfaultfd, and the fault server that places guest pages on first touch.

The :class:`FaultServer` owns one userfaultfd with guest RAM registered in MISSING mode.
Two loops run on their own threads and never need the GIL (a Python thread that touches
missing memory faults *holding* the GIL, so a handler that needed it would deadlock):

* ``serve_faults``: reads fault events and places the faulting page together with the
  neighbours in its window that are not placed yet (``window_pages``, 16 = 64 KiB per
  fault: 16x fewer faults on scans), with UFFDIO_COPY (data) or UFFDIO_ZEROPAGE (zero
  pages).  It optionally spins a little before sleeping in poll: a wake-up on the other
  core costs ~110-140 us here, a spinning handler ~25 us.
* ``fill_background``: places everything else, in order, in 1 MiB windows.

Each page is claimed with an atomic bit before it is placed, so no page is placed twice;
EEXIST is tolerated anyway.  Pages come from a *source*, the one seam between lazy restore
and postcopy:

* local: a mapping of a snapshot file plus its bitmap of present pages (mapped layout);
  the fault thread places pages itself;
* remote (postcopy): the fault thread asks for the faulting page and its missing
  neighbours on a return path (QEMU's REQ_PAGES_ID / REQ_PAGES messages) and ``receive``,
  on its own thread, places the pages as they arrive on the main stream.

:class:`DirtyTracker` finds the pages a program writes (userfaultfd asynchronous write
protection + PAGEMAP_SCAN, Linux 6.7+), for precopy rounds.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.errno cimport (errno, EINTR, EAGAIN, EEXIST, ENOENT, EINVAL, EPIPE, ETIMEDOUT,
                         EPROTO, EFAULT)
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset, memcpy, memcmp
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK, O_RDWR, O_RDONLY as O_RDONLY_, open as c_open
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport read, write, close, _exit, pread
from libc.stdio cimport snprintf
from libc.string cimport strerror
from posix.mman cimport madvise

cdef extern from "<sys/mman.h>":
    enum:
        MADV_POPULATE_READ

import os

from qfram.errors import FormatError

from qfram._fast cimport pollfd, poll, POLLIN, POLLOUT, QEMUFile

cdef uint64_t PAGE = 4096
cdef int MAX_AREAS = 64
cdef int MAX_LATENCIES = 1 << 20


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


def open_userfaultfd():
    """A new userfaultfd (non-blocking, close-on-exec), through the syscall or, where
    that is not allowed, /dev/userfaultfd.  Returns the fd."""
    cdef int fd
    cdef int dev
    fd = <int>syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)
    if fd >= 0:
        return fd
    err = errno
    dev = c_open(b"/dev/userfaultfd", O_RDWR | O_CLOEXEC)
    if dev >= 0:
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)
        err = errno
        close(dev)
        if fd >= 0:
            return fd
    raise OSError(err, f"userfaultfd: {os.strerror(err)} (needs Linux 4.3+, and root or "
                       f"vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)")


cdef class FaultServer:
    """Guest RAM that fills itself on first touch from a page source.

    ``add_area(region, source, present)``: register a writable, page-aligned buffer
    (e.g. a fresh anonymous mmap); ``source`` is a readable buffer holding the pages
    (e.g. a mapping of the snapshot file at pages_offset), ``present`` its bitmap.
    Then run ``serve_faults()`` and ``fill_background()`` on threads; ``stop()`` ends
    them.  Statistics: ``faults``, ``fault_pages``, ``background_pages``,
    ``zero_pages``, ``eexist``, ``latencies_ns()``.
    """
    cdef int uffd
    cdef int stop_fd
    cdef Area *areas
    cdef int nareas
    cdef list exports            # Py_buffer holders keeping regions/sources alive
    cdef Py_buffer *views
    cdef int nviews
    cdef readonly uint64_t window_pages
    cdef readonly uint64_t spin_ns
    cdef int stopping
    cdef uint64_t total_pages
    cdef uint64_t placed_pages
    cdef uint64_t *lat
    cdef uint64_t nlat
    cdef readonly uint64_t faults
    cdef readonly uint64_t fault_pages
    cdef readonly uint64_t background_pages
    cdef readonly uint64_t zero_pages
    cdef readonly uint64_t eexist
    cdef int error                # errno of the first failure in a loop
    cdef uint64_t fail_addr       # where a page could not be placed (0: not that)
    cdef readonly uint64_t features
    # remote source
    cdef int request_fd
    cdef int last_request_area
    cdef int request_timeout_ms
    cdef readonly uint64_t requests
    cdef readonly uint64_t requested_pages
    cdef readonly uint64_t received_pages
    cdef readonly uint64_t received_zero_pages
    cdef readonly uint64_t duplicate_pages
    cdef int receiving            # receive() is inside its GIL-free loop
    cdef uint64_t upto[2]         # per channel: every page record before this stream
                                  # offset is in place (what the source may release)
    cdef int rp_lock              # one writer at a time on the return path
    cdef public bint exit_on_failure  # remote areas: a failure ends the process (see _die)
    cdef int format_error         # receive(): 1 bad record, 2 unknown block, 3 page past block
    cdef int64_t format_offset

    def __cinit__(self):
        self.uffd = -1
        self.stop_fd = -1
        self.request_fd = -1
        self.last_request_area = -1
        self.request_timeout_ms = 10000

    def __init__(self, uint64_t window_pages=16, double spin_us=0.0):
        cdef uffdio_api api
        if window_pages < 1 or window_pages > 4096:
            raise ValueError("window_pages must be 1..4096")
        self.exports = []
        self.window_pages = window_pages
        self.spin_ns = <uint64_t>(spin_us * 1000.0)
        self.areas = <Area *>calloc(MAX_AREAS, sizeof(Area))
        self.views = <Py_buffer *>calloc(2 * MAX_AREAS, sizeof(Py_buffer))
        self.lat = <uint64_t *>malloc(MAX_LATENCIES * sizeof(uint64_t))
        if self.areas == NULL or self.views == NULL or self.lat == NULL:
            raise MemoryError()
        self.uffd = open_userfaultfd()
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        api.features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS
        if ioctl(self.uffd, UFFDIO_API, &api) != 0:
            api.features = 0            # an older kernel: anonymous memory only
            if ioctl(self.uffd, UFFDIO_API, &api) != 0:
                raise OSError(errno, f"UFFDIO_API: {os.strerror(errno)}")
        self.features = api.features
        self.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.stop_fd < 0:
            raise OSError(errno, "eventfd")

    def __dealloc__(self):
        self._release()
        free(self.areas)
        free(self.views)
        free(self.lat)

    cdef void _release(self) noexcept:
        cdef int i
        for i in range(self.nareas):
            free(self.areas[i].claimed)
            free(self.areas[i].requested)
            free(self.areas[i].zero_known)
            free(self.areas[i].fault_ns)
            self.areas[i].claimed = NULL
            self.areas[i].requested = NULL
            self.areas[i].zero_known = NULL
            self.areas[i].fault_ns = NULL
        self.nareas = 0
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        self.nviews = 0
        if self.uffd >= 0:
            close(self.uffd)
            self.uffd = -1
        if self.stop_fd >= 0:
            close(self.stop_fd)
            self.stop_fd = -1

    def close(self):
        """Give back the memory exports and close the userfaultfd (closing it also
        unregisters every area).  The loops must have returned."""
        self._release()

    cdef Py_buffer *_export(self, obj) except NULL:
        cdef Py_buffer *view = &self.views[self.nviews]
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
        self.nviews += 1
        return view

    def add_area(self, region, source=None, present=None, name=None):
        """Register ``region`` (MISSING mode).  Local source: its pages come from
        ``source`` (same length or longer) where ``present`` has the page's bit, else
        they are zero.  Remote source (``source`` None): pages are asked for on the
        request fd and placed by ``receive``; ``name`` is the block's idstr there, and
        ``present`` marks the pages already in place (arrived before registration; never
        asked for).  Returns the area's index."""
        cdef Py_buffer *r
        cdef Py_buffer *s
        cdef Py_buffer pview
        cdef uffdio_register reg
        cdef Area *a
        cdef uint64_t nwords
        cdef bytes encoded
        if self.nareas >= MAX_AREAS:
            raise ValueError(f"at most {MAX_AREAS} areas")
        r = self._export(region)
        if <uint64_t>r.buf % PAGE or r.len % PAGE or r.len == 0:
            raise ValueError("a userfaultfd area must be whole, aligned pages")
        a = &self.areas[self.nareas]
        memset(a, 0, sizeof(Area))
        a.kind = AREA_LOCAL if source is not None else AREA_REMOTE
        a.base = <uint64_t>r.buf
        a.length = r.len
        a.npages = r.len // PAGE
        nwords = (a.npages + 63) // 64
        encoded = (name or "").encode()
        if len(encoded) > 255:
            raise ValueError("a block name holds at most 255 bytes")
        memcpy(a.name, <const char *>encoded, len(encoded))
        a.name_len = len(encoded)
        if source is not None:
            if present is None:
                raise ValueError("a local source needs its bitmap of present pages")
            s = self._export(source)
            if s.len < r.len:
                raise ValueError("the source is shorter than the region")
            PyObject_GetBuffer(present, &pview, PyBUF_SIMPLE)
            try:
                if <uint64_t>pview.len * 8 < a.npages:
                    raise ValueError("the present bitmap is shorter than the region")
            finally:
                PyBuffer_Release(&pview)
            # the bitmap must outlive the server: keep our own copy
            kept = bytes(present)
            self.exports.append(kept)
            a.present = <const unsigned char *><char *>kept
            a.src = <const unsigned char *>s.buf
        a.claimed = <uint64_t *>calloc(nwords, 8)
        if a.claimed == NULL:
            raise MemoryError()
        if source is None:
            if not encoded:
                raise ValueError("a remote area needs its block name")
            a.requested = <uint64_t *>calloc(nwords, 8)
            a.zero_known = <uint64_t *>calloc(nwords, 8)
            a.fault_ns = <uint64_t *>calloc(a.npages, 8)
            if a.requested == NULL or a.zero_known == NULL or a.fault_ns == NULL:
                raise MemoryError()

        memset(&reg, 0, sizeof(reg))
        reg.range.start = a.base
        reg.range.len = a.length
        reg.mode = UFFDIO_REGISTER_MODE_MISSING
        if ioctl(self.uffd, UFFDIO_REGISTER, &reg) != 0:
            raise OSError(errno, f"UFFDIO_REGISTER: {os.strerror(errno)}")
        if source is None and present is not None:
            self._mark_present(a, present)
        self.total_pages += a.npages
        self.nareas += 1
        return self.nareas - 1

    cdef int _mark_present(self, Area *a, present) except -1:
        """The pages whose bit is set are in place already.  Zero pages that arrived as
        ZERO records on fresh memory were never touched (/proc/self/pagemap tells which):
        a fault there gets the zero page on the spot, nothing is asked for — mapping them
        all now would cost ~1.4 us a page of downtime."""
        cdef Py_buffer view
        cdef uint64_t i, j, k, p, n = 0
        cdef uint64_t entries[512]
        cdef int pm
        cdef ssize_t got
        cdef const unsigned char *bits
        PyObject_GetBuffer(present, &view, PyBUF_SIMPLE)
        pm = c_open(b"/proc/self/pagemap", O_RDONLY_ | O_CLOEXEC)
        try:
            if <uint64_t>view.len * 8 < a.npages:
                raise ValueError("the bitmap is shorter than the area")
            if pm < 0:
                raise OSError(errno, "/proc/self/pagemap")
            bits = <const unsigned char *>view.buf
            i = 0
            while i < a.npages:
                j = min(<uint64_t>512, a.npages - i)
                got = pread(pm, entries, j * 8, (a.base // PAGE + i) * 8)
                if got != <ssize_t>(j * 8):
                    raise OSError(errno, "reading /proc/self/pagemap")
                for k in range(j):
                    p = i + k
                    if (bits[p >> 3] >> (p & 7)) & 1:
                        n += 1
                        if (entries[k] >> 63) & 1:
                            a.claimed[p >> 6] |= (<uint64_t>1) << (p & 63)
                        else:                       # arrived as zero, never touched
                            a.zero_known[p >> 6] |= (<uint64_t>1) << (p & 63)
                i += j
        finally:
            if pm >= 0:
                close(pm)
            PyBuffer_Release(&view)
        a.placed = n
        self.placed_pages += n
        return 0

    def set_remote(self, int request_fd, double timeout=10.0):
        """Faults on remote areas become page requests written to ``request_fd``."""
        self.request_fd = request_fd
        self.request_timeout_ms = <int>(timeout * 1000)

    # -- placing --------------------------------------------------------------------------

    cdef int _place_window(self, Area *a, uint64_t first, uint64_t count,
                           uint64_t *placed_out) noexcept nogil:
        """Claim the unclaimed pages of [first, first+count) and place them, one ioctl
        per run of the same kind.  Returns 0, or -1 on a hard error (in self.error)."""
        cdef uint64_t i = first
        cdef uint64_t end = first + count
        cdef uint64_t j
        cdef uint64_t bit
        cdef bint data
        cdef int rc
        placed_out[0] = 0
        while i < end:
            bit = <uint64_t>1 << (i & 63)
            if qf_fetch_or(&a.claimed[i >> 6], bit) & bit:
                i += 1                  # someone else places it (and wakes its waiters)
                continue
            data = (a.present[i >> 3] >> (i & 7)) & 1
            j = i + 1
            while j < end and ((a.present[j >> 3] >> (j & 7)) & 1) == data:
                bit = <uint64_t>1 << (j & 63)
                if qf_fetch_or(&a.claimed[j >> 6], bit) & bit:
                    break
                j += 1
            rc = self._place(a, i, j - i, data)
            if rc < 0:
                return -1
            placed_out[0] += j - i
            i = j
        qf_add(&a.placed, placed_out[0])
        qf_add(&self.placed_pages, placed_out[0])
        return 0

    cdef int _place(self, Area *a, uint64_t first, uint64_t n, bint data) noexcept nogil:
        """Place pages [first, first+n) of a local area from its source."""
        if data:
            return self._copy(a.base + first * PAGE, <uint64_t>a.src + first * PAGE, n)
        return self._zero(a.base + first * PAGE, n)

    cdef int _copy(self, uint64_t dst, uint64_t src, uint64_t n) noexcept nogil:
        """UFFDIO_COPY n pages (waking their waiters): partial progress, EAGAIN and a
        page already present (EEXIST) are stepped over.  -1 on a real error."""
        cdef uffdio_copy cp
        cdef uint64_t done = 0
        while done < n:
            cp.dst = dst + done * PAGE
            cp.src = src + done * PAGE
            cp.len = (n - done) * PAGE
            cp.mode = 0
            cp.copy = 0
            if ioctl(self.uffd, UFFDIO_COPY, &cp) == 0:
                return 0
            if cp.copy > 0:
                done += <uint64_t>cp.copy // PAGE
            elif errno == EEXIST:
                qf_add(&self.eexist, 1)
                done += 1
            elif errno != EAGAIN:
                self.error = errno
                self.fail_addr = dst + done * PAGE
                return -1
        return 0

    cdef int _zero(self, uint64_t dst, uint64_t n) noexcept nogil:
        """UFFDIO_ZEROPAGE n pages, as _copy."""
        cdef uffdio_zeropage zp
        cdef uint64_t done = 0
        while done < n:
            zp.range.start = dst + done * PAGE
            zp.range.len = (n - done) * PAGE
            zp.mode = 0
            zp.zeropage = 0
            if ioctl(self.uffd, UFFDIO_ZEROPAGE, &zp) == 0:
                qf_add(&self.zero_pages, n - done)
                return 0
            if zp.zeropage > 0:
                qf_add(&self.zero_pages, <uint64_t>zp.zeropage // PAGE)
                done += <uint64_t>zp.zeropage // PAGE
            elif errno == EEXIST:
                qf_add(&self.eexist, 1)
                done += 1
            elif errno != EAGAIN:
                self.error = errno
                self.fail_addr = dst + done * PAGE
                return -1
        return 0

    cdef Area *_area_of(self, uint64_t addr) noexcept nogil:
        cdef int i
        for i in range(self.nareas):
            if self.areas[i].base <= addr < self.areas[i].base + self.areas[i].length:
                return &self.areas[i]
        return NULL

    # -- the loops ------------------------------------------------------------------------

    cdef int _serve_loop(self) noexcept nogil:
        cdef uffd_msg msgs[64]
        cdef pollfd fds[2]
        cdef ssize_t n
        cdef int k
        cdef uint64_t t0, spin_until, page, first, placed
        cdef Area *a
        fds[0].fd = self.uffd
        fds[0].events = POLLIN
        fds[1].fd = self.stop_fd
        fds[1].events = POLLIN
        spin_until = 0
        while not qf_load_int(&self.stopping):
            n = read(self.uffd, msgs, sizeof(msgs))
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    self.error = errno
                    return -1
                if now_ns() < spin_until:
                    continue            # busy-wait a little: a wake-up costs more
                fds[0].revents = 0
                fds[1].revents = 0
                if poll(fds, 2, -1) < 0 and errno != EINTR:
                    self.error = errno
                    return -1
                continue
            t0 = now_ns()
            for k in range(<int>(n // sizeof(uffd_msg))):
                if msgs[k].event != UFFD_EVENT_PAGEFAULT:
                    continue
                a = self._area_of(msgs[k].arg.pagefault.address)
                if a == NULL:
                    continue
                page = (msgs[k].arg.pagefault.address - a.base) // PAGE
                if a.requested != NULL:
                    if self._request(a, page, t0) < 0:
                        return -1
                    self.faults += 1
                    continue
                first = page - page % self.window_pages
                if first + self.window_pages > a.npages:
                    first = a.npages - self.window_pages if a.npages > self.window_pages else 0
                if self._place_window(a, first, min(self.window_pages, a.npages - first),
                                      &placed) < 0:
                    return -1
                self.faults += 1
                self.fault_pages += placed
                if self.nlat < <uint64_t>MAX_LATENCIES:
                    self.lat[self.nlat] = now_ns() - t0
                    self.nlat += 1
            spin_until = now_ns() + self.spin_ns
        return 0

    cdef int _request(self, Area *a, uint64_t page, uint64_t t0) noexcept nogil:
        """Ask for the faulting page and the following pages of its window that are
        neither in place nor asked for yet: one REQ_PAGES(_ID) message."""
        cdef uint64_t end = page + self.window_pages
        cdef uint64_t j = page
        cdef uint64_t bit
        cdef unsigned char msg[4 + 12 + 256]
        cdef int n, idx
        bit = <uint64_t>1 << (page & 63)
        if a.zero_known[page >> 6] & bit:
            # zero, known here: place the zero page at once (and wake the faulter)
            if not (qf_fetch_or(&a.claimed[page >> 6], bit) & bit):
                return self._zero(a.base + page * PAGE, 1)
            return 0
        if (qf_load(&a.claimed[page >> 6]) >> (page & 63)) & 1:
            return 0                    # arriving or in place: the copy will wake us
        if a.fault_ns[page] == 0:
            a.fault_ns[page] = t0
        if end > a.npages:
            end = a.npages
        while j < end:
            bit = <uint64_t>1 << (j & 63)
            if (qf_load(&a.claimed[j >> 6]) & bit) or (a.requested[j >> 6] & bit):
                if j == page:
                    return 0            # asked for already
                break
            a.requested[j >> 6] |= bit
            j += 1
        idx = <int>(a - self.areas)
        # be16 type, be16 length, be64 start, be32 length [, counted block name]
        _be64(msg + 4, page * PAGE)
        _be32(msg + 12, <uint32_t>((j - page) * PAGE))
        n = 12
        if idx != self.last_request_area:
            msg[16] = <unsigned char>a.name_len
            memcpy(msg + 17, a.name, a.name_len)
            n += 1 + a.name_len
            _be16(msg, 3)               # REQ_PAGES_ID
            self.last_request_area = idx
        else:
            _be16(msg, 4)               # REQ_PAGES: the same block as the last request
        _be16(msg + 2, <unsigned int>n)
        if self._send(msg, 4 + n) < 0:
            self.error = errno
            return -1
        self.requests += 1
        self.requested_pages += j - page
        return 0

    cdef int _send(self, const unsigned char *msg, size_t n) noexcept nogil:
        """Write one whole return path message; the fault thread and Python senders
        share the fd, so messages never interleave."""
        cdef int rc
        qf_lock(&self.rp_lock)
        rc = _write_all(self.request_fd, msg, n, self.request_timeout_ms)
        qf_unlock(&self.rp_lock)
        return rc

    def send_message(self, unsigned int msg_type, bytes payload=b""):
        """Write a return path message (be16 type, be16 length, payload) between the
        fault thread's requests, GIL released."""
        cdef bytes msg = msg_type.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
        cdef const unsigned char *p = <const unsigned char *>msg
        cdef size_t n = len(msg)
        cdef int rc
        if self.request_fd < 0:
            raise ValueError("no return path: set_remote() first")
        with nogil:
            rc = self._send(p, n)
        if rc < 0:
            raise OSError(errno, f"return path: {os.strerror(errno)}")

    def placed_upto(self, int channel):
        """The offset in ``channel``'s stream (0: main, 1: preempt) before which every
        page record is in place."""
        if not 0 <= channel < 2:
            raise ValueError("channel is 0 or 1")
        return qf_load(&self.upto[channel])

    def receive(self, QEMUFile f not None, int channel=0):
        """Place the pages of a postcopy stream as they arrive on ``f`` (GIL released):
        PART/END sections of RAM page records, until EOF.  ``channel`` (0: main, 1:
        preempt) names the stream for ``placed_upto``.  Returns when the stream ends;
        raises on a broken stream or connection."""
        cdef int rc
        if not 0 <= channel < 2:
            raise ValueError("channel is 0 or 1")
        self._require(AREA_REMOTE, "receive")
        if f.busy:
            raise RuntimeError("the QEMUFile is in use by another thread")
        if f.fd < 0:
            raise ValueError("receive() needs a QEMUFile over an fd")
        f.busy = True
        f.gil_free = True
        try:
            with nogil:
                qf_add_int(&self.receiving, 1)
                rc = self._receive_loop(f, &self.upto[channel])
                if rc < 0 and self.exit_on_failure:
                    self._die(f, b"receiving pages")
                qf_add_int(&self.receiving, -1)
        finally:
            f.busy = False
            f.gil_free = False
        if rc == 0:
            return
        if self.format_error:
            what = {1: "an unexpected record or section", 2: "a page of an unknown block",
                    3: "a page outside its block"}[self.format_error]
            raise FormatError(f"postcopy stream: {what}", self.format_offset)
        err = f.error
        if err is not None:
            raise err
        raise OSError(self.error, f"postcopy receive: {os.strerror(self.error)}")

    cdef int _receive_loop(self, QEMUFile f, uint64_t *upto) noexcept nogil:
        cdef unsigned char kind
        cdef uint64_t header, flags, offset
        cdef Area *a = NULL
        cdef Area *b
        cdef int i, n
        cdef unsigned char name[256]
        while True:
            if _get(f, &kind, 1) < 0:
                return -1
            if kind == 0x00:                        # EOF
                return 0
            if kind == 0x08:                        # COMMAND (PING...): skipped
                if _get(f, name, 4) < 0 or f._skip((name[2] << 8) | name[3]) < \
                        ((name[2] << 8) | name[3]):
                    return -1
                continue
            if kind != 0x02 and kind != 0x03:       # PART or END
                return self._bad(f, 1)
            if _get(f, name, 4) < 0:                # section id
                return -1
            while True:                             # records up to EOS
                if _get_be64(f, &header) < 0:
                    return -1
                flags = header & (PAGE - 1)
                offset = header & ~(PAGE - 1)
                if flags == 0x10:                   # EOS
                    qf_store(upto, <uint64_t>f._read_pos())
                    break
                if flags == 0x200:                  # MULTIFD_FLUSH
                    continue
                if not (flags & 0x20):              # no CONTINUE: a block name follows
                    if _get(f, name, 1) < 0 or _get(f, name + 1, name[0]) < 0:
                        return -1
                    a = NULL
                    for i in range(self.nareas):
                        b = &self.areas[i]
                        if b.name_len == name[0] and memcmp(b.name, name + 1, name[0]) == 0:
                            a = b
                    if a == NULL:
                        return self._bad(f, 2)
                elif a == NULL:
                    return self._bad(f, 1)
                flags &= ~(<uint64_t>0x20)
                if flags != 0x08 and flags != 0x02:
                    return self._bad(f, 1)
                if offset >= a.length:
                    return self._bad(f, 3)
                if self._receive_page(f, a, offset // PAGE, flags == 0x08) < 0:
                    return -1
            if f.buf_fill - f.buf_index >= 1 and f.buf[f.buf_index] == 0x7E or \
                    f.buf_fill - f.buf_index < 1 and f._peek(1, 0) == 1 and \
                    f.buf[f.buf_index] == 0x7E:
                if _get(f, name, 5) < 0:            # footer
                    return -1

    cdef int _receive_page(self, QEMUFile f, Area *a, uint64_t page, bint data) noexcept nogil:
        cdef uint64_t bit = <uint64_t>1 << (page & 63)
        cdef unsigned char fill
        cdef unsigned char scratch[4096]
        cdef uint64_t src, k
        if qf_fetch_or(&a.claimed[page >> 6], bit) & bit:
            qf_add(&self.duplicate_pages, 1)    # in place already: skip its bytes
            if data:
                return 0 if f._skip(PAGE) == <Py_ssize_t>PAGE else self._short(f)
            return 0 if _get(f, &fill, 1) == 0 else -1
        if data:
            if f.buf_fill - f.buf_index >= <Py_ssize_t>PAGE:
                src = <uint64_t>(f.buf + f.buf_index)     # straight from the stream buffer
                f.buf_index += PAGE
            else:
                if f._get_into(scratch, PAGE) < <Py_ssize_t>PAGE:
                    return self._short(f)
                src = <uint64_t>scratch
            if self._copy(a.base + page * PAGE, src, 1) < 0:
                return -1
            qf_add(&self.received_pages, 1)
        else:
            if _get(f, &fill, 1) < 0:
                return -1
            if fill != 0:
                return self._bad(f, 1)
            if self._zero(a.base + page * PAGE, 1) < 0:
                return -1
            qf_add(&self.received_zero_pages, 1)
        qf_add(&a.placed, 1)
        qf_add(&self.placed_pages, 1)
        if a.fault_ns[page]:
            k = qf_add(&self.nlat, 1) - 1       # two receivers may place at once
            if k < <uint64_t>MAX_LATENCIES:
                self.lat[k] = now_ns() - a.fault_ns[page]
        return 0

    cdef int _where(self, char *out, size_t size) noexcept nogil:
        """The page that could not be placed, in words (empty when that was not it)."""
        cdef Area *a = self._area_of(self.fail_addr) if self.fail_addr else NULL
        out[0] = 0
        if a == NULL:
            return 0
        return snprintf(out, size, " placing page %llu of block %.*s%s",
                        <unsigned long long>((self.fail_addr - a.base) // PAGE), a.name_len,
                        a.name,
                        b" from the snapshot" if a.kind == AREA_LOCAL else b"")

    cdef void _die(self, QEMUFile f, const char *what) noexcept nogil:
        """Memory that lost its page source cannot wake the threads waiting for pages
        (and one of them may hold the GIL): say why on stderr, without Python, and end
        the process with status 1."""
        cdef char line[768]
        cdef char where[320]
        cdef int n
        cdef int err = self.error
        cdef const char *reason = b"the stream ended early"
        cdef const char *hint = b""
        cdef Area *a = self._area_of(self.fail_addr) if self.fail_addr else NULL
        if f is not None and err == 0 and f.last_error:
            err = -f.last_error
        if err:
            reason = strerror(err)
        self._where(where, sizeof(where))
        if a != NULL and a.kind == AREA_LOCAL and err == EFAULT:
            hint = b" (the snapshot file no longer holds it: was it cut or replaced while " \
                   b"in use?)"
        if self.format_error:
            n = snprintf(line, sizeof(line), "qfram: postcopy failed while %s: broken stream "
                         "(%d) at byte %lld\n", what, self.format_error,
                         <long long>self.format_offset)
        else:
            n = snprintf(line, sizeof(line), "qfram: %s failed while %s%s: %s%s\n",
                         b"lazy restore" if a != NULL and a.kind == AREA_LOCAL else
                         b"postcopy", what, where, reason, hint)
        write(2, line, n)
        _exit(1)

    def _failure(self):
        """What went wrong in a loop, for an exception."""
        cdef char where[320]
        self._where(where, sizeof(where))
        return f"{where.decode(errors='replace').strip()}: {os.strerror(self.error)}" \
            if where[0] else os.strerror(self.error)

    cdef int _bad(self, QEMUFile f, int what) noexcept nogil:
        self.format_error = what
        self.format_offset = f._read_pos()
        return -1

    cdef int _short(self, QEMUFile f) noexcept nogil:
        self.error = EPIPE
        return -1

    def serve_faults(self):
        """Serve faults until stop(); run it on a thread of its own (GIL released)."""
        cdef int rc
        with nogil:
            rc = self._serve_loop()
            if rc < 0 and self.exit_on_failure:
                self._die(None, b"serving faults")
        if rc < 0:
            raise OSError(self.error, f"fault server: {self._failure()}")

    cdef int _fill_loop(self) noexcept nogil:
        cdef int i
        cdef uint64_t first, n, placed
        cdef Area *a
        for i in range(self.nareas):
            a = &self.areas[i]
            first = 0
            while first < a.npages:
                if qf_load_int(&self.stopping):
                    return 0
                n = min(<uint64_t>256, a.npages - first)
                if self._place_window(a, first, n, &placed) < 0:
                    return -1
                self.background_pages += placed
                first += n
        return 0

    cdef int _require(self, AreaKind kind, str what) except -1:
        cdef int i
        for i in range(self.nareas):
            if self.areas[i].kind != kind:
                raise ValueError(f"{what} needs areas with a "
                                 f"{'local' if kind == AREA_LOCAL else 'remote'} source; "
                                 f"area {i} has a "
                                 f"{'remote' if kind == AREA_LOCAL else 'local'} one")
        return 0

    def fill_background(self):
        """Place every page not placed yet, in order (GIL released); returns when all
        are in place or stop() was called.  Local areas only (a remote area's pages
        arrive through receive())."""
        cdef int rc
        self._require(AREA_LOCAL, "fill_background")
        with nogil:
            rc = self._fill_loop()
            # pages it claimed and could not place would be waited for forever
            if rc < 0 and self.exit_on_failure:
                self._die(None, b"filling in the background")
        if rc < 0:
            raise OSError(self.error, f"background fill: {self._failure()}")

    def stop(self):
        """Make both loops return (safe from any thread)."""
        cdef uint64_t one = 1
        qf_store_int(&self.stopping, 1)
        write(self.stop_fd, &one, 8)

    def unregister(self):
        """Stop catching faults on every area (after the fill: the memory is complete)."""
        cdef uffdio_range rng
        cdef int i
        for i in range(self.nareas):
            rng.start = self.areas[i].base
            rng.len = self.areas[i].length
            if ioctl(self.uffd, UFFDIO_UNREGISTER, &rng) != 0:
                raise OSError(errno, f"UFFDIO_UNREGISTER: {os.strerror(errno)}")

    @property
    def receiving(self):
        """How many receive() calls run without the GIL: only once they do may a Python
        thread fault on remote areas (it holds the GIL while it waits for its page)."""
        return qf_load_int(&self.receiving)

    @property
    def placed_pages(self):
        return qf_load(&self.placed_pages)

    @property
    def total_pages(self):
        return self.total_pages

    def latencies_ns(self):
        """Time from reading each fault to its pages being in place, in ns."""
        return [self.lat[i] for i in range(min(self.nlat, <uint64_t>MAX_LATENCIES))]


# ---------------------------------------------------------------------------------------
# small helpers for the postcopy wire format (no GIL)
# ---------------------------------------------------------------------------------------

cdef inline void _be16(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void _be32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _be64(unsigned char *p, uint64_t v) noexcept nogil:
    _be32(p, <uint32_t>(v >> 32))
    _be32(p + 4, <uint32_t>v)


cdef int _get(QEMUFile f, unsigned char *dst, Py_ssize_t n) noexcept nogil:
    """Exactly n bytes from f, or -1 (end of stream or error, sticky in f)."""
    if n == 0:
        return 0
    if f.buf_fill - f.buf_index >= n:
        memcpy(dst, f.buf + f.buf_index, n)
        f.buf_index += n
        return 0
    return 0 if f._get_into(dst, n) == n else -1


cdef int _get_be64(QEMUFile f, uint64_t *out) noexcept nogil:
    cdef unsigned char b[8]
    cdef int i
    if _get(f, b, 8) < 0:
        return -1
    out[0] = 0
    for i in range(8):
        out[0] = (out[0] << 8) | b[i]
    return 0


cdef int _write_all(int fd, const unsigned char *p, size_t n, int timeout_ms) noexcept nogil:
    """Write all of p to a (possibly non-blocking) fd, waiting at most timeout_ms for
    room each time; errno set on failure."""
    cdef ssize_t k
    cdef pollfd pfd
    while n > 0:
        k = write(fd, p, n)
        if k > 0:
            p += k
            n -= k
            continue
        if k < 0 and errno == EINTR:
            continue
        if k < 0 and errno == EAGAIN:
            pfd.fd = fd
            pfd.events = POLLOUT
            pfd.revents = 0
            if poll(&pfd, 1, timeout_ms) == 0:
                qf_set_errno(ETIMEDOUT)
                return -1
            continue
        return -1
    return 0


# ---------------------------------------------------------------------------------------
# dirty tracking: asynchronous write protection + PAGEMAP_SCAN
# ---------------------------------------------------------------------------------------

cdef class DirtyTracker:
    """The pages of a region written since the last ``collect()``, found with
    userfaultfd asynchronous write protection (writes are never stopped: the kernel
    only notes them) and the PAGEMAP_SCAN ioctl, which reads and re-arms them at once.
    Needs Linux 6.7+; ``DirtyTracker.available()`` says whether this kernel has it."""
    cdef int uffd
    cdef int pagemap
    cdef uint64_t base
    cdef uint64_t length
    cdef Py_buffer view
    cdef bint have_view
    cdef qf_page_region *vec
    cdef uint64_t vec_len

    def __cinit__(self):
        self.uffd = -1
        self.pagemap = -1

    def __init__(self, region):
        cdef uffdio_api api
        cdef uffdio_register reg
        cdef uffdio_writeprotect wp
        PyObject_GetBuffer(region, &self.view, PyBUF_SIMPLE)
        self.have_view = True
        self.base = <uint64_t>self.view.buf
        self.length = self.view.len
        if self.base % PAGE or self.length % PAGE:
            raise ValueError("a tracked region must be whole, aligned pages")
        self.vec_len = 4096
        self.vec = <qf_page_region *>malloc(self.vec_len * sizeof(qf_page_region))
        if self.vec == NULL:
            raise MemoryError()
        self.uffd = open_userfaultfd()
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        api.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
        if ioctl(self.uffd, UFFDIO_API, &api) != 0 or not (api.features & UFFD_FEATURE_WP_ASYNC):
            raise OSError(errno or EINVAL, "userfaultfd asynchronous write protection is not "
                                           "available (Linux 6.7+)")
        memset(&reg, 0, sizeof(reg))
        reg.range.start = self.base
        reg.range.len = self.length
        reg.mode = UFFDIO_REGISTER_MODE_WP
        if ioctl(self.uffd, UFFDIO_REGISTER, &reg) != 0:
            raise OSError(errno, f"UFFDIO_REGISTER (write protect): {os.strerror(errno)}")
        memset(&wp, 0, sizeof(wp))
        wp.range.start = self.base
        wp.range.len = self.length
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP
        if ioctl(self.uffd, UFFDIO_WRITEPROTECT, &wp) != 0:
            raise OSError(errno, f"UFFDIO_WRITEPROTECT: {os.strerror(errno)}")
        self.pagemap = c_open(b"/proc/self/pagemap", O_RDONLY_ | O_CLOEXEC)
        if self.pagemap < 0:
            raise OSError(errno, "/proc/self/pagemap")

    @staticmethod
    def available():
        try:
            probe = DirtyTracker(memoryview(_probe_region()))
        except OSError:
            return False
        probe.close()
        return True

    def collect(self, bitmap):
        """OR the pages written since the last call into ``bitmap`` (bit i = page i,
        writable, LSB first) and start watching them again.  Returns how many."""
        cdef Py_buffer b
        cdef qf_pm_scan_arg arg
        cdef uint64_t start = self.base
        cdef long n, k
        cdef uint64_t p, first, last, count = 0
        cdef unsigned char *bits
        PyObject_GetBuffer(bitmap, &b, PyBUF_WRITABLE)
        try:
            if <uint64_t>b.len * 8 < self.length // PAGE:
                raise ValueError("the bitmap is shorter than the region")
            bits = <unsigned char *>b.buf
            with nogil:
                while start < self.base + self.length:
                    memset(&arg, 0, sizeof(arg))
                    arg.size = sizeof(arg)
                    arg.flags = QF_PM_SCAN_WP_MATCHING | QF_PM_SCAN_CHECK_WPASYNC
                    arg.start = start
                    arg.end = self.base + self.length
                    arg.vec = <uint64_t>self.vec
                    arg.vec_len = self.vec_len
                    arg.category_mask = QF_PAGE_IS_WRITTEN
                    arg.return_mask = QF_PAGE_IS_WRITTEN
                    n = ioctl(self.pagemap, QF_PAGEMAP_SCAN, &arg)
                    if n < 0:
                        break
                    for k in range(n):
                        first = (self.vec[k].start - self.base) // PAGE
                        last = (self.vec[k].end - self.base) // PAGE
                        for p in range(first, last):
                            bits[p >> 3] |= <unsigned char>(1 << (p & 7))
                        count += last - first
                    if arg.walk_end <= start:
                        break
                    start = arg.walk_end
            if n < 0:
                raise OSError(errno, f"PAGEMAP_SCAN: {os.strerror(errno)}")
            return count
        finally:
            PyBuffer_Release(&b)

    def close(self):
        if self.uffd >= 0:
            close(self.uffd)         # unregisters: the region is ordinary memory again
            self.uffd = -1
        if self.pagemap >= 0:
            close(self.pagemap)
            self.pagemap = -1
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False

    def __dealloc__(self):
        self.close()
        free(self.vec)


def _probe_region():
    import mmap
    return mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
