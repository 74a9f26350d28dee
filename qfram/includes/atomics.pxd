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
    /* one step of a wait for another thread: spin a little, then sleep (20 us) — the
       thread we wait for may need this very CPU (two cores, a stream busy on the other
       one), and a real-time waiter that only yielded would never give it */
    #include <time.h>
    static inline void qf_relax(int *spins) {
        if (++*spins < 100) {
            __builtin_ia32_pause();
        } else {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
    /* a spin lock for a few short critical sections (one message written) */
    static inline void qf_lock(int *p) {
        int spins = 0;
        while (__atomic_exchange_n(p, 1, __ATOMIC_ACQUIRE))
            qf_relax(&spins);
    }
    static inline void qf_unlock(int *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); }
    """
    uint64_t qf_load(const uint64_t *p) nogil
    void qf_store(uint64_t *p, uint64_t v) nogil
    uint64_t qf_add(uint64_t *p, uint64_t v) nogil
    int qf_load_int(const int *p) nogil
    void qf_store_int(int *p, int v) nogil
    int qf_add_int(int *p, int v) nogil
    void qf_relax(int *spins) nogil
    void qf_lock(int *p) nogil
    void qf_unlock(int *p) nogil
