/* Streaming tar parser with file-aligned chunk hashing (see tar.h). */
#include "tar.h"

#include <errno.h>
#include <limits.h>

enum { T_HDR, T_EXT, T_DATA, T_SKIP, T_SPARSE_MAP, T_GNU_SPARSE_EXT, T_END, T_FAILED };

#define MAX_EXT_SIZE (1u << 20)          /* PAX / GNU long-name payload limit */
#define MAX_SANE_SIZE ((uint64_t)1 << 56) /* 64 PiB: anything larger is hostile */
#define MAX_SPARSE_SEGMENTS LZ_MAX_SPARSE_SEGMENTS

static const uint8_t ZERO_BLOCK[512];

static void pend_clear(tar_pending *p)
{
    p->has_path = p->has_link = p->has_size = p->has_uid = p->has_gid = p->has_mtime = 0;
    p->path.len = p->link.len = 0;
    p->xattr_data.len = 0;
    p->xattr_count = 0;
    p->sparse_major = p->sparse_minor = -1;
    p->has_sparse_realsize = 0;
    p->has_sparse_name = 0;
    p->sparse_name.len = 0;
    p->sparse_map.len = 0;
    p->has_sparse_map = 0;
    p->pending_offset = -1;
}

void tar_free(tar_t *t)
{
    lz_buf_free(&t->ext);
    lz_buf_free(&t->pend.path);
    lz_buf_free(&t->pend.link);
    lz_buf_free(&t->pend.xattr_data);
    lz_buf_free(&t->pend.sparse_name);
    lz_buf_free(&t->pend.sparse_map);
    lz_buf_free(&t->entries);
    lz_buf_free(&t->chunks);
    lz_buf_free(&t->arena);
    lz_buf_free(&t->xattrs);
    lz_buf_free(&t->sparse);
    lz_buf_free(&t->finals);
    lz_buf_free(&t->keep);
    lz_buf_free(&t->sunk_flags);
    lz_buf_free(&t->stored);
    lz_mh_free(&t->mh);
}

void tar_set_sink(tar_t *t, tar_sink_fn sink, void *ctx, uint64_t min_file)
{
    t->sink = sink;
    t->sink_ctx = ctx;
    t->sink_min_file = min_file;
}

void tar_set_consumer(tar_t *t, tar_entry_fn fn, void *ctx)
{
    t->consume = fn;
    t->consume_ctx = ctx;
}

/* The complete entries to the consumer, then forgotten (the chunk table stays: chunks
 * are numbered across the layer and their digests come at flushes). */
static void hand_over(tar_t *t)
{
    if (!t->consume)
        return;
    size_t n = tar_entry_count(t);
    for (size_t i = 0; i < n && !t->consume_done; i++)
        t->consume_done = t->consume(t->consume_ctx, t, i) != 0;
    t->entries.len = t->arena.len = t->xattrs.len = t->sparse.len = 0;
}

static int fail(tar_t *t, int kind, const char *fmt, ...)
{
    if (t->err.kind == LZ_OK) {
        t->err.kind = kind;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t->err.msg, sizeof t->err.msg, fmt, ap);
        va_end(ap);
    }
    t->state = T_FAILED;
    return -1;
}

static int nomem(tar_t *t) { return fail(t, LZ_NOMEM, "out of memory"); }

int tar_init(tar_t *t, uint64_t chunk_size, int want_diff, int simd)
{
    memset(t, 0, sizeof *t);
    t->chunk_size = chunk_size;
    t->want_diff = want_diff;
    t->state = T_HDR;
    pend_clear(&t->pend);
    lz_mh_init(&t->mh, simd);
    if (lz_mh_new(&t->mh, &t->chunk_slot) || (want_diff && lz_mh_new(&t->mh, &t->diff_slot)))
        return nomem(t);
    return 0;
}

/* ---- numeric fields (octal, or base-256 as GNU/star write big values) ---- */

static int parse_num(const uint8_t *s, size_t n, int64_t *out)
{
    if (n && (s[0] == 0x80 || s[0] == 0xff)) {
        int neg = s[0] == 0xff;
        uint64_t v = 0;
        for (size_t i = 1; i < n; i++) {
            uint8_t c = neg ? (uint8_t)~s[i] : s[i];
            if (v >> 55)
                return -1;  /* does not fit in int64 */
            v = (v << 8) | c;
        }
        if (v > (uint64_t)INT64_MAX)
            return -1;
        *out = neg ? -(int64_t)v - 1 : (int64_t)v;
        return 0;
    }
    size_t end = 0;
    while (end < n && s[end])
        end++;
    size_t i = 0;
    while (i < end && s[i] == ' ')
        i++;
    while (end > i && s[end - 1] == ' ')
        end--;
    uint64_t v = 0;
    for (; i < end; i++) {
        if (s[i] < '0' || s[i] > '7')
            return -1;
        if (v >> 60)
            return -1;
        v = v * 8 + (uint64_t)(s[i] - '0');
    }
    *out = (int64_t)v;
    return 0;
}

static size_t field_len(const uint8_t *s, size_t n)
{
    const uint8_t *z = memchr(s, 0, n);
    return z ? (size_t)(z - s) : n;
}

/* ---- decimal helpers for PAX values ---- */

