# PAGEMAP_SCAN (Linux 6.7+): the pages of a region a scan picks, and what is done with
# them — the dirty tracker of precopy rounds (userfaultfd asynchronous write protection)
# and the private copies of a copy-on-write snapshot mapping (dirty-only reset).
# Included by _uffd.pyx (it shares open_userfaultfd and _register).

cdef class PageScan:
    """Runs of pages of a region picked by PAGEMAP_SCAN (Linux 6.7+), and what to do
    with them: the base of DirtyTracker and PrivateCopies, which say which pages."""
    cdef int pagemap
    cdef uint64_t base
    cdef uint64_t length
    cdef Py_buffer view
    cdef bint have_view
    cdef qf_page_region *vec
    cdef uint64_t vec_len
    # the scan: its flags, and the categories a page must have (after inverting those
    # in `inverted`), may have any of, and are reported
    cdef uint64_t scan_flags, inverted, mask, anyof
    cdef bint whole_tables

    def __cinit__(self):
        self.pagemap = -1

    def __init__(self, region):
        PyObject_GetBuffer(region, &self.view, PyBUF_SIMPLE)
        self.have_view = True
        self.base = <uint64_t>self.view.buf
        self.length = self.view.len
        if self.base % PAGE or self.length % PAGE:
            raise ValueError("a scanned region must be whole, aligned pages")
        self.vec_len = 4096
        self.vec = <qf_page_region *>malloc(self.vec_len * sizeof(qf_page_region))
        if self.vec == NULL:
            raise MemoryError()
        self.pagemap = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if self.pagemap < 0:
            raise OSError(errno, "/proc/self/pagemap")

    cdef long _scan(self, uint64_t start, uint64_t *walk_end) noexcept nogil:
        """PAGEMAP_SCAN [start, end of region): the runs of pages it picks, into
        self.vec.  How many runs (-1: errno), and where the walk stopped."""
        cdef qf_pm_scan_arg arg
        cdef long n
        memset(&arg, 0, sizeof(arg))
        arg.size = sizeof(arg)
        arg.flags = self.scan_flags
        arg.start = start
        arg.end = self.base + self.length
        arg.vec = <uint64_t>self.vec
        arg.vec_len = self.vec_len
        arg.category_inverted = self.inverted
        arg.category_mask = self.mask
        arg.category_anyof_mask = self.anyof
        arg.return_mask = self.mask | self.anyof
        n = ioctl(self.pagemap, QF_PAGEMAP_SCAN, &arg)
        walk_end[0] = arg.walk_end
        return n

    def collect(self, bitmap):
        """OR the pages written since the last call into ``bitmap`` (bit i = page i,
        writable, LSB first) and start watching them again.  Returns how many."""
        cdef Py_buffer b
        cdef uint64_t start = self.base, walk_end = 0
        cdef long n = 0, k
        cdef uint64_t p, first, last, count = 0
        cdef unsigned char *bits
        PyObject_GetBuffer(bitmap, &b, PyBUF_WRITABLE)
        try:
            if <uint64_t>b.len * 8 < self.length // PAGE:
                raise ValueError("the bitmap is shorter than the region")
            bits = <unsigned char *>b.buf
            with nogil:
                while start < self.base + self.length:
                    n = self._scan(start, &walk_end)
                    if n < 0:
                        break
                    for k in range(n):
                        first = (self.vec[k].start - self.base) // PAGE
                        last = (self.vec[k].end - self.base) // PAGE
                        for p in range(first, last):
                            qf_set_bit(bits, p, True)
                        count += last - first
                    if walk_end <= start:
                        break
                    start = walk_end
            if n < 0:
                raise OSError(errno, f"PAGEMAP_SCAN: {os.strerror(errno)}")
            return count
        finally:
            PyBuffer_Release(&b)

    def revert_written(self):
        """Drop every page the scan picks (``MADV_DONTNEED``) and start watching them
        again: in a private mapping of a file the next touch sees the file's bytes, in
        private anonymous memory zeros.  Returns (pages, runs).  The scan hands its
        runs straight to the kernel, many at a time (``process_madvise``), with no
        bitmap and no call per run from Python.  With ``whole_tables`` each run is
        widened to the 2 MiB its page table maps (see PrivateCopies)."""
        cdef uint64_t start = self.base, walk_end = 0
        cdef long n = 0, k, m
        cdef uint64_t pages = 0, runs = 0, lo, hi
        cdef int err = 0
        cdef iovec *iov = <iovec *>malloc(self.vec_len * sizeof(iovec))
        if iov == NULL:
            raise MemoryError()
        try:
            with nogil:
                while start < self.base + self.length:
                    n = self._scan(start, &walk_end)
                    if n < 0:
                        err = errno
                        break
                    m = 0
                    for k in range(n):
                        pages += (self.vec[k].end - self.vec[k].start) // PAGE
                        lo, hi = self.vec[k].start, self.vec[k].end
                        self._dropping(lo, hi)
                        if self.whole_tables:
                            lo = max(lo & ~(TABLE_BYTES - 1), self.base)
                            hi = min((hi + TABLE_BYTES - 1) & ~(TABLE_BYTES - 1),
                                     self.base + self.length)
                        if m and <uint64_t>iov[m - 1].iov_base + iov[m - 1].iov_len >= lo:
                            iov[m - 1].iov_len = hi - <uint64_t>iov[m - 1].iov_base
                            continue        # the same table as the last run's
                        iov[m].iov_base = <void *>lo
                        iov[m].iov_len = hi - lo
                        m += 1
                    runs += n
                    if _drop_ranges(iov, m) < 0:
                        err = errno
                        break
                    if walk_end <= start:
                        break
                    start = walk_end
            if err:
                raise OSError(err, f"reverting written pages: {os.strerror(err)}")
            return pages, runs
        finally:
            free(iov)

    cdef void _dropping(self, uint64_t start, uint64_t end) noexcept nogil:
        """[start, end) is about to be dropped: a subclass keeps its books here."""
        pass

    def close(self):
        self._close()

    cdef void _close(self) noexcept:
        if self.pagemap >= 0:
            close(self.pagemap)
            self.pagemap = -1
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False

    def __dealloc__(self):
        self._close()
        free(self.vec)


