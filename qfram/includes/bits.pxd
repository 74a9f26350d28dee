# Page bitmaps: bit i is page i, least significant bit first (QEMU's layout on x86).
# One implementation of each operation, plain and atomic, for every loop.

cdef extern from *:
    """
    #include <stddef.h>
    static inline int qf_bit(const unsigned char *bits, size_t i) {
        return (bits[i >> 3] >> (i & 7)) & 1;
    }
    static inline void qf_set_bit(unsigned char *bits, size_t i, int value) {
        if (value)
            bits[i >> 3] |= (unsigned char)(1u << (i & 7));
        else
            bits[i >> 3] &= (unsigned char)~(1u << (i & 7));
    }
    /* Take page i's set bit: true if this caller cleared it (several threads may take
       pages from one dirty bitmap: each page goes to exactly one). */
    static inline int qf_take_bit(unsigned char *bits, size_t i) {
        unsigned char mask = (unsigned char)(1u << (i & 7));
        return (__atomic_fetch_and(&bits[i >> 3], (unsigned char)~mask, __ATOMIC_ACQ_REL)
                & mask) != 0;
    }
    /* Claim page i by setting its bit: true if this caller set it (one thread places a
       page, the others leave it). */
    static inline int qf_claim_bit(unsigned char *bits, size_t i) {
        unsigned char mask = (unsigned char)(1u << (i & 7));
        return (__atomic_fetch_or(&bits[i >> 3], mask, __ATOMIC_ACQ_REL) & mask) == 0;
    }
    static inline int qf_bit_atomic(const unsigned char *bits, size_t i) {
        return (__atomic_load_n(&bits[i >> 3], __ATOMIC_ACQUIRE) >> (i & 7)) & 1;
    }
    """
    bint qf_bit(const unsigned char *bits, size_t i) nogil
    void qf_set_bit(unsigned char *bits, size_t i, bint value) nogil
    bint qf_take_bit(unsigned char *bits, size_t i) nogil
    bint qf_claim_bit(unsigned char *bits, size_t i) nogil
    bint qf_bit_atomic(const unsigned char *bits, size_t i) nogil
