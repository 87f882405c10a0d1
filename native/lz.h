/* Shared helpers of the lazysnap C core: errors, growable buffers, SHA-256.
 *
 * Nothing here touches Python: the core is plain C11 so it can run with the GIL
 * released and be tested under sanitizers; module.c maps lz_err to exceptions. */
#ifndef LZ_H
#define LZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>

enum { LZ_OK = 0, LZ_CORRUPT = 1, LZ_TRUNCATED = 2, LZ_NOMEM = 3, LZ_INVALID = 4 };

/* One packed chunk record, the layout scans return and verify_chunks reads: u64 LE offset
 * in the tar stream, u64 LE length, SHA-256. Python's side is index.model.CHUNK_RECORD;
 * snapshotter.native refuses to load a core whose size differs (_core.CHUNK_RECORD_SIZE). */
#define LZ_CHUNK_RECORD 48

/* Most data segments one sparse file may have: a layer with more is refused (no index), and
 * so is an index listing more. Bounds what one hostile entry costs to hold (1 MiB here,
 * ~8 MiB as Python tuples). Python's side is index.model.MAX_SPARSE_SEGMENTS, checked
 * against _core.MAX_SPARSE_SEGMENTS like the record size. */
#define LZ_MAX_SPARSE_SEGMENTS 65536

typedef struct {
    int kind;        /* LZ_* */
    char msg[320];
} lz_err;

/* Record the first error only (later ones are consequences); returns -1. */
static inline int lz_fail(lz_err *e, int kind, const char *fmt, ...)
{
    if (e->kind != LZ_OK)
        return -1;
    e->kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

static inline int lz_nomem(lz_err *e) { return lz_fail(e, LZ_NOMEM, "out of memory"); }

/* A growable byte buffer. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} lz_buf;

static inline int lz_buf_reserve(lz_buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    uint8_t *np = realloc(b->p, cap);
    if (!np)
        return -1;
    b->p = np;
    b->cap = cap;
    return 0;
}

static inline int lz_buf_append(lz_buf *b, const void *src, size_t n)
{
    if (lz_buf_reserve(b, n))
        return -1;
    if (n)
        memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static inline void lz_buf_free(lz_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* A record field as the index and the scan results store it: little-endian. */
static inline void lz_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint64_t lz_get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#define LZ_MIN(a, b) ((a) < (b) ? (a) : (b))
#define LZ_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
