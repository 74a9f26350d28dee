"""The postcopy source's page-request server: the return path read, and every page
request answered on the preempt channel, without the GIL.

A destination's faulting thread waits for the pages it asked for.  Read and answered in
Python, a request also waited for the GIL whenever another thread of the source held it
— and, on a busy machine, for that thread to get a core back to let it go: milliseconds
at the 99th percentile.  Here the reader stays in C: REQ_PAGES_ID and REQ_PAGES are
checked against the RAM and their pages go out at once on the preempt channel, through
the core's save loop (each page's dirty bit is taken atomically, so the background
stream and this never send a page twice).  Only the other messages (SHUT, PONG,
QFRAM_RECEIVED, ...) come back to Python; what was served waits in a ring for Python's
bookkeeping (release-ram, the background scan's hints, the statistics).
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memcmp, memset

from qfram.includes.atomics cimport qf_lock, qf_unlock
from qfram.includes.bits cimport qf_bit, qf_bit_atomic, qf_set_bit
from qfram.includes.system cimport qf_now_ns
from qfram.includes.wire cimport (MIG_RP_MSG_REQ_PAGES_ID, MIG_RP_MSG_REQ_PAGES, SECTION_PART,
                                  SECTION_FOOTER, SECTION_EOF, RAM_SAVE_FLAG_EOS,
                                  RAM_SAVE_FLAG_CONTINUE, TARGET_PAGE_SIZE)
from qfram._fast cimport (QEMUFile, PageLoop, qf_begin_gil_free, qf_end_gil_free, qf_read,
                          qf_position, qf_save_records)

from qfram import wire
from qfram.errors import FormatError

cdef uint64_t PAGE = TARGET_PAGE_SIZE

cdef enum:
    MAX_BLOCKS = 64
    RING = 1024                   # served requests waiting for Python's bookkeeping
    DRAIN_AT = 768                # serve() hands back to Python to take them beyond this

# what serve() stopped for
cdef enum Stop:
    STOP_MESSAGE = 1              # a message for Python (or, kind 0, a full ring)
    STOP_READ = -1                # the return path failed or ended
    STOP_WRITE = -2               # the preempt channel failed
    STOP_BAD = -3                 # a request that breaks the protocol or leaves the RAM


cdef struct Block:
    const unsigned char *base
    uint64_t used_length
    unsigned char *dirty          # the pages still to send (the source's bitmap)
    unsigned char *resent         # the faulting pages sent a second time
    unsigned char *claimed        # what this channel sent, for release-ram (or NULL)
    unsigned char name[256]
    int name_len


cdef struct Served:
    int block
    uint64_t first
    uint64_t count
    uint64_t pages                # page records it took (0: all were sent before)
    int64_t end                   # the preempt stream's offset after them
    uint64_t t_read
    uint64_t t_done
    bint resent                   # the faulting page went once more
    bint dropped                  # nothing sent: asked and resent already, or the end


cdef struct State:
    Block blocks[MAX_BLOCKS]
    int nblocks
    int last                      # the last request's block (REQ_PAGES names none)
    uint32_t section_id
    int lock                      # the preempt file and the ring
    bint done                     # the preempt stream has ended
    Served ring[RING]
    uint64_t head                 # next to take
    uint64_t tail                 # next to fill
    # the message that stopped serve()
    unsigned int kind
    unsigned int length
    int64_t pos
    unsigned char payload[65536]
    const char *bad               # what was wrong with a request (STOP_BAD)
    uint64_t bad_start
    uint64_t bad_length


cdef inline uint64_t _be(const unsigned char *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef int _find(State *st, const unsigned char *name, int n) noexcept nogil:
    cdef int i
    for i in range(st.nblocks):
        if st.blocks[i].name_len == n and memcmp(st.blocks[i].name, name, n) == 0:
            return i
    return -1


cdef int64_t _part(State *st, QEMUFile f, Block *b, uint64_t first, uint64_t count,
                   unsigned char *dirty, unsigned char *claimed) noexcept nogil:
    """One PART section of [first, first+count) — only the pages still dirty when
    ``dirty`` is given — flushed when it holds a page.  Returns the pages, or -1."""
    cdef PageLoop loop
    f._put_byte(SECTION_PART)
    f._put_be(st.section_id, 4)
    memset(&loop, 0, sizeof(loop))
    loop.base = b.base
    loop.page_size = PAGE
    loop.first = first
    loop.end = first + count
    loop.next_page = first
    loop.flags = RAM_SAVE_FLAG_CONTINUE
    loop.detect_zero = True
    loop.dirty = dirty
    loop.claimed = claimed
    loop.idstr = b.name
    loop.idstr_len = b.name_len
    qf_save_records(f, &loop)
    f._put_be64(RAM_SAVE_FLAG_EOS)
    f._put_byte(SECTION_FOOTER)
    f._put_be(st.section_id, 4)
    if loop.pages + loop.zeros and f.last_error == 0:
        f._flush_batch()
    return -1 if f.last_error else <int64_t>(loop.pages + loop.zeros)


cdef int _bad(State *st, const char *what, uint64_t start, uint64_t length) noexcept nogil:
    st.bad = what
    st.bad_start = start
    st.bad_length = length
    return STOP_BAD


cdef int _answer(State *st, QEMUFile pf) noexcept nogil:
    """A page request: checked, its pages sent (the faulting one again if the
    background stream sent it already: it may still sit in that connection's buffers),
    and noted in the ring."""
    cdef uint64_t start, length, first, count
    cdef int b, n
    cdef int64_t sent
    cdef bint before
    cdef Block *blk
    cdef Served *e
    if st.length < 12:
        return _bad(st, b"a page request shorter than 12 bytes", 0, 0)
    start = _be(st.payload, 8)
    length = _be(st.payload + 8, 4)
    if st.kind == MIG_RP_MSG_REQ_PAGES_ID:
        n = st.payload[12] if st.length > 12 else 0
        if n == 0 or st.length != <unsigned int>(13 + n):
            return _bad(st, b"REQ_PAGES_ID with a broken block name", 0, 0)
        b = _find(st, st.payload + 13, n)
    else:
        if st.last < 0:
            return _bad(st, b"REQ_PAGES before any REQ_PAGES_ID", 0, 0)
        b = st.last
    if b < 0 or start % PAGE or length % PAGE or length == 0 \
            or start > st.blocks[b].used_length \
            or length > st.blocks[b].used_length - start:
        return _bad(st, b"outside the RAM", start, length)
    st.last = b
    blk = &st.blocks[b]
    first = start // PAGE
    count = length // PAGE
    before = not qf_bit_atomic(blk.dirty, first)
    qf_lock(&st.lock)
    e = &st.ring[st.tail % RING]
    e.block, e.first, e.count, e.t_read = b, first, count, qf_now_ns()
    e.pages, e.end, e.resent, e.dropped = 0, 0, False, False
    if st.done or (before and qf_bit(blk.resent, first)):
        e.dropped = True                # sent and sent again already: a duplicate
    else:
        sent = _part(st, pf, blk, first, count, blk.dirty, blk.claimed)
        if sent >= 0 and before:
            qf_set_bit(blk.resent, first, True)
            e.resent = True
            if _part(st, pf, blk, first, 1, NULL, NULL) < 0:
                sent = -1
        if sent < 0:
            qf_unlock(&st.lock)
            return STOP_WRITE
        e.pages = <uint64_t>sent
        e.end = pf.total_transferred
    e.t_done = qf_now_ns()
    st.tail += 1
    qf_unlock(&st.lock)
    return 0


cdef uint64_t *_runs(State *st, uint64_t n, Served *entries, uint64_t *counts) noexcept nogil:
    """Copy the n oldest entries of the ring and, for each, the stretches of pages its
    channel sent (claimed bits, cleared as they are read); NULL without memory (nothing
    is cleared then).  Called with the lock held."""
    cdef uint64_t i, p, first, total = 0, k = 0
    cdef uint64_t *runs
    cdef Served *e
    cdef Block *b
    if entries == NULL or counts == NULL:
        return NULL
    for i in range(n):
        total += st.ring[(st.head + i) % RING].count
    runs = <uint64_t *>malloc((total + 1) * 2 * sizeof(uint64_t))
    if runs == NULL:
        return NULL
    for i in range(n):
        e = &st.ring[(st.head + i) % RING]
        entries[i] = e[0]
        counts[i] = 0
        b = &st.blocks[e.block]
        if b.claimed == NULL or e.pages == 0:
            continue
        p = e.first
        while p < e.first + e.count:
            if not qf_bit(b.claimed, p):
                p += 1
                continue
            first = p
            while p < e.first + e.count and qf_bit(b.claimed, p):
                qf_set_bit(b.claimed, p, False)
                p += 1
            runs[2 * k] = first
            runs[2 * k + 1] = p - first
            k += 1
            counts[i] += 1
    return runs


cdef int _serve(State *st, QEMUFile rp, QEMUFile pf) noexcept nogil:
    cdef unsigned char head[4]
    cdef int rc
    while True:
        if st.tail - st.head >= DRAIN_AT:
            st.kind = 0
            return STOP_MESSAGE
        st.pos = qf_position(rp)
        if qf_read(rp, head, 4) < 0:
            return STOP_READ
        st.kind = (head[0] << 8) | head[1]
        st.length = (head[2] << 8) | head[3]
        if st.kind != MIG_RP_MSG_REQ_PAGES_ID and st.kind != MIG_RP_MSG_REQ_PAGES:
            # its payload stays unread: Python refuses a kind the return path does
            # not have before waiting for bytes a liar may never send
            return STOP_MESSAGE
        if st.length and qf_read(rp, st.payload, st.length) < 0:
            return STOP_READ
        rc = _answer(st, pf)
        if rc:
            return rc


cdef class RequestServer:
    """Serve page requests from a return path on a preempt channel's file ``pf`` (held
    in GIL-free use until :meth:`close`).  ``blocks``: ``(name, region, used_length,
    dirty, resent, claimed)`` per RAM block — the region's pages, the bitmap of pages
    still to send, the one of faulting pages sent twice, and the one that records what
    this channel sent (for release-ram; None without it).  ``section_id``: the RAM
    section's."""
    cdef State *st
    cdef QEMUFile pf
    cdef Py_buffer views[4 * MAX_BLOCKS]
    cdef int nviews
    cdef list names

    def __cinit__(self):
        self.st = NULL
        self.nviews = 0

    def __init__(self, QEMUFile pf not None, blocks, uint32_t section_id):
        cdef Block *b
        if len(blocks) > MAX_BLOCKS:
            raise ValueError(f"at most {MAX_BLOCKS} blocks")
        self.st = <State *>malloc(sizeof(State))
        if self.st == NULL:
            raise MemoryError()
        memset(self.st, 0, sizeof(State))
        self.st.last = -1
        self.st.section_id = section_id
        self.names = []
        try:
            for name, region, used_length, dirty, resent, claimed in blocks:
                encoded = name.encode()
                if not 0 < len(encoded) < 256:
                    raise ValueError(f"a block name of {len(encoded)} bytes")
                b = &self.st.blocks[self.st.nblocks]
                b.base = <const unsigned char *>self._export(region, False, used_length, 1)
                b.used_length = used_length
                npages = (used_length + PAGE - 1) // PAGE
                b.dirty = <unsigned char *>self._export(dirty, True, npages, 8)
                b.resent = <unsigned char *>self._export(resent, True, npages, 8)
                b.claimed = NULL if claimed is None else \
                    <unsigned char *>self._export(claimed, True, npages, 8)
                memcpy(b.name, <const char *>encoded, len(encoded))
                b.name_len = len(encoded)
                self.names.append(name)
                self.st.nblocks += 1
            qf_begin_gil_free(pf)
        except BaseException:
            self._release()
            raise
        self.pf = pf

    cdef void *_export(self, obj, bint writable, uint64_t units, uint64_t per_byte) except NULL:
        """A buffer export kept until close(), at least ``units`` long (``per_byte``
        units a byte: 8 for a bitmap)."""
        cdef Py_buffer *view = &self.views[self.nviews]
        PyObject_GetBuffer(obj, view, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)
        self.nviews += 1
        if <uint64_t>view.len * per_byte < units or view.len == 0:
            raise ValueError(f"a buffer of {view.len} bytes is too short")
        return view.buf

    cdef void _release(self) noexcept:
        cdef int i
        for i in range(self.nviews):
            PyBuffer_Release(&self.views[i])
        self.nviews = 0
        free(self.st)
        self.st = NULL

    def serve(self, QEMUFile rp not None):
        """Answer page requests from ``rp`` (GIL released) until another message comes:
        returns ``(kind, payload, offset)`` — kind 0 (no payload) when served requests
        wait to be taken.  Raises the return path's or the preempt channel's error, or
        FormatError for a request that breaks the protocol or leaves the RAM."""
        cdef int rc
        if self.st == NULL:
            raise ValueError("the request server is closed")
        qf_begin_gil_free(rp)
        try:
            with nogil:
                rc = _serve(self.st, rp, self.pf)
        finally:
            qf_end_gil_free(rp)
        if rc == STOP_MESSAGE:
            if self.st.kind == 0:
                return (0, b"", self.st.pos)
            if self.st.kind not in wire.RETURN_MESSAGE_NAMES:
                raise FormatError(f"unknown return path message {self.st.kind}", self.st.pos)
            return (self.st.kind, rp.get_buffer(self.st.length), self.st.pos)
        if rc == STOP_BAD:
            what = self.st.bad.decode()
            if what == "outside the RAM":
                name = (self.names[self.st.last] if self.st.kind == MIG_RP_MSG_REQ_PAGES
                        else bytes(self.st.payload[13:13 + self.st.payload[12]]).decode(
                            "utf-8", "replace"))
                what = (f"a request for {name!r} {self.st.bad_start:#x}+"
                        f"{self.st.bad_length:#x} outside the RAM")
            raise FormatError(what, self.st.pos)
        failed = rp if rc == STOP_READ else self.pf
        exc = failed.error
        raise exc if exc is not None else OSError(32, "the channel ended")

    def take(self):
        """The requests served since the last call, in order: ``(block, first, count,
        pages, end, t_read_ns, t_done_ns, resent, dropped, runs)`` — ``runs`` the
        ``(first, count)`` stretches of pages this channel sent for it (their claimed
        bits are cleared here, under the lock the sender sets them under)."""
        cdef uint64_t n = 0, i, j, k = 0
        cdef Served *entries = NULL
        cdef uint64_t *runs = NULL
        cdef uint64_t *counts = NULL
        cdef bint failed = False
        if self.st == NULL:
            return []
        with nogil:
            qf_lock(&self.st.lock)
            n = self.st.tail - self.st.head
            entries = <Served *>malloc((n + 1) * sizeof(Served))
            counts = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
            runs = _runs(self.st, n, entries, counts)
            failed = entries == NULL or counts == NULL or runs == NULL
            if not failed:
                self.st.head += n
            qf_unlock(&self.st.lock)
        try:
            if failed:
                raise MemoryError()
            out = []
            for i in range(n):
                stretches = [(runs[2 * (k + j)], runs[2 * (k + j) + 1])
                             for j in range(counts[i])]
                k += counts[i]
                out.append((entries[i].block, entries[i].first, entries[i].count,
                            entries[i].pages, entries[i].end, entries[i].t_read,
                            entries[i].t_done, bool(entries[i].resent),
                            bool(entries[i].dropped), stretches))
            return out
        finally:
            free(entries)
            free(runs)
            free(counts)

    def finish(self):
        """End the preempt stream (EOF, flushed): no request is answered after it."""
        cdef int err = 0
        if self.st == NULL:
            raise ValueError("the request server is closed")
        with nogil:
            qf_lock(&self.st.lock)
            if not self.st.done:
                self.st.done = True
                self.pf._put_byte(SECTION_EOF)
                self.pf._flush_batch()
            err = self.pf.last_error
            qf_unlock(&self.st.lock)
        if err:
            exc = self.pf.error
            raise exc if exc is not None else OSError(-err, "the preempt channel failed")

    def close(self):
        """Give the preempt file back to Python (no thread may be in serve() or
        finish()) and the buffers back to their owners."""
        if self.st != NULL:
            qf_end_gil_free(self.pf)
            self._release()

    def __dealloc__(self):
        if self.st != NULL:
            if self.pf is not None:
                qf_end_gil_free(self.pf)
            self._release()
