/* A libFuzzer stand-in for gcc builds: replays the files given as arguments, then runs
 * LZ_FUZZ_RUNS (default 200000) inputs generated from LZ_FUZZ_SEED: mostly well-formed
 * FUSE requests of the opcodes the filesystem answers, then damaged (length, cut,
 * missing NUL, random bytes).  Exit 0 when no input crashed (sanitizers abort). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kproto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t rng_state;
static uint64_t rnd(void) /* xorshift64*: deterministic per seed */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static const uint32_t opcodes[] = {FUSE_INIT,    FUSE_LOOKUP,   FUSE_FORGET,   FUSE_BATCH_FORGET, FUSE_GETATTR,
                                   FUSE_READLINK, FUSE_OPEN,    FUSE_OPENDIR,  FUSE_READ,         FUSE_READDIR,
                                   FUSE_READDIRPLUS, FUSE_RELEASE, FUSE_RELEASEDIR, FUSE_STATFS,   FUSE_GETXATTR,
                                   FUSE_LISTXATTR, FUSE_INTERRUPT, FUSE_DESTROY, FUSE_FLUSH,       9999};

static size_t generate(uint8_t *buf, size_t cap)
{
    size_t arg = rnd() % 300;
    if (rnd() % 8 == 0)
        arg = rnd() % 5000;
    size_t n = sizeof(struct fuse_in_header) + arg;
    if (n > cap)
        n = cap;
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)rnd();
    struct fuse_in_header h = {.len = (uint32_t)n,
                               .opcode = opcodes[rnd() % (sizeof opcodes / sizeof *opcodes)],
                               .unique = rnd() | 1,
                               .nodeid = rnd() % 4 ? 1 + rnd() % 8 : rnd()};
    memcpy(buf, &h, sizeof h);
    if (h.opcode == FUSE_INIT && n >= sizeof h + 8) { /* mostly plausible versions */
        uint32_t v[2] = {rnd() % 4 ? 7 : (uint32_t)rnd() % 9, (uint32_t)(rnd() % 45)};
        memcpy(buf + sizeof h, v, sizeof v);
    }
    if (rnd() % 3 == 0 && n > sizeof h) /* a terminated name somewhere */
        buf[sizeof h + rnd() % (n - sizeof h)] = 0;
    switch (rnd() % 6) {
    case 0: /* the header lies about the length */
        h.len = (uint32_t)rnd();
        memcpy(buf, &h.len, sizeof h.len);
        break;
    case 1: /* cut short */
        n = rnd() % (n + 1);
        break;
    default:
        break;
    }
    return n;
}

int main(int argc, char **argv)
{
    static uint8_t buf[LZK_BUFSIZE];
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 2;
        }
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
    }
    const char *runs_s = getenv("LZ_FUZZ_RUNS"), *seed_s = getenv("LZ_FUZZ_SEED");
    long runs = runs_s ? atol(runs_s) : 200000;
    rng_state = seed_s ? strtoull(seed_s, NULL, 10) : 1;
    if (!rng_state)
        rng_state = 1;
    for (long i = 0; i < runs; i++) {
        size_t n = generate(buf, sizeof buf);
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("fuzz: %d files, %ld generated inputs, no crash\n", argc - 1, runs);
    return 0;
}