static int parse_dec_u64(const uint8_t *s, size_t n, uint64_t *out)
{
    if (n == 0)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

static int parse_dec_i64(const uint8_t *s, size_t n, int64_t *out)
{
    int neg = n && s[0] == '-';
    uint64_t v;
    if (parse_dec_u64(s + neg, n - (size_t)neg, &v) || v > (uint64_t)INT64_MAX)
        return -1;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 0;
}

/* "1700000000.123456789" or "-1.5" → nanoseconds. */
static int parse_pax_time(const uint8_t *s, size_t n, int64_t *out)
{
    const uint8_t *dot = memchr(s, '.', n);
    size_t ilen = dot ? (size_t)(dot - s) : n;
    int neg = ilen && s[0] == '-';
    uint64_t sec;
    if (ilen == (size_t)neg)
        sec = 0;
    else if (parse_dec_u64(s + neg, ilen - (size_t)neg, &sec))
        return -1;
    if (sec > (uint64_t)INT64_MAX / 1000000000ull - 1)
        return -1;
    uint64_t frac = 0;
    if (dot) {
        size_t flen = n - ilen - 1, digits = 0;
        for (size_t i = 0; i < flen; i++) {
            uint8_t c = dot[1 + i];
            if (c < '0' || c > '9')
                return -1;
            if (digits < 9) {
                frac = frac * 10 + (uint64_t)(c - '0');
                digits++;
            }
        }
        for (; digits < 9; digits++)
            frac *= 10;
    }
    int64_t ns = (int64_t)(sec * 1000000000ull + frac);
    *out = neg ? -ns : ns;
    return 0;
}

/* ---- outputs ---- */

static int arena_add(tar_t *t, const uint8_t *p, size_t n, size_t *off)
{
    *off = t->arena.len;
    return lz_buf_append(&t->arena, p, n);
}

static int sparse_add(lz_buf *b, uint64_t off, uint64_t len)
{
    uint64_t pair[2] = {off, len};
    return lz_buf_append(b, pair, sizeof pair);
}

static int chunk_finish(tar_t *t)
{
    /* The digest is filled in by tar_flush, once the batched hashing has run. */
    tar_chunk c;
    memset(&c, 0, sizeof c);
    c.offset = t->chunk_start;
    c.length = t->chunk_fill;
    uint8_t sunk = t->cur_sunk && t->sink;
    if (t->sink && lz_buf_append(&t->sunk_flags, &sunk, 1))
        return nomem(t);
    size_t fin[2] = {t->chunk_slot, tar_chunk_count(t)};
    if (lz_buf_append(&t->chunks, &c, sizeof c) || lz_buf_append(&t->finals, fin, sizeof fin) ||
        lz_mh_new(&t->mh, &t->chunk_slot))
        return nomem(t);
    t->keep_done = t->keep.len;
    t->chunk_start += t->chunk_fill;
    t->chunk_fill = 0;
    return 0;
}

/* ---- PAX records ---- */

static int key_is(const uint8_t *k, size_t kl, const char *s)
{
    size_t n = strlen(s);
    return kl == n && memcmp(k, s, n) == 0;
}

/* pending xattrs: u64 key length, key, u64 value length, value; repeated */
static int xattr_push(tar_pending *p, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    uint64_t a = kl, b = vl;
    return lz_buf_append(&p->xattr_data, &a, sizeof a) || lz_buf_append(&p->xattr_data, k, kl) ||
           lz_buf_append(&p->xattr_data, &b, sizeof b) || lz_buf_append(&p->xattr_data, v, vl);
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int b64val(uint8_t c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

static int add_libarchive_xattr(tar_t *t, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    tar_pending *p = &t->pend;
    lz_buf key = {0}, val = {0};
    int rc = -1;
    for (size_t i = 0; i < kl; i++) {
        uint8_t c = k[i];
        if (c == '%') {
            int hi = i + 2 < kl ? hexval(k[i + 1]) : -1, lo = i + 2 < kl ? hexval(k[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                goto bad;
            c = (uint8_t)(hi * 16 + lo);
            i += 2;
        }
        if (c == 0 || lz_buf_append(&key, &c, 1))
            goto bad;
    }
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < vl && v[i] != '='; i++) {
        int d = b64val(v[i]);
        if (d < 0)
            goto bad;
        acc = (acc << 6) | (uint32_t)d;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            uint8_t byte = (uint8_t)(acc >> bits);
            if (lz_buf_append(&val, &byte, 1)) {
                nomem(t);
                goto out;
            }
        }
    }
    if (xattr_push(p, key.p, key.len, val.p, val.len)) {
        nomem(t);
        goto out;
    }
    p->xattr_count++;
    rc = 0;
    goto out;
bad:
    fail(t, LZ_CORRUPT, "bad LIBARCHIVE.xattr record in header at offset %llu",
         (unsigned long long)t->hdr_off);
out:
    lz_buf_free(&key);
    lz_buf_free(&val);
    return rc;
}

static int pax_apply(tar_t *t, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    tar_pending *p = &t->pend;
    uint64_t u;
    int64_t i;
    if (key_is(k, kl, "path")) {
        p->path.len = 0;
        if (lz_buf_append(&p->path, v, vl))
            return nomem(t);
        p->has_path = 1;
    } else if (key_is(k, kl, "linkpath")) {
        p->link.len = 0;
        if (lz_buf_append(&p->link, v, vl))
            return nomem(t);
        p->has_link = 1;
    } else if (key_is(k, kl, "size")) {
        if (parse_dec_u64(v, vl, &u) || u > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad PAX size '%.*s' in header at offset %llu",
                        (int)LZ_MIN(vl, 40), v, (unsigned long long)t->hdr_off);
        p->size = u;
        p->has_size = 1;
    } else if (key_is(k, kl, "uid") || key_is(k, kl, "gid")) {
        if (parse_dec_i64(v, vl, &i))
            return fail(t, LZ_CORRUPT, "bad PAX %.*s in header at offset %llu", (int)kl, k,
                        (unsigned long long)t->hdr_off);
        if (k[0] == 'u') {
            p->uid = i;
            p->has_uid = 1;
        } else {
            p->gid = i;
            p->has_gid = 1;
        }
    } else if (key_is(k, kl, "mtime")) {
        if (parse_pax_time(v, vl, &i))
            return fail(t, LZ_CORRUPT, "bad PAX mtime in header at offset %llu",
                        (unsigned long long)t->hdr_off);
        p->mtime_ns = i;
        p->has_mtime = 1;
    } else if (kl > 13 && memcmp(k, "SCHILY.xattr.", 13) == 0) {
        if (xattr_push(p, k + 13, kl - 13, v, vl))
            return nomem(t);
        p->xattr_count++;
    } else if (kl > 17 && memcmp(k, "LIBARCHIVE.xattr.", 17) == 0) {
        /* libarchive: key %-encoded, value base64 */
        if (add_libarchive_xattr(t, k + 17, kl - 17, v, vl))
            return -1;
    } else if (key_is(k, kl, "GNU.sparse.major") || key_is(k, kl, "GNU.sparse.minor")) {
        if (parse_dec_u64(v, vl, &u) || u > 100)
            return fail(t, LZ_CORRUPT, "bad PAX %.*s at offset %llu", (int)kl, k,
                        (unsigned long long)t->hdr_off);
        if (k[12] == 'a')
            p->sparse_major = (int)u;
        else
            p->sparse_minor = (int)u;
    } else if (key_is(k, kl, "GNU.sparse.realsize") || key_is(k, kl, "GNU.sparse.size")) {
        if (parse_dec_u64(v, vl, &u) || u > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad PAX %.*s at offset %llu", (int)kl, k,
                        (unsigned long long)t->hdr_off);
        p->sparse_realsize = u;
        p->has_sparse_realsize = 1;
    } else if (key_is(k, kl, "GNU.sparse.name")) {
        p->sparse_name.len = 0;
        if (lz_buf_append(&p->sparse_name, v, vl))
            return nomem(t);
        p->has_sparse_name = 1;
    } else if (key_is(k, kl, "GNU.sparse.offset")) {  /* 0.0: offset/numbytes pairs */
        if (parse_dec_u64(v, vl, &u) || u > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad GNU.sparse.offset at offset %llu",
                        (unsigned long long)t->hdr_off);
        p->pending_offset = (int64_t)u;
    } else if (key_is(k, kl, "GNU.sparse.numbytes")) {
        if (parse_dec_u64(v, vl, &u) || u > MAX_SANE_SIZE || p->pending_offset < 0)
            return fail(t, LZ_CORRUPT, "bad GNU.sparse.numbytes at offset %llu",
                        (unsigned long long)t->hdr_off);
        if (p->sparse_map.len / 16 >= MAX_SPARSE_SEGMENTS)
            return fail(t, LZ_CORRUPT, "too many sparse segments at offset %llu",
                        (unsigned long long)t->hdr_off);
        if (sparse_add(&p->sparse_map, (uint64_t)p->pending_offset, u))
            return nomem(t);
        p->pending_offset = -1;
        p->has_sparse_map = 1;
        if (p->sparse_major < 0)
            p->sparse_major = 0;
    } else if (key_is(k, kl, "GNU.sparse.map")) {  /* 0.1: "off,len,off,len" */
        p->sparse_map.len = 0;
        size_t a = 0, count = 0;
        uint64_t pair[2];
        while (a <= vl && vl) {
            size_t b = a;
            while (b < vl && v[b] != ',')
                b++;
            if (parse_dec_u64(v + a, b - a, &pair[count & 1]) || pair[count & 1] > MAX_SANE_SIZE)
                return fail(t, LZ_CORRUPT, "bad GNU.sparse.map at offset %llu",
                            (unsigned long long)t->hdr_off);
            if (count & 1) {
                if (sparse_add(&p->sparse_map, pair[0], pair[1]))
                    return nomem(t);
            }
            count++;
            a = b + 1;
        }
        if (count & 1)
            return fail(t, LZ_CORRUPT, "odd GNU.sparse.map at offset %llu",
                        (unsigned long long)t->hdr_off);
        p->has_sparse_map = 1;
        if (p->sparse_major < 0)
            p->sparse_major = 0;
    }
    /* uname, gname, atime, ctime, comment, charset, ...: not needed */
    return 0;
}

static int pax_parse(tar_t *t, const uint8_t *d, size_t n)
{
    size_t pos = 0;
    while (pos < n) {
        if (d[pos] == 0)  /* some writers pad with NULs */
            break;
        size_t sp = pos;
        uint64_t reclen = 0;
        while (sp < n && d[sp] >= '0' && d[sp] <= '9' && sp - pos < 10) {
            reclen = reclen * 10 + (uint64_t)(d[sp] - '0');
            sp++;
        }
        if (sp == pos || sp >= n || d[sp] != ' ' || reclen < 5 || reclen > n - pos ||
            d[pos + reclen - 1] != '\n')
            return fail(t, LZ_CORRUPT, "malformed PAX record at offset %llu of header at %llu",
                        (unsigned long long)pos, (unsigned long long)t->hdr_off);
        const uint8_t *k = d + sp + 1;
        const uint8_t *end = d + pos + reclen - 1;
        const uint8_t *eq = memchr(k, '=', (size_t)(end - k));
        if (!eq || eq == k)
            return fail(t, LZ_CORRUPT, "PAX record without key at offset %llu of header at %llu",
                        (unsigned long long)pos, (unsigned long long)t->hdr_off);
        if (pax_apply(t, k, (size_t)(eq - k), eq + 1, (size_t)(end - eq - 1)))
            return -1;
        pos += reclen;
    }
    return 0;
}

/* ---- entries ---- */

static uint64_t pad512(uint64_t n) { return (n + 511) & ~(uint64_t)511; }

static int set_xattrs(tar_t *t, tar_entry *e)
{
    tar_pending *p = &t->pend;
    e->xattr_first = t->xattrs.len / sizeof(tar_xattr);
    e->xattr_count = p->xattr_count;
    size_t pos = 0;
    for (size_t i = 0; i < p->xattr_count; i++) {
        uint64_t kl, vl;
        memcpy(&kl, p->xattr_data.p + pos, sizeof kl);
        const uint8_t *k = p->xattr_data.p + pos + sizeof kl;
        memcpy(&vl, k + kl, sizeof vl);
        const uint8_t *v = k + kl + sizeof vl;
        tar_xattr x;
        x.key_len = (size_t)kl;
        x.val_len = (size_t)vl;
        if (arena_add(t, k, (size_t)kl, &x.key_off) || arena_add(t, v, (size_t)vl, &x.val_off) ||
            lz_buf_append(&t->xattrs, &x, sizeof x))
            return nomem(t);
        pos += 2 * sizeof kl + (size_t)kl + (size_t)vl;
    }
    return 0;
}

/* Switch to the data (or padding) of the entry just pushed. */
static void start_data(tar_t *t, uint64_t stored)
{
    t->cur_index = tar_entry_count(t) - 1;
    t->chunk_fill = 0;
    t->chunk_start = t->off;
    lz_mh_reset(&t->mh, t->chunk_slot);
    tar_entry *e = (tar_entry *)t->entries.p + t->cur_index;
    e->data_offset = t->off;
    e->stored_size = stored;
    e->first_chunk = tar_chunk_count(t);
    e->chunk_count = stored ? (stored + t->chunk_size - 1) / t->chunk_size : 0;
    t->cur_sunk = t->sink && stored >= t->sink_min_file;
    if (stored) {
        t->state = T_DATA;
        t->remaining = stored;
    } else {
        t->state = T_SKIP;
        t->skip_is_pad = 1;
        t->remaining = t->region_end - t->off;
    }
}

static int old_gnu_sparse_entries(tar_t *t, const uint8_t *base, int n)
{
    for (int i = 0; i < n; i++) {
        int64_t off, len;
        const uint8_t *s = base + i * 24;
        if (s[0] == 0)
            continue;
        if (parse_num(s, 12, &off) || parse_num(s + 12, 12, &len) || off < 0 || len < 0 ||
            (uint64_t)off > MAX_SANE_SIZE || (uint64_t)len > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad GNU sparse map in header at offset %llu",
                        (unsigned long long)t->hdr_off);
        tar_entry *e = (tar_entry *)t->entries.p + tar_entry_count(t) - 1;
        if (e->sparse_count >= MAX_SPARSE_SEGMENTS)
            return fail(t, LZ_CORRUPT, "too many sparse segments at offset %llu",
                        (unsigned long long)t->hdr_off);
        if (sparse_add(&t->sparse, (uint64_t)off, (uint64_t)len))
            return nomem(t);
        e = (tar_entry *)t->entries.p + tar_entry_count(t) - 1;
        e->sparse_count++;
    }
    return 0;
}

static int handle_header(tar_t *t)
{
    const uint8_t *h = t->hdr;
    uint64_t hoff = t->hdr_off;
    if (memcmp(h, ZERO_BLOCK, 512) == 0) {
        /* End of archive: like tarfile, one zero block ends it; the rest is ignored. */
        t->state = T_END;
        return 0;
    }
    int64_t chk;
    if (parse_num(h + 148, 8, &chk)) {
        if (hoff == 0)
            return fail(t, LZ_CORRUPT, "unknown layer format: not gzip, zstd or tar "
                        "(bad tar header checksum field at offset 0)");
        return fail(t, LZ_CORRUPT, "bad tar header checksum field at offset %llu",
                    (unsigned long long)hoff);
    }
    int64_t usum = 0, ssum = 0;
    for (int i = 0; i < 512; i++) {
        uint8_t c = (i >= 148 && i < 156) ? ' ' : h[i];
        usum += c;
        ssum += (int8_t)c;
    }
    if (chk != usum && chk != ssum) {
        if (hoff == 0)
            return fail(t, LZ_CORRUPT, "unknown layer format: not gzip, zstd or tar "
                        "(bad tar header checksum at offset 0)");
        return fail(t, LZ_CORRUPT, "bad tar header checksum at offset %llu",
                    (unsigned long long)hoff);
    }
    uint8_t tf = h[156];
    int64_t hsize;
    if (parse_num(h + 124, 12, &hsize) || hsize < 0 || (uint64_t)hsize > MAX_SANE_SIZE)
        return fail(t, LZ_CORRUPT, "bad or absurd size field in tar header at offset %llu",
                    (unsigned long long)hoff);
    uint64_t data_start = hoff + 512;

    if (tf == 'x' || tf == 'g' || tf == 'L' || tf == 'K') {
        if ((uint64_t)hsize > MAX_EXT_SIZE)
            return fail(t, LZ_CORRUPT,
                        "extended header ('%c') of %lld bytes exceeds 1 MiB at offset %llu",
                        tf, (long long)hsize, (unsigned long long)hoff);
        t->ext_type = tf;
        t->ext.len = 0;
        t->remaining = (uint64_t)hsize;
        t->region_end = data_start + pad512((uint64_t)hsize);
        t->state = T_EXT;
        return 0;
    }

    hand_over(t);  /* every entry before this header is complete */
    tar_pending *p = &t->pend;
    tar_entry e;
    memset(&e, 0, sizeof e);
    e.sparse_first = -1;
    e.sparse_count = -1;

    /* path */
    if (p->has_sparse_name) {
        if (arena_add(t, p->sparse_name.p, p->sparse_name.len, &e.path_off))
            return nomem(t);
        e.path_len = p->sparse_name.len;
    } else if (p->has_path) {
        if (arena_add(t, p->path.p, p->path.len, &e.path_off))
            return nomem(t);
        e.path_len = p->path.len;
    } else {
        size_t nl = field_len(h, 100);
        int posix = memcmp(h + 257, "ustar\0", 6) == 0;
        size_t pl = posix ? field_len(h + 345, 155) : 0;
        e.path_off = t->arena.len;
        if (pl && (lz_buf_append(&t->arena, h + 345, pl) || lz_buf_append(&t->arena, "/", 1)))
            return nomem(t);
        if (lz_buf_append(&t->arena, h, nl))
            return nomem(t);
        e.path_len = t->arena.len - e.path_off;
    }
    if (p->has_link) {
        if (arena_add(t, p->link.p, p->link.len, &e.link_off))
            return nomem(t);
        e.link_len = p->link.len;
    } else {
        size_t ll = field_len(h + 157, 100);
        if (arena_add(t, h + 157, ll, &e.link_off))
            return nomem(t);
        e.link_len = ll;
    }

    int64_t v;
    if (parse_num(h + 100, 8, &v))
        return fail(t, LZ_CORRUPT, "bad mode field in tar header at offset %llu",
                    (unsigned long long)hoff);
    e.mode = (uint32_t)v & 07777;
    if (p->has_uid)
        e.uid = p->uid;
    else if (parse_num(h + 108, 8, &e.uid))
        return fail(t, LZ_CORRUPT, "bad uid field in tar header at offset %llu",
                    (unsigned long long)hoff);
    if (p->has_gid)
        e.gid = p->gid;
    else if (parse_num(h + 116, 8, &e.gid))
        return fail(t, LZ_CORRUPT, "bad gid field in tar header at offset %llu",
                    (unsigned long long)hoff);
    if (p->has_mtime) {
        e.mtime_ns = p->mtime_ns;
    } else {
        if (parse_num(h + 136, 12, &v) || v > INT64_MAX / 1000000000 || v < INT64_MIN / 1000000000)
            return fail(t, LZ_CORRUPT, "bad mtime field in tar header at offset %llu",
                        (unsigned long long)hoff);
        e.mtime_ns = v * 1000000000;
    }
    uint64_t size = p->has_size ? p->size : (uint64_t)hsize;
    int has_data = 0;
    switch (tf) {
    case '1': e.type = ET_HARDLINK; break;
    case '2': e.type = ET_SYMLINK; break;
    case '3': e.type = ET_CHAR; break;
    case '4': e.type = ET_BLOCK; break;
    case '5': e.type = ET_DIR; break;
    case '6': e.type = ET_FIFO; break;
    case 0:
        if (e.path_len && t->arena.p[e.path_off + e.path_len - 1] == '/') {
            e.type = ET_DIR;  /* old V7 directory */
            break;
        }
        /* fall through */
    default:  /* '0', '7', 'S' and unknown types: data follows, like tarfile */
        e.type = ET_REG;
        has_data = 1;
    }
    if (e.type == ET_CHAR || e.type == ET_BLOCK) {
        if (parse_num(h + 329, 8, &e.devmajor) || parse_num(h + 337, 8, &e.devminor))
            return fail(t, LZ_CORRUPT, "bad device number in tar header at offset %llu",
                        (unsigned long long)hoff);
    }
    e.size = has_data ? (int64_t)size : 0;
    if (set_xattrs(t, &e))
        return -1;
    t->region_end = data_start + (has_data ? pad512(size) : 0);

    int old_sparse = tf == 'S';
    int pax_sparse = has_data && (p->has_sparse_map || p->sparse_major == 1);
    if (old_sparse || pax_sparse) {
        e.sparse_first = (int64_t)(t->sparse.len / 16);
        e.sparse_count = 0;
    }
    if (old_sparse) {
        int64_t real;
        if (parse_num(h + 483, 12, &real) || real < 0 || (uint64_t)real > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad GNU sparse real size in header at offset %llu",
                        (unsigned long long)hoff);
        e.size = real;
    } else if (pax_sparse && p->has_sparse_realsize) {
        e.size = (int64_t)p->sparse_realsize;
    }
    if (pax_sparse && p->sparse_major != 1) {
        if (lz_buf_append(&t->sparse, p->sparse_map.p, p->sparse_map.len))
            return nomem(t);
        e.sparse_count = (int64_t)(p->sparse_map.len / 16);
    }
    if (lz_buf_append(&t->entries, &e, sizeof e))
        return nomem(t);
    int sparse10 = pax_sparse && p->sparse_major == 1;
    pend_clear(p);

    t->cur_index = tar_entry_count(t) - 1;
    if (old_sparse) {
        if (old_gnu_sparse_entries(t, h + 386, 4))
            return -1;
        t->remaining = size;
        if (h[482]) {
            t->state = T_GNU_SPARSE_EXT;
            t->hdr_have = 0;
            return 0;
        }
        start_data(t, size);
        return 0;
    }
    if (sparse10) {
        /* PAX 1.0: the map is at the start of the data, decimal numbers one a line. */
        t->state = T_SPARSE_MAP;
        t->ext.len = 0;
        t->remaining = size;
        t->sparse_map_numbers_needed = 1;
        t->sparse_map_newlines = 0;
        return 0;
    }
    if (has_data)
        start_data(t, size);
    else {
        t->state = T_HDR;
        t->hdr_have = 0;
    }
    return 0;
}

static int finish_ext(tar_t *t)
{
    const uint8_t *d = t->ext.p;
    size_t n = t->ext.len;
    switch (t->ext_type) {
    case 'x':
        return pax_parse(t, d, n);
    case 'L':
    case 'K': {
        lz_buf *b = t->ext_type == 'L' ? &t->pend.path : &t->pend.link;
        size_t l = field_len(d, n);
        b->len = 0;
        if (lz_buf_append(b, d, l))
            return nomem(t);
        if (t->ext_type == 'L')
            t->pend.has_path = 1;
        else
            t->pend.has_link = 1;
        return 0;
    }
    default:  /* 'g': global PAX headers are skipped */
        return 0;
    }
}

/* PAX 1.0 sparse map: parse the numbers accumulated in t->ext once complete.
 * Returns 1 when done, 0 when more bytes are needed. */
static int sparse10_try(tar_t *t)
{
    const uint8_t *d = t->ext.p;
    size_t n = t->ext.len, pos = 0;
    uint64_t vals_needed = 1, count = 0, got = 0;
    uint64_t pair[2];
    tar_entry *e = (tar_entry *)t->entries.p + t->cur_index;
    size_t sparse_mark = t->sparse.len;
    while (got < vals_needed) {
        const uint8_t *nl = memchr(d + pos, '\n', n - pos);
        if (!nl) {
            t->sparse.len = sparse_mark;
            return 0;
        }
        uint64_t val;
        if (parse_dec_u64(d + pos, (size_t)(nl - d - pos), &val) || val > MAX_SANE_SIZE)
            return fail(t, LZ_CORRUPT, "bad GNU sparse 1.0 map in entry at offset %llu",
                        (unsigned long long)e->data_offset);
        if (got == 0) {
            if (val > MAX_SPARSE_SEGMENTS)
                return fail(t, LZ_CORRUPT, "too many sparse segments at offset %llu",
                            (unsigned long long)t->hdr_off);
            count = val;
            vals_needed = 1 + 2 * count;
        } else {
            pair[(got - 1) & 1] = val;
            if (((got - 1) & 1) == 1 && sparse_add(&t->sparse, pair[0], pair[1]))
                return nomem(t);
        }
        got++;
        pos = (size_t)(nl - d) + 1;
    }
    e->sparse_count = (int64_t)count;
    uint64_t map_bytes = pad512(pos);
    if (map_bytes > n) {
        t->sparse.len = sparse_mark;
        return 0;
    }
    return 1;
}

static void drop_sink(tar_t *t, int err)
{
    t->sink = NULL;
    t->sink_errno = err;
    lz_buf_free(&t->keep);
    lz_buf_free(&t->sunk_flags);
    t->keep_done = 0;
}

/* Hand the chunks finished since the last flush (digests known) to the sink, then keep only
 * the open chunk's bytes. */
static void sink_run(tar_t *t)
{
    size_t first = t->sunk, n = tar_chunk_count(t) - first;
    const tar_chunk *c = (const tar_chunk *)t->chunks.p + first;
    const uint8_t **digest = malloc(n * sizeof *digest), **data = malloc(n * sizeof *data);
    size_t *len = malloc(n * sizeof *len), *which = malloc(n * sizeof *which);
    uint64_t *offset = malloc(n * sizeof *offset);
    int *status = malloc(n * sizeof *status);
    int rc = -ENOMEM;
    if (digest && data && len && offset && which && status) {
        size_t pos = 0, m = 0;
        for (size_t i = 0; i < n; i++) {
            if (!t->sunk_flags.p[first + i])
                continue;
            which[m] = i;
            digest[m] = c[i].sha;
            data[m] = t->keep.p + pos;
            len[m] = (size_t)c[i].length;
            offset[m] = c[i].offset;
            pos += len[m++];
        }
        rc = m ? t->sink(t->sink_ctx, m, digest, data, len, offset, status) : 0;
        for (size_t j = 0; j < m; j++) {
            uint8_t rec[LZ_CHUNK_RECORD];
            if (status[j] != 1)
                continue;
            tar_put_chunk_record(rec, c + which[j]);
            if (lz_buf_append(&t->stored, rec, sizeof rec)) {
                rc = -ENOMEM;
                break;
            }
        }
    }
    free(digest);
    free(data);
    free(len);
    free(offset);
    free(which);
    free(status);
    t->sunk = tar_chunk_count(t);
    if (rc < 0) {
        drop_sink(t, -rc);
        return;
    }
    if (t->keep_done && t->keep.len > t->keep_done)
        memmove(t->keep.p, t->keep.p + t->keep_done, t->keep.len - t->keep_done);
    t->keep.len -= t->keep_done;
    t->keep_done = 0;
}

/* Run the queued hashing and fill in the digests of the chunks finished since. */
static void tar_flush(tar_t *t)
{
    lz_mh_run(&t->mh);
    const size_t *f = (const size_t *)t->finals.p;
    tar_chunk *c = (tar_chunk *)t->chunks.p;
    for (size_t i = 0; i < t->finals.len / sizeof *f; i += 2)
        lz_mh_final(&t->mh, f[i], c[f[i + 1]].sha);
    t->finals.len = 0;
    if (t->sink && tar_chunk_count(t) > t->sunk)
        sink_run(t);
    else if (!t->sink)
        t->sunk = tar_chunk_count(t);
}

static int tar_feed_queued(tar_t *t, const uint8_t *p, size_t n);

int tar_feed(tar_t *t, const uint8_t *p, size_t n)
{
    int rc = tar_feed_queued(t, p, n);
    tar_flush(t);
    return rc;
}

static int tar_feed_queued(tar_t *t, const uint8_t *p, size_t n)
{
    if (t->state == T_FAILED)
        return -1;
    if (t->want_diff && n)
        lz_mh_update(&t->mh, t->diff_slot, p, n);
    while (n > 0) {
        switch (t->state) {
        case T_END:
            t->off += n;
            return 0;
        case T_HDR: {
            if (t->hdr_have == 0)
                t->hdr_off = t->off;
            size_t take = LZ_MIN(n, 512 - t->hdr_have);
            memcpy(t->hdr + t->hdr_have, p, take);
            t->hdr_have += take;
            p += take;
            n -= take;
            t->off += take;
            if (t->hdr_have == 512) {
                t->hdr_have = 0;
                if (handle_header(t))
                    return -1;
            }
            break;
        }
        case T_EXT: {
            size_t take = (size_t)LZ_MIN((uint64_t)n, t->remaining);
            if (lz_buf_append(&t->ext, p, take))
                return nomem(t);
            p += take;
            n -= take;
            t->off += take;
            t->remaining -= take;
            if (t->remaining == 0) {
                if (finish_ext(t))
                    return -1;
                t->state = T_SKIP;
                t->skip_is_pad = 0;
                t->remaining = t->region_end - t->off;
            }
            break;
        }
        case T_GNU_SPARSE_EXT: {
            size_t take = LZ_MIN(n, 512 - t->hdr_have);
            memcpy(t->hdr + t->hdr_have, p, take);
            t->hdr_have += take;
            p += take;
            n -= take;
            t->off += take;
            t->region_end += take;  /* extension blocks are not counted in size */
            if (t->hdr_have == 512) {
                t->hdr_have = 0;
                if (old_gnu_sparse_entries(t, t->hdr, 21))
                    return -1;
                if (!t->hdr[504])
                    start_data(t, t->remaining);
            }
            break;
        }
        case T_SPARSE_MAP: {
            size_t take = (size_t)LZ_MIN((uint64_t)n, LZ_MIN(t->remaining, (uint64_t)512));
            if (t->ext.len + take > MAX_EXT_SIZE)
                return fail(t, LZ_CORRUPT, "GNU sparse 1.0 map over 1 MiB at offset %llu",
                            (unsigned long long)t->hdr_off);
            if (lz_buf_append(&t->ext, p, take))
                return nomem(t);
            /* Parse only once enough lines are there (not after every block: a
             * hostile 1 MiB map would make that quadratic). */
            const uint8_t *fresh = t->ext.p + t->ext.len - take;
            for (size_t i = 0; i < take; i++)
                t->sparse_map_newlines += fresh[i] == '\n';
            p += take;
            n -= take;
            t->off += take;
            t->remaining -= take;
            if (t->sparse_map_numbers_needed == 1 && t->sparse_map_newlines >= 1) {
                const uint8_t *nl = memchr(t->ext.p, '\n', t->ext.len);
                uint64_t c;
                if (parse_dec_u64(t->ext.p, (size_t)(nl - t->ext.p), &c) || c > MAX_SPARSE_SEGMENTS)
                    return fail(t, LZ_CORRUPT, "bad GNU sparse 1.0 map at offset %llu",
                                (unsigned long long)t->hdr_off);
                t->sparse_map_numbers_needed = 1 + 2 * c;
            }
            int r = 0;
            if (t->sparse_map_newlines >= t->sparse_map_numbers_needed)
                r = sparse10_try(t);
            if (r < 0)
                return -1;
            if (r == 1) {
                /* Bytes read past the map's padded end belong to the data. */
                const uint8_t *d = t->ext.p;
                size_t pos = 0;
                for (uint64_t got = 0, need = 1; got < need; got++) {
                    const uint8_t *nl = memchr(d + pos, '\n', t->ext.len - pos);
                    if (got == 0) {
                        uint64_t c = 0;
                        parse_dec_u64(d, (size_t)(nl - d), &c);
                        need = 1 + 2 * c;
                    }
                    pos = (size_t)(nl - d) + 1;
                }
                size_t map_bytes = (size_t)pad512(pos);
                size_t extra = t->ext.len - map_bytes;  /* < 512 by construction */
                uint64_t stored = t->remaining + extra;
                t->off -= extra;
                tar_entry *e = (tar_entry *)t->entries.p + t->cur_index;
                (void)e;
                start_data(t, stored);
                /* replay the extra bytes through T_DATA without double-hashing diff */
                if (extra) {
                    uint8_t tmp[512];
                    memcpy(tmp, t->ext.p + map_bytes, extra);
                    int wd = t->want_diff;
                    t->want_diff = 0;
                    int rr = tar_feed_queued(t, tmp, extra);
                    tar_flush(t);  /* tmp goes out of scope */
                    t->want_diff = wd;
                    if (rr)
                        return -1;
                }
            } else if (t->remaining == 0) {
                return fail(t, LZ_CORRUPT, "GNU sparse 1.0 map runs past the data at offset %llu",
                            (unsigned long long)t->hdr_off);
            }
            break;
        }
        case T_DATA: {
            uint64_t room = t->chunk_size - t->chunk_fill;
            size_t take = (size_t)LZ_MIN((uint64_t)n, LZ_MIN(room, t->remaining));
            lz_mh_update(&t->mh, t->chunk_slot, p, take);
            if (t->cur_sunk && t->sink && lz_buf_append(&t->keep, p, take))
                drop_sink(t, ENOMEM);
            t->chunk_fill += take;
            p += take;
            n -= take;
            t->off += take;
            t->remaining -= take;
            if (t->chunk_fill == t->chunk_size || (t->remaining == 0 && t->chunk_fill)) {
                if (chunk_finish(t))
                    return -1;
            }
            if (t->remaining == 0) {
                t->state = T_SKIP;
                t->skip_is_pad = 1;
                t->remaining = t->region_end - t->off;
            }
            break;
        }
        case T_SKIP: {
            size_t take = (size_t)LZ_MIN((uint64_t)n, t->remaining);
            p += take;
            n -= take;
            t->off += take;
            t->remaining -= take;
            if (t->remaining == 0) {
                t->state = T_HDR;
                t->hdr_have = 0;
            }
            break;
        }
        default:
            return -1;
        }
        if (t->state == T_SKIP && t->remaining == 0) {
            t->state = T_HDR;
            t->hdr_have = 0;
        }
    }
    return 0;
}

int tar_finish(tar_t *t, uint8_t diff_out[32])
{
    if (t->state == T_FAILED)
        return -1;
    /* EOF at a header boundary (no end-of-archive blocks) or in the padding after an
     * entry's data is tolerated, as tarfile does. */
    int ok = t->state == T_END || (t->state == T_HDR && t->hdr_have == 0) ||
             (t->state == T_SKIP && t->skip_is_pad);
    if (ok && t->state != T_END &&
        (t->pend.has_path || t->pend.has_link || t->pend.has_size || t->pend.xattr_count))
        return fail(t, LZ_TRUNCATED, "tar stream ends after an extended header at offset %llu",
                    (unsigned long long)t->hdr_off);
    if (!ok) {
        if (t->state == T_HDR)
            return fail(t, LZ_TRUNCATED, "tar stream ends inside the header at offset %llu",
                        (unsigned long long)t->hdr_off);
        if ((t->state == T_DATA || t->state == T_SKIP || t->state == T_SPARSE_MAP) &&
            !(t->state == T_SKIP && !t->skip_is_pad)) {
            tar_entry *e = (tar_entry *)t->entries.p + t->cur_index;
            return fail(t, LZ_TRUNCATED,
                        "tar stream ends at offset %llu inside entry '%.*s' (header at %llu)",
                        (unsigned long long)t->off, (int)LZ_MIN(e->path_len, 200),
                        t->arena.p + e->path_off, (unsigned long long)t->hdr_off);
        }
        return fail(t, LZ_TRUNCATED, "tar stream ends at offset %llu inside the entry at %llu",
                    (unsigned long long)t->off, (unsigned long long)t->hdr_off);
    }
    tar_flush(t);
    if (t->want_diff)
        lz_mh_final(&t->mh, t->diff_slot, diff_out);
    hand_over(t);
    return 0;
}
