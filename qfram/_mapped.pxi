# The mapped layout's page I/O (included by _fast.pyx): pages at fixed file offsets,
# written with pwrite straight from RAM and read with pread straight into it (GIL
# released), and the page-bitmap helpers the snapshot and journal code use.

# A run written with one pwrite is capped so that release keeps pace with the writes.
cdef size_t MAX_RUN = 8 << 20


cdef struct MappedIO:
    int fd
    unsigned char *base           # the RAM
    const unsigned char *old      # the file's current pages (mapped), or NULL
    unsigned char *present        # file bitmap: bit set = the page's bytes are in the file
    unsigned char *dirty          # only these pages (NULL: all)
    int64_t file_offset           # where page 0 lives in the file
    size_t page_size
    Py_ssize_t first
    Py_ssize_t end
    bint release
    # results
    uint64_t written
    uint64_t zeros
    uint64_t unchanged
    uint64_t released
    int err                       # errno of the first failure
    int64_t err_offset


cdef int _pwrite_all(MappedIO *io, const unsigned char *p, size_t n, int64_t off) noexcept nogil:
    cdef ssize_t k
    while n > 0:
        k = pwrite(io.fd, p, n, off)
        if k < 0:
            if errno == EINTR:
                continue
            io.err = errno
            io.err_offset = off
            return -1
        p += k
        n -= k
        off += k
    return 0


cdef void _write_mapped(MappedIO *io) noexcept nogil:
    """Write the non-zero pages of [first, end) at file_offset + i*page_size, one pwrite
    per run of adjacent pages; zero pages become holes (punched if the file had data
    there).  With `old`, pages equal to the file's are skipped (incremental).  With
    `release`, pages are released once written (zero pages at once), in runs."""
    cdef Py_ssize_t i
    cdef size_t ps = io.page_size
    cdef unsigned char *page
    cdef Py_ssize_t run_start = -1     # pending write run [run_start, run_end)
    cdef Py_ssize_t run_end = -1
    cdef Py_ssize_t hole_start = -1    # pending hole punch
    cdef Py_ssize_t hole_end = -1
    cdef char *rel_base = NULL         # pending release
    cdef size_t rel_len = 0
    cdef size_t released
    for i in range(io.first, io.end + 1):
        page = io.base + <size_t>i * ps
        if i < io.end:
            if io.dirty != NULL and not qf_bit(io.dirty, i):
                page = NULL
            elif _is_zero(page, ps):
                io.zeros += 1
                if qf_bit(io.present, i):
                    if hole_end != i:
                        if hole_start >= 0 and fallocate(
                                io.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                io.file_offset + <int64_t>hole_start * ps,
                                <int64_t>(hole_end - hole_start) * ps) != 0:
                            io.err = errno
                            io.err_offset = io.file_offset + <int64_t>hole_start * ps
                            return
                        hole_start = i
                    hole_end = i + 1
                    qf_set_bit(io.present, i, False)
                page = NULL
            elif (io.old != NULL and qf_bit(io.present, i)
                    and memcmp(page, io.old + <size_t>i * ps, ps) == 0):
                io.unchanged += 1
                page = NULL
        else:
            page = NULL
        # a run ends at a page that is not written, at the end, or at MAX_RUN
        if run_start >= 0 and (page == NULL or <size_t>(run_end - run_start) * ps >= MAX_RUN):
            if _pwrite_all(io, io.base + <size_t>run_start * ps, <size_t>(run_end - run_start) * ps,
                           io.file_offset + <int64_t>run_start * ps) < 0:
                return
            if io.release:
                if rel_base + rel_len != <char *>io.base + <size_t>run_start * ps:
                    if rel_len and _advise_free(rel_base, rel_len, &released) == 0:
                        io.released += released
                    rel_base = <char *>io.base + <size_t>run_start * ps
                    rel_len = 0
                rel_len += <size_t>(run_end - run_start) * ps
            run_start = -1
        if page != NULL:
            if run_start < 0:
                run_start = i
            run_end = i + 1
            qf_set_bit(io.present, i, True)
            io.written += 1
        elif io.release and i < io.end and (io.dirty == NULL or qf_bit(io.dirty, i)):
            # a zero or unchanged page: nothing of it is pending, release it now
            if rel_base + rel_len != <char *>io.base + <size_t>i * ps:
                if rel_len and _advise_free(rel_base, rel_len, &released) == 0:
                    io.released += released
                rel_base = <char *>io.base + <size_t>i * ps
                rel_len = 0
            rel_len += ps
        if io.release and rel_len >= 2 << 20:
            if _advise_free(rel_base, rel_len, &released) == 0:
                io.released += released
            rel_base += rel_len
            rel_len = 0
        if io.dirty != NULL and i < io.end:
            qf_set_bit(io.dirty, i, False)
    if hole_start >= 0 and fallocate(io.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                     io.file_offset + <int64_t>hole_start * ps,
                                     <int64_t>(hole_end - hole_start) * ps) != 0:
        io.err = errno
        io.err_offset = io.file_offset + <int64_t>hole_start * ps
        return
    if io.release and rel_len and _advise_free(rel_base, rel_len, &released) == 0:
        io.released += released


