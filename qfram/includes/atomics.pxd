# Atomic operations the GIL-free loops share (GCC/Clang builtins).

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t qf_load(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void qf_store(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline uint64_t qf_add(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
    }
    static inline int qf_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void qf_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int qf_add_int(int *p, int v) {
        return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
    }
    /* a spin lock for a few short critical sections (one message written) */
    static inline void qf_lock(int *p) {
        while (__atomic_exchange_n(p, 1, __ATOMIC_ACQUIRE))
            __builtin_ia32_pause();
    }
    static inline void qf_unlock(int *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); }
    """
    uint64_t qf_load(const uint64_t *p) nogil
    void qf_store(uint64_t *p, uint64_t v) nogil
    uint64_t qf_add(uint64_t *p, uint64_t v) nogil
    int qf_load_int(const int *p) nogil
    void qf_store_int(int *p, int v) nogil
    int qf_add_int(int *p, int v) nogil
    void qf_lock(int *p) nogil
    void qf_unlock(int *p) nogil
