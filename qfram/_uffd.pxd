# C declarations for qfram's userfaultfd fault server (see _uffd.pyx).

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_userfaultfd
    long syscall(long number, ...)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<linux/userfaultfd.h>" nogil:
    enum:
        UFFD_API
        UFFDIO_API
        UFFDIO_REGISTER
        UFFDIO_UNREGISTER
        UFFDIO_WAKE
        UFFDIO_COPY
        UFFDIO_ZEROPAGE
        UFFDIO_REGISTER_MODE_MISSING
        UFFD_EVENT_PAGEFAULT
        UFFD_FEATURE_MISSING_SHMEM
        UFFD_FEATURE_MISSING_HUGETLBFS
        USERFAULTFD_IOC_NEW

    struct uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls

    struct uffdio_range:
        uint64_t start
        uint64_t len

    struct uffdio_register:
        uffdio_range range
        uint64_t mode
        uint64_t ioctls

    struct uffdio_copy:
        uint64_t dst
        uint64_t src
        uint64_t len
        uint64_t mode
        int64_t copy

    struct uffdio_zeropage:
        uffdio_range range
        uint64_t mode
        int64_t zeropage

    # only the members read here; the C compiler knows the real (packed) layout
    struct _uffd_pagefault:
        uint64_t flags
        uint64_t address

    union _uffd_arg:
        _uffd_pagefault pagefault

    struct uffd_msg:
        uint8_t event
        _uffd_arg arg

cdef extern from *:
    """
    static inline uint64_t qf_fetch_or(uint64_t *p, uint64_t v) {
        return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL);
    }
    static inline uint64_t qf_load(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void qf_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int qf_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t qf_add(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
    }
    """
    uint64_t qf_fetch_or(uint64_t *p, uint64_t v) nogil
    uint64_t qf_load(const uint64_t *p) nogil
    void qf_store_int(int *p, int v) nogil
    int qf_load_int(const int *p) nogil
    uint64_t qf_add(uint64_t *p, uint64_t v) nogil


# One registered range of guest RAM and where its pages come from.
cdef struct Area:
    uint64_t base                 # start address (page aligned)
    uint64_t length
    uint64_t npages
    uint64_t *claimed             # bit set = a thread has taken this page to place it
    const unsigned char *present  # source bitmap: bit set = data, clear = zero page
    const unsigned char *src      # source bytes of page 0 (a mapping of the snapshot)
    uint64_t placed               # pages placed so far
