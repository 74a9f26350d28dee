/* What placing arrived pages costs, by userfaultfd ioctl: the measurement behind the
 * postcopy receiver's choice (issue 22).  RAM of the demo's mix (30% zero pages, in
 * ones and twos, hashed as qfram.lab.demo.page_kind does) is placed 128 pages at a
 * time, each way below in turn, into fresh memory registered with userfaultfd; the
 * bytes come from a small cache-hot source page, as a receiver's buffer is.  Prints the
 * thread's CPU time per page, the least of the repeats.
 *
 *   cc -O2 -o /tmp/uffd_placement scripts/experiments/uffd_placement.c
 *   /tmp/uffd_placement [MiB=256] [repeats=7]     (METHODS=bc ... picks some, by letter)
 *
 * Measured here (Linux 6.18, 2-core VM shared with other work; us per page, lowest and
 * highest of several runs on 2026-12-04):
 *   a copy per page 1.34-1.67, b copy runs + zeropage runs 0.98-1.17 (what qfram does),
 *   c copy runs with zero pages folded in 1.00-1.24, d move 1.59-1.76,
 *   e move from a staging area populated in bulk 1.22-1.54, f populate + memcpy (no
 *   userfaultfd) 1.22-1.62, g continue on memfd 2.1-2.4, h copy on memfd 1.42-1.83,
 *   i copy runs, zero pages left unplaced 0.85-0.90.
 * UFFDIO_MOVE and UFFDIO_CONTINUE both need their pages allocated first, which costs
 * more than UFFDIO_COPY's allocation and copy together.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFDIO_MOVE                   /* Linux 6.8+; older headers lack it */
struct uffdio_move { uint64_t dst, src, len, mode; int64_t move; };
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#define PAGE 4096UL
#define RUN 128

static char source[PAGE] __attribute__((aligned(4096)));
static char *stage;

static int is_zero(uint64_t i)
{
    uint32_t h = (uint32_t)(i * 2654435761u);
    return (h >> 8) % 100 < 30;
}

static void must(int ok, const char *what)
{
    if (!ok) {
        perror(what);
        exit(1);
    }
}

static int uffd(uint64_t features, char *area, size_t size, uint64_t mode)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    struct uffdio_register reg = {.range = {(uint64_t)area, size}, .mode = mode};
    must(fd >= 0 && ioctl(fd, UFFDIO_API, &api) == 0, "UFFDIO_API");
    if (mode)
        must(ioctl(fd, UFFDIO_REGISTER, &reg) == 0, "UFFDIO_REGISTER");
    return fd;
}

static void copy(int fd, char *dst, char *src, size_t n)
{
    struct uffdio_copy c = {.dst = (uint64_t)dst, .src = (uint64_t)src, .len = n};
    must(ioctl(fd, UFFDIO_COPY, &c) == 0, "UFFDIO_COPY");
}

static void zeropage(int fd, char *dst, size_t n)
{
    struct uffdio_zeropage z = {.range = {(uint64_t)dst, n}};
    must(ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0, "UFFDIO_ZEROPAGE");
}

/* the batch's pages into `to` (zero pages zeroed), as a receiver stages them */
static void fill(char *to, uint64_t first, int zeros)
{
    for (uint64_t k = 0; k < RUN; k++) {
        if (!is_zero(first + k))
            memcpy(to + k * PAGE, source, PAGE);
        else if (zeros)
            memset(to + k * PAGE, 0, PAGE);
    }
}

/* runs of one kind within the batch: copy (one ioctl per page, or per run), zeropage */
static void runs(int fd, char *dst, uint64_t b, int per_page, int place_zero)
{
    uint64_t i = b;
    fill(stage, b, 0);
    while (i < b + RUN) {
        uint64_t j = i + 1;
        while (j < b + RUN && is_zero(j) == is_zero(i))
            j++;
        if (!is_zero(i) && per_page)
            for (uint64_t k = i; k < j; k++)
                copy(fd, dst + k * PAGE, stage + (k - b) * PAGE, PAGE);
        else if (!is_zero(i))
            copy(fd, dst + i * PAGE, stage + (i - b) * PAGE, (j - i) * PAGE);
        else if (place_zero)
            zeropage(fd, dst + i * PAGE, (j - i) * PAGE);
        i = j;
    }
}

