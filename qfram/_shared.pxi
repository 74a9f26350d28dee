# The shared source: a host page server's cache (qfram.server), included by _uffd.pyx.
#
# The server keeps the snapshot's RAM, decoded and verified, in a memfd; the client maps
# it copy-on-write (MAP_PRIVATE) and registers that mapping in MISSING mode.  A page that
# is in the cache is mapped by the kernel on first touch — shared with every clone, no
# fault here at all; a page that is not is a hole, and the fault thread gets a MISSING
# fault for it: it asks the server for the page's chunk (REQ) and, once the server says
# READY (the chunk's pages are in the cache), wakes whoever waits in the chunk
# (UFFDIO_WAKE: they touch again and the kernel maps the cached pages).  A zero chunk is
# never in the cache: the fault thread maps the zero page there itself.
#
# A chunk can leave the cache (the server evicts under its memory limit; the clone's
# unwritten pages go with it): the next touch is a fault again, and the chunk is asked
# for again.  So the fault thread serves for as long as the memory lives.
#
# Frames (qfram.format.pageserver): 16 bytes, big-endian u8 op, u8 block, u16 text
# length, u32 first chunk, u32 count, u32 flags; FAIL and BYE carry a text.

# (the frame's constants are qfram/wire.py's, through includes/wire.pxd)
cdef enum:
    # a chunk the server keeps calling READY while its pages never reach the cache is a
    # lying (or thrashing) server: give up after this many asks in a row
    PS_MAX_STREAK = 64
    PS_SCAN_MS = 200              # how often asked chunks are checked for a late answer


cdef inline uint32_t _rd32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef void _ps_fail(Server *s, const char *what, const unsigned char *text,
                   size_t n) noexcept nogil:
    """Remember why the page server failed us (for _die and the exception)."""
    cdef int k
    if s.ps_reason[0]:
        return                      # the first reason wins
    k = snprintf(s.ps_reason, sizeof(s.ps_reason), "%s", what)
    if n and k < <int>sizeof(s.ps_reason) - 1:
        snprintf(s.ps_reason + k, sizeof(s.ps_reason) - k, ": %.*s", <int>n, text)
    if s.error == 0:
        s.error = EIO


cdef int _ps_send(Server *s, int op, Area *a, uint64_t first, uint64_t count,
                  bint urgent) noexcept nogil:
    """One REQ frame (the fault and fill threads share the socket: one writer at a
    time); ``urgent``: a thread waits for it (the server decodes it before the
    background's)."""
    cdef unsigned char msg[PS_FRAME_BYTES]
    cdef int rc, err
    cdef const char *reason
    memset(msg, 0, PS_FRAME_BYTES)
    msg[0] = <unsigned char>op
    msg[1] = <unsigned char>a.server_block
    _be32(msg + 4, <uint32_t>first)
    _be32(msg + 8, <uint32_t>count)
    _be32(msg + 12, PS_FLAG_URGENT if urgent else 0)
    qf_lock(&s.rp_lock)
    if s.ps_fd < 0:
        qf_unlock(&s.rp_lock)
        _ps_fail(s, "the page server is gone", NULL, 0)
        return -1
    rc = _write_all(s.ps_fd, msg, PS_FRAME_BYTES, s.request_timeout_ms)
    err = errno
    qf_unlock(&s.rp_lock)
    if rc < 0:
        if err == ETIMEDOUT:
            _ps_fail(s, "the page server took no request for a whole timeout", NULL, 0)
        else:
            reason = strerror(err)
            _ps_fail(s, "writing to the page server", <const unsigned char *>reason,
                     strlen(reason))
        return -1
    return 0


cdef uint64_t _chunk_pages(Area *a, uint64_t c) noexcept nogil:
    """Pages of chunk c (the last one of a block may be short)."""
    return min(a.chunk_pages, a.npages - c * a.chunk_pages)


cdef int _ps_ask(Server *s, Area *a, uint64_t first, uint64_t count, uint64_t now,
                 bint fault) noexcept nogil:
    """Ask for chunks [first, first+count) (already claimed by the caller)."""
    cdef uint64_t c
    for c in range(first, first + count):
        a.asked_ns[c] = now
        if fault:
            qf_set_bit(a.by_fault, c, True)
    qf_add(&s.ps_outstanding, count)
    qf_add(&s.n.requests, 1)
    qf_add(&s.n.requested_pages, count * a.chunk_pages)
    if fault:
        s.n.fault_pages += count * a.chunk_pages
    return _ps_send(s, PS_OP_REQ, a, first, count, fault)


cdef int _place_zero_chunk(Server *s, Area *a, uint64_t c) noexcept nogil:
    """The zero page over a zero chunk (the pages a thread wrote meanwhile stay)."""
    cdef uint64_t n = _chunk_pages(a, c)
    if _place(s, a.base + c * a.chunk_pages * PAGE, 0, n, True) < 0:
        return -1
    if qf_claim_bit(a.ready, c):
        qf_add(&a.placed, n)
        qf_add(&s.placed_pages, n)
    return 0


