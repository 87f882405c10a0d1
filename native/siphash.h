/* SipHash-1-3 under a random key per table.  Tables keyed by what a layer chooses (names,
 * paths, xattr records) must not let a hostile layer pick names that share one probe
 * chain: with an unkeyed hash, 500k such names make a build quadratic (hours of CPU). */
#ifndef LZ_SIPHASH_H
#define LZ_SIPHASH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/random.h>
#include <time.h>

typedef struct {
    uint64_t k0, k1;
} lz_hash_key;

/* A fresh key: from getrandom, else (no entropy yet) the clock and an address. */
static inline void lz_hash_key_new(lz_hash_key *k)
{
    uint64_t v[2];
    if (getrandom(v, sizeof v, GRND_NONBLOCK) != (ssize_t)sizeof v) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        v[0] = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)ts.tv_sec;
        v[1] = (uint64_t)(uintptr_t)k * 0xC2B2AE3D27D4EB4Full ^ v[0];
    }
    k->k0 = v[0];
    k->k1 = v[1];
}

static inline uint64_t lz_sip_rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

#define LZ_SIPROUND                                                                  \
    do {                                                                             \
        v0 += v1; v1 = lz_sip_rotl(v1, 13); v1 ^= v0; v0 = lz_sip_rotl(v0, 32);      \
        v2 += v3; v3 = lz_sip_rotl(v3, 16); v3 ^= v2;                                \
        v0 += v3; v3 = lz_sip_rotl(v3, 21); v3 ^= v0;                                \
        v2 += v1; v1 = lz_sip_rotl(v1, 17); v1 ^= v2; v2 = lz_sip_rotl(v2, 32);      \
    } while (0)

static inline uint64_t lz_siphash(const lz_hash_key *k, const uint8_t *p, size_t n)
{
    uint64_t v0 = 0x736f6d6570736575ull ^ k->k0, v1 = 0x646f72616e646f6dull ^ k->k1;
    uint64_t v2 = 0x6c7967656e657261ull ^ k->k0, v3 = 0x7465646279746573ull ^ k->k1;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t m = 0;
        for (int j = 0; j < 8; j++)
            m |= (uint64_t)p[i + j] << (8 * j);
        v3 ^= m;
        LZ_SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)n << 56;
    for (size_t j = 0; i + j < n; j++)
        b |= (uint64_t)p[i + j] << (8 * j);
    v3 ^= b;
    LZ_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    LZ_SIPROUND;
    LZ_SIPROUND;
    LZ_SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

#undef LZ_SIPROUND

#endif
