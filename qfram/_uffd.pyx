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
EEXIST is tolerated anyway.  Pages come from a *source*: here a mapping of the snapshot
file plus its bitmap of present pages (the mapped layout).
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.errno cimport errno, EINTR, EAGAIN, EEXIST, ENOENT, EINVAL
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK, O_RDWR, open as c_open
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport read, write, close

import os

from qfram._fast cimport pollfd, poll, POLLIN

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
    cdef readonly uint64_t features

    def __cinit__(self):
        self.uffd = -1
        self.stop_fd = -1

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
            self.areas[i].claimed = NULL
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

    def add_area(self, region, source, present):
        """Register ``region`` (MISSING mode); its pages come from ``source`` (same
        length or longer) where ``present`` has the page's bit, else they are zero.
        Returns the area's index."""
        cdef Py_buffer *r
        cdef Py_buffer *s
        cdef Py_buffer pview
        cdef uffdio_register reg
        cdef Area *a
        cdef uint64_t nwords
        if self.nareas >= MAX_AREAS:
            raise ValueError(f"at most {MAX_AREAS} areas")
        r = self._export(region)
        if <uint64_t>r.buf % PAGE or r.len % PAGE or r.len == 0:
            raise ValueError("a userfaultfd area must be whole, aligned pages")
        s = self._export(source)
        if s.len < r.len:
            raise ValueError("the source is shorter than the region")
        a = &self.areas[self.nareas]
        a.base = <uint64_t>r.buf
        a.length = r.len
        a.npages = r.len // PAGE
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
        nwords = (a.npages + 63) // 64
        a.claimed = <uint64_t *>calloc(nwords, 8)
        if a.claimed == NULL:
            raise MemoryError()
        memset(&reg, 0, sizeof(reg))
        reg.range.start = a.base
        reg.range.len = a.length
        reg.mode = UFFDIO_REGISTER_MODE_MISSING
        if ioctl(self.uffd, UFFDIO_REGISTER, &reg) != 0:
            free(a.claimed)
            a.claimed = NULL
            raise OSError(errno, f"UFFDIO_REGISTER: {os.strerror(errno)}")
        self.total_pages += a.npages
        self.nareas += 1
        return self.nareas - 1

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
        cdef uffdio_copy cp
        cdef uffdio_zeropage zp
        cdef uint64_t done = 0
        cdef int r
        while done < n:
            if data:
                cp.dst = a.base + (first + done) * PAGE
                cp.src = <uint64_t>a.src + (first + done) * PAGE
                cp.len = (n - done) * PAGE
                cp.mode = 0
                cp.copy = 0
                r = ioctl(self.uffd, UFFDIO_COPY, &cp)
                if r == 0:
                    return 0
                if cp.copy > 0:
                    done += <uint64_t>cp.copy // PAGE
                    continue
                if errno == EAGAIN:
                    continue
                if errno == EEXIST:
                    qf_add(&self.eexist, 1)
                    done += 1
                    continue
                self.error = errno
                return -1
            else:
                zp.range.start = a.base + (first + done) * PAGE
                zp.range.len = (n - done) * PAGE
                zp.mode = 0
                zp.zeropage = 0
                r = ioctl(self.uffd, UFFDIO_ZEROPAGE, &zp)
                if r == 0:
                    qf_add(&self.zero_pages, n - done)
                    return 0
                if zp.zeropage > 0:
                    qf_add(&self.zero_pages, <uint64_t>zp.zeropage // PAGE)
                    done += <uint64_t>zp.zeropage // PAGE
                    continue
                if errno == EAGAIN:
                    continue
                if errno == EEXIST:
                    qf_add(&self.eexist, 1)
                    done += 1
                    continue
                self.error = errno
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

    def serve_faults(self):
        """Serve faults until stop(); run it on a thread of its own (GIL released)."""
        cdef int rc
        with nogil:
            rc = self._serve_loop()
        if rc < 0:
            raise OSError(self.error, f"fault server: {os.strerror(self.error)}")

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

    def fill_background(self):
        """Place every page not placed yet, in order (GIL released); returns when all
        are in place or stop() was called."""
        cdef int rc
        with nogil:
            rc = self._fill_loop()
        if rc < 0:
            raise OSError(self.error, f"background fill: {os.strerror(self.error)}")

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
    def placed_pages(self):
        return qf_load(&self.placed_pages)

    @property
    def total_pages(self):
        return self.total_pages

    def latencies_ns(self):
        """Time from reading each fault to its pages being in place, in ns."""
        return [self.lat[i] for i in range(self.nlat)]
