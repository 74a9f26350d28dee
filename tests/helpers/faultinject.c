/* A fault injector for tests, loaded with LD_PRELOAD: the real syscalls run, except the
 * ones chosen to fail.  QFRAM_FAULT="OP:PATH:SKIP" picks calls on files whose path contains
 * PATH (for renames: the target's name or its directory):
 *   write      writes (write, pwrite, writev, pwritev) fail with EIO once SKIP bytes went
 *              through, and every write after that (a dead disk);
 *   full       the same with ENOSPC;
 *   writeread  as write, and from then on reads (read, pread) of those files fail too;
 *   sync       the sync call (fsync, fdatasync, sync_file_range) after SKIP of them fails
 *              with EIO, once (as the kernel reports a writeback error once);
 *   rename     the rename (rename, renameat, renameat2) after SKIP of them fails. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { WRITE, SYNC, RENAME, READ };

static char op[16], where[4096];
static long long budget;
static int configured, active, tripped;

static void configure(void) {
    const char *spec = getenv("QFRAM_FAULT");
    configured = 1;
    active = spec && sscanf(spec, "%15[^:]:%4095[^:]:%lld", op, where, &budget) == 3;
}

static int fd_matches(int fd) {
    char link[64], path[4096];
    ssize_t n;
    if (fd < 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = 0;
    return strstr(path, where) != NULL;
}

static int op_class(void) {
    if (!strcmp(op, "sync")) return SYNC;
    if (!strcmp(op, "rename")) return RENAME;
    return WRITE;                       /* write, full, writeread */
}

/* 1: this call must fail (errno set); `amount` is bytes for writes, 0 otherwise */
static int should_fail(int cls, int fd, const char *name, long long amount) {
    if (!configured)
        configure();
    if (!active || !(fd_matches(fd) || (name && strstr(name, where))))
        return 0;
    if (cls == READ) {
        if (!tripped || strcmp(op, "writeread"))
            return 0;
    } else if (cls != op_class()) {
        return 0;
    } else if (!(tripped && cls != SYNC)) {
        if (cls == WRITE && budget >= amount) {
            budget -= amount;
            return 0;
        }
        if (cls != WRITE && budget > 0) {
            budget--;
            return 0;
        }
        tripped = 1;
        if (cls == SYNC)
            budget = LLONG_MAX;         /* reported once */
    }
    errno = strcmp(op, "full") == 0 ? ENOSPC : EIO;
    return 1;
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

static long long iov_bytes(const struct iovec *v, int cnt) {
    long long total = 0;
    for (int i = 0; i < cnt; i++)
        total += v[i].iov_len;
    return total;
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(ssize_t, write, int, const void *, size_t);
    if (fd > 2 && should_fail(WRITE, fd, NULL, n)) return -1;
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite, int, const void *, size_t, off_t);
    if (should_fail(WRITE, fd, NULL, n)) return -1;
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    if (should_fail(WRITE, fd, NULL, n)) return -1;
    return real_pwrite64(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *v, int cnt) {
    REAL(ssize_t, writev, int, const struct iovec *, int);
    if (fd > 2 && should_fail(WRITE, fd, NULL, iov_bytes(v, cnt))) return -1;
    return real_writev(fd, v, cnt);
}

ssize_t pwritev(int fd, const struct iovec *v, int cnt, off_t off) {
    REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t);
    if (should_fail(WRITE, fd, NULL, iov_bytes(v, cnt))) return -1;
    return real_pwritev(fd, v, cnt, off);
}

int fsync(int fd) {
    REAL(int, fsync, int);
    if (should_fail(SYNC, fd, NULL, 0)) return -1;
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(int, fdatasync, int);
    if (should_fail(SYNC, fd, NULL, 0)) return -1;
    return real_fdatasync(fd);
}

int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    REAL(int, sync_file_range, int, off_t, off_t, unsigned int);
    if (should_fail(SYNC, fd, NULL, 0)) return -1;
    return real_sync_file_range(fd, off, n, flags);
}

int rename(const char *a, const char *b) {
    REAL(int, rename, const char *, const char *);
    if (should_fail(RENAME, -1, b, 0)) return -1;
    return real_rename(a, b);
}

int renameat(int da, const char *a, int db, const char *b) {
    REAL(int, renameat, int, const char *, int, const char *);
    if (should_fail(RENAME, db, b, 0)) return -1;
    return real_renameat(da, a, db, b);
}

int renameat2(int da, const char *a, int db, const char *b, unsigned int flags) {
    REAL(int, renameat2, int, const char *, int, const char *, unsigned int);
    if (should_fail(RENAME, db, b, 0)) return -1;
    return real_renameat2(da, a, db, b, flags);
}

ssize_t read(int fd, void *buf, size_t n) {
    REAL(ssize_t, read, int, void *, size_t);
    if (tripped && fd > 2 && should_fail(READ, fd, NULL, n)) return -1;
    return real_read(fd, buf, n);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    REAL(ssize_t, pread, int, void *, size_t, off_t);
    if (tripped && should_fail(READ, fd, NULL, n)) return -1;
    return real_pread(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    REAL(ssize_t, pread64, int, void *, size_t, off_t);
    if (tripped && should_fail(READ, fd, NULL, n)) return -1;
    return real_pread64(fd, buf, n, off);
}
