/*
 * The C reference for qfram's benchmarks: QEMU's qemu-file.c algorithm in plain C,
 * compiled at run time by the benchmark scripts (cc -O2) and run in the same run as
 * qfram, so that ratios, not absolute GB/s, are what we report.
 *
 *   cref_writer write IMAGE FD IOV_MAX BUF_SIZE   stream IMAGE's pages as RAM records
 *                                                 into FD (32 KiB buffer + 64 iovecs =
 *                                                 the seed); prints JSON timing
 *   cref_writer read STREAM RAM_SIZE HUGE         parse a record stream into fresh
 *                                                 anonymous memory (HUGE=1: MADV_HUGEPAGE)
 *   cref_writer drain FD                          read FD to its end (a pipe's reader)
 *
 * The record format is the one qfram's save_pages emits: be64(offset|flags), the first
 * record carries the counted block name "pc.ram", the rest CONTINUE; ZERO records for
 * all-zero pages (memcmp against a static zero page, as qfram), PAGE records otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define FLAG_ZERO 0x02
#define FLAG_PAGE 0x08
#define FLAG_EOS 0x10
#define FLAG_CONTINUE 0x20

static const unsigned char zero_page[PAGE];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* ---- the writer: qemu-file.c's buffer, gather list and flush points ---- */

struct qfile {
    int fd;
    int iov_max, buf_size;
    unsigned char *buf;
    int buf_index;
    struct iovec *iov;
    int iovcnt;
    int error;
    uint64_t written;
};

static void qflush(struct qfile *f)
{
    struct iovec *v = f->iov;
    int cnt = f->iovcnt;
    if (f->error || cnt == 0) {
        f->iovcnt = 0;
        f->buf_index = 0;
        return;
    }
    while (cnt > 0) {
        ssize_t n = writev(f->fd, v, cnt < IOV_MAX ? cnt : IOV_MAX);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            f->error = errno;
            break;
        }
        f->written += n;
        while (cnt > 0 && (size_t)n >= v->iov_len) {
            n -= v->iov_len;
            v++;
            cnt--;
        }
        if (cnt > 0) {
            v->iov_base = (char *)v->iov_base + n;
            v->iov_len -= n;
        }
    }
    f->iovcnt = 0;
    f->buf_index = 0;
}

static int add_to_iovec(struct qfile *f, const unsigned char *p, size_t n)
{
    if (f->iovcnt > 0 &&
        (unsigned char *)f->iov[f->iovcnt - 1].iov_base + f->iov[f->iovcnt - 1].iov_len == p) {
        f->iov[f->iovcnt - 1].iov_len += n;
    } else {
        f->iov[f->iovcnt].iov_base = (void *)p;
        f->iov[f->iovcnt++].iov_len = n;
    }
    if (f->iovcnt >= f->iov_max) {
        qflush(f);
        return 1;
    }
    return 0;
}

static void put_byte(struct qfile *f, unsigned char v)
{
    f->buf[f->buf_index] = v;
    if (!add_to_iovec(f, f->buf + f->buf_index, 1)) {
        if (++f->buf_index == f->buf_size)
            qflush(f);
    }
}

static void put_be64(struct qfile *f, uint64_t v)
{
    for (int shift = 56; shift >= 0; shift -= 8)
        put_byte(f, (unsigned char)(v >> shift));
}

static unsigned char *load_image(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die("image");
    unsigned char *ram = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap");
    size_t done = 0;
    while (done < (size_t)st.st_size) {
        ssize_t n = read(fd, ram + done, st.st_size - done);
        if (n <= 0)
            die("read image");
        done += n;
    }
    close(fd);
    *len = st.st_size;
    return ram;
}

