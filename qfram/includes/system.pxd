# The system calls and C library pieces qfram's core and fault server use, beyond what
# Cython ships in posix.* and libc.*.

from posix.types cimport off_t
from posix.uio cimport iovec

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<limits.h>":
    enum:
        IOV_MAX

cdef extern from "<string.h>" nogil:
    char *strerror(int errnum)

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        SYNC_FILE_RANGE_WRITE

cdef extern from "<unistd.h>" nogil:
    enum:
        SEEK_DATA                   # (_GNU_SOURCE: Python.h defines it)

cdef extern from "<sys/mman.h>" nogil:
    enum:
        MADV_POPULATE_READ

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_userfaultfd
    long syscall(long number, ...)

cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <sys/uio.h>
    #include <unistd.h>
    #ifndef SYS_process_madvise
    #define SYS_process_madvise 440
    #endif
    /* Linux 6.13+: process_madvise() on the caller itself takes any advice; PIDFD_SELF
       (6.14+) names the caller without opening a pidfd.  Many ranges, one mmap lock and
       one TLB flush: a few microseconds instead of a few per range. */
    static inline long qf_process_madvise_self(const struct iovec *iov, size_t n, int advice) {
        return syscall(SYS_process_madvise, -10000 /* PIDFD_SELF */, iov, n, advice, 0);
    }
    """
    long qf_process_madvise_self(const iovec *iov, size_t n, int advice) nogil

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from *:
    """
    #include <errno.h>
    #include <time.h>
    #include <stdint.h>
    static inline void qf_set_errno(int e) { errno = e; }
    static inline uint64_t qf_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    """
    void qf_set_errno(int e) nogil
    unsigned long long qf_now_ns() nogil