cdef int _shared_fault(Server *s, Area *a, uint64_t page, uint64_t t0) noexcept nogil:
    """A hole was touched: its chunk is zero (placed here), asked for already (the READY
    will wake the thread), or to be asked for — again, if it was READY once and left the
    cache since."""
    cdef uint64_t c = page // a.chunk_pages
    if qf_bit(a.zero_chunks, c):
        return _place_zero_chunk(s, a, c)
    if qf_claim_bit(a.claimed, c):
        return _ps_ask(s, a, c, 1, t0, True)
    if not qf_bit_atomic(a.ready, c) or a.asked_ns[c]:
        return 0                    # asked for, not answered yet: the READY wakes us
    if _in_cache(s, a, page):
        return _wake(s, a, page, 1)  # READY came after the touch: touch again
    # READY once, a hole again: evicted by the server since
    if <int64_t>c == s.ps_streak_chunk and a == s.ps_streak_area:
        s.ps_streak += 1
        if s.ps_streak > PS_MAX_STREAK:
            _ps_fail(s, "the page server answers READY, but the chunk never reaches the "
                        "cache", NULL, 0)
            s.fail_addr = a.base + page * PAGE
            return -1
    else:
        s.ps_streak_area = a
        s.ps_streak_chunk = <int64_t>c
        s.ps_streak = 0
    return _ps_ask(s, a, c, 1, t0, True)


cdef bint _in_cache(Server *s, Area *a, uint64_t page) noexcept nogil:
    """Whether the page is in the server's cache (SEEK_DATA on the memfd)."""
    cdef off_t off = <off_t>(a.cache_offset + page * PAGE)
    return lseek(s.cache_fd, off, SEEK_DATA) == off


cdef int _wake(Server *s, Area *a, uint64_t first_page, uint64_t pages) noexcept nogil:
    cdef uffdio_range rng
    rng.start = a.base + first_page * PAGE
    rng.len = min(pages, a.npages - first_page) * PAGE
    if ioctl(s.uffd, UFFDIO_WAKE, &rng) != 0:
        s.error = errno
        return -1
    return 0


cdef Area *_shared_area(Server *s, int block) noexcept nogil:
    cdef int i
    for i in range(s.nareas):
        if s.areas[i].kind == AREA_SHARED and s.areas[i].server_block == block:
            return &s.areas[i]
    return NULL


cdef int _ps_ready(Server *s, Area *a, uint64_t first, uint64_t count) noexcept nogil:
    """Chunks [first, first+count) are in the cache: count them placed (once), note the
    latency of those a fault asked for, and wake whoever waits in them."""
    cdef uint64_t c, n, now = qf_now_ns(), answered = 0
    for c in range(first, first + count):
        if a.asked_ns[c]:
            answered += 1
            if qf_bit(a.by_fault, c):
                _note_latency(s, now - a.asked_ns[c])
                qf_set_bit(a.by_fault, c, False)
            a.asked_ns[c] = 0
        if qf_claim_bit(a.ready, c):
            n = _chunk_pages(a, c)
            qf_add(&a.placed, n)
            qf_add(&s.placed_pages, n)
    qf_add(&s.ps_outstanding, <uint64_t>(-<int64_t>answered))
    return _wake(s, a, first * a.chunk_pages, count * a.chunk_pages)


cdef int _ps_read(Server *s) noexcept nogil:
    """Take every frame the server has sent (the socket is non-blocking).  -1 on a FAIL,
    a broken frame, or the server gone while pages are still to come."""
    cdef unsigned char head[PS_FRAME_BYTES]
    cdef unsigned char text[PS_MAX_TEXT]
    cdef ssize_t got
    cdef int op, block
    cdef uint32_t n, first, count
    cdef Area *a
    cdef uint64_t one = 1
    while s.ps_fd >= 0:
        got = _ps_recv(s.ps_fd, head, PS_FRAME_BYTES, s.ps_have)
        if got == -2:
            return 0                # nothing more for now
        if got <= 0:
            # the server closed the socket (killed, or gone after BYE)
            qf_lock(&s.rp_lock)
            close(s.ps_fd)
            s.ps_fd = -1
            qf_unlock(&s.rp_lock)
            if s.placed_pages < s.total_pages or qf_load(&s.ps_outstanding):
                _ps_fail(s, "the page server went away before every page had come", NULL, 0)
                return -1
            return 0                # complete: the clone lives on without it
        op = head[0]
        block = head[1]
        n = (<uint32_t>head[2] << 8) | head[3]
        first = _rd32(head + 4)
        count = _rd32(head + 8)
        if n > PS_MAX_TEXT or (op != PS_OP_FAIL and op != PS_OP_BYE and n):
            _ps_fail(s, "the page server sent a broken frame", NULL, 0)
            return -1
        if n and _ps_recv_all(s.ps_fd, text, n, s.request_timeout_ms) < 0:
            _ps_fail(s, "the page server's reason was cut short", NULL, 0)
            return -1
        if op == PS_OP_FAIL:
            _ps_fail(s, "the page server failed", text, n)
            return -1
        if op == PS_OP_BYE:
            _ps_fail(s, "the page server stopped", text, n)
            if s.placed_pages < s.total_pages or qf_load(&s.ps_outstanding):
                return -1
            s.ps_reason[0] = 0      # complete: no harm done
            s.error = 0
            continue
        a = _shared_area(s, block)
        if op != PS_OP_READY or a == NULL or count == 0 or first >= a.nchunks \
                or count > a.nchunks - first:
            _ps_fail(s, "the page server answered for chunks it was not asked for", NULL, 0)
            return -1
        if _ps_ready(s, a, first, count) < 0:
            return -1
        write(s.ps_progress_fd, &one, 8)
    return 0