cdef class DirtyTracker(PageScan):
    """The pages of a region written since the last ``collect()`` (or
    ``revert_written()``), found with userfaultfd asynchronous write protection
    (writes are never stopped: the kernel only notes them) and PAGEMAP_SCAN, which
    reads and re-arms them at once.  Needs Linux 6.7+; ``DirtyTracker.available()``
    says whether this kernel has it."""
    cdef int uffd

    def __cinit__(self):
        self.uffd = -1

    def __init__(self, region):
        cdef uffdio_api api
        cdef uffdio_writeprotect wp
        PageScan.__init__(self, region)
        self.scan_flags = QF_PM_SCAN_WP_MATCHING | QF_PM_SCAN_CHECK_WPASYNC
        self.mask = QF_PAGE_IS_WRITTEN
        self.uffd = open_userfaultfd()
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        api.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
        if ioctl(self.uffd, UFFDIO_API, &api) != 0 or not (api.features & UFFD_FEATURE_WP_ASYNC):
            raise OSError(errno or EINVAL, "userfaultfd asynchronous write protection is not "
                                           "available (Linux 6.7+)")
        _register(self.uffd, self.base, self.length, UFFDIO_REGISTER_MODE_WP, "write protect")
        memset(&wp, 0, sizeof(wp))
        wp.range.start = self.base
        wp.range.len = self.length
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP
        if ioctl(self.uffd, UFFDIO_WRITEPROTECT, &wp) != 0:
            raise OSError(errno, f"UFFDIO_WRITEPROTECT: {os.strerror(errno)}")

    @staticmethod
    def available():
        try:
            probe = DirtyTracker(memoryview(_probe_region()))
        except OSError:
            return False
        probe.close()
        return True

    cdef void _close(self) noexcept:
        if self.uffd >= 0:
            close(self.uffd)         # unregisters: the region is ordinary memory again
            self.uffd = -1
        PageScan._close(self)


