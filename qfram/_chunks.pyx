# cython: language_level=3
"""The chunked layout's loops: RAM cut into fixed-size chunks, each compressed on its own
(lz4 or zstd, or kept raw when that does not shrink it; all-zero chunks are holes) and
hashed (xxh3-64), and chunks decoded straight into RAM — with the GIL released, so that
several threads share the work.  The file format around them is qfram.chunked's."""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp

from qfram.includes.chunks cimport (qf_chunk, qf_hash, qf_chunk_bound, qf_chunk_encode,
                                    qf_chunk_decode, qf_chunk_decompress, QF_CHUNK_LZ4,
                                    QF_CHUNK_ZSTD, QF_CHUNK_ZERO, QF_CHUNK_RAW)

CODECS = {"lz4": QF_CHUNK_LZ4, "zstd": QF_CHUNK_ZSTD}
cdef enum:
    PAGE = 4096
cdef unsigned char ZERO_PAGE[PAGE]


def encode(region, size_t start, size_t length, size_t chunk_bytes, int codec,
           int level=3):
    """Encode ``region[start:start+length]`` chunk by chunk (the last may be short).
    Returns (data, chunks, zero pages): the stored bytes one after the other, per chunk
    (kind, stored length, xxh3-64 of its bytes), and how many pages were all zero."""
    cdef Py_buffer view
    cdef size_t n = (length + chunk_bytes - 1) // chunk_bytes
    cdef size_t bound = qf_chunk_bound(chunk_bytes)
    cdef unsigned char *out = NULL
    cdef uint32_t *kinds = NULL
    cdef size_t *lengths = NULL
    cdef uint64_t *hashes = NULL
    cdef size_t i, p, size, used = 0, zero_pages = 0
    cdef const unsigned char *src
    if chunk_bytes == 0 or codec not in (QF_CHUNK_LZ4, QF_CHUNK_ZSTD):
        raise ValueError("a chunk size and a codec (lz4 or zstd)")
    PyObject_GetBuffer(region, &view, PyBUF_SIMPLE)
    try:
        if start + length > <size_t>view.len:
            raise ValueError("the range lies outside the region")
        out = <unsigned char *>malloc(n * bound + 1)
        kinds = <uint32_t *>malloc(n * sizeof(uint32_t) + 1)
        lengths = <size_t *>malloc(n * sizeof(size_t) + 1)
        hashes = <uint64_t *>malloc(n * sizeof(uint64_t) + 1)
        if out == NULL or kinds == NULL or lengths == NULL or hashes == NULL:
            raise MemoryError()
        src = <const unsigned char *>view.buf + start
        with nogil:
            for i in range(n):
                size = min(chunk_bytes, length - i * chunk_bytes)
                hashes[i] = qf_hash(src + i * chunk_bytes, size)
                lengths[i] = qf_chunk_encode(codec, level, src + i * chunk_bytes, size,
                                             out + used, &kinds[i])
                used += lengths[i]
                if kinds[i] == QF_CHUNK_ZERO:
                    zero_pages += size // PAGE
                    continue
                p = 0
                while p < size:
                    if memcmp(src + i * chunk_bytes + p, ZERO_PAGE, PAGE) == 0:
                        zero_pages += 1
                    p += PAGE
        data = PyBytes_FromStringAndSize(<char *>out, used)
        return data, [(kinds[i], lengths[i], hashes[i]) for i in range(n)], zero_pages
    finally:
        PyBuffer_Release(&view)
        free(out)
        free(kinds)
        free(lengths)
        free(hashes)