static int cmd_write(const char *image, int fd, int iov_max, int buf_size)
{
    size_t len;
    unsigned char *ram = load_image(image, &len);   /* loaded = pre-faulted */
    struct qfile f = {.fd = fd, .iov_max = iov_max, .buf_size = buf_size};
    f.buf = malloc(buf_size);
    f.iov = malloc(sizeof(struct iovec) * iov_max);
    const char *name = "pc.ram";

    double t0 = now();
    for (size_t off = 0; off < len; off += PAGE) {
        unsigned char *page = ram + off;
        int zero = memcmp(page, zero_page, PAGE) == 0;
        uint64_t header = off | (zero ? FLAG_ZERO : FLAG_PAGE);
        if (off == 0) {
            put_be64(&f, header);
            put_byte(&f, (unsigned char)strlen(name));
            for (const char *c = name; *c; c++)
                put_byte(&f, (unsigned char)*c);
        } else {
            put_be64(&f, header | FLAG_CONTINUE);
        }
        if (zero)
            put_byte(&f, 0);
        else
            add_to_iovec(&f, page, PAGE);
    }
    put_be64(&f, FLAG_EOS);
    qflush(&f);
    double t1 = now();
    if (f.error) {
        fprintf(stderr, "write: %s\n", strerror(f.error));
        return 1;
    }
    printf("{\"seconds\": %.6f, \"bytes\": %llu, \"ram_bytes\": %zu}\n", t1 - t0,
           (unsigned long long)f.written, len);
    return 0;
}

/* ---- the reader: a 32 KiB buffer + memcpy, as QEMU's qemu_get_buffer ---- */

struct rfile {
    int fd;
    unsigned char buf[32768];
    size_t index, size;
};

static int fill(struct rfile *r)
{
    size_t pending = r->size - r->index;
    memmove(r->buf, r->buf + r->index, pending);
    r->index = 0;
    r->size = pending;
    ssize_t n;
    do {
        n = read(r->fd, r->buf + pending, sizeof(r->buf) - pending);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return -1;
    r->size += n;
    return 0;
}

static int get(struct rfile *r, unsigned char *dst, size_t n)
{
    while (n > 0) {
        if (r->index == r->size && fill(r) < 0)
            return -1;
        size_t chunk = r->size - r->index < n ? r->size - r->index : n;
        memcpy(dst, r->buf + r->index, chunk);
        r->index += chunk;
        dst += chunk;
        n -= chunk;
    }
    return 0;
}

static int cmd_read(const char *path, size_t cap, int huge)
{
    static struct rfile r;
    struct stat st;
    r.fd = open(path, O_RDONLY);
    if (r.fd < 0 || fstat(r.fd, &st) < 0)
        die("stream");
    unsigned char *ram = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap");
    if (huge)
        madvise(ram, cap, MADV_HUGEPAGE);
    uint64_t pages = 0, zeros = 0;
    double t0 = now();
    for (;;) {
        unsigned char h[8], ch, name[256];
        if (get(&r, h, 8) < 0)
            die("truncated stream");
        uint64_t header = 0;
        for (int i = 0; i < 8; i++)
            header = header << 8 | h[i];
        uint64_t flags = header & (PAGE - 1), off = header & ~(uint64_t)(PAGE - 1);
        if (flags & FLAG_EOS)
            break;
        if (!(flags & FLAG_CONTINUE)) {
            if (get(&r, &ch, 1) < 0 || get(&r, name, ch) < 0)
                die("truncated name");
        }
        if (off + PAGE > cap) {
            fprintf(stderr, "page outside the block\n");
            return 1;
        }
        if (flags & FLAG_PAGE) {
            if (get(&r, ram + off, PAGE) < 0)
                die("truncated page");
            pages++;
        } else if (flags & FLAG_ZERO) {
            if (get(&r, &ch, 1) < 0)
                die("truncated zero");
            zeros++;                 /* fresh memory is zero already: nothing to do */
        } else {
            fprintf(stderr, "unexpected flags %#llx\n", (unsigned long long)flags);
            return 1;
        }
    }
    double t1 = now();
    printf("{\"seconds\": %.6f, \"bytes\": %lld, \"pages\": %llu, \"zeros\": %llu}\n",
           t1 - t0, (long long)st.st_size, (unsigned long long)pages,
           (unsigned long long)zeros);
    return 0;
}

static int cmd_drain(int fd)
{
    static unsigned char buf[1 << 20];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n == 0)
            return 0;
        if (n < 0 && errno != EINTR)
            die("drain");
    }
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "write"))
        return cmd_write(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "read"))
        return cmd_read(argv[2], strtoull(argv[3], NULL, 0), atoi(argv[4]));
    if (argc == 3 && !strcmp(argv[1], "drain"))
        return cmd_drain(atoi(argv[2]));
    fprintf(stderr, "usage: cref_writer write IMAGE FD IOV_MAX BUF_SIZE | "
                    "read STREAM RAM_SIZE HUGE | drain FD\n");
    return 2;
}
