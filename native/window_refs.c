/* Which window bytes the deflate data after a checkpoint refers to (window_refs.h).
 *
 * A small deflate parser (RFC 1951) that produces no output: it counts output positions
 * and, for each match reaching before the checkpoint, marks the window bytes it copies.
 * Speed barely matters (it reads ~32 KiB of output's worth of input per checkpoint, one
 * checkpoint per span); bounds checks on every read do, since the blob is untrusted. */
#include "window_refs.h"

#include <string.h>

#define REFS_OUT (32u << 10)  /* output after which no distance reaches the window */
#define MAXBITS 15

typedef struct {
    const uint8_t *p;
    size_t n, next;   /* input, its length, the next byte to load */
    uint64_t buf;     /* bits loaded and not yet taken, least significant first */
    int cnt;          /* how many */
} bitrd;

static inline void refill(bitrd *b)
{
    while (b->cnt <= 56 && b->next < b->n) {
        b->buf |= (uint64_t)b->p[b->next++] << b->cnt;
        b->cnt += 8;
    }
}

/* k (0..16) bits, least significant first; -1 past the end of the input */
static inline int32_t take(bitrd *b, int k)
{
    if (b->cnt < k) {
        refill(b);
        if (b->cnt < k)
            return -1;
    }
    int32_t v = (int32_t)(b->buf & ((1u << k) - 1));
    b->buf >>= k;
    b->cnt -= k;
    return v;
}

#define FASTBITS 10  /* codes up to this long are looked up in one step */

typedef struct {
    uint16_t count[MAXBITS + 1];  /* codes of each length */
    uint16_t symbol[288];         /* symbols ordered by code */
    /* indexed by the next FASTBITS input bits: (length << 9) | symbol of the code they
     * start with, or 0 when that code is longer (then decoded bit by bit) */
    uint16_t fast[1u << FASTBITS];
} huff;

/* Canonical code from code lengths; over-subscribed sets are invalid, incomplete ones
 * are allowed (a code that is not assigned fails when it is met). */
static int build(huff *h, const uint8_t *len, int n)
{
    uint16_t offs[MAXBITS + 2];
    memset(h->count, 0, sizeof h->count);
    for (int s = 0; s < n; s++)
        h->count[len[s]]++;
    int left = 1;
    for (int l = 1; l <= MAXBITS; l++) {
        left = (left << 1) - h->count[l];
        if (left < 0)
            return -1;
    }
    offs[1] = 0;
    for (int l = 1; l <= MAXBITS; l++)
        offs[l + 1] = (uint16_t)(offs[l] + h->count[l]);
    for (int s = 0; s < n; s++)
        if (len[s])
            h->symbol[offs[len[s]]++] = (uint16_t)s;
    /* codes are assigned in (length, symbol) order and sent most significant bit first */
    memset(h->fast, 0, sizeof h->fast);
    unsigned code = 0, idx = 0;
    for (unsigned l = 1; l <= FASTBITS; l++, code <<= 1)
        for (unsigned k = 0; k < h->count[l]; k++, code++) {
            unsigned rev = 0;
            for (unsigned i = 0; i < l; i++)
                rev |= ((code >> i) & 1u) << (l - 1 - i);
            uint16_t e = (uint16_t)((l << 9) | h->symbol[idx++]);
            for (unsigned i = rev; i < (1u << FASTBITS); i += 1u << l)
                h->fast[i] = e;
        }
    return 0;
}

