/* A libFuzzer stand-in for gcc builds: replays the files given as arguments, then runs
 * LZ_FUZZ_RUNS (default 200000) inputs from the target's own generator
 * (lz_fuzz_generate, fuzz.h: mostly well-formed inputs, then damaged ones) seeded by
 * LZ_FUZZ_SEED.  Exit 0 when no input crashed (sanitizers abort). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

static uint64_t rng_state;
uint64_t lz_fuzz_rnd(void) /* xorshift64*: deterministic per seed */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

int main(int argc, char **argv)
{
    static uint8_t buf[LZ_FUZZ_MAX];
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
        size_t n = lz_fuzz_generate(buf, sizeof buf);
        if (lz_fuzz_rnd() % 6 == 0) /* cut short: every target's inputs */
            n = lz_fuzz_rnd() % (n + 1);
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("fuzz: %d files, %ld generated inputs, no crash\n", argc - 1, runs);
    return 0;
}
