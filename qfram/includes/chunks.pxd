# The chunked layout's chunks in C: one place that encodes, decodes and checks a chunk,
# for the save and eager-restore loops (_chunks) and the lazy fault server (_uffd).
# Links liblz4, libzstd and libxxhash (Debian's), as the core links libc.

from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <limits.h>
    #include <lz4.h>
    #include <zstd.h>
    #define XXH_INLINE_ALL
    #include <xxhash.h>

    /* How a chunk is stored (the index's kind field). */
    enum { QF_CHUNK_ZERO = 0, QF_CHUNK_RAW = 1, QF_CHUNK_LZ4 = 2, QF_CHUNK_ZSTD = 3 };

    /* One chunk of the index, in memory (the file spells it big-endian). */
    typedef struct {
        uint64_t offset;      /* where its bytes start in the file */
        uint32_t length;      /* stored bytes (0 for a zero chunk) */
        uint32_t kind;
        uint64_t hash;        /* xxh3-64 of the chunk's uncompressed bytes */
    } qf_chunk;

    static inline uint64_t qf_hash(const void *p, size_t n) { return XXH3_64bits(p, n); }

    /* Encode n bytes at src into out (room: qf_chunk_bound(n)) with codec (LZ4 or
       ZSTD at level); a chunk that does not shrink is stored raw.  Sets *kind, returns
       the stored length; 0 and kind ZERO for an all-zero chunk. */
    static size_t qf_chunk_bound(size_t n) {
        size_t a = (size_t)LZ4_compressBound((int)n), b = ZSTD_compressBound(n);
        return (a > b ? a : b) + n;
    }
    static size_t qf_chunk_encode(int codec, int level, const unsigned char *src,
                                  size_t n, unsigned char *out, uint32_t *kind) {
        static const unsigned char zero[4096];
        size_t i, got = 0;
        for (i = 0; i < n; i += 4096)
            if (memcmp(src + i, zero, n - i < 4096 ? n - i : 4096) != 0)
                break;
        if (i >= n) {
            *kind = QF_CHUNK_ZERO;
            return 0;
        }
        if (codec == QF_CHUNK_LZ4) {
            int k = LZ4_compress_default((const char *)src, (char *)out, (int)n,
                                         LZ4_compressBound((int)n));
            got = k > 0 ? (size_t)k : 0;
        } else if (codec == QF_CHUNK_ZSTD) {
            size_t k = ZSTD_compress(out, ZSTD_compressBound(n), src, n, level);
            got = ZSTD_isError(k) ? 0 : k;
        }
        if (got == 0 || got >= n) {
            memcpy(out, src, n);
            *kind = QF_CHUNK_RAW;
            return n;
        }
        *kind = (uint32_t)codec;
        return got;
    }

    /* Decompress stored bytes of a kind into dst (exactly n bytes): 0, or -1 when they
       do not decode to n bytes. */
    static int qf_chunk_decompress(uint32_t kind, const unsigned char *src, size_t length,
                                   unsigned char *dst, size_t n) {
        if (kind == QF_CHUNK_ZERO) {
            memset(dst, 0, n);
        } else if (kind == QF_CHUNK_RAW) {
            if (length != n)
                return -1;
            memcpy(dst, src, n);
        } else if (kind == QF_CHUNK_LZ4) {
            if (length > INT_MAX || n > INT_MAX
                    || LZ4_decompress_safe((const char *)src, (char *)dst, (int)length,
                                           (int)n) != (int)n)
                return -1;
        } else if (kind == QF_CHUNK_ZSTD) {
            size_t k = ZSTD_decompress(dst, n, src, length);
            if (ZSTD_isError(k) || k != n)
                return -1;
        } else {
            return -1;
        }
        return 0;
    }

    /* Decode a stored chunk into dst (exactly n bytes) and check its hash: 0, or -1
       when the bytes do not decode to n bytes, -2 when they decode to other bytes
       than were saved. */
    static int qf_chunk_decode(const qf_chunk *c, const unsigned char *src,
                               unsigned char *dst, size_t n) {
        if (qf_chunk_decompress(c->kind, src, c->length, dst, n) != 0)
            return -1;
        return XXH3_64bits(dst, n) == c->hash ? 0 : -2;
    }
    """
    enum:
        QF_CHUNK_ZERO
        QF_CHUNK_RAW
        QF_CHUNK_LZ4
        QF_CHUNK_ZSTD
    ctypedef struct qf_chunk:
        uint64_t offset
        uint32_t length
        uint32_t kind
        uint64_t hash
    uint64_t qf_hash(const void *p, size_t n) nogil
    size_t qf_chunk_bound(size_t n) nogil
    size_t qf_chunk_encode(int codec, int level, const unsigned char *src, size_t n,
                           unsigned char *out, uint32_t *kind) nogil
    int qf_chunk_decompress(uint32_t kind, const unsigned char *src, size_t length,
                            unsigned char *dst, size_t n) nogil
    int qf_chunk_decode(const qf_chunk *c, const unsigned char *src, unsigned char *dst,
                        size_t n) nogil