cdef class PrivateCopies(PageScan):
    """The pages of a private file mapping (``MAP_PRIVATE``) that were written: a write
    there makes the process its own anonymous copy of the page, so "present or
    swapped, and not the file's page" is exactly "written since mapped or since the
    last revert".  No write protection, no fault on a write; the scan walks only the
    page tables that exist.  ``revert_written()`` drops the copies: the file's bytes
    show through again."""

    def __init__(self, region):
        PageScan.__init__(self, region)
        # Dropping single pages leaves their page tables behind (the kernel frees an
        # empty one only when a zap covers all of it), and every later scan walks every
        # table left: after a while, the whole mapping's.  Dropping the whole 2 MiB of
        # a table a written page is in frees the table; the file pages only read there
        # come back on their next touch from the page cache (a minor fault maps 16).
        self.whole_tables = True
        # not the file's page, nor the shared zero page (a read where zero memory was
        # mapped over stale file bytes, see snapshot.map_block_private)
        self.inverted = QF_PAGE_IS_FILE | QF_PAGE_IS_PFNZERO
        self.mask = QF_PAGE_IS_FILE | QF_PAGE_IS_PFNZERO
        self.anyof = QF_PAGE_IS_PRESENT | QF_PAGE_IS_SWAPPED


cdef int _drop_ranges(iovec *iov, long n) noexcept nogil:
    """MADV_DONTNEED on n ranges: IOV_MAX at a time through process_madvise, or one
    madvise each where this kernel does not take DONTNEED there (before 6.13)."""
    cdef long k = 0, i, batch, want
    cdef long done
    while k < n:
        batch = min(n - k, <long>IOV_MAX)
        want = 0
        for i in range(k, k + batch):
            want += iov[i].iov_len
        done = qf_process_madvise_self(&iov[k], batch, MADV_DONTNEED)
        if done != want:
            # not there, or stopped part way: the rest one by one (dropping a dropped
            # page again is harmless)
            for i in range(k, k + batch):
                if madvise(iov[i].iov_base, iov[i].iov_len, MADV_DONTNEED) != 0:
                    return -1
        k += batch
    return 0


def _probe_region():
    import mmap
    return mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


cdef class AreaWrites(PageScan):
    """The pages of a fault server's area written since they were placed (a FaultServer
    made with ``track_writes`` places them write-protected, asynchronously), leaving out
    the zero page (UFFDIO_ZEROPAGE maps it unprotected; a write there makes a new page,
    which is found) and holes (a page dropped by the last revert and not touched since,
    which the scan of a write-protected area would call written).  Dropping them makes
    them missing again: their claim bits are cleared first, so the next touch has the
    server place them anew."""
    cdef Server *s
    cdef Area *area

    def __init__(self, region):
        PageScan.__init__(self, region)
        self.scan_flags = QF_PM_SCAN_WP_MATCHING | QF_PM_SCAN_CHECK_WPASYNC
        self.inverted = QF_PAGE_IS_PFNZERO
        self.mask = QF_PAGE_IS_WRITTEN | QF_PAGE_IS_PFNZERO
        self.anyof = QF_PAGE_IS_PRESENT | QF_PAGE_IS_SWAPPED

    cdef void _dropping(self, uint64_t start, uint64_t end) noexcept nogil:
        cdef uint64_t p, first = (start - self.area.base) // PAGE
        cdef uint64_t last = (end - self.area.base) // PAGE
        for p in range(first, last):
            qf_set_bit(self.area.claimed, p, False)
        qf_add(&self.area.placed, -(last - first))
        qf_add(&self.s.placed_pages, -(last - first))
