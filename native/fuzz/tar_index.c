/* Fuzz target: an uncompressed layer through the tar stage and the C index build, as a
 * hostile registry could serve it: whatever the bytes, the stage refuses them with a
 * message or the builder builds or declines with a reason, and the built entry blocks
 * decompress to whole records; built as the stage goes (tar_set_consumer, no entries kept)
 * it is the same sections or the same reason to decline.  A chunk sink (what stores a streamed layer's chunks) gets
 * every chunk once, in order, each chunk's bytes hashing to its digest, and may give up
 * half way without changing what the stage produces.
 *
 * libFuzzer: clang -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Inative \
 *            native/fuzz/tar_index.c native/tar.c native/sha_mb.c native/indexbuild.c -lcrypto -lzstd
 * gcc (no libFuzzer): tests/test_native_fuzz.py links native/fuzz/driver.c instead. */
#include <errno.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "fuzz.h"
#include "indexbuild.h"
#include "tar.h"

#define CHUNK 1024

typedef struct {
    size_t seen, fail_at;  /* chunks received; the call that fails (0: none) */
    size_t calls;
    const uint8_t *tar;    /* the layer: each chunk's bytes are there at the offset it is given */
    size_t tar_len;
} sink_check;

static int check_sink(void *ctx, size_t n, const uint8_t *const *digest, const uint8_t *const *data,
                      const size_t *len, const uint64_t *offset, int *status)
{
    sink_check *c = ctx;
    if (++c->calls == c->fail_at) {
        for (size_t i = 0; i < n; i++)
            status[i] = -EIO;
        return -EIO;
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t md[32];
        if (len[i] == 0 || len[i] > CHUNK)
            abort();
        SHA256(data[i], len[i], md);
        if (memcmp(md, digest[i], 32))
            abort();  /* the sink would store bytes under another chunk's name */
        if (offset[i] > c->tar_len || len[i] > c->tar_len - offset[i] || memcmp(c->tar + offset[i], data[i], len[i]))
            abort();  /* a layer file would hold the chunk where the tar does not */
        status[i] = 1;
    }
    c->seen += n;
    return 0;
}

static int same_buf(const lz_buf *a, const lz_buf *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->p, b->p, a->len) == 0);
}

