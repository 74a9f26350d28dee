"""userfaultfd: the fault server that places guest pages on first touch, and the dirty
tracker that finds the pages a program writes.

The :class:`FaultServer` owns one userfaultfd with guest RAM registered in MISSING mode.
Its loops run on their own threads and never need the GIL (a Python thread that touches
missing memory faults *holding* the GIL, so a handler that needed it would deadlock); all
they touch is one C struct, :c:type:`Server`:

* ``serve_faults``: reads fault events and places the faulting page together with the
  neighbours in its window that are not placed yet (``window_pages``, 16 = 64 KiB per
  fault: 16x fewer faults on scans), with UFFDIO_COPY (data) or UFFDIO_ZEROPAGE (zero
  pages).  It optionally spins a little before sleeping in poll: a wake-up on the other
  core costs ~110-140 us here, a spinning handler ~25 us.
* ``fill_background``: places everything else, in order, in 1 MiB windows.
* ``receive``: places the pages of a postcopy stream as they arrive; the records are read
  by the core's one record parser (``qf_load_records``), which hands each page to this
  module's placing sink.

Each page is claimed with an atomic bit before it is placed, so no page is placed twice;
EEXIST is tolerated anyway.  Pages come from a *source*, the one seam between lazy restore
and postcopy: a *local* one (a mapping of a snapshot file plus its bitmap of present
pages; the loops place pages themselves) or a *remote* one (the fault thread asks for the
faulting page and its missing neighbours on a return path, QEMU's REQ_PAGES_ID /
REQ_PAGES, and ``receive`` places them).

:class:`DirtyTracker` finds the pages a program writes (userfaultfd asynchronous write
protection + PAGEMAP_SCAN, Linux 6.7+), for precopy rounds; :class:`PrivateCopies` the
pages written in a copy-on-write file mapping (both in _pagescan.pxi).  A FaultServer
made with ``track_writes`` places pages write-protected and finds the written ones
itself (``revert_written``: a lazy restore's reset).
"""

from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.errno cimport (errno, EINTR, EAGAIN, EEXIST, EINVAL, EPIPE, ETIMEDOUT, EFAULT, EIO,
                        EBADMSG, ENOMEM)
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memset, memcpy, memcmp, strlen
from posix.fcntl cimport O_CLOEXEC, O_NONBLOCK, O_RDWR, O_RDONLY, open as c_open
from posix.unistd cimport read, write, close, _exit, pread, sysconf, _SC_PAGESIZE, lseek
from posix.types cimport off_t
from posix.mman cimport madvise, MADV_DONTNEED, MADV_WILLNEED
from posix.uio cimport iovec

from qfram.includes.atomics cimport (qf_load, qf_store, qf_add, qf_load_int, qf_store_int,
                                     qf_add_int, qf_lock, qf_unlock)
from qfram.includes.bits cimport qf_bit, qf_set_bit, qf_claim_bit, qf_bit_atomic
from qfram.includes.system cimport (pollfd, poll, POLLIN, POLLOUT, strerror, ioctl, syscall,
                                    SYS_userfaultfd, eventfd, EFD_CLOEXEC, EFD_NONBLOCK,
                                    qf_set_errno, qf_now_ns, qf_process_madvise_self, SEEK_DATA,
                                    IOV_MAX)
from qfram.includes.uffd cimport *
from qfram.includes.chunks cimport (qf_chunk, qf_chunk_decode, qf_hash, QF_CHUNK_ZERO,
                                    QF_CHUNK_RAW, QF_CHUNK_ZSTD)
from qfram.includes.wire cimport (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_EOS,
                                  RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_MULTIFD_FLUSH,
                                  SECTION_EOF, SECTION_PART, SECTION_END, SECTION_COMMAND,
                                  SECTION_FOOTER, MIG_RP_MSG_REQ_PAGES_ID,
                                  MIG_RP_MSG_REQ_PAGES, TARGET_PAGE_SIZE, PS_FRAME_BYTES,
                                  PS_OP_REQ, PS_OP_READY, PS_OP_FAIL, PS_OP_BYE,
                                  PS_FLAG_URGENT, PS_MAX_TEXT)
from qfram._fast cimport (Transport, QEMUFile, LoadLoop, qf_begin_gil_free, qf_end_gil_free, qf_read,
                          qf_read_be64, qf_skip, qf_peek_byte, qf_position, qf_errno,
                          qf_load_records)

import os

from qfram.errors import FormatError

# userfaultfd places host pages; qfram's areas index target pages: one per host page
cdef uint64_t PAGE = TARGET_PAGE_SIZE

cdef enum:
    MAX_AREAS = 64
    MAX_LATENCIES = 1 << 20
    MAX_TOUCHES = 1 << 20         # first touches remembered (the working set), 8 MiB
    TABLE_BYTES = 2 << 20         # what one page table (PTE page) maps on x86-64
    # Arrived pages are placed in runs of up to this many, one UFFDIO_COPY (or ZEROPAGE)
    # a run: the background stream at link speed instead of one ioctl per page
    RUN_PAGES = 128

# Where an area's pages come from: a local source (a snapshot mapping, placed by the
# fault and fill loops) or a remote one (asked for on a return path, placed by receive).
cdef enum AreaKind:
    AREA_LOCAL = 1
    AREA_REMOTE = 2
    AREA_SHARED = 3               # a host page server's cache, mapped copy-on-write

# What a broken postcopy stream did (Server.format_error).
cdef enum StreamFault:
    BAD_RECORD = 1
    UNKNOWN_BLOCK = 2
    PAGE_PAST_BLOCK = 3


# One registered range of guest RAM and where its pages come from.
cdef struct Area:
    AreaKind kind
    uint64_t base                 # start address (page aligned)
    uint64_t length
    uint64_t npages
    unsigned char *claimed        # bit set = a thread has taken this page to place it
    const unsigned char *present  # local source: bit set = data, clear = zero page
    const unsigned char *src      # local source: bytes of page 0 (a snapshot mapping)
    # or a chunked source (qfram.chunked): chunks read from fd and decoded as needed
    const qf_chunk *chunks
    uint64_t chunk_pages
    int fd
    uint64_t placed               # pages placed so far
    # remote source (postcopy): pages are asked for and arrive on a stream
    unsigned char *requested      # bit set = already asked for
    unsigned char *zero_known     # bit set = arrived as zero and never touched: a fault
                                  # there gets the zero page here, nothing is asked for
    uint64_t *fault_ns            # when the page's fault was read (0: not faulted)
    # shared source (a host page server, _shared.pxi): per chunk of chunk_pages pages
    uint64_t nchunks
    const unsigned char *zero_chunks  # bit set: all zero, never in the cache
    unsigned char *ready          # bit set: READY came once (its pages count as placed)
    unsigned char *by_fault       # bit set: asked for by a fault (its latency is noted)
    uint64_t *asked_ns            # when it was asked for, until READY (0: not asked)
    int server_block              # the block's index at the server
    uint64_t cache_offset         # where the block starts in the server's cache
    unsigned char name[256]
    int name_len


cdef struct Counters:
    uint64_t faults
    uint64_t fault_pages
    uint64_t background_pages
    uint64_t zero_pages
    uint64_t eexist
    uint64_t requests
    uint64_t requested_pages
    uint64_t received_pages
    uint64_t received_zero_pages
    uint64_t duplicate_pages
    uint64_t prefetch_pages
    uint64_t received_runs        # placing ioctls of receive() (a run each)


# Everything the GIL-free loops touch.
cdef struct Server:
    int uffd
    int stop_fd
    Area areas[MAX_AREAS]
    int nareas
    uint64_t window_pages
    uint64_t spin_ns
    int stopping
    uint64_t total_pages
    uint64_t placed_pages
    uint64_t *lat                 # time from a fault being read to its page in place
    uint64_t nlat
    uint64_t *touches             # the faults in the order they came: area << 48 | page
    uint64_t ntouches
    size_t stage_bytes            # a placing thread's buffers for chunked areas
    bint track_writes             # pages are placed write-protected (async): the ones
                                  # written since are found by revert_written()
    Counters n
    int error                     # errno of the first failure in a loop
    uint64_t fail_addr            # where a page could not be placed (0: not that)
    # remote source
    int request_fd                # the return path: this fd (-1: none, or the link is down)
    Transport *rp_transport       # or, when set, this transport (TLS) over request_fd
    bint resumable                # a failed return path pauses (requests wait for
    int link_down                 # resume_remote()) instead of failing the loop
    int resume_pending            # the fault thread must ask again for what is missing
    int last_request_area
    int request_timeout_ms
    int rp_lock                   # one writer at a time on the return path
    int receiving                 # receive() calls inside their GIL-free loop
    uint64_t upto[2]              # per channel: every page record before this stream
                                  # offset is in place (what the source may release)
    bint exit_on_failure          # a failure ends the process (see _die)
    int format_error              # a StreamFault
    int64_t format_offset
    # shared source: the page server's socket and cache (_shared.pxi)
    int ps_fd                     # -1: none (or it went away)
    size_t ps_have[1]             # bytes of a frame header read so far
    int ps_progress_fd            # eventfd: READYs came (wakes the fill thread)
    int cache_fd                  # the cache memfd (read-only): is a page in it?
    uint64_t ps_outstanding       # chunks asked for, not READY yet
    int ps_window                 # at most this many asked for by the background
    Area *ps_streak_area          # the chunk asked for again and again (a lying server)
    int64_t ps_streak_chunk
    int ps_streak
    char ps_reason[512]           # what went wrong with the page server


