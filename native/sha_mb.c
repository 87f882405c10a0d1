/* Batched SHA-256 (see sha_mb.h): 16 messages per AVX-512 pass, OpenSSL for the rest. */
#include "sha_mb.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LZ_MH_X16 1
#include <immintrin.h>
#else
#define LZ_MH_X16 0
#endif

static const uint32_t IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* One message, whole blocks: OpenSSL's block function (SHA-NI where the CPU has it). */
static void x1_blocks(uint32_t h[8], const uint8_t *p, size_t nblocks)
{
    if (!nblocks)
        return;
    /* With nothing buffered and whole blocks, SHA256_Update hands all of them to the
     * block function in one call; the length counters are never used (no Final). */
    SHA256_CTX c;
    memset(&c, 0, sizeof c);
    memcpy(c.h, h, sizeof c.h);
    c.md_len = SHA256_DIGEST_LENGTH;
    SHA256_Update(&c, p, 64 * nblocks);
    memcpy(h, c.h, sizeof c.h);
}

#if LZ_MH_X16
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define X16_TARGET __attribute__((target("avx512f,avx512bw")))
#define X16_MIN_ACTIVE 10  /* below this many busy lanes one-at-a-time SHA-NI is faster */

static int cpu_has_x16(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

/* 16 lanes, m blocks each: lane l reads base[l] + 64 * k * step[l] (step 0: a dummy lane).
 * st[j][l] is word j of lane l's state. */
X16_TARGET static void x16_blocks(uint32_t st[8][16], const uint8_t *const base[16],
                                  const size_t step[16], size_t m)
{
    const __m512i bswap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
    __m512i s[8];
    for (int j = 0; j < 8; j++)
        s[j] = _mm512_loadu_si512((const void *)st[j]);
    for (size_t k = 0; k < m; k++) {
        __m512i w[16], t[16], u[16];
        for (int l = 0; l < 16; l++)
            w[l] = _mm512_loadu_si512((const void *)(base[l] + 64 * k * step[l]));
        /* 16x16 transpose of 32-bit words: row l (lane l's block) -> w[j] = word j of all */
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_epi32(w[i], w[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(w[i], w[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for (int j = 0; j < 4; j++) {
            __m512i a0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
            __m512i a1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
            __m512i b0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
            __m512i b1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
            t[j] = _mm512_shuffle_i32x4(a0, b0, 0x88);
            t[j + 8] = _mm512_shuffle_i32x4(a0, b0, 0xDD);
            t[j + 4] = _mm512_shuffle_i32x4(a1, b1, 0x88);
            t[j + 12] = _mm512_shuffle_i32x4(a1, b1, 0xDD);
        }
        for (int j = 0; j < 16; j++)
            w[j] = _mm512_shuffle_epi8(t[j], bswap);
        __m512i a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
#pragma GCC unroll 64
        for (int r = 0; r < 64; r++) {
            __m512i wr;
            if (r < 16) {
                wr = w[r];
            } else {
                __m512i w15 = w[(r - 15) & 15], w2 = w[(r - 2) & 15];
                __m512i s0 = _mm512_ternarylogic_epi32(_mm512_ror_epi32(w15, 7), _mm512_ror_epi32(w15, 18),
                                                       _mm512_srli_epi32(w15, 3), 0x96);
                __m512i s1 = _mm512_ternarylogic_epi32(_mm512_ror_epi32(w2, 17), _mm512_ror_epi32(w2, 19),
                                                       _mm512_srli_epi32(w2, 10), 0x96);
                wr = w[r & 15] = _mm512_add_epi32(_mm512_add_epi32(w[r & 15], s0),
                                                  _mm512_add_epi32(w[(r - 7) & 15], s1));
            }
            __m512i S1 = _mm512_ternarylogic_epi32(_mm512_ror_epi32(e, 6), _mm512_ror_epi32(e, 11),
                                                   _mm512_ror_epi32(e, 25), 0x96);
            __m512i ch = _mm512_ternarylogic_epi32(e, f, g, 0xCA);
            __m512i t1 = _mm512_add_epi32(_mm512_add_epi32(h, S1),
                                          _mm512_add_epi32(ch, _mm512_add_epi32(wr, _mm512_set1_epi32((int)K[r]))));
            __m512i S0 = _mm512_ternarylogic_epi32(_mm512_ror_epi32(a, 2), _mm512_ror_epi32(a, 13),
                                                   _mm512_ror_epi32(a, 22), 0x96);
            __m512i mj = _mm512_ternarylogic_epi32(a, b, c, 0xE8);
            h = g;
            g = f;
            f = e;
            e = _mm512_add_epi32(d, t1);
            d = c;
            c = b;
            b = a;
            a = _mm512_add_epi32(t1, _mm512_add_epi32(S0, mj));
        }
        s[0] = _mm512_add_epi32(s[0], a);
        s[1] = _mm512_add_epi32(s[1], b);
        s[2] = _mm512_add_epi32(s[2], c);
        s[3] = _mm512_add_epi32(s[3], d);
        s[4] = _mm512_add_epi32(s[4], e);
        s[5] = _mm512_add_epi32(s[5], f);
        s[6] = _mm512_add_epi32(s[6], g);
        s[7] = _mm512_add_epi32(s[7], h);
    }
    for (int j = 0; j < 8; j++)
        _mm512_storeu_si512((void *)st[j], s[j]);
}

static int by_blocks_desc(const void *a, const void *b)
{
    size_t x = ((const lz_mh_job *)a)->nblocks, y = ((const lz_mh_job *)b)->nblocks;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Longest jobs first into 16 lanes; a lane that finishes takes the next job; once fewer
 * than X16_MIN_ACTIVE lanes are busy the rest goes one message at a time.  Returns how
 * many jobs (from the front) it finished; the caller does the others. */
static size_t run_x16(lz_sha *s, lz_mh_job *jobs, size_t nj)
{
    static const uint8_t dummy_block[64];  /* read-only constant, not state */
    uint32_t st[8][16];
    const uint8_t *base[16];
    size_t step[16], left[16], job_of[16];
    size_t next = 0;
    memset(st, 0, sizeof st);
    for (int l = 0; l < 16; l++) {
        left[l] = 0;
        base[l] = dummy_block;
        step[l] = 0;
        job_of[l] = 0;
    }
    for (;;) {
        /* fill idle lanes */
        int active = 0;
        for (int l = 0; l < 16; l++) {
            if (!left[l] && next < nj) {
                lz_mh_job *jb = &jobs[next];
                job_of[l] = next++;
                base[l] = jb->p;
                step[l] = 1;
                left[l] = jb->nblocks;
                for (int j = 0; j < 8; j++)
                    st[j][l] = s[jb->slot].h[j];
            }
            active += left[l] > 0;
        }
        if (active < X16_MIN_ACTIVE)
            break;
        size_t m = SIZE_MAX;
        for (int l = 0; l < 16; l++)
            if (left[l] && left[l] < m)
                m = left[l];
        x16_blocks(st, base, step, m);
        for (int l = 0; l < 16; l++) {
            if (!left[l])
                continue;
            base[l] += 64 * m;
            left[l] -= m;
            if (!left[l]) {
                for (int j = 0; j < 8; j++)
                    s[jobs[job_of[l]].slot].h[j] = st[j][l];
                base[l] = dummy_block;
                step[l] = 0;
            }
        }
    }
    /* busy lanes finish one at a time */
    for (int l = 0; l < 16; l++) {
        if (!left[l])
            continue;
        uint32_t *h = s[jobs[job_of[l]].slot].h;
        for (int j = 0; j < 8; j++)
            h[j] = st[j][l];
        x1_blocks(h, base[l], left[l]);
    }
    return next;
}
#endif

void lz_mh_init(lz_mh *m, int allow_simd)
{
    memset(m, 0, sizeof *m);
#if LZ_MH_X16
    m->simd = allow_simd && cpu_has_x16();
#else
    (void)allow_simd;
#endif
}

void lz_mh_free(lz_mh *m)
{
    lz_buf_free(&m->slots);
    lz_buf_free(&m->free_slots);
    lz_buf_free(&m->jobs);
}

static lz_sha *slot_ptr(lz_mh *m, size_t slot) { return (lz_sha *)m->slots.p + slot; }

static void sha_clear(lz_sha *c)
{
    memcpy(c->h, IV, sizeof IV);
    c->total = 0;
    c->nbuf = 0;
    c->queued = 0;
    c->in_use = 1;
}

int lz_mh_new(lz_mh *m, size_t *slot)
{
    if (m->free_slots.len) {
        m->free_slots.len -= sizeof(size_t);
        memcpy(slot, m->free_slots.p + m->free_slots.len, sizeof(size_t));
    } else {
        lz_sha c;
        memset(&c, 0, sizeof c);
        if (lz_buf_append(&m->slots, &c, sizeof c))
            return -1;
        *slot = m->slots.len / sizeof c - 1;
    }
    /* reserve now so that freeing this slot later cannot fail */
    if (lz_buf_reserve(&m->free_slots, m->slots.len / sizeof(lz_sha) * sizeof(size_t) -
                                           m->free_slots.len))
        return -1;
    sha_clear(slot_ptr(m, *slot));
    return 0;
}

void lz_mh_reset(lz_mh *m, size_t slot)
{
    if (slot_ptr(m, slot)->queued)
        lz_mh_run(m);
    sha_clear(slot_ptr(m, slot));
}

int lz_mh_update(lz_mh *m, size_t slot, const uint8_t *p, size_t n)
{
    if (!n)
        return 0;
    lz_sha *c = slot_ptr(m, slot);
    if (c->queued) {
        lz_mh_run(m);
        c = slot_ptr(m, slot);
    }
    c->total += n;
    if (c->nbuf) {
        size_t take = LZ_MIN(n, (size_t)(64 - c->nbuf));
        memcpy(c->buf + c->nbuf, p, take);
        c->nbuf += (uint32_t)take;
        p += take;
        n -= take;
        if (c->nbuf < 64)
            return 0;
        x1_blocks(c->h, c->buf, 1);
        c->nbuf = 0;
    }
    size_t full = n / 64;
    if (full) {
        lz_mh_job j = {slot, p, full};
        if (lz_buf_append(&m->jobs, &j, sizeof j)) {
            x1_blocks(c->h, p, full);  /* no room to queue: hash now */
        } else {
            c->queued = 1;
        }
    }
    size_t tail = n % 64;
    memcpy(c->buf, p + 64 * full, tail);
    c->nbuf = (uint32_t)tail;
    return 0;
}

void lz_mh_run(lz_mh *m)
{
    size_t nj = m->jobs.len / sizeof(lz_mh_job);
    if (!nj)
        return;
    lz_mh_job *jobs = (lz_mh_job *)m->jobs.p;
    lz_sha *s = (lz_sha *)m->slots.p;
    size_t done = 0;
#if LZ_MH_X16
    if (m->simd && nj >= X16_MIN_ACTIVE) {
        qsort(jobs, nj, sizeof *jobs, by_blocks_desc);
        done = run_x16(s, jobs, nj);
    }
#endif
    for (size_t i = done; i < nj; i++)
        x1_blocks(s[jobs[i].slot].h, jobs[i].p, jobs[i].nblocks);
    for (size_t i = 0; i < nj; i++)
        s[jobs[i].slot].queued = 0;
    m->jobs.len = 0;
}

void lz_mh_final(lz_mh *m, size_t slot, uint8_t out[32])
{
    if (slot_ptr(m, slot)->queued)
        lz_mh_run(m);
    lz_sha *c = slot_ptr(m, slot);
    uint8_t pad[128];
    size_t n = c->nbuf;
    memcpy(pad, c->buf, n);
    pad[n++] = 0x80;
    size_t len = n <= 56 ? 64 : 128;
    memset(pad + n, 0, len - n);
    uint64_t bits = c->total * 8;
    for (int i = 0; i < 8; i++)
        pad[len - 1 - i] = (uint8_t)(bits >> (8 * i));
    x1_blocks(c->h, pad, len / 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
    c->in_use = 0;
    memcpy(m->free_slots.p + m->free_slots.len, &slot, sizeof slot);  /* reserved in new() */
    m->free_slots.len += sizeof slot;
}