/* The same bytes through a stage that hands its entries to a builder as it goes. */
static void check_as_scanned(const uint8_t *data, size_t size, size_t cut, int want,
                             const lz_index_sections *kept)
{
    tar_t t;
    lz_index_builder *b = lz_index_builder_new(CHUNK);
    if (!b || tar_init(&t, CHUNK, 0, 0))
        abort();
    tar_set_consumer(&t, lz_index_apply, b);
    uint8_t diff[32];
    if (tar_feed(&t, data, cut) || tar_feed(&t, data + cut, size - cut) || tar_finish(&t, diff))
        abort();  /* the same bytes passed the stage before */
    if (tar_entry_count(&t) || t.arena.len)
        abort();  /* nothing kept */
    lz_index_sections out = {0};
    lz_err err = {0};
    int r = lz_index_finish(b, &t, 1, &out, &err);
    if (r != want || (r == LZ_INDEX_DECLINED && strcmp(out.declined, kept->declined)))
        abort();
    if (r == LZ_INDEX_BUILT &&
        (!same_buf(&out.blocks, &kept->blocks) || !same_buf(&out.blockidx, &kept->blockidx) ||
         !same_buf(&out.extras, &kept->extras) || !same_buf(&out.chunks, &kept->chunks) ||
         out.entry_count != kept->entry_count || out.reg_count != kept->reg_count ||
         out.chunk_count != kept->chunk_count))
        abort();
    lz_index_sections_free(&out);
    lz_index_builder_free(b);
    tar_free(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tar_t t;
    if (tar_init(&t, CHUNK, 0, 0))
        return 0;
    sink_check sink = {0, size > 1 ? data[1] % 4 : 0, 0, data, size};
    tar_set_sink(&t, check_sink, &sink, size > 2 && data[2] % 2 ? 700 : 0);
    uint8_t diff[32];
    size_t cut = size ? (size_t)data[0] * 37 % (size + 1) : 0;  /* fed in two slices */
    int rc = tar_feed(&t, data, cut);
    if (!rc)
        rc = tar_feed(&t, data + cut, size - cut);
    if (!rc)
        rc = tar_finish(&t, diff);
    if (rc) {
        if (!t.err.msg[0])
            abort();  /* every refusal says why */
        tar_free(&t);
        return 0;
    }
    size_t stored = t.stored.len / LZ_CHUNK_RECORD, sunk = 0;
    for (size_t i = 0; i < t.sunk_flags.len; i++)
        sunk += t.sunk_flags.p[i];
    if (t.sink_errno ? stored > sink.seen : (stored != sink.seen || sink.seen != sunk))
        abort();
    lz_index_sections out = {0};
    lz_err err = {0};
    int r = lz_index_build(&t, CHUNK, 1, &out, &err);
    if (r == LZ_INDEX_DECLINED && !out.declined[0])
        abort();
    if (r == LZ_INDEX_BUILT) {
        size_t nblocks = out.blockidx.len / 8 - 1, records = 0;
        if (out.entry_count < 1 || out.blockidx.len % 8 || out.chunks.len != out.chunk_count * LZ_INDEX_CHUNK_RECORD)
            abort();
        for (size_t b = 0; b < nblocks; b++) {
            uint64_t lo, hi;
            memcpy(&lo, out.blockidx.p + 8 * b, 8);
            memcpy(&hi, out.blockidx.p + 8 * (b + 1), 8);
            unsigned long long n = ZSTD_getFrameContentSize(out.blocks.p + lo, hi - lo);
            uint8_t *blk = malloc(n ? n : 1);
            if (!blk || ZSTD_isError(ZSTD_decompress(blk, n, out.blocks.p + lo, hi - lo)))
                abort();
            size_t in_block = LZ_MIN(out.entry_count - records, LZ_INDEX_BLOCK_RECORDS);
            if (n < in_block * LZ_INDEX_ENTRY_RECORD)
                abort();
            records += in_block;
            free(blk);
        }
        if (records != out.entry_count)
            abort();
    }
    if (r >= 0)
        check_as_scanned(data, size, cut, r, &out);
    lz_index_sections_free(&out);
    tar_free(&t);
    return 0;
}

/* ---- generator: small tars of the awkward entries, then damaged ---- */

static const char *const names[] = {"a", "a/b", "./a/c", "a/./d", "a//e", "a/../x", "../up", "/abs", "",
                                    ".", "a/b/", "dir", "dir/f", "dir/g/h", "link", "\xc3\xa9t\xc3\xa9"};
#define NNAMES (sizeof names / sizeof *names)

static void octal(char *field, size_t len, uint64_t v)
{
    snprintf(field, len, "%0*llo", (int)len - 1, (unsigned long long)v);
}

static size_t header(uint8_t *p, const char *name, char type, uint64_t size, const char *link)
{
    memset(p, 0, 512);
    char *h = (char *)p;
    strncpy(h, name, 100);
    octal(h + 100, 8, lz_fuzz_rnd() % 2 ? 0644 : 04755);
    octal(h + 108, 8, lz_fuzz_rnd() % 4 ? 0 : lz_fuzz_rnd() % 70000);
    octal(h + 116, 8, 0);
    octal(h + 124, 12, size);
    octal(h + 136, 12, 1700000000);
    h[156] = type;
    strncpy(h + 157, link, 100);
    memcpy(h + 257, "ustar\0" "00", 8);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++)
        sum += p[i];
    snprintf(h + 148, 8, "%06o", sum);
    return 512;
}

static size_t pax(uint8_t *p, size_t cap, const char *records)
{
    size_t n = strlen(records), padded = (n + 511) / 512 * 512;
    if (512 + padded > cap)
        return 0;
    header(p, "PaxHeader", 'x', n, "");
    memset(p + 512, 0, padded);
    memcpy(p + 512, records, n);
    return 512 + padded;
}

size_t lz_fuzz_generate(uint8_t *buf, size_t cap)
{
    size_t n = 0, entries = 1 + lz_fuzz_rnd() % 12;
    static const char types[] = {'0', '0', '0', '5', '5', '2', '1', '1', '3', '6'};
    for (size_t e = 0; e < entries && n + 8192 < cap; e++) {
        const char *name = names[lz_fuzz_rnd() % NNAMES], *link = names[lz_fuzz_rnd() % NNAMES];
        char type = types[lz_fuzz_rnd() % sizeof types];
        if (lz_fuzz_rnd() % 5 == 0) {  /* xattrs (or a PAX path) for the next entry */
            char rec[128];
            int k = (int)(lz_fuzz_rnd() % 3);
            const char *key = k == 0 ? "SCHILY.xattr.user.a=1" : k == 1 ? "SCHILY.xattr.security.capability=c"
                                                                       : "path=dir/pax";
            snprintf(rec, sizeof rec, "%d %s\n", (int)strlen(key) + 4, key);
            n += pax(buf + n, cap - n, rec);
        }
        uint64_t size = type == '0' ? lz_fuzz_rnd() % (3 * CHUNK + 2) : 0;
        n += header(buf + n, name, type, size, link);
        for (uint64_t i = 0; i < (size + 511) / 512 * 512; i++)
            buf[n + i] = i < size ? (uint8_t)(i * 7) : 0;
        n += (size + 511) / 512 * 512;
    }
    memset(buf + n, 0, 1024);
    n += 1024;
    if (lz_fuzz_rnd() % 6 == 0)  /* a few bytes changed */
        for (int i = 0; i < 4; i++)
            buf[lz_fuzz_rnd() % n] = (uint8_t)lz_fuzz_rnd();
    return n;  /* the driver cuts some inputs short */
}
