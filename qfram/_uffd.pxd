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
        UFFDIO_WRITEPROTECT
        UFFDIO_REGISTER_MODE_MISSING
        UFFDIO_REGISTER_MODE_WP
        UFFDIO_WRITEPROTECT_MODE_WP
        UFFDIO_ZEROPAGE_MODE_DONTWAKE
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

    struct uffdio_writeprotect:
        uffdio_range range
        uint64_t mode

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
    #include <stdint.h>
    #include <sys/ioctl.h>
    /* Kernel 6.7+ (PAGEMAP_SCAN, asynchronous write protection); older headers lack
       them, the kernel decides at run time. */
    #ifndef UFFD_FEATURE_WP_UNPOPULATED
    #define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
    #endif
    #ifndef UFFD_FEATURE_WP_ASYNC
    #define UFFD_FEATURE_WP_ASYNC (1 << 15)
    #endif
    struct qf_page_region { uint64_t start, end, categories; };
    struct qf_pm_scan_arg {
        uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages,
                 category_inverted, category_mask, category_anyof_mask, return_mask;
    };
    #define QF_PAGEMAP_SCAN _IOWR('f', 16, struct qf_pm_scan_arg)
    #define QF_PAGE_IS_WRITTEN (1 << 1)
    #define QF_PM_SCAN_WP_MATCHING (1 << 0)
    #define QF_PM_SCAN_CHECK_WPASYNC (1 << 1)
    """
    enum:
        UFFD_FEATURE_WP_UNPOPULATED
        UFFD_FEATURE_WP_ASYNC
        QF_PAGEMAP_SCAN
        QF_PAGE_IS_WRITTEN
        QF_PM_SCAN_WP_MATCHING
        QF_PM_SCAN_CHECK_WPASYNC
    struct qf_page_region:
        uint64_t start
        uint64_t end
        uint64_t categories
    struct qf_pm_scan_arg:
        uint64_t size
        uint64_t flags
        uint64_t start
        uint64_t end
        uint64_t walk_end
        uint64_t vec
        uint64_t vec_len
        uint64_t max_pages
        uint64_t category_inverted
        uint64_t category_mask
        uint64_t category_anyof_mask
        uint64_t return_mask

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
    static inline int qf_add_int(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline uint64_t qf_add(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
    }
    static inline void qf_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void qf_lock(int *p) {
        while (__atomic_exchange_n(p, 1, __ATOMIC_ACQUIRE))
            __builtin_ia32_pause();
    }
    static inline void qf_unlock(int *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); }
    #include <errno.h>
    static inline void qf_set_errno(int e) { errno = e; }
    """
    uint64_t qf_fetch_or(uint64_t *p, uint64_t v) nogil
    uint64_t qf_load(const uint64_t *p) nogil
    void qf_store_int(int *p, int v) nogil
    int qf_load_int(const int *p) nogil
    int qf_add_int(int *p, int v) nogil
    uint64_t qf_add(uint64_t *p, uint64_t v) nogil
    void qf_store(uint64_t *p, uint64_t v) nogil
    void qf_lock(int *p) nogil
    void qf_unlock(int *p) nogil
    void qf_set_errno(int e) nogil


# Where an area's pages come from: a local source (a snapshot mapping, placed by the
# fault and fill loops) or a remote one (asked for on a return path, placed by receive).
cdef enum AreaKind:
    AREA_LOCAL = 1
    AREA_REMOTE = 2

# One registered range of guest RAM and where its pages come from.
cdef struct Area:
    AreaKind kind
    uint64_t base                 # start address (page aligned)
    uint64_t length
    uint64_t npages
    uint64_t *claimed             # bit set = a thread has taken this page to place it
    const unsigned char *present  # local source: bit set = data, clear = zero page
    const unsigned char *src      # local source: bytes of page 0 (a snapshot mapping)
    uint64_t placed               # pages placed so far
    # remote source (postcopy): pages are asked for and arrive on a stream
    uint64_t *requested           # bit set = already asked for
    uint64_t *zero_known          # bit set = arrived as zero and never touched: a fault
                                  # there gets the zero page here, nothing is asked for
    uint64_t *fault_ns            # when the page's fault was read (0: not faulted)
    unsigned char name[256]
    int name_len