static double method(char m, size_t size)
{
    size_t npages = size / PAGE;
    int shared = m == 'g' || m == 'h';
    int memfd = shared ? memfd_create("ram", MFD_CLOEXEC) : -1;
    char *dst, *alias = NULL, *moved = NULL;
    uint64_t features = 0, mode = UFFDIO_REGISTER_MODE_MISSING;
    struct timespec t0, t1;
    if (shared) {
        must(ftruncate(memfd, (off_t)size) == 0, "ftruncate");
        dst = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        alias = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM;
        if (m == 'g')
            mode |= UFFDIO_REGISTER_MODE_MINOR;
    } else {
        dst = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (m == 'd' || m == 'e') {
        features = UFFD_FEATURE_MOVE;
        moved = mmap(NULL, RUN * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    }
    if (m == 'f')
        mode = 0;
    int fd = uffd(features, dst, size, mode);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (uint64_t b = 0; b < npages; b += RUN) {
        char *at = dst + b * PAGE;
        switch (m) {
        case 'a': runs(fd, dst, b, 1, 1); break;
        case 'b': runs(fd, dst, b, 0, 1); break;
        case 'i': runs(fd, dst, b, 0, 0); break;
        case 'c':
        case 'h':
            fill(stage, b, 1);
            copy(fd, at, stage, RUN * PAGE);
            break;
        case 'd':
        case 'e': {
            struct uffdio_move mv = {.dst = (uint64_t)at, .src = (uint64_t)moved,
                                     .len = RUN * PAGE};
            if (m == 'e')
                madvise(moved, RUN * PAGE, MADV_POPULATE_WRITE);
            fill(moved, b, 1);
            must(ioctl(fd, UFFDIO_MOVE, &mv) == 0, "UFFDIO_MOVE");
            break;
        }
        case 'f':
            madvise(at, RUN * PAGE, MADV_POPULATE_WRITE);
            fill(stage, b, 1);
            memcpy(at, stage, RUN * PAGE);
            break;
        case 'g': {
            struct uffdio_continue c = {.range = {(uint64_t)at, RUN * PAGE}};
            must(fallocate(memfd, 0, (off_t)(b * PAGE), RUN * PAGE) == 0, "fallocate");
            fill(alias + b * PAGE, b, 0);
            must(ioctl(fd, UFFDIO_CONTINUE, &c) == 0, "UFFDIO_CONTINUE");
            break;
        }
        }
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    close(fd);
    munmap(dst, size);
    if (alias)
        munmap(alias, size);
    if (moved)
        munmap(moved, RUN * PAGE);
    if (memfd >= 0)
        close(memfd);
    return (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
}

int main(int argc, char **argv)
{
    static const char *names[] = {
        "a copy per page", "b copy runs + zeropage runs", "c copy runs, zeros folded",
        "d move", "e move, staging populated", "f populate + memcpy (no uffd)",
        "g continue (memfd)", "h copy (memfd)", "i copy runs, zeros unplaced"};
    size_t size = (size_t)(argc > 1 ? atol(argv[1]) : 256) << 20;
    int repeats = argc > 2 ? atoi(argv[2]) : 7;
    const char *methods = getenv("METHODS") ? getenv("METHODS") : "abcdefghi";
    double best[9];
    stage = aligned_alloc(PAGE, RUN * PAGE);
    memset(source, 7, PAGE);
    for (int m = 0; m < 9; m++)
        best[m] = 1e9;
    for (int r = 0; r < repeats; r++)
        for (const char *m = methods; *m; m++) {
            double t = method(*m, size);
            if (t < best[*m - 'a'])
                best[*m - 'a'] = t;
        }
    for (const char *m = methods; *m; m++)
        printf("%-32s %.3f us/page\n", names[*m - 'a'], best[*m - 'a'] / (size / PAGE) * 1e6);
    return 0;
}