cdef void _read_mapped(MappedIO *io) noexcept nogil:
    """Read the present pages of [first, end) straight into the RAM, one pread per run;
    absent pages are zero (left alone where `dirty` — here: touched — has no bit: new
    zero memory)."""
    cdef Py_ssize_t i = io.first
    cdef Py_ssize_t j
    cdef size_t ps = io.page_size
    cdef unsigned char *p
    cdef size_t n
    cdef int64_t off
    cdef ssize_t k
    while i < io.end:
        if qf_bit(io.present, i):
            j = i
            while j < io.end and qf_bit(io.present, j) and <size_t>(j - i) * ps < MAX_RUN:
                j += 1
            p = io.base + <size_t>i * ps
            n = <size_t>(j - i) * ps
            off = io.file_offset + <int64_t>i * ps
            while n > 0:
                k = pread(io.fd, p, n, off)
                if k < 0 and errno == EINTR:
                    continue
                if k <= 0:
                    io.err = errno if k < 0 else -1     # -1: the file ends early
                    io.err_offset = off
                    return
                p += k
                n -= k
                off += k
            io.written += j - i
            i = j
        else:
            if io.dirty == NULL or qf_bit(io.dirty, i):
                p = io.base + <size_t>i * ps
                if not _is_zero(p, ps):
                    memset(p, 0, ps)
            io.zeros += 1
            i += 1


cdef int _mapped_setup(MappedIO *io, int fd, Py_buffer *region, Py_buffer *present,
                       int64_t file_offset, Py_ssize_t first, Py_ssize_t count,
                       Py_ssize_t page_size) except -1:
    cdef Py_ssize_t npages
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
    if file_offset < 0 or file_offset & (page_size - 1):
        raise ValueError("file_offset must be page aligned")
    npages = region.len // page_size
    if count < 0:
        count = npages - first
    if first < 0 or count < 0 or first + count > npages:
        raise ValueError(f"pages {first}..{first + count} are outside a region of "
                         f"{npages} pages")
    if present.len * 8 < npages:
        raise ValueError("the present bitmap is shorter than the region")
    memset(io, 0, sizeof(MappedIO))
    io.fd = fd
    io.base = <unsigned char *>region.buf
    io.present = <unsigned char *>present.buf
    io.file_offset = file_offset
    io.page_size = page_size
    io.first = first
    io.end = first + count
    return 0


cdef int _mapped_error(MappedIO *io, str what) except -1:
    if io.err == -1:
        raise FormatError(f"the file ends inside the pages it claims to hold",
                          io.err_offset)
    if io.err:
        raise OSError(io.err, f"{what} at file offset {io.err_offset}: "
                              f"{os.strerror(io.err)}")
    return 0