/* the next symbol: -1 out of input, -2 no such code */
static int decode(bitrd *b, const huff *h)
{
    if (b->cnt < FASTBITS)
        refill(b);
    if (b->cnt >= FASTBITS) {
        uint16_t e = h->fast[b->buf & ((1u << FASTBITS) - 1)];
        if (e) {
            b->buf >>= e >> 9;
            b->cnt -= e >> 9;
            return e & 511;
        }
    }
    int code = 0, first = 0, index = 0;
    for (int l = 1; l <= MAXBITS; l++) {
        if (b->cnt == 0) {
            refill(b);
            if (b->cnt == 0)
                return -1;
        }
        code |= (int)(b->buf & 1);
        b->buf >>= 1;
        b->cnt--;
        int count = h->count[l];
        if (code - first < count)
            return h->symbol[index + code - first];
        index += count;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -2;
}

static const uint16_t LEN_BASE[29] = {3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                      35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LEN_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                      3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129,
                                       193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097,
                                       6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                       7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

#define FAIL(r) ((r) == -1 ? LZ_REFS_SHORT : LZ_REFS_INVALID)

/* one Huffman-coded block's symbols; *out advances; stops early once past REFS_OUT */
static int codes(bitrd *b, const huff *lit, const huff *dist, uint64_t *out, size_t wlen,
                 uint8_t *used)
{
    for (;;) {
        int s = decode(b, lit);
        if (s < 0)
            return FAIL(s);
        if (s < 256) {
            ++*out;
        } else if (s == 256) {
            return LZ_REFS_OK;
        } else {
            s -= 257;
            if (s >= 29)
                return LZ_REFS_INVALID;
            int32_t e = take(b, LEN_EXTRA[s]);
            if (e < 0)
                return LZ_REFS_SHORT;
            uint64_t len = LEN_BASE[s] + (uint32_t)e;
            int ds = decode(b, dist);
            if (ds < 0)
                return FAIL(ds);
            if (ds >= 30)
                return LZ_REFS_INVALID;
            e = take(b, DIST_EXTRA[ds]);
            if (e < 0)
                return LZ_REFS_SHORT;
            uint64_t d = DIST_BASE[ds] + (uint32_t)e;
            if (d > *out) {  /* reaches before the checkpoint, into the window */
                uint64_t back = d - *out;
                if (back > wlen)
                    return LZ_REFS_INVALID;
                for (uint64_t i = 0; i < len && i < back; i++)
                    used[wlen - back + i] = 1;
            }
            *out += len;
        }
        if (*out >= REFS_OUT)
            return LZ_REFS_OK;
    }
}

static int dynamic_tables(bitrd *b, huff *lit, huff *dist)
{
    static const uint8_t order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    uint8_t lens[286 + 30];
    int32_t nlen = take(b, 5), ndist = take(b, 5), ncode = take(b, 4);
    if (nlen < 0 || ndist < 0 || ncode < 0)
        return LZ_REFS_SHORT;
    nlen += 257;
    ndist += 1;
    ncode += 4;
    if (nlen > 286 || ndist > 30)
        return LZ_REFS_INVALID;
    memset(lens, 0, 19);
    for (int i = 0; i < ncode; i++) {
        int32_t v = take(b, 3);
        if (v < 0)
            return LZ_REFS_SHORT;
        lens[order[i]] = (uint8_t)v;
    }
    huff lencode;
    if (build(&lencode, lens, 19))
        return LZ_REFS_INVALID;
    int i = 0;
    while (i < nlen + ndist) {
        int s = decode(b, &lencode);
        if (s < 0)
            return FAIL(s);
        if (s < 16) {
            lens[i++] = (uint8_t)s;
            continue;
        }
        int rep;
        uint8_t v = 0;
        int32_t e;
        if (s == 16) {
            if (i == 0)
                return LZ_REFS_INVALID;
            v = lens[i - 1];
            e = take(b, 2);
            rep = 3 + e;
        } else if (s == 17) {
            e = take(b, 3);
            rep = 3 + e;
        } else {
            e = take(b, 7);
            rep = 11 + e;
        }
        if (e < 0)
            return LZ_REFS_SHORT;
        if (i + rep > nlen + ndist)
            return LZ_REFS_INVALID;
        while (rep--)
            lens[i++] = v;
    }
    if (lens[256] == 0 || build(lit, lens, nlen) || build(dist, lens + nlen, ndist))
        return LZ_REFS_INVALID;
    return LZ_REFS_OK;
}

static void fixed_tables(huff *lit, huff *dist)
{
    uint8_t lens[288];
    memset(lens, 8, 144);
    memset(lens + 144, 9, 112);
    memset(lens + 256, 7, 24);
    memset(lens + 280, 8, 8);
    build(lit, lens, 288);
    memset(lens, 5, 30);
    build(dist, lens, 30);
}

int lz_window_refs(const uint8_t *in, size_t n, int bits, size_t wlen, uint8_t *used)
{
    bitrd b = {in, n, 0, 0, 0};
    uint64_t out = 0;
    if (bits < 0 || bits > 7)
        return LZ_REFS_INVALID;
    if (take(&b, bits) < 0)
        return LZ_REFS_SHORT;
    for (;;) {
        int32_t final = take(&b, 1), type = take(&b, 2);
        if (final < 0 || type < 0)
            return LZ_REFS_SHORT;
        int r;
        if (type == 0) {
            take(&b, b.cnt % 8);  /* to the byte boundary */
            int32_t len = take(&b, 16), nlen = take(&b, 16);
            if (len < 0 || nlen < 0)
                return LZ_REFS_SHORT;
            if ((len ^ 0xffff) != nlen)
                return LZ_REFS_INVALID;
            size_t at = b.next - (size_t)(b.cnt / 8);  /* the first stored byte */
            if (n - at < (size_t)len)
                return out + (uint64_t)len >= REFS_OUT ? LZ_REFS_OK : LZ_REFS_SHORT;
            b.next = at + (size_t)len;
            b.buf = 0;
            b.cnt = 0;
            out += (uint64_t)len;
            r = LZ_REFS_OK;
        } else if (type == 1 || type == 2) {
            huff lit, dist;
            if (type == 1)
                fixed_tables(&lit, &dist);
            else if ((r = dynamic_tables(&b, &lit, &dist)) != LZ_REFS_OK)
                return r;
            r = codes(&b, &lit, &dist, &out, wlen, used);
        } else {
            return LZ_REFS_INVALID;
        }
        if (r != LZ_REFS_OK || out >= REFS_OUT || final)
            return r;
    }
}
