/* Exercises the C allocator API that libremora_preload.so replaces:
 * calloc zeroes (also on recycled blocks), memalign/posix_memalign/
 * aligned_alloc/valloc alignments, realloc growth and shrink keeping bytes,
 * malloc_usable_size, and blocks freed and reallocated by other threads than
 * the ones that allocated them, and fork while other threads allocate (the
 * child checks the parent's bytes and allocates and frees). Prints a checksum that a native run must
 * match; exits non-zero on the first failure. */
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } while (0)

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void check_zero(const unsigned char *p, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) FAIL("%s: byte %zu of %zu is %d", what, i, n, p[i]);
}

#define SLOTS 4096
static void *slots[SLOTS];
static size_t sizes[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void check_fill(void *p, size_t n, size_t slot) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(slot + i)) FAIL("slot %zu: byte %zu of %zu changed", slot, i, n);
}

static void fill(void *p, size_t n, size_t slot) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(slot + i);
}

/* Threads pick random slots: free what is there (whoever allocated it),
 * realloc it, or allocate a new block. */
static void *worker(void *arg) {
    uint64_t s = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
    for (int i = 0; i < 50000; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t slot = s % SLOTS;
        size_t size = (s >> 20) % ((s >> 40) % 16 == 0 ? 40000 : 300);
        pthread_mutex_lock(&lock);
        void *p = slots[slot];
        if (p) check_fill(p, sizes[slot], slot);
        switch ((s >> 32) % 3) {
        case 0: free(p); p = NULL; size = 0; break;
        case 1: p = realloc(p, size + 1); if (!p) FAIL("realloc"); size += 1; break;
        default:
            free(p);
            p = (s >> 36) % 2 ? malloc(size) : calloc(1, size);
            if (!p && size) FAIL("malloc");
            if ((s >> 36) % 2 == 0) check_zero(p, size, "calloc");
        }
        if (p && malloc_usable_size(p) < size) FAIL("usable size %zu < %zu", malloc_usable_size(p), size);
        if (p) fill(p, size, slot);
        slots[slot] = p;
        sizes[slot] = size;
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

static volatile int stop_churn;

static void *churn(void *arg) {
    void *keep[256] = {0};
    uint64_t s = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 7;
    while (!stop_churn) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t i = s % 256, n = (s >> 16) % 3000 + 1;
        free(keep[i]);
        keep[i] = malloc(n);
        memset(keep[i], (int)i, n);
    }
    for (int i = 0; i < 256; i++) free(keep[i]);
    return NULL;
}

int main(void) {
    uint64_t sum = 0;
    /* calloc on recycled memory. */
    for (int round = 0; round < 50; round++) {
        size_t n = 1 + next() % 100000;
        unsigned char *p = malloc(n);
        memset(p, 0xAB, n);
        free(p);
        unsigned char *q = calloc(n, 1);
        check_zero(q, n, "calloc after free");
        sum += n;
        free(q);
    }
    /* Alignments. */
    for (size_t align = 16; align <= (1 << 20); align <<= 1) {
        for (size_t size = 1; size < 100000; size = size * 7 + 3) {
            void *a = memalign(align, size), *b = aligned_alloc(align, size), *c = NULL;
            if (posix_memalign(&c, align, size)) FAIL("posix_memalign");
            if ((uintptr_t)a % align || (uintptr_t)b % align || (uintptr_t)c % align)
                FAIL("misaligned: %zu bytes at %zu", size, align);
            if (malloc_usable_size(a) < size) FAIL("memalign usable size");
            memset(a, 1, size); memset(b, 2, size); memset(c, 3, size);
            /* realloc of an aligned block keeps its bytes. */
            a = realloc(a, size * 2);
            for (size_t i = 0; i < size; i++) if (((unsigned char *)a)[i] != 1) FAIL("realloc of memalign block");
            free(a); free(b); free(c);
            sum += align + size;
        }
    }
    void *v = valloc(100);
    if ((uintptr_t)v % 4096) FAIL("valloc");
    free(v);
    /* realloc growth and shrink. */
    unsigned char *g = NULL;
    size_t n = 0;
    while (n < (8 << 20)) {
        size_t m = n * 3 / 2 + 1;
        g = realloc(g, m);
        for (size_t i = 0; i < n; i++) if (g[i] != (unsigned char)(i * 7)) FAIL("realloc grow at %zu", i);
        for (size_t i = n; i < m; i++) g[i] = (unsigned char)(i * 7);
        n = m;
    }
    while (n > 1) {
        n /= 3;
        g = realloc(g, n);
        for (size_t i = 0; i < n; i++) if (g[i] != (unsigned char)(i * 7)) FAIL("realloc shrink at %zu", i);
    }
    free(g);
    /* Threads freeing and reallocating each other's blocks. */
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (size_t i = 0; i < SLOTS; i++) {
        if (slots[i]) check_fill(slots[i], sizes[i], i);
        free(slots[i]);
    }
    /* fork while other threads allocate: the child sees the parent's bytes
     * and can allocate, and free what the parent allocated. */
    for (uintptr_t i = 0; i < 3; i++) pthread_create(&t[i], NULL, churn, (void *)(i + 1));
    unsigned char *shared = malloc(1 << 20);
    memset(shared, 7, 1 << 20);
    for (int k = 0; k < 20; k++) {
        pid_t pid = fork();
        if (pid < 0) FAIL("fork");
        if (pid == 0) {
            for (size_t i = 0; i < (1 << 20); i++) if (shared[i] != 7) _exit(2);
            for (size_t i = 0; i < 10000; i++) { unsigned char *q = malloc(i % 5000 + 1); q[0] = 1; free(q); }
            free(shared);
            _exit(0);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) FAIL("child %d failed", k);
    }
    stop_churn = 1;
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    free(shared);
    printf("ok %llu\n", (unsigned long long)sum);
    return 0;
}