def write_pages_at(int fd, region, int64_t file_offset, present, Py_ssize_t first_page=0,
                   Py_ssize_t count=-1, *, Py_ssize_t page_size=4096, old=None, dirty=None,
                   bint release=False):
    """Write pages ``first_page .. first_page+count-1`` of ``region`` to ``fd`` at
    ``file_offset + i*page_size`` (the mapped layout), GIL released, one pwrite per run
    of adjacent non-zero pages.  Zero pages are holes: their ``present`` bit (a writable
    bitmap, bit i = page i is in the file) is cleared, and punched out if it was set;
    written pages get their bit set.  ``old`` (the file's pages, e.g. a read-only mmap at
    ``file_offset``) skips pages that did not change; ``dirty`` limits the work to its
    set bits and clears them.  ``release`` gives pages back once they are written.
    Threads may write disjoint ranges at once if the ranges start at multiples of 64.

    Returns ``(written, zero, unchanged, released_bytes)``."""
    cdef Py_buffer rview, pview, oview, dview
    cdef MappedIO io
    cdef bint have_old = old is not None
    cdef bint have_dirty = dirty is not None
    PyObject_GetBuffer(region, &rview, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(present, &pview, PyBUF_WRITABLE)
        try:
            _mapped_setup(&io, fd, &rview, &pview, file_offset, first_page, count, page_size)
            io.release = release
            if have_old:
                PyObject_GetBuffer(old, &oview, PyBUF_SIMPLE)
            if have_dirty:
                PyObject_GetBuffer(dirty, &dview, PyBUF_WRITABLE)
            try:
                if have_old:
                    if oview.len < rview.len // page_size * page_size:
                        raise ValueError("`old` is shorter than the region")
                    io.old = <const unsigned char *>oview.buf
                if have_dirty:
                    if dview.len * 8 < io.end:
                        raise ValueError("the dirty bitmap is shorter than the page range")
                    io.dirty = <unsigned char *>dview.buf
                with nogil:
                    _write_mapped(&io)
            finally:
                if have_old:
                    PyBuffer_Release(&oview)
                if have_dirty:
                    PyBuffer_Release(&dview)
            _mapped_error(&io, "pwrite")
            return (io.written, io.zeros, io.unchanged, io.released)
        finally:
            PyBuffer_Release(&pview)
    finally:
        PyBuffer_Release(&rview)


def read_pages_at(int fd, region, int64_t file_offset, present, Py_ssize_t first_page=0,
                  Py_ssize_t count=-1, *, Py_ssize_t page_size=4096, touched=None):
    """Read the pages whose ``present`` bit is set from ``fd`` at ``file_offset +
    i*page_size`` straight into ``region`` (one pread per run, GIL released); the other
    pages are zero: cleared where they are not, left alone where ``touched`` (a bitmap;
    the region is new zero memory except where a bit is set) says they still are.

    Returns ``(pages_read, zero_pages)``.  A file shorter than its bitmap claims raises
    FormatError."""
    cdef Py_buffer rview, pview, tview
    cdef MappedIO io
    cdef bint have_touched = touched is not None
    PyObject_GetBuffer(region, &rview, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(present, &pview, PyBUF_SIMPLE)
        try:
            _mapped_setup(&io, fd, &rview, &pview, file_offset, first_page, count, page_size)
            if have_touched:
                PyObject_GetBuffer(touched, &tview, PyBUF_SIMPLE)
            try:
                if have_touched:
                    if tview.len * 8 < io.end:
                        raise ValueError("the touched bitmap is shorter than the page range")
                    io.dirty = <unsigned char *>tview.buf
                with nogil:
                    _read_mapped(&io)
            finally:
                if have_touched:
                    PyBuffer_Release(&tview)
            _mapped_error(&io, "pread")
            return (io.written, io.zeros)
        finally:
            PyBuffer_Release(&pview)
    finally:
        PyBuffer_Release(&rview)


cdef int _diff_pages(const unsigned char *base, const unsigned char *old,
                     const unsigned char *present, unsigned char *changed,
                     unsigned char *nonzero, Py_ssize_t npages, size_t ps) noexcept nogil:
    cdef Py_ssize_t i
    cdef int n = 0
    cdef const unsigned char *page
    cdef bint zero, held
    for i in range(npages):
        page = base + <size_t>i * ps
        zero = _is_zero(page, ps)
        held = qf_bit(present, i)
        if zero:
            if held:
                qf_set_bit(changed, i, True)
                n += 1
        elif not held or memcmp(page, old + <size_t>i * ps, ps) != 0:
            qf_set_bit(changed, i, True)
            qf_set_bit(nonzero, i, True)
            n += 1
    return n


def diff_pages(region, old, present, changed, nonzero, *, Py_ssize_t page_size=4096):
    """Which pages of ``region`` differ from a mapped file's: ``old`` holds the file's
    pages, ``present`` its bitmap.  A page changed when it holds data the file has not
    (absent there, or other bytes), or is zero where the file holds data.  Sets the
    changed pages' bits in ``changed`` and, for those that hold data, in ``nonzero``
    (both writable bitmaps); GIL released.  Returns how many pages changed."""
    cdef Py_buffer rview, oview, pview, cview, nview
    cdef Py_ssize_t npages
    cdef int n
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")
    PyObject_GetBuffer(region, &rview, PyBUF_SIMPLE)
    try:
        npages = rview.len // page_size
        PyObject_GetBuffer(old, &oview, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(present, &pview, PyBUF_SIMPLE)
            try:
                PyObject_GetBuffer(changed, &cview, PyBUF_WRITABLE)
                try:
                    PyObject_GetBuffer(nonzero, &nview, PyBUF_WRITABLE)
                    try:
                        if oview.len < npages * page_size:
                            raise ValueError("`old` is shorter than the region")
                        if min(pview.len, cview.len, nview.len) * 8 < npages:
                            raise ValueError("a bitmap is shorter than the region")
                        with nogil:
                            n = _diff_pages(<const unsigned char *>rview.buf,
                                            <const unsigned char *>oview.buf,
                                            <const unsigned char *>pview.buf,
                                            <unsigned char *>cview.buf,
                                            <unsigned char *>nview.buf, npages, page_size)
                        return n
                    finally:
                        PyBuffer_Release(&nview)
                finally:
                    PyBuffer_Release(&cview)
            finally:
                PyBuffer_Release(&pview)
        finally:
            PyBuffer_Release(&oview)
    finally:
        PyBuffer_Release(&rview)


def start_writeback(int fd, int64_t offset, int64_t length):
    """Start writing ``length`` bytes of ``fd`` at ``offset`` to the disk, without
    waiting (sync_file_range WRITE): a later fdatasync then finds them done or on their
    way.  A filesystem that cannot is not an error."""
    cdef int rc
    cdef int err = 0
    with nogil:
        rc = sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
        if rc != 0:
            err = errno
    if rc != 0 and err not in (EINVAL, ESPIPE, EOPNOTSUPP):
        raise OSError(err, f"sync_file_range at file offset {offset}: {os.strerror(err)}")


def punch_hole(int fd, int64_t offset, int64_t length):
    """Make ``length`` bytes of ``fd`` at ``offset`` a hole (they read as zero and hold
    no space); the file's size stays.  Where the filesystem cannot punch holes, zeros
    are written instead."""
    cdef int rc
    cdef int err = 0
    if offset < 0 or length < 0:
        raise ValueError("offset and length cannot be negative")
    with nogil:
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
            err = errno
    if rc == 0:
        return
    if err != EOPNOTSUPP:
        raise OSError(err, f"fallocate (punch hole) at file offset {offset}: "
                           f"{os.strerror(err)}")
    zeros = bytes(min(length, 1 << 20))
    while length > 0:
        n = os.pwrite(fd, zeros[:length], offset)
        offset += n
        length -= n


def bitmap_runs(bitmap, Py_ssize_t npages, Py_ssize_t first=0):
    """The runs of set bits of a page bitmap (bit i = page i, LSB first) among bits
    ``first .. npages-1``, as ``(first_page, count)`` pairs: fast on sparse and dense
    maps."""
    cdef Py_buffer view
    cdef const unsigned char *bits
    cdef Py_ssize_t i = max(first, 0), j
    runs = []
    PyObject_GetBuffer(bitmap, &view, PyBUF_SIMPLE)
    try:
        if view.len * 8 < npages:
            raise ValueError("the bitmap is shorter than npages")
        bits = <const unsigned char *>view.buf
        while i < npages:
            if (i & 7) == 0 and bits[i >> 3] == 0:
                i += 8
                continue
            if not (bits[i >> 3] >> (i & 7)) & 1:
                i += 1
                continue
            j = i + 1
            while j < npages:
                if (j & 7) == 0 and bits[j >> 3] == 0xFF and j + 8 <= npages:
                    j += 8
                elif (bits[j >> 3] >> (j & 7)) & 1:
                    j += 1
                else:
                    break
            runs.append((i, j - i))
            i = j
    finally:
        PyBuffer_Release(&view)
    return runs