def decode(source, index, size_t first, size_t count, region, size_t chunk_bytes,
           bint zeroed=False):
    """Decode chunks [first, first+count) of a block into ``region`` (the block's RAM,
    chunk i at i * chunk_bytes; the last may be short), from ``source`` (the file's
    bytes, e.g. a read-only mapping) as ``index`` (the block's qf_chunk array, checked
    against the file) says; ``zeroed``: the region is new memory, all zero already, so
    zero chunks are not written (nor their pages touched).  Returns -1, or the first chunk that would not decode (its
    rc: -1 corrupt, -2 decoded to other bytes than were saved, in the second value)."""
    cdef Py_buffer src, idx, dst
    cdef const qf_chunk *chunks
    cdef size_t i, size
    cdef int rc = 0
    cdef long bad = -1
    PyObject_GetBuffer(source, &src, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(index, &idx, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(region, &dst, PyBUF_WRITABLE)
            try:
                if (first + count) * sizeof(qf_chunk) > <size_t>idx.len:
                    raise ValueError("chunks past the index")
                if chunk_bytes == 0 or (first + count - 1) * chunk_bytes >= <size_t>dst.len:
                    raise ValueError("chunks past the region")
                chunks = <const qf_chunk *>idx.buf
                for i in range(first, first + count):
                    if chunks[i].offset + chunks[i].length > <size_t>src.len:
                        raise ValueError(f"chunk {i} lies past the file")
                with nogil:
                    for i in range(first, first + count):
                        if zeroed and chunks[i].kind == QF_CHUNK_ZERO:
                            continue
                        size = min(chunk_bytes, <size_t>dst.len - i * chunk_bytes)
                        rc = qf_chunk_decode(&chunks[i],
                                             <const unsigned char *>src.buf + chunks[i].offset,
                                             <unsigned char *>dst.buf + i * chunk_bytes, size)
                        if rc != 0:
                            bad = i
                            break
                return bad, rc
            finally:
                PyBuffer_Release(&dst)
        finally:
            PyBuffer_Release(&idx)
    finally:
        PyBuffer_Release(&src)


def decode_one(uint32_t kind, stored, out, uint64_t xxh3=0, bint check=True):
    """Decode one chunk's ``stored`` bytes of ``kind`` into ``out`` (a writable buffer of
    exactly the chunk's length), GIL released: 0, -1 when they do not decode to that
    many bytes, -2 when (``check``) they decode to other bytes than ``xxh3`` says.  A
    zero chunk fills ``out`` with zeros."""
    cdef Py_buffer src, dst
    cdef qf_chunk c
    cdef int rc
    PyObject_GetBuffer(stored, &src, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &dst, PyBUF_WRITABLE)
        try:
            c.offset = 0
            c.length = <uint32_t>src.len
            c.kind = kind
            c.hash = xxh3
            if <uint64_t>src.len > 0xFFFFFFFF:
                return -1
            with nogil:
                if check:
                    rc = qf_chunk_decode(&c, <const unsigned char *>src.buf,
                                         <unsigned char *>dst.buf, dst.len)
                else:
                    rc = qf_chunk_decompress(kind, <const unsigned char *>src.buf, src.len,
                                             <unsigned char *>dst.buf, dst.len)
            return rc
        finally:
            PyBuffer_Release(&dst)
    finally:
        PyBuffer_Release(&src)


def encode_one(data, int codec, int level=3):
    """One chunk, compressed on its own (GIL released): (kind, stored bytes, xxh3-64) —
    kind zero (no bytes), raw (when compressing does not shrink it), lz4 or zstd."""
    cdef Py_buffer src
    cdef size_t bound, used
    cdef uint32_t kind = 0
    cdef uint64_t digest
    cdef unsigned char *out
    if codec not in (QF_CHUNK_LZ4, QF_CHUNK_ZSTD):
        raise ValueError("a codec: lz4 or zstd")
    PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
    try:
        bound = qf_chunk_bound(src.len)
        out = <unsigned char *>malloc(bound + 1)
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                digest = qf_hash(src.buf, src.len)
                used = qf_chunk_encode(codec, level, <const unsigned char *>src.buf,
                                       src.len, out, &kind)
            return kind, PyBytes_FromStringAndSize(<char *>out, used), digest
        finally:
            free(out)
    finally:
        PyBuffer_Release(&src)
