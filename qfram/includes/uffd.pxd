# userfaultfd (linux/userfaultfd.h) and the PAGEMAP_SCAN ioctl: what the fault server and
# the dirty tracker need.  Include <sys/ioctl.h> before <linux/userfaultfd.h>.

from libc.stdint cimport uint8_t, uint64_t, int64_t

cdef extern from "<sys/ioctl.h>" nogil:
    pass

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
        UFFDIO_COPY_MODE_WP
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
    #define QF_PAGE_IS_FILE (1 << 2)
    #define QF_PAGE_IS_PRESENT (1 << 3)
    #define QF_PAGE_IS_SWAPPED (1 << 4)
    #define QF_PAGE_IS_PFNZERO (1 << 5)
    #define QF_PM_SCAN_WP_MATCHING (1 << 0)
    #define QF_PM_SCAN_CHECK_WPASYNC (1 << 1)
    """
    enum:
        UFFD_FEATURE_WP_UNPOPULATED
        UFFD_FEATURE_WP_ASYNC
        QF_PAGEMAP_SCAN
        QF_PAGE_IS_WRITTEN
        QF_PAGE_IS_FILE
        QF_PAGE_IS_PRESENT
        QF_PAGE_IS_SWAPPED
        QF_PAGE_IS_PFNZERO
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
