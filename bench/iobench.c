/* iobench: one small static program that measures the same file I/O on the host and inside a
 * Box (busybox images have no fio), so bench/volumes.py compares like with like.
 *
 *   iobench seqwrite FILE MIB      write MIB MiB in 1 MiB blocks, then fsync
 *   iobench seqread  FILE          read the file in 1 MiB blocks (its cached pages dropped first)
 *   iobench randwrite FILE OPS     OPS 4 KiB writes at random aligned offsets, then fsync
 *   iobench randread  FILE OPS     OPS 4 KiB reads at random aligned offsets (cache dropped first)
 *   iobench exec CMD [ARG...]      run CMD, then sync
 *
 * Prints one line: `secs=S bytes=B ops=N` (ops only for the random modes). Build with
 * `gcc -O2 -static -o iobench iobench.c`.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)
#define PAGE 4096

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    perror(path ? path : what);
    exit(1);
}

/* xorshift64: reproducible offsets, no libc state. */
static uint64_t next_random(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int open_file(const char *path, int flags) {
    int fd = open(path, flags, 0644);
    if (fd < 0) die("open", path);
    return fd;
}

static void drop_cache(int fd) {
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

static off_t file_size(int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) < 0) die("stat", path);
    return st.st_size;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: iobench seqwrite|seqread|randwrite|randread|exec FILE [N]\n");
        return 2;
    }
    const char *mode = argv[1], *path = argv[2];
    static char buf[BLOCK] __attribute__((aligned(PAGE)));
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (char)(i * 2654435761u >> 13);
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    long long bytes = 0, ops = 0;
    double start;

    if (!strcmp(mode, "exec")) {
        start = now();
        pid_t pid = fork();
        if (pid == 0) {
            execvp(argv[2], argv + 2);
            die("exec", argv[2]);
        }
        int status;
        waitpid(pid, &status, 0);
        sync();
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "%s failed\n", argv[2]);
            return 1;
        }
    } else if (!strcmp(mode, "seqwrite") && argc == 4) {
        long mib = atol(argv[3]);
        int fd = open_file(path, O_WRONLY | O_CREAT | O_TRUNC);
        start = now();
        for (long i = 0; i < mib; i++) {
            if (write(fd, buf, BLOCK) != BLOCK) die("write", path);
            bytes += BLOCK;
        }
        if (fsync(fd) < 0) die("fsync", path);
        close(fd);
    } else if (!strcmp(mode, "seqread")) {
        int fd = open_file(path, O_RDONLY);
        drop_cache(fd);
        start = now();
        ssize_t n;
        while ((n = read(fd, buf, BLOCK)) > 0) bytes += n;
        if (n < 0) die("read", path);
        close(fd);
    } else if ((!strcmp(mode, "randwrite") || !strcmp(mode, "randread")) && argc == 4) {
        int writing = mode[4] == 'w';
        ops = atol(argv[3]);
        int fd = open_file(path, writing ? O_WRONLY : O_RDONLY);
        long long pages = file_size(fd, path) / PAGE;
        if (pages == 0) die("empty file", path);
        if (!writing) drop_cache(fd);
        start = now();
        for (long long i = 0; i < ops; i++) {
            off_t off = (off_t)(next_random(&seed) % pages) * PAGE;
            ssize_t n = writing ? pwrite(fd, buf, PAGE, off) : pread(fd, buf, PAGE, off);
            if (n != PAGE) die(writing ? "pwrite" : "pread", path);
            bytes += PAGE;
        }
        if (writing && fsync(fd) < 0) die("fsync", path);
        close(fd);
    } else {
        fprintf(stderr, "iobench: bad arguments\n");
        return 2;
    }
    printf("secs=%.4f bytes=%lld ops=%lld\n", now() - start, bytes, ops);
    return 0;
}