cdef ssize_t _ps_recv(int fd, unsigned char *buf, size_t n, size_t *have) noexcept nogil:
    """Read a whole frame header from a non-blocking socket, keeping a partial one in
    ``buf``/``have`` between calls: n (a frame), 0 (closed), -1 (error), -2 (not yet)."""
    cdef ssize_t k
    while have[0] < n:
        k = read(fd, buf + have[0], n - have[0])
        if k > 0:
            have[0] += <size_t>k
            continue
        if k == 0:
            return 0
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return -2
        return -1
    have[0] = 0
    return <ssize_t>n


cdef int _ps_recv_all(int fd, unsigned char *buf, size_t n, int timeout_ms) noexcept nogil:
    """The text after a frame, waiting at most timeout_ms for each part."""
    cdef size_t have = 0
    cdef ssize_t k
    cdef pollfd pfd
    while have < n:
        k = read(fd, buf + have, n - have)
        if k > 0:
            have += <size_t>k
        elif k < 0 and errno == EINTR:
            continue
        elif k < 0 and errno == EAGAIN:
            pfd.fd = fd
            pfd.events = POLLIN
            pfd.revents = 0
            if poll(&pfd, 1, timeout_ms) <= 0:
                return -1
        else:
            return -1
    return 0


cdef int _ps_overdue(Server *s, uint64_t now) noexcept nogil:
    """A chunk asked for longer than the request timeout ago, unanswered: the server is
    silent (or starves this client) — give up with a reason instead of hanging."""
    cdef int i
    cdef uint64_t c, limit = <uint64_t>s.request_timeout_ms * 1000000
    cdef Area *a
    if qf_load(&s.ps_outstanding) == 0:
        return 0
    for i in range(s.nareas):
        a = &s.areas[i]
        if a.kind != AREA_SHARED:
            continue
        for c in range(a.nchunks):
            if a.asked_ns[c] and now - a.asked_ns[c] > limit:
                s.fail_addr = a.base + c * a.chunk_pages * PAGE
                _ps_fail(s, "the page server did not answer within the request timeout",
                         NULL, 0)
                return -1
    return 0


cdef int _shared_fill(Server *s, Area *a, int window) noexcept nogil:
    """The background for a shared area: zero chunks mapped here, the others asked for
    in runs, at most ``window`` chunks unanswered at a time (the fault thread takes the
    READYs and nudges us through ps_progress_fd)."""
    cdef uint64_t c = 0, run
    cdef uint64_t drained
    cdef pollfd pfd
    while c < a.nchunks:
        if qf_load_int(&s.stopping):
            return 0
        if s.error:
            return -1
        if qf_bit(a.zero_chunks, c):
            if qf_claim_bit(a.claimed, c):
                if _place_zero_chunk(s, a, c) < 0:
                    return -1
                qf_add(&s.n.background_pages, _chunk_pages(a, c))
            c += 1
            continue
        if qf_load(&s.ps_outstanding) >= <uint64_t>window:
            pfd.fd = s.ps_progress_fd
            pfd.events = POLLIN
            pfd.revents = 0
            poll(&pfd, 1, PS_SCAN_MS)
            read(s.ps_progress_fd, &drained, 8)
            continue
        run = 0
        while c + run < a.nchunks and run < 64 and not qf_bit(a.zero_chunks, c + run) \
                and qf_claim_bit(a.claimed, c + run):
            run += 1
        if run:
            if _ps_ask(s, a, c, run, qf_now_ns(), False) < 0:
                return -1
            qf_add(&s.n.background_pages, run * a.chunk_pages)
            c += run
        else:
            c += 1                  # asked for by a fault already
    # every chunk asked for: wait for the answers (or a stop, or a failure)
    while qf_load(&a.placed) < a.npages:
        if qf_load_int(&s.stopping):
            return 0
        if s.error:
            return -1
        pfd.fd = s.ps_progress_fd
        pfd.events = POLLIN
        pfd.revents = 0
        poll(&pfd, 1, PS_SCAN_MS)
        read(s.ps_progress_fd, &drained, 8)
    return 0