ctypedef int (*Loop)(Server *s) noexcept nogil


# The placing sink's context: which server, which area the records are for.
cdef struct Receiving:
    Server *s
    Area *a
    # the run of pages staged to be placed with one ioctl: [first, first + count) of
    # `run_area`, all data (their bytes in `stage`) or all zero
    Area *run_area
    uint64_t first
    uint64_t count
    bint zero
    unsigned char *stage          # RUN_PAGES pages


cdef int _register(int uffd, uint64_t base, uint64_t length, uint64_t mode,
                   str what) except -1:
    """UFFDIO_REGISTER [base, base+length) in ``mode``."""
    cdef uffdio_register reg
    memset(&reg, 0, sizeof(reg))
    reg.range.start = base
    reg.range.len = length
    reg.mode = mode
    if ioctl(uffd, UFFDIO_REGISTER, &reg) != 0:
        raise OSError(errno, f"UFFDIO_REGISTER ({what}): {os.strerror(errno)}")
    return 0


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


# ---------------------------------------------------------------------------------------
# placing pages (no GIL)
# ---------------------------------------------------------------------------------------

cdef int _place(Server *s, uint64_t dst, uint64_t src, uint64_t n, bint zero) noexcept nogil:
    """UFFDIO_COPY (or, ``zero``, UFFDIO_ZEROPAGE) n pages, waking their waiters:
    partial progress, EAGAIN and a page already present (EEXIST) are stepped over.
    -1 on a real error (in s.error, the page in s.fail_addr)."""
    cdef uffdio_copy cp
    cdef uffdio_zeropage zp
    cdef uint64_t done = 0
    cdef int64_t progress
    cdef int rc
    while done < n:
        if zero:
            zp.range.start = dst + done * PAGE
            zp.range.len = (n - done) * PAGE
            zp.mode = 0
            zp.zeropage = 0
            rc = ioctl(s.uffd, UFFDIO_ZEROPAGE, &zp)
            progress = zp.zeropage
        else:
            cp.dst = dst + done * PAGE
            cp.src = src + done * PAGE
            cp.len = (n - done) * PAGE
            cp.mode = UFFDIO_COPY_MODE_WP if s.track_writes else 0
            cp.copy = 0
            rc = ioctl(s.uffd, UFFDIO_COPY, &cp)
            progress = cp.copy
        if rc == 0:
            progress = <int64_t>((n - done) * PAGE)
        if progress > 0:
            if zero:
                qf_add(&s.n.zero_pages, <uint64_t>progress // PAGE)
            done += <uint64_t>progress // PAGE
        elif errno == EEXIST:
            qf_add(&s.n.eexist, 1)
            done += 1
        elif errno != EAGAIN:
            s.error = errno
            s.fail_addr = dst + done * PAGE
            return -1
    return 0


cdef Area *_area_of(Server *s, uint64_t addr) noexcept nogil:
    cdef int i
    for i in range(s.nareas):
        if s.areas[i].base <= addr < s.areas[i].base + s.areas[i].length:
            return &s.areas[i]
    return NULL


cdef Area *_area_named(Server *s, const unsigned char *name, int n) noexcept nogil:
    cdef int i
    for i in range(s.nareas):
        if s.areas[i].name_len == n and memcmp(s.areas[i].name, name, n) == 0:
            return &s.areas[i]
    return NULL


cdef int _place_window(Server *s, Area *a, uint64_t first, uint64_t count,
                       unsigned char *stage, uint64_t *placed_out) noexcept nogil:
    """Claim the unclaimed pages of [first, first+count) of a local area and place them
    from its source, one ioctl per run of the same kind.  0, or -1 on a hard error.
    ``stage``: the calling thread's buffers (``stage_bytes``), for chunked areas."""
    cdef uint64_t i = first
    cdef uint64_t end = first + count
    cdef uint64_t j
    cdef bint data
    placed_out[0] = 0
    if a.chunks != NULL:
        return _place_chunks(s, a, first, count, stage, placed_out)
    while i < end:
        if not qf_claim_bit(a.claimed, i):
            i += 1                  # someone else places it (and wakes its waiters)
            continue
        data = qf_bit(a.present, i)
        j = i + 1
        while j < end and qf_bit(a.present, j) == data and qf_claim_bit(a.claimed, j):
            j += 1
        if _place(s, a.base + i * PAGE, <uint64_t>a.src + i * PAGE, j - i, not data) < 0:
            return -1
        placed_out[0] += j - i
        i = j
    qf_add(&a.placed, placed_out[0])
    qf_add(&s.placed_pages, placed_out[0])
    return 0


cdef int _place_chunks(Server *s, Area *a, uint64_t first, uint64_t count,
                       unsigned char *stage, uint64_t *placed_out) noexcept nogil:
    """A chunked area: every chunk [first, first+count) reaches into is read and decoded
    once (if a page of it is still to place), then its unclaimed pages are placed from
    the decoded bytes, one ioctl per run; a zero chunk's with the zero page."""
    cdef uint64_t c = first // a.chunk_pages
    cdef uint64_t c_end = (first + count + a.chunk_pages - 1) // a.chunk_pages
    cdef uint64_t p, p_end, i, j, placed = 0
    cdef bint decoded
    cdef int rc
    while c < c_end:
        p = c * a.chunk_pages
        p_end = min(p + a.chunk_pages, a.npages)
        decoded = False
        i = p
        while i < p_end:
            if not qf_claim_bit(a.claimed, i):
                i += 1
                continue
            j = i + 1
            while j < p_end and qf_claim_bit(a.claimed, j):
                j += 1
            if a.chunks[c].kind == QF_CHUNK_ZERO:
                rc = _place(s, a.base + i * PAGE, 0, j - i, True)
            else:
                if not decoded and _read_chunk(s, a, c, p_end - p, stage) < 0:
                    return -1
                decoded = True
                rc = _place(s, a.base + i * PAGE, <uint64_t>stage + (i - p) * PAGE, j - i,
                            False)
            if rc < 0:
                return -1
            placed += j - i
            i = j
        c += 1
    placed_out[0] = placed
    qf_add(&a.placed, placed)
    qf_add(&s.placed_pages, placed)
    return 0


cdef int _read_chunk(Server *s, Area *a, uint64_t c, uint64_t pages,
                     unsigned char *stage) noexcept nogil:
    """Chunk c of a chunked area, decoded into ``stage`` and checked against its hash.
    Read with pread (a file cut under us is an error here, not a SIGBUS); -1 with EIO
    for a short read, EBADMSG for bytes that do not decode to what was saved."""
    cdef const qf_chunk *ch = &a.chunks[c]
    cdef unsigned char *packed = stage + a.chunk_pages * PAGE
    cdef unsigned char *into = stage if ch.kind == QF_CHUNK_RAW else packed
    cdef size_t done = 0
    cdef ssize_t got
    cdef int err = 0
    while done < ch.length:
        got = pread(a.fd, into + done, ch.length - done, <off_t>(ch.offset + done))
        if got < 0 and errno == EINTR:
            continue
        if got <= 0:
            err = errno if got < 0 else EIO
            break
        done += <size_t>got
    if err == 0 and ch.kind != QF_CHUNK_RAW:
        if qf_chunk_decode(ch, packed, stage, pages * PAGE) != 0:
            err = EBADMSG
    elif err == 0 and qf_hash(stage, pages * PAGE) != ch.hash:
        err = EBADMSG
    if err:
        s.error = err
        s.fail_addr = a.base + c * a.chunk_pages * PAGE
        return -1
    return 0


cdef void _note_touch(Server *s, Area *a, uint64_t page) noexcept nogil:
    """Remember a fault (only the fault thread writes the log)."""
    if s.ntouches < MAX_TOUCHES:
        s.touches[s.ntouches] = (<uint64_t>(a - s.areas) << 48) | page
        qf_store(&s.ntouches, s.ntouches + 1)


cdef void _window_of(uint64_t window, Area *a, uint64_t page, uint64_t *first,
                     uint64_t *count) noexcept nogil:
    """The aligned window of ``window`` pages placed together with ``page``."""
    first[0] = page - page % window
    if first[0] + window > a.npages:
        first[0] = a.npages - window if a.npages > window else 0
    count[0] = min(window, a.npages - first[0])


cdef void _note_latency(Server *s, uint64_t ns) noexcept nogil:
    cdef uint64_t k = qf_add(&s.nlat, 1) - 1       # several threads may place at once
    if k < MAX_LATENCIES:
        s.lat[k] = ns


# ---------------------------------------------------------------------------------------
# the loops (no GIL)
# ---------------------------------------------------------------------------------------

cdef int _serve_loop(Server *s) noexcept nogil:
    cdef uffd_msg msgs[64]
    cdef pollfd fds[3]
    cdef unsigned char *stage = _new_stage(s)
    cdef int rc
    if s.stage_bytes and stage == NULL:
        return -1
    rc = _serve_faults(s, msgs, fds, stage)
    free(stage)
    return rc


cdef struct _Run:
    uint64_t key                  # area << 48 | first page
    uint64_t count


cdef int _by_key(const void *x, const void *y) noexcept nogil:
    cdef uint64_t a = (<const _Run *>x).key, b = (<const _Run *>y).key
    return (a > b) - (a < b)


cdef void _read_ahead(Server *s, const uint64_t *keys, const uint64_t *counts,
                      uint64_t n) noexcept nogil:
    """MADV_WILLNEED on the snapshot mappings' runs, sorted and merged: the page cache
    reads them in file order, a few large reads instead of many scattered ones.  A hint:
    nothing happens where there is no memory for the sort."""
    cdef _Run *runs = <_Run *>malloc(max(n, <uint64_t>1) * sizeof(_Run))
    cdef uint64_t i, m = 0
    cdef Area *a
    if runs == NULL:
        return
    for i in range(n):
        runs[i].key = keys[i]
        runs[i].count = counts[i]
    qsort(runs, n, sizeof(_Run), _by_key)
    for i in range(n):
        if m and runs[i].key >> 48 == runs[m - 1].key >> 48 \
                and runs[i].key <= runs[m - 1].key + runs[m - 1].count:
            runs[m - 1].count = max(runs[m - 1].count,
                                    runs[i].key + runs[i].count - runs[m - 1].key)
            continue
        runs[m] = runs[i]
        m += 1
    for i in range(m):
        a = &s.areas[runs[i].key >> 48]
        if a.chunks == NULL:
            madvise(<void *>(a.src + (runs[i].key & ((1ULL << 48) - 1)) * PAGE),
                    runs[i].count * PAGE, MADV_WILLNEED)
    free(runs)


cdef unsigned char *_new_stage(Server *s) noexcept nogil:
    """A placing thread's buffers for chunked areas (NULL when there are none, or with
    ENOMEM in s.error when there is no memory)."""
    cdef unsigned char *stage = NULL
    if s.stage_bytes:
        stage = <unsigned char *>malloc(s.stage_bytes)
        if stage == NULL:
            s.error = ENOMEM
    return stage


cdef int _serve_faults(Server *s, uffd_msg *msgs, pollfd *fds,
                       unsigned char *stage) noexcept nogil:
    cdef ssize_t n
    cdef int k, nfds, wait_ms
    cdef uint64_t t0, spin_until, page, first, count, placed, last_scan = 0
    cdef Area *a
    fds[0].fd = s.uffd
    fds[0].events = POLLIN
    fds[1].fd = s.stop_fd
    fds[1].events = POLLIN
    fds[2].events = POLLIN
    spin_until = 0
    while not qf_load_int(&s.stopping):
        if s.ps_fd >= 0 and _ps_read(s) < 0:
            return -1
        if qf_load_int(&s.resume_pending):
            read(s.stop_fd, &t0, 8)            # the wake-up resume_remote() wrote
            qf_store_int(&s.resume_pending, 0)
            if _request_again(s) < 0:
                return -1
        n = read(s.uffd, msgs, 64 * sizeof(uffd_msg))
        if n < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                s.error = errno
                return -1
            if qf_now_ns() < spin_until:
                continue            # busy-wait a little: a wake-up costs more
            fds[0].revents = 0
            fds[1].revents = 0
            fds[2].revents = 0
            fds[2].fd = s.ps_fd
            nfds = 3 if s.ps_fd >= 0 else 2
            # with chunks asked of a page server, wake now and then to notice one that
            # is never answered
            wait_ms = PS_SCAN_MS if qf_load(&s.ps_outstanding) else -1
            if poll(fds, nfds, wait_ms) < 0 and errno != EINTR:
                s.error = errno
                return -1
            t0 = qf_now_ns()
            if wait_ms > 0 and t0 - last_scan > <uint64_t>PS_SCAN_MS * 1000000:
                last_scan = t0
                if _ps_overdue(s, t0) < 0:
                    return -1
            continue
        t0 = qf_now_ns()
        for k in range(<int>(n // sizeof(uffd_msg))):
            if msgs[k].event != UFFD_EVENT_PAGEFAULT:
                continue
            a = _area_of(s, msgs[k].arg.pagefault.address)
            if a == NULL:
                continue
            page = (msgs[k].arg.pagefault.address - a.base) // PAGE
            s.n.faults += 1
            _note_touch(s, a, page)
            if a.kind == AREA_REMOTE:
                if _request(s, a, page, t0) < 0:
                    return -1
                continue
            if a.kind == AREA_SHARED:
                if _shared_fault(s, a, page, t0) < 0:
                    return -1
                continue
            _window_of(a.chunk_pages if a.chunks != NULL else s.window_pages, a, page,
                       &first, &count)
            if _place_window(s, a, first, count, stage, &placed) < 0:
                return -1
            s.n.fault_pages += placed
            _note_latency(s, qf_now_ns() - t0)
        spin_until = qf_now_ns() + s.spin_ns
    return 0


cdef int _request_again(Server *s) noexcept nogil:
    """After a resume: what was asked for on the lost link may never have arrived, so
    every page a thread faulted on and that is not in place yet is asked for again (on
    the fault thread, the only one that touches the request bits)."""
    cdef int i
    cdef uint64_t p
    cdef Area *a
    for i in range(s.nareas):
        a = &s.areas[i]
        if a.kind != AREA_REMOTE:
            continue
        for p in range(a.npages):
            if qf_bit(a.requested, p) and not qf_bit_atomic(a.claimed, p):
                qf_set_bit(a.requested, p, False)
        for p in range(a.npages):
            if a.fault_ns[p] and not qf_bit_atomic(a.claimed, p) \
                    and not qf_bit(a.requested, p):
                if _request(s, a, p, a.fault_ns[p]) < 0:
                    return -1
    return 0


cdef int _fill_loop(Server *s) noexcept nogil:
    cdef unsigned char *stage = _new_stage(s)
    cdef int rc
    if s.stage_bytes and stage == NULL:
        return -1
    rc = _fill(s, stage)
    free(stage)
    return rc


cdef int _fill(Server *s, unsigned char *stage) noexcept nogil:
    cdef int i
    cdef uint64_t first, n, placed
    cdef Area *a
    for i in range(s.nareas):
        a = &s.areas[i]
        if a.kind == AREA_SHARED:
            if _shared_fill(s, a, s.ps_window) < 0:
                return -1
            continue
        first = 0
        while first < a.npages:
            if qf_load_int(&s.stopping):
                return 0
            n = min(<uint64_t>256, a.npages - first)
            if _place_window(s, a, first, n, stage, &placed) < 0:
                return -1
            qf_add(&s.n.background_pages, placed)
            first += n
    return 0


# -- the remote source: requests out, pages in ---------------------------------------------

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


cdef int _write_transport(Transport *t, const unsigned char *p, size_t n,
                          int timeout_ms) noexcept nogil:
    """_write_all through a transport."""
    cdef ssize_t k
    cdef short wait = 0
    cdef pollfd pfd
    while n > 0:
        k = t.write(t.ctx, <void *>p, n, &wait)
        if k > 0:
            p += k
            n -= k
        elif k < 0 and errno == EAGAIN:
            pfd.fd = t.fd
            pfd.events = wait
            pfd.revents = 0
            if poll(&pfd, 1, timeout_ms) == 0:
                qf_set_errno(ETIMEDOUT)
                return -1
        else:
            if k == 0:
                qf_set_errno(EPIPE)
            return -1
    return 0


cdef int _send(Server *s, const unsigned char *msg, size_t n) noexcept nogil:
    """Write one whole return path message; the fault thread and Python senders share
    the return path, so messages never interleave.  While a resumable link is down the
    message is dropped (resume_remote() asks again for every page still missing)."""
    cdef int rc
    qf_lock(&s.rp_lock)
    if s.request_fd < 0:
        rc = 0 if s.resumable else -1
        if rc < 0:
            qf_set_errno(EPIPE)
    elif s.rp_transport != NULL:
        rc = _write_transport(s.rp_transport, msg, n, s.request_timeout_ms)
    else:
        rc = _write_all(s.request_fd, msg, n, s.request_timeout_ms)
    if rc < 0 and s.resumable:
        s.request_fd = -1
        s.rp_transport = NULL
        qf_store_int(&s.link_down, 1)
        rc = 0
    qf_unlock(&s.rp_lock)
    return rc


cdef int _request(Server *s, Area *a, uint64_t page, uint64_t t0) noexcept nogil:
    """Ask for the faulting page and the following pages of its window that are
    neither in place nor asked for yet: one REQ_PAGES(_ID) message."""
    cdef uint64_t end = page + s.window_pages
    cdef uint64_t j = page
    cdef unsigned char msg[4 + 12 + 256]
    cdef int n, idx
    if qf_bit(a.zero_known, page):
        # zero, known here: place the zero page at once (and wake the faulter)
        if qf_claim_bit(a.claimed, page):
            return _place(s, a.base + page * PAGE, 0, 1, True)
        return 0
    if qf_bit_atomic(a.claimed, page):
        return 0                    # arriving or in place: the copy will wake us
    if a.fault_ns[page] == 0:
        a.fault_ns[page] = t0
    if end > a.npages:
        end = a.npages
    while j < end:
        if qf_bit_atomic(a.claimed, j) or qf_bit(a.requested, j):
            if j == page:
                return 0            # asked for already
            break
        qf_set_bit(a.requested, j, True)
        j += 1
    idx = <int>(a - s.areas)
    # be16 type, be16 length, be64 start, be32 length [, counted block name]
    _be64(msg + 4, page * PAGE)
    _be32(msg + 12, <uint32_t>((j - page) * PAGE))
    n = 12
    if idx != s.last_request_area:
        msg[16] = <unsigned char>a.name_len
        memcpy(msg + 17, a.name, a.name_len)
        n += 1 + a.name_len
        _be16(msg, MIG_RP_MSG_REQ_PAGES_ID)
        s.last_request_area = idx
    else:
        _be16(msg, MIG_RP_MSG_REQ_PAGES)    # the same block as the last request
    _be16(msg + 2, <unsigned int>n)
    if _send(s, msg, 4 + n) < 0:
        s.error = errno
        return -1
    s.n.requests += 1
    s.n.requested_pages += j - page
    return 0


cdef int _place_received(void *ctx, uint64_t offset, const unsigned char *page) noexcept nogil:
    """The record parser's sink for postcopy: stage an arrived page (``page`` NULL: a zero
    page) in the current run, placing the run first when this page does not extend it."""
    cdef Receiving *r = <Receiving *>ctx
    cdef uint64_t index = offset // PAGE
    cdef bint zero = page == NULL
    if qf_bit_atomic(r.a.claimed, index):
        qf_add(&r.s.n.duplicate_pages, 1)   # in place already: its bytes are skipped
        return 0
    if r.count and (r.run_area != r.a or index != r.first + r.count or zero != r.zero
                    or r.count == RUN_PAGES):
        if _place_run(r) < 0:
            return -1
    if r.count == 0:
        r.run_area, r.first, r.zero = r.a, index, zero
    if not zero:
        memcpy(r.stage + r.count * PAGE, page, PAGE)
    r.count += 1
    return 0


cdef int _place_run(Receiving *r) noexcept nogil:
    """Place the staged run: claim its pages (one a faulting thread asked for may have
    come on the other channel meanwhile: it is skipped) and place each stretch of claimed
    pages with one ioctl, waking whoever waits on them."""
    cdef Server *s = r.s
    cdef Area *a = r.run_area
    cdef uint64_t i = 0, j, k, now
    while i < r.count:
        if not qf_claim_bit(a.claimed, r.first + i):
            qf_add(&s.n.duplicate_pages, 1)
            i += 1
            continue
        j = i + 1
        while j < r.count and qf_claim_bit(a.claimed, r.first + j):
            j += 1
        if _place(s, a.base + (r.first + i) * PAGE, <uint64_t>(r.stage + i * PAGE), j - i,
                  r.zero) < 0:
            return -1
        qf_add(&s.n.received_runs, 1)
        qf_add(&s.n.received_zero_pages if r.zero else &s.n.received_pages, j - i)
        qf_add(&a.placed, j - i)
        qf_add(&s.placed_pages, j - i)
        now = qf_now_ns()
        for k in range(r.first + i, r.first + j):
            if a.fault_ns[k]:
                _note_latency(s, now - a.fault_ns[k])
        i = j
    r.count = 0
    return 0


cdef int _bad(Server *s, QEMUFile f, int what) noexcept nogil:
    s.format_error = what
    s.format_offset = qf_position(f)
    return -1


cdef int _receive_sections(Server *s, QEMUFile f, uint64_t *upto,
                           unsigned char *stage) noexcept nogil:
    """PART/END sections of RAM page records (and COMMANDs, skipped) until EOF; the
    records of each block go through the core's record parser into _place_received."""
    cdef unsigned char kind
    cdef unsigned char name[256]
    cdef uint64_t header, flags
    cdef LoadLoop loop
    cdef Receiving ctx
    cdef Area *a = NULL
    memset(&ctx, 0, sizeof(ctx))
    ctx.s = s
    ctx.stage = stage
    while True:
        if qf_read(f, &kind, 1) < 0:
            return -1
        if kind == SECTION_EOF:
            return 0
        if kind == SECTION_COMMAND:                 # PING and the like: skipped
            if qf_read(f, name, 4) < 0 or qf_skip(f, (name[2] << 8) | name[3]) < 0:
                return -1
            continue
        if kind != SECTION_PART and kind != SECTION_END:
            return _bad(s, f, BAD_RECORD)
        if qf_read(f, name, 4) < 0 or qf_read_be64(f, &header) < 0:
            return -1
        while True:                                 # records up to EOS
            flags = header & (PAGE - 1)
            if flags == RAM_SAVE_FLAG_EOS:
                break
            if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                if qf_read_be64(f, &header) < 0:
                    return -1
                continue
            if not (flags & RAM_SAVE_FLAG_CONTINUE):   # a block name follows
                if qf_read(f, name, 1) < 0 or qf_read(f, name + 1, name[0]) < 0:
                    return -1
                a = _area_named(s, name + 1, name[0])
                if a == NULL:
                    return _bad(s, f, UNKNOWN_BLOCK)
            elif a == NULL:
                return _bad(s, f, BAD_RECORD)
            flags &= ~(<uint64_t>RAM_SAVE_FLAG_CONTINUE)
            if flags != RAM_SAVE_FLAG_PAGE and flags != RAM_SAVE_FLAG_ZERO:
                return _bad(s, f, BAD_RECORD)
            memset(&loop, 0, sizeof(loop))
            loop.length = a.length
            loop.page_size = PAGE
            loop.sink = _place_received
            ctx.a = a
            loop.sink_ctx = &ctx
            loop.have_header = True
            loop.header = header
            qf_load_records(f, &loop)
            if loop.status == -2:
                s.format_error = PAGE_PAST_BLOCK if loop.reason == 1 else BAD_RECORD
                s.format_offset = loop.bad_pos
                return -1
            if loop.status < 0 or (ctx.count and _place_run(&ctx) < 0):
                return -1                           # the stream ended, or placing failed
            header = loop.header
        if qf_peek_byte(f) == SECTION_FOOTER and qf_skip(f, 5) < 0:
            return -1
        qf_store(upto, <uint64_t>qf_position(f))


cdef int _where(Server *s, char *out, size_t size) noexcept nogil:
    """The page that could not be placed, in words (empty when that was not it)."""
    cdef Area *a = _area_of(s, s.fail_addr) if s.fail_addr else NULL
    out[0] = 0
    if a == NULL:
        return 0
    return snprintf(out, size, " placing page %llu of block %.*s%s",
                    <unsigned long long>((s.fail_addr - a.base) // PAGE), a.name_len,
                    a.name, b" from the snapshot" if a.kind == AREA_LOCAL else b"")


cdef void _die(Server *s, QEMUFile f, const char *what) noexcept nogil:
    """Memory that lost its page source cannot wake the threads waiting for pages (and
    one of them may hold the GIL): say why on stderr, without Python, and end the
    process with status 1."""
    cdef char line[768]
    cdef char where[320]
    cdef int n
    cdef int err = s.error
    cdef const char *reason = b"the stream ended early"
    cdef const char *hint = b""
    cdef Area *a = _area_of(s, s.fail_addr) if s.fail_addr else NULL
    if f is not None and err == 0:
        err = qf_errno(f)
    if err:
        reason = strerror(err)
    _where(s, where, sizeof(where))
    if a != NULL and a.kind == AREA_LOCAL and (err == EFAULT or err == EIO):
        hint = b" (the snapshot file no longer holds it: was it cut or replaced while " \
               b"in use?)"
    if a != NULL and a.kind == AREA_LOCAL and err == EBADMSG:
        hint = b" (its chunk does not decode to the bytes that were saved: the file is " \
               b"damaged)"
    if s.format_error:
        n = snprintf(line, sizeof(line), "qfram: postcopy failed while %s: broken stream "
                     "(%d) at byte %lld\n", what, s.format_error,
                     <long long>s.format_offset)
    elif s.ps_reason[0]:
        n = snprintf(line, sizeof(line), "qfram: lazy restore failed while %s%s: %s\n",
                     what, where, s.ps_reason)
    else:
        n = snprintf(line, sizeof(line), "qfram: %s failed while %s%s: %s%s\n",
                     b"lazy restore" if a != NULL and a.kind == AREA_LOCAL else
                     b"postcopy", what, where, reason, hint)
    write(2, line, n)
    _exit(1)


# ---------------------------------------------------------------------------------------
# the Python face
# ---------------------------------------------------------------------------------------

cdef class FaultServer:
    """Guest RAM that fills itself on first touch from a page source.

    ``add_area(region, source, present)``: register a writable, page-aligned buffer
    (e.g. a fresh anonymous mmap); ``source`` is a readable buffer holding the pages
    (e.g. a mapping of the snapshot file at pages_offset), ``present`` its bitmap.
    Then run ``serve_faults()`` and ``fill_background()`` on threads; ``stop()`` ends
    them.  Statistics: ``faults``, ``fault_pages``, ``background_pages``,
    ``zero_pages``, ``eexist``, ``latencies_ns()``.
    """
    cdef Server s
    cdef list exports            # objects that must outlive the areas (bitmap copies)
    cdef Py_buffer views[2 * MAX_AREAS]
    cdef int nviews
    cdef readonly uint64_t features
    cdef object remote           # the return path's channel (its transport lives in it)
    cdef list writes             # track_writes: an AreaWrites per local area

    def __cinit__(self):
        self.s.uffd = -1
        self.s.stop_fd = -1
        self.s.request_fd = -1
        self.s.ps_fd = -1
        self.s.cache_fd = -1
        self.s.ps_progress_fd = -1
        self.s.ps_streak_chunk = -1
        self.s.last_request_area = -1
        self.s.request_timeout_ms = 10000

    def __init__(self, uint64_t window_pages=16, double spin_us=0.0, bint track_writes=False):
        cdef uffdio_api api
        cdef uint64_t wp = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
        if window_pages < 1 or window_pages > 4096:
            raise ValueError("window_pages must be 1..4096")
        if <uint64_t>sysconf(_SC_PAGESIZE) != PAGE:
            raise OSError(EINVAL, "the fault server places one 4 KiB target page per host "
                                  "page; this machine's pages differ")
        self.exports = []
        self.s.window_pages = window_pages
        self.s.spin_ns = <uint64_t>(spin_us * 1000.0)
        self.s.lat = <uint64_t *>malloc(MAX_LATENCIES * sizeof(uint64_t))
        self.s.touches = <uint64_t *>malloc(MAX_TOUCHES * sizeof(uint64_t))
        if self.s.lat == NULL or self.s.touches == NULL:
            raise MemoryError()
        self.s.uffd = open_userfaultfd()
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        api.features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS
        if track_writes:
            api.features |= wp
            if ioctl(self.s.uffd, UFFDIO_API, &api) != 0 or api.features & wp != wp:
                raise OSError(errno or EINVAL, "tracking writes needs userfaultfd "
                                               "asynchronous write protection (Linux 6.7+)")
        elif ioctl(self.s.uffd, UFFDIO_API, &api) != 0:
            api.features = 0            # an older kernel: anonymous memory only
            if ioctl(self.s.uffd, UFFDIO_API, &api) != 0:
                raise OSError(errno, f"UFFDIO_API: {os.strerror(errno)}")
        self.features = api.features
        self.s.track_writes = track_writes
        self.writes = []
        self.s.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.s.stop_fd < 0:
            raise OSError(errno, "eventfd")

    def __dealloc__(self):
        self._release()
        free(self.s.lat)
        free(self.s.touches)

    cdef void _release(self) noexcept:
        cdef int i
        for i in range(self.s.nareas):
            free(self.s.areas[i].claimed)
            free(self.s.areas[i].requested)
            free(self.s.areas[i].zero_known)
            free(self.s.areas[i].fault_ns)
            free(self.s.areas[i].ready)
            free(self.s.areas[i].by_fault)
            free(self.s.areas[i].asked_ns)
        memset(self.s.areas, 0, sizeof(self.s.areas))
        self.s.nareas = 0
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        self.nviews = 0
        if self.s.uffd >= 0:
            close(self.s.uffd)
            self.s.uffd = -1
        if self.s.stop_fd >= 0:
            close(self.s.stop_fd)
            self.s.stop_fd = -1
        for fd in (self.s.ps_fd, self.s.cache_fd, self.s.ps_progress_fd):
            if fd >= 0:
                close(fd)
        self.s.ps_fd = self.s.cache_fd = self.s.ps_progress_fd = -1

    def close(self):
        """Give back the memory exports and close the userfaultfd (closing it also
        unregisters every area).  The loops must have returned."""
        for writes in self.writes or ():
            writes.close()
        self.writes = []
        self._release()

    cdef Py_buffer *_export(self, obj) except NULL:
        cdef Py_buffer *view = &self.views[self.nviews]
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
        self.nviews += 1
        return view

    cdef unsigned char *_bitmap(self, uint64_t npages) except NULL:
        cdef unsigned char *bits = <unsigned char *>calloc((npages + 7) // 8, 1)
        if bits == NULL:
            raise MemoryError()
        return bits

    def add_area(self, region, source=None, present=None, name=None, chunks=None,
                 int fd=-1, uint64_t chunk_bytes=0):
        """Register ``region`` (MISSING mode).  Local source: its pages come from
        ``source`` (same length or longer) where ``present`` has the page's bit, else
        they are zero.  Remote source (``source`` None): pages are asked for on the
        request fd and placed by ``receive``; ``name`` is the block's idstr there, and
        ``present`` marks the pages already in place (arrived before registration; never
        asked for).  Chunked source (qfram.chunked): ``chunks`` is the block's index
        (qf_chunk entries, checked against the file), read from ``fd`` in chunks of
        ``chunk_bytes``.  Returns the area's index."""
        cdef Py_buffer *r
        cdef Py_buffer *src
        cdef Py_buffer pview
        cdef Area *a
        cdef bytes encoded
        cdef AreaWrites writes
        if self.s.nareas >= MAX_AREAS:
            raise ValueError(f"at most {MAX_AREAS} areas")
        encoded = (name or "").encode()
        if len(encoded) > 255:
            raise ValueError("a block name holds at most 255 bytes")
        if source is None and not encoded:
            raise ValueError("a remote area needs its block name")
        if source is not None and present is None:
            raise ValueError("a local source needs its bitmap of present pages")
        if chunks is not None and (fd < 0 or chunk_bytes == 0 or chunk_bytes % PAGE
                                   or source is not None):
            raise ValueError("a chunked source is an index, an fd and a chunk size")
        r = self._export(region)
        if <uint64_t>r.buf % PAGE or r.len % PAGE or r.len == 0:
            raise ValueError("a userfaultfd area must be whole, aligned pages")
        a = &self.s.areas[self.s.nareas]
        memset(a, 0, sizeof(Area))
        a.kind = AREA_LOCAL if source is not None or chunks is not None else AREA_REMOTE
        a.base = <uint64_t>r.buf
        a.length = r.len
        a.npages = r.len // PAGE
        memcpy(a.name, <const char *>encoded, len(encoded))
        a.name_len = len(encoded)
        if present is not None:
            PyObject_GetBuffer(present, &pview, PyBUF_SIMPLE)
            PyBuffer_Release(&pview)
            if <uint64_t>pview.len * 8 < a.npages:
                raise ValueError("the present bitmap is shorter than the region")
        if source is not None:
            src = self._export(source)
            if src.len < r.len:
                raise ValueError("the source is shorter than the region")
            # the bitmap must outlive the server: keep our own copy
            kept = bytes(present)
            self.exports.append(kept)
            a.present = <const unsigned char *><char *>kept
            a.src = <const unsigned char *>src.buf
        if chunks is not None:
            self._add_chunks(a, chunks, fd, chunk_bytes)
        a.claimed = self._bitmap(a.npages)
        if a.kind == AREA_REMOTE:
            a.requested = self._bitmap(a.npages)
            a.zero_known = self._bitmap(a.npages)
            a.fault_ns = <uint64_t *>calloc(a.npages, 8)
            if a.fault_ns == NULL:
                raise MemoryError()
        _register(self.s.uffd, a.base, a.length, UFFDIO_REGISTER_MODE_MISSING
                  | (UFFDIO_REGISTER_MODE_WP if self.s.track_writes else 0), "missing")
        if a.kind == AREA_REMOTE and present is not None:
            self._mark_present(a, present)
        if self.s.track_writes and a.kind == AREA_LOCAL:
            writes = AreaWrites(region)
            writes.s = &self.s
            writes.area = a
            self.writes.append(writes)
        self.s.total_pages += a.npages
        self.s.nareas += 1
        return self.s.nareas - 1

    cdef int _add_chunks(self, Area *a, chunks, int fd, uint64_t chunk_bytes) except -1:
        """Check a chunked area's index once more where the C loops rely on it (the
        stored bytes fit the thread's buffers) and keep a copy."""
        cdef bytes kept = bytes(chunks)
        cdef const qf_chunk *c = <const qf_chunk *><const char *>kept
        cdef uint64_t i, n = (a.npages * PAGE + chunk_bytes - 1) // chunk_bytes
        if <uint64_t>len(kept) != n * sizeof(qf_chunk):
            raise ValueError(f"the index holds {len(kept) // sizeof(qf_chunk)} chunks, "
                             f"the area needs {n}")
        for i in range(n):
            if c[i].kind > QF_CHUNK_ZSTD or c[i].length > 2 * chunk_bytes \
                    or (c[i].kind == QF_CHUNK_RAW
                        and c[i].length != min(chunk_bytes, a.npages * PAGE - i * chunk_bytes)):
                raise ValueError(f"chunk {i}: {c[i].length} stored bytes of kind "
                                 f"{c[i].kind} do not fit a {chunk_bytes}-byte chunk")
        self.exports.append(kept)
        a.chunks = c
        a.chunk_pages = chunk_bytes // PAGE
        a.fd = fd
        self.s.stage_bytes = max(self.s.stage_bytes, 3 * chunk_bytes)
        return 0

    cdef int _mark_present(self, Area *a, present) except -1:
        """The pages whose bit is set are in place already.  Zero pages that arrived as
        ZERO records on new memory were never touched (/proc/self/pagemap tells which):
        a fault there gets the zero page on the spot, nothing is asked for — mapping them
        all now would cost ~1.4 us a page of downtime."""
        cdef Py_buffer view
        cdef uint64_t i, j, k, p, n = 0
        cdef uint64_t entries[512]
        cdef int pm
        cdef ssize_t got
        cdef const unsigned char *bits
        PyObject_GetBuffer(present, &view, PyBUF_SIMPLE)
        pm = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        try:
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
                    if qf_bit(bits, p):
                        n += 1
                        if (entries[k] >> 63) & 1:
                            qf_set_bit(a.claimed, p, True)
                        else:                       # arrived as zero, never touched
                            qf_set_bit(a.zero_known, p, True)
                i += j
        finally:
            if pm >= 0:
                close(pm)
            PyBuffer_Release(&view)
        a.placed = n
        self.s.placed_pages += n
        return 0

    def set_remote(self, remote, double timeout=10.0, bint resumable=False):
        """Faults on remote areas become page requests written to ``remote``: an fd, or
        a channel (its ``c_transport`` when it has one, else its ``fd``).
        ``resumable``: when the return path fails, requests wait for
        :meth:`resume_remote` instead of failing the fault server."""
        cdef Transport *transport = NULL
        cdef int fd
        capsule = getattr(remote, "c_transport", None)
        if capsule is not None:
            transport = <Transport *>PyCapsule_GetPointer(capsule, "qfram.transport")
            fd = transport.fd
        else:
            fd = remote if isinstance(remote, int) else remote.fd
        if fd < 0:
            raise ValueError(f"{remote!r} has no file descriptor")
        qf_lock(&self.s.rp_lock)
        self.s.request_fd = fd
        self.s.rp_transport = transport
        self.s.last_request_area = -1
        self.s.request_timeout_ms = <int>(timeout * 1000)
        self.s.resumable = resumable
        qf_store_int(&self.s.link_down, 0)
        qf_unlock(&self.s.rp_lock)
        self.remote = remote           # the transport lives in it

    # -- the shared source: a host page server (_shared.pxi) ---------------------------------

    def add_shared_area(self, region, int server_block, uint64_t chunk_bytes,
                        zero_chunks, uint64_t cache_offset):
        """Register ``region`` — a copy-on-write mapping of the page server's cache at
        ``cache_offset`` — in MISSING mode: a hole touched there becomes a request for
        its chunk (``chunk_bytes``) of block ``server_block`` at the server;
        ``zero_chunks`` marks the chunks that are all zero (mapped to the zero page
        here).  Returns the area's index."""
        cdef Py_buffer *r
        cdef Area *a
        cdef uint64_t n
        if self.s.nareas >= MAX_AREAS:
            raise ValueError(f"at most {MAX_AREAS} areas")
        if self.s.track_writes:
            raise ValueError("a shared area cannot be reset (its pages are the server's)")
        if chunk_bytes < PAGE or chunk_bytes % PAGE or not 0 <= server_block < 256:
            raise ValueError("a shared area needs whole-page chunks and a block 0..255")
        r = self._export(region)
        if <uint64_t>r.buf % PAGE or r.len % PAGE or r.len == 0:
            raise ValueError("a userfaultfd area must be whole, aligned pages")
        n = (<uint64_t>r.len + chunk_bytes - 1) // chunk_bytes
        if <uint64_t>len(zero_chunks) != (n + 7) // 8:
            raise ValueError(f"a zero-chunk bitmap of {len(zero_chunks)} bytes for {n} "
                             f"chunks")
        a = &self.s.areas[self.s.nareas]
        memset(a, 0, sizeof(Area))
        a.kind = AREA_SHARED
        a.base = <uint64_t>r.buf
        a.length = r.len
        a.npages = r.len // PAGE
        a.chunk_pages = chunk_bytes // PAGE
        a.nchunks = n
        a.server_block = server_block
        a.cache_offset = cache_offset
        kept = bytes(zero_chunks)
        self.exports.append(kept)
        a.zero_chunks = <const unsigned char *><char *>kept
        a.claimed = self._bitmap(n)
        a.ready = self._bitmap(n)
        a.by_fault = self._bitmap(n)
        a.asked_ns = <uint64_t *>calloc(n, 8)
        if a.asked_ns == NULL:
            raise MemoryError()
        _register(self.s.uffd, a.base, a.length, UFFDIO_REGISTER_MODE_MISSING, "missing")
        self.s.total_pages += a.npages
        self.s.nareas += 1
        return self.s.nareas - 1

    def set_page_server(self, int sock, int cache_fd, double timeout=10.0,
                        int window=64):
        """The page server's socket (handshake done; ours from now on: the fault thread
        reads its frames) and its cache memfd (ours too).  ``timeout`` bounds each
        write to it and each wait for a chunk asked for; ``window``: chunks the
        background asks for at a time."""
        if self.s.ps_fd >= 0:
            raise ValueError("a page server is set already")
        if window < 1:
            raise ValueError("window must be at least 1")
        os.set_blocking(sock, False)
        self.s.ps_progress_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.s.ps_progress_fd < 0:
            raise OSError(errno, "eventfd")
        self.s.ps_fd = sock
        self.s.cache_fd = cache_fd
        self.s.request_timeout_ms = <int>(timeout * 1000)
        self.s.ps_window = window

    def ask_chunks(self, int area, uint64_t first, uint64_t count):
        """Ask the page server for chunks [first, first+count) of a shared area (those
        not asked for yet; zero chunks are mapped here): the working set, before the
        program runs.  Returns how many were asked for."""
        cdef Area *a
        cdef uint64_t c, run_start = 0, run = 0, asked = 0
        cdef int rc = 0
        if not 0 <= area < self.s.nareas or self.s.areas[area].kind != AREA_SHARED:
            raise ValueError(f"area {area} is not a shared one")
        a = &self.s.areas[area]
        if first >= a.nchunks:
            return 0
        count = min(count, a.nchunks - first)
        with nogil:
            for c in range(first, first + count + 1):
                if c < first + count and not qf_bit(a.zero_chunks, c) \
                        and qf_claim_bit(a.claimed, c):
                    if run == 0:
                        run_start = c
                    run += 1
                    continue
                if c < first + count and qf_bit(a.zero_chunks, c):
                    if qf_claim_bit(a.claimed, c):
                        rc = _place_zero_chunk(&self.s, a, c)
                        if rc < 0:
                            break
                if run:
                    rc = _ps_ask(&self.s, a, run_start, run, qf_now_ns(), False)
                    if rc < 0:
                        break
                    asked += run
                    run = 0
        if rc < 0:
            raise OSError(self.s.error or EIO, f"asking the page server: {self._failure()}")
        return asked

    def chunks_ready(self, int area, uint64_t first, uint64_t count):
        """Whether every chunk of [first, first+count) of a shared area is in place
        (READY once, or zero and mapped)."""
        cdef Area *a = &self.s.areas[area]
        cdef uint64_t c
        if not 0 <= area < self.s.nareas or a.kind != AREA_SHARED:
            raise ValueError(f"area {area} is not a shared one")
        for c in range(first, min(first + count, a.nchunks)):
            if not qf_bit_atomic(a.ready, c):
                return False
        return True

    @property
    def page_server_reason(self):
        """What the page server said when it failed or left ("" when nothing)."""
        return self.s.ps_reason.decode(errors="replace")

    def pause_remote(self):
        """The link is down: requests wait (dropped now, asked again on resume)."""
        qf_lock(&self.s.rp_lock)
        self.s.request_fd = -1
        self.s.rp_transport = NULL
        qf_store_int(&self.s.link_down, 1)
        qf_unlock(&self.s.rp_lock)
        self.remote = None

    @property
    def link_down(self):
        """A resumable return path failed (or was paused): requests wait."""
        return bool(qf_load_int(&self.s.link_down))

    def resume_remote(self, remote, double timeout=10.0):
        """Requests go to ``remote`` again; every page asked for and not yet in place is
        asked for again (what was sent on the lost link may never have arrived)."""
        cdef uint64_t one = 1
        self.set_remote(remote, timeout, True)
        qf_store_int(&self.s.resume_pending, 1)
        write(self.s.stop_fd, &one, 8)         # wake the fault thread to do it

    cdef int _require(self, AreaKind kind, str what) except -1:
        cdef int i
        for i in range(self.s.nareas):
            if self.s.areas[i].kind != kind:
                raise ValueError(f"{what} needs areas with a "
                                 f"{'local' if kind == AREA_LOCAL else 'remote'} source; "
                                 f"area {i} has a "
                                 f"{'remote' if kind == AREA_LOCAL else 'local'} one")
        return 0

    def _failure(self):
        """What went wrong in a loop, for an exception."""
        cdef char where[320]
        _where(&self.s, where, sizeof(where))
        reason = os.strerror(self.s.error)
        if self.s.ps_reason[0]:
            reason = self.s.ps_reason.decode(errors="replace")
        return f"{where.decode(errors='replace').strip()}: {reason}" if where[0] else reason

    # -- the loops --------------------------------------------------------------------------

    cdef int _run(self, Loop loop, const char *doing, str name) except -1:
        """Run a GIL-free loop; on a failure end the process (exit_on_failure: threads
        waiting for pages it claimed could never be woken) or raise."""
        cdef int rc
        with nogil:
            rc = loop(&self.s)
            if rc < 0 and self.s.exit_on_failure:
                _die(&self.s, None, doing)
        if rc < 0:
            raise OSError(self.s.error, f"{name}: {self._failure()}")
        return 0

    def serve_faults(self):
        """Serve faults until stop(); run it on a thread of its own (GIL released)."""
        self._run(_serve_loop, b"serving faults", "fault server")

    def fill_background(self):
        """Place every page not placed yet, in order (GIL released); returns when all
        are in place or stop() was called.  Local areas only (a remote area's pages
        arrive through receive())."""
        for i in range(self.s.nareas):
            if self.s.areas[i].kind == AREA_REMOTE:
                raise ValueError("fill_background needs areas with a local source (or a "
                                 "page server's): a remote area's pages arrive through "
                                 "receive()")
        self._run(_fill_loop, b"filling in the background", "background fill")

    def receive(self, QEMUFile f not None, int channel=0):
        """Place the pages of a postcopy stream as they arrive on ``f`` (GIL released):
        PART/END sections of RAM page records, until EOF.  ``channel`` (0: main, 1:
        preempt) names the stream for ``placed_upto``.  Returns when the stream ends;
        raises on a broken stream or connection."""
        cdef int rc
        if not 0 <= channel < 2:
            raise ValueError("channel is 0 or 1")
        self._require(AREA_REMOTE, "receive")
        cdef unsigned char *stage = <unsigned char *>malloc(RUN_PAGES * PAGE)
        if stage == NULL:
            raise MemoryError()
        qf_begin_gil_free(f)
        qf_store(&self.s.upto[channel], 0)      # offsets in this stream
        try:
            with nogil:
                qf_add_int(&self.s.receiving, 1)
                rc = _receive_sections(&self.s, f, &self.s.upto[channel], stage)
                # a lost link is survivable when the return path is resumable (the
                # pages come again on the next link); a broken stream or a page that
                # could not be placed never is
                if rc < 0 and self.s.exit_on_failure and not (
                        self.s.resumable and not self.s.format_error and not self.s.error):
                    _die(&self.s, f, b"receiving pages")
                qf_add_int(&self.s.receiving, -1)
        finally:
            qf_end_gil_free(f)
            free(stage)
        if rc == 0:
            return
        if self.s.format_error:
            what = {BAD_RECORD: "an unexpected record or section",
                    UNKNOWN_BLOCK: "a page of an unknown block",
                    PAGE_PAST_BLOCK: "a page outside its block"}[self.s.format_error]
            raise FormatError(f"postcopy stream: {what}", self.s.format_offset)
        if self.s.error:
            raise OSError(self.s.error, f"postcopy receive: {self._failure()}")
        err = f.error
        raise err if err is not None else OSError(EPIPE, "postcopy receive: the stream ended")

    def stop(self):
        """Make the loops return (safe from any thread)."""
        cdef uint64_t one = 1
        qf_store_int(&self.s.stopping, 1)
        write(self.s.stop_fd, &one, 8)

    def unregister(self):
        """Stop catching faults on every area (after the fill: the memory is complete)."""
        cdef uffdio_range rng
        cdef int i
        for i in range(self.s.nareas):
            rng.start = self.s.areas[i].base
            rng.len = self.s.areas[i].length
            if ioctl(self.s.uffd, UFFDIO_UNREGISTER, &rng) != 0:
                raise OSError(errno, f"UFFDIO_UNREGISTER: {os.strerror(errno)}")

    # -- the return path --------------------------------------------------------------------

    def send_message(self, unsigned int msg_type, bytes payload=b""):
        """Write a return path message (be16 type, be16 length, payload) between the
        fault thread's requests, GIL released."""
        cdef bytes msg = msg_type.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
        cdef const unsigned char *p = <const unsigned char *>msg
        cdef size_t n = len(msg)
        cdef int rc
        if self.s.request_fd < 0 and not self.s.resumable:
            raise ValueError("no return path: set_remote() first")
        with nogil:
            rc = _send(&self.s, p, n)
        if rc < 0:
            raise OSError(errno, f"return path: {os.strerror(errno)}")

    def received_bitmap(self, str name):
        """The pages of remote area ``name`` that are in place (or known to be zero): a
        bitmap of little-endian 64-bit words, as QEMU's RECV_BITMAP carries it."""
        cdef int i
        cdef Area *a
        for i in range(self.s.nareas):
            a = &self.s.areas[i]
            if a.kind == AREA_REMOTE and a.name[:a.name_len] == name.encode():
                words = (a.npages + 63) // 64
                out = bytearray(words * 8)
                for j in range((a.npages + 7) // 8):
                    out[j] = a.claimed[j] | a.zero_known[j]
                if a.npages % 8:                # bits past the end stay clear
                    out[a.npages // 8] &= (1 << (a.npages % 8)) - 1
                return bytes(out)
        raise KeyError(name)

    def placed_upto(self, int channel):
        """The offset in ``channel``'s stream (0: main, 1: preempt) before which every
        page record is in place."""
        if not 0 <= channel < 2:
            raise ValueError("channel is 0 or 1")
        return qf_load(&self.s.upto[channel])

    # -- state and statistics ---------------------------------------------------------------

    @property
    def exit_on_failure(self):
        """A loop's failure ends the process (threads waiting for pages cannot be woken
        with the right bytes); else it raises in the loop's thread."""
        return self.s.exit_on_failure

    @exit_on_failure.setter
    def exit_on_failure(self, bint value):
        self.s.exit_on_failure = value

    @property
    def receiving(self):
        """How many receive() calls run without the GIL: only once they do may a Python
        thread fault on remote areas (it holds the GIL while it waits for its page)."""
        return qf_load_int(&self.s.receiving)

    @property
    def placement(self):
        """How receive() places arrived pages: one UFFDIO_COPY per run of data pages
        from a cache-hot staging buffer, one UFFDIO_ZEROPAGE per run of zero pages.
        UFFDIO_MOVE and UFFDIO_CONTINUE (see placements_offered) measured dearer here:
        their pages must be allocated first (scripts/experiments/uffd_placement.c)."""
        return "copy"

    @property
    def placements_offered(self):
        """The placing ioctls this kernel offers (UFFDIO_API's features)."""
        offered = ["copy", "zeropage"]
        if self.features & (1 << 16):          # UFFD_FEATURE_MOVE, Linux 6.8+
            offered.append("move")
        if self.features & (1 << 10):          # UFFD_FEATURE_MINOR_SHMEM
            offered.append("continue")
        return offered

    @property
    def placed_pages(self):
        return qf_load(&self.s.placed_pages)

    @property
    def total_pages(self):
        return self.s.total_pages

    @property
    def counters(self):
        """Every counter of the loops (the Counters struct), by name."""
        return dict(self.s.n)

    def latencies_ns(self):
        """Time from reading each fault to its pages being in place, in ns."""
        return [self.s.lat[i] for i in range(min(self.s.nlat, <uint64_t>MAX_LATENCIES))]

    def revert_written(self):
        """Drop the pages of local areas written since they were placed (or since the
        last call) and make them missing again: the next touch has them placed from the
        source anew, as the first time (``AreaWrites``).  Needs ``track_writes``; call
        it while no thread touches the memory and no loop but serve_faults runs (a
        sandbox between runs).  Returns (pages, runs)."""
        if not self.s.track_writes:
            raise ValueError("revert_written() needs a FaultServer made with track_writes")
        pages = runs = 0
        for writes in self.writes:
            p, r = writes.revert_written()
            pages += p
            runs += r
        return pages, runs

    def touches(self):
        """The faults so far, in the order they came, as (area index, page) pairs (a
        page several threads faulted on at once may come more than once)."""
        cdef uint64_t n = qf_load(&self.s.ntouches)
        return [(<int>(self.s.touches[i] >> 48), self.s.touches[i] & ((1ULL << 48) - 1))
                for i in range(n)]

    def prefetch(self, pages, uint64_t window=0):
        """Place the windows of ``pages`` — (area index, page) pairs of local areas, in
        the order given; ``window`` pages a window, 0: the fault path's — before anything
        asks for them: the page cache is told to read them all first, in file order
        (readahead of merged runs: as near one sequential read as the set allows), then
        each run of adjacent windows is placed with one UFFDIO_COPY, in the order given
        (GIL released).  Pages placed already are stepped
        over.  Returns how many pages it placed."""
        cdef uint64_t n = len(pages)
        cdef uint64_t *want = <uint64_t *>malloc(max(n, <uint64_t>1) * sizeof(uint64_t))
        cdef uint64_t *counts = <uint64_t *>malloc(max(n, <uint64_t>1) * sizeof(uint64_t))
        cdef uint64_t i, page, first, count, run_first, run_count, placed, runs, total = 0
        cdef Area *a
        cdef Area *run_area
        cdef int idx
        cdef int rc = 0
        cdef unsigned char *stage = _new_stage(&self.s)
        if want == NULL or counts == NULL or (self.s.stage_bytes and stage == NULL):
            free(want)
            free(counts)
            free(stage)
            raise MemoryError()
        if window == 0:
            window = self.s.window_pages
        try:
            for i, (idx, page) in enumerate(pages):
                if not 0 <= idx < self.s.nareas or self.s.areas[idx].kind != AREA_LOCAL:
                    raise ValueError(f"area {idx}: no such local area")
                if page >= self.s.areas[idx].npages:
                    raise ValueError(f"page {page} lies outside area {idx}")
                want[i] = (<uint64_t>idx << 48) | page
            with nogil:
                # the touches become runs of adjacent windows, in place: (area, first),
                # count; the page cache reads them all ahead, then each is placed
                runs = 0
                for i in range(n):
                    a = &self.s.areas[want[i] >> 48]
                    _window_of(window, a, want[i] & ((1ULL << 48) - 1), &first, &count)
                    if runs and run_area == a and first == run_first + run_count:
                        run_count += count
                        counts[runs - 1] = run_count
                        continue
                    run_area, run_first, run_count = a, first, count
                    want[runs] = (<uint64_t>(a - self.s.areas) << 48) | first
                    counts[runs] = count
                    runs += 1
                _read_ahead(&self.s, want, counts, runs)
                for i in range(runs):
                    a = &self.s.areas[want[i] >> 48]
                    rc = _place_window(&self.s, a, want[i] & ((1ULL << 48) - 1), counts[i],
                                       stage, &placed)
                    if rc < 0:
                        break
                    total += placed
                qf_add(&self.s.n.prefetch_pages, total)
            if rc < 0:
                raise OSError(self.s.error, f"prefetch: {os.strerror(self.s.error)}")
            return total
        finally:
            free(want)
            free(counts)
            free(stage)


# ---------------------------------------------------------------------------------------
# touching memory that may fault, without the GIL
# ---------------------------------------------------------------------------------------

# A thread that touches a missing page waits until its page is placed; if it held the GIL
# meanwhile, nothing in Python could run — not the code that accepts a resumed link.  So
# programs (and qfram's Workload) touch such memory through these.

def read_memory(region, Py_ssize_t offset, Py_ssize_t length):
    """A copy of ``region[offset:offset+length]``, read with the GIL released."""
    cdef Py_buffer view
    cdef bytes out
    cdef char *dst
    PyObject_GetBuffer(region, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or length < 0 or offset + length > view.len:
            raise ValueError("the range lies outside the region")
        out = PyBytes_FromStringAndSize(NULL, length)
        dst = PyBytes_AS_STRING(out)
        with nogil:
            memcpy(dst, <char *>view.buf + offset, length)
        return out
    finally:
        PyBuffer_Release(&view)


def write_memory(region, Py_ssize_t offset, data):
    """``region[offset:offset+len(data)] = data``, with the GIL released."""
    cdef Py_buffer view
    cdef Py_buffer src
    PyObject_GetBuffer(region, &view, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        try:
            if offset < 0 or offset + src.len > view.len:
                raise ValueError("the range lies outside the region")
            with nogil:
                memcpy(<char *>view.buf + offset, src.buf, src.len)
        finally:
            PyBuffer_Release(&src)
    finally:
        PyBuffer_Release(&view)


# the page scans (dirty tracker, private copies): qfram/_pagescan.pxi
include "_pagescan.pxi"
# a host page server's cache as a page source: qfram/_shared.pxi
include "_shared.pxi"
# a SIGBUS in a snapshot mapping says why and ends the process: qfram/_sigbus.pxi
include "_sigbus.pxi"
