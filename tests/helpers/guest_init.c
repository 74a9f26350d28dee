/* PID 1 of the Linux guest in the QEMU restore test.  It fills `qfram_mib` MiB (a
 * kernel command-line parameter, which reaches init as an environment variable) with a
 * known pattern, says so on the serial port with the memory's checksum, then walks the
 * memory for ever, printing the checksum after each walk: restored lazily, every page
 * it reads is a fault that QEMU turns into a page request to qfram. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

static uint64_t checksum(const uint64_t *m, size_t n)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++)
        sum = sum * 31 + m[i];
    return sum;
}

int main(void)
{
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
    }
    const char *mib = getenv("qfram_mib");
    size_t n = (size_t)(mib ? atoi(mib) : 64) * 1024 * 1024 / 8;
    uint64_t *m = mmap(NULL, n * 8, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (m == MAP_FAILED) {
        printf("QFRAM FAILED mmap\n");
        fflush(stdout);
        for (;;)
            pause();
    }
    for (size_t i = 0; i < n; i++)
        m[i] = (i * 0x9E3779B97F4A7C15ull) ^ (i >> 7);
    printf("QFRAM READY %016llx\n", (unsigned long long)checksum(m, n));
    fflush(stdout);
    struct timespec pause_between = {0, 100 * 1000 * 1000};
    for (unsigned round = 0;; round++) {
        printf("QFRAM SUM %u %016llx\n", round, (unsigned long long)checksum(m, n));
        fflush(stdout);
        nanosleep(&pause_between, NULL);
    }
}
