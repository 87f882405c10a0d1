/* The scanning pipeline (see scanner.h).
 *
 * Producer side (the caller's thread, GIL released): blob SHA-256, format detection,
 * decompression into 1 MiB blocks, checkpoint recording.  Consumer side: the tar stage
 * (tar.c: header parsing, chunk SHA-256, diff ID).  With `threaded` the consumer runs on
 * a worker thread owned by this scanner: SHA-256 costs about as much as ISA-L inflate,
 * so overlapping the two is what lifts gzip indexing past one core's speed.  Each block
 * starts with a copy of the 32 KiB of output before it, so a checkpoint's window is always
 * one contiguous slice and blocks can be handed over without further copies. */
#include "scanner.h"

#include <time.h>

enum { GZ_BETWEEN = 0, GZ_IN = 1 };

#define GZ_HUNT_SLICE 32            /* input slice while looking for a block boundary */
#define GZ_HUNT_AVAIL (160u << 10)  /* output room that 32 input bytes cannot overflow */
#define MIN_AVAIL (64u << 10)

const char *lz_isal_error_name(int r)
{
    switch (r) {
    case ISAL_INVALID_BLOCK: return "invalid deflate block";
    case ISAL_INVALID_SYMBOL: return "invalid deflate symbol";
    case ISAL_INVALID_LOOKBACK: return "invalid deflate distance";
    case ISAL_INVALID_WRAPPER: return "invalid gzip header";
    case ISAL_UNSUPPORTED_METHOD: return "unsupported gzip compression method";
    case ISAL_INCORRECT_CHECKSUM: return "gzip CRC32/ISIZE mismatch";
    default: return "inflate error";
    }
}

/* ---------------- consumer (tar stage) ---------------- */

static void *consumer_main(void *arg)
{
    scanner_t *sc = arg;
    pthread_mutex_lock(&sc->mu);
    for (;;) {
        while (sc->q_count == 0 && !sc->eof)
            pthread_cond_wait(&sc->cv_cons, &sc->mu);
        if (sc->q_count == 0)
            break;
        int idx = sc->queue[sc->q_head];
        sc->q_head = (sc->q_head + 1) % LZ_QCAP;
        sc->q_count--;
        int failed = sc->cons_failed;
        pthread_mutex_unlock(&sc->mu);
        if (idx < 0) {
            /* The blob digest of the bytes being fed: hashed here so the producer only
             * inflates; feed() waits for this job before returning the caller's buffer. */
            SHA256_Update(&sc->blob_ctx, sc->in_job_p, sc->in_job_n);
            pthread_mutex_lock(&sc->mu);
            sc->in_job_done = 1;
            pthread_cond_broadcast(&sc->cv_prod);
            continue;
        }
        lz_block *b = &sc->blocks[idx];
        int rc = failed ? 0 : tar_feed(&sc->tar, b->mem + LZ_HIST, b->len);
        pthread_mutex_lock(&sc->mu);
        if (rc)
            sc->cons_failed = 1;
        sc->free_list[sc->free_count++] = idx;
        pthread_cond_broadcast(&sc->cv_prod);
    }
    pthread_mutex_unlock(&sc->mu);
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
        sc->thread_cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return NULL;
}

static int tar_error(scanner_t *sc)
{
    return lz_fail(&sc->err, sc->tar.err.kind ? sc->tar.err.kind : LZ_CORRUPT, "%s",
                   sc->tar.err.msg);
}

/* Hand the current block to the tar stage and start a new one. */
static int flush_block(scanner_t *sc)
{
    lz_block *old = sc->cur, *nb;
    if (!sc->threaded) {
        if (old->len && tar_feed(&sc->tar, old->mem + LZ_HIST, old->len))
            return tar_error(sc);
        nb = old;
    } else {
        pthread_mutex_lock(&sc->mu);
        int failed = sc->cons_failed;
        if (!failed) {
            sc->queue[(sc->q_head + sc->q_count) % LZ_QCAP] = (int)(old - sc->blocks);
            sc->q_count++;
            pthread_cond_signal(&sc->cv_cons);
            while (sc->free_count == 0 && !sc->cons_failed)
                pthread_cond_wait(&sc->cv_prod, &sc->mu);
            failed = sc->cons_failed;
        }
        nb = failed ? NULL : &sc->blocks[sc->free_list[--sc->free_count]];
        pthread_mutex_unlock(&sc->mu);
        if (failed)
            return tar_error(sc);
    }
    size_t h = (size_t)LZ_MIN((uint64_t)LZ_HIST, sc->out_total);
    memmove(nb->mem + LZ_HIST - h, old->mem + LZ_HIST + old->len - h, h);
    nb->len = 0;
    sc->cur = nb;
    return 0;
}

static inline uint8_t *out_ptr(scanner_t *sc) { return sc->cur->mem + LZ_HIST + sc->cur->len; }
static inline size_t out_avail(scanner_t *sc) { return LZ_BLOCK - sc->cur->len; }
static inline void out_commit(scanner_t *sc, size_t n)
{
    sc->cur->len += n;
    sc->out_total += n;
}
static inline int out_ensure(scanner_t *sc, size_t min)
{
    return out_avail(sc) < min ? flush_block(sc) : 0;
}

static int add_checkpoint(scanner_t *sc, int kind, uint64_t coff, int bits, int with_window)
{
    lz_checkpoint c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    c.coff = coff;
    c.uoff = sc->out_total;
    c.bits = bits;
    if (with_window) {
        c.wlen = (size_t)LZ_MIN((uint64_t)LZ_HIST, sc->out_total);
        c.window = malloc(c.wlen ? c.wlen : 1);
        if (!c.window)
            return lz_nomem(&sc->err);
        memcpy(c.window, out_ptr(sc) - c.wlen, c.wlen);
    }
    if (lz_buf_append(&sc->cps, &c, sizeof c)) {
        free(c.window);
        return lz_nomem(&sc->err);
    }
    return 0;
}

/* ---------------- tar (no compression) ---------------- */

static int plain_feed(scanner_t *sc, const uint8_t *p, size_t n)
{
    while (n) {
        if (out_ensure(sc, 1))
            return -1;
        size_t take = LZ_MIN(n, out_avail(sc));
        memcpy(out_ptr(sc), p, take);
        out_commit(sc, take);
        p += take;
        n -= take;
        sc->dec_in += take;
    }
    return 0;
}

/* ---------------- gzip (ISA-L) ----------------
 *
 * Block boundaries: ISA-L returns in state ISAL_BLOCK_HDR (header bytes parked in
 * tmp_in_buffer, read_in rewound to the header start) or ISAL_BLOCK_NEW_HDR when the
 * input runs out at or inside a block header.  Once a span's worth of compressed bytes
 * has passed, we feed input in slices shorter than any dynamic-Huffman header, so the
 * next header is caught; its bit position is
 *     8 * consumed - 8 * tmp_in_size - read_in_length.
 * tests/test_native.py cross-checks every such checkpoint against zlib's Z_BLOCK. */

static int gz_member_start(scanner_t *sc)
{
    isal_inflate_reset(sc->isal);
    sc->isal->crc_flag = ISAL_GZIP;
    sc->member_start = sc->dec_in;
    sc->next_cp = sc->dec_in + sc->span_size;
    sc->gz_hunting = 0;
    sc->gz_target = 0;
    sc->gz_phase = GZ_IN;
    if (sc->dec_in > 0)
        return add_checkpoint(sc, CK_GZIP_MEMBER, sc->dec_in, 0, 0);
    return 0;
}

static int gz_step(scanner_t *sc, const uint8_t **pp, size_t *pn)
{
    struct inflate_state *st = sc->isal;
    if (out_ensure(sc, sc->gz_hunting ? GZ_HUNT_AVAIL : MIN_AVAIL))
        return -1;
    /* Slices are aligned to absolute offsets (span threshold, then every GZ_HUNT_SLICE
     * bytes) and boundaries are only taken at aligned returns, so the checkpoints do not
     * depend on how the caller sliced its input. */
    size_t slice = LZ_MIN(*pn, (size_t)1 << 30);
    if (sc->gz_hunting && sc->gz_target > sc->dec_in)
        slice = (size_t)LZ_MIN((uint64_t)slice, sc->gz_target - sc->dec_in);
    else if (sc->gz_hunting)
        slice = LZ_MIN(slice, (size_t)(GZ_HUNT_SLICE - (sc->dec_in - sc->hunt_base) % GZ_HUNT_SLICE));
    else if (sc->next_cp > sc->dec_in)
        slice = (size_t)LZ_MIN((uint64_t)slice, sc->next_cp - sc->dec_in);
    size_t avail = out_avail(sc);
    st->next_in = (uint8_t *)*pp;
    st->avail_in = (uint32_t)slice;
    st->next_out = out_ptr(sc);
    st->avail_out = (uint32_t)avail;
    int r = isal_inflate(st);
    size_t used = slice - st->avail_in, produced = avail - st->avail_out;
    out_commit(sc, produced);
    *pp += used;
    *pn -= used;
    sc->dec_in += used;
    if (r < 0)
        return lz_fail(&sc->err, LZ_CORRUPT,
                       "%s in gzip member starting at offset %llu (near compressed offset %llu)",
                       lz_isal_error_name(r), (unsigned long long)sc->member_start,
                       (unsigned long long)sc->dec_in);
    if (st->block_state == ISAL_BLOCK_FINISH) {
        sc->gz_phase = GZ_BETWEEN;
        sc->members++;
        return 0;
    }
    if (sc->gz_hunting && st->block_state == ISAL_BLOCK_TYPE0 && sc->gz_target <= sc->dec_in) {
        /* Inside a stored block: its end (the next header) is known exactly; stop there. */
        sc->gz_target = sc->dec_in + (uint64_t)st->type0_block_len - (uint64_t)(st->read_in_length / 8);
    }
    if (sc->gz_hunting &&
        ((sc->dec_in - sc->hunt_base) % GZ_HUNT_SLICE == 0 || sc->dec_in == sc->gz_target) &&
        (st->block_state == ISAL_BLOCK_NEW_HDR ||
                           st->block_state == ISAL_BLOCK_HDR) && st->wrapper_flag &&
        st->tmp_out_valid == st->tmp_out_processed) {
        int64_t bp = (int64_t)sc->dec_in * 8 - (int64_t)st->tmp_in_size * 8 - st->read_in_length;
        if (bp >= (int64_t)(sc->member_start + 10) * 8) {
            if (add_checkpoint(sc, CK_DEFLATE, (uint64_t)bp >> 3, (int)(bp & 7), 1))
                return -1;
            sc->gz_hunting = 0;
            sc->gz_target = 0;
            sc->next_cp = ((uint64_t)bp >> 3) + sc->span_size;
        }
    }
    if (!sc->gz_hunting && sc->dec_in >= sc->next_cp) {
        sc->gz_hunting = 1;
        sc->hunt_base = sc->dec_in;
    }
    if (used == 0 && produced == 0)
        return 1;  /* no progress possible with this input */
    return 0;
}

static int gz_feed(scanner_t *sc, const uint8_t *p, size_t n)
{
    while (n > 0) {
        if (sc->gz_phase == GZ_BETWEEN) {
            if (sc->gz_zero_tail || p[0] == 0) {
                /* zero padding after the last member is tolerated (as Python's gzip does) */
                sc->gz_zero_tail = 1;
                for (size_t i = 0; i < n; i++)
                    if (p[i])
                        return lz_fail(&sc->err, LZ_CORRUPT,
                                       "garbage after the last gzip member at offset %llu",
                                       (unsigned long long)(sc->dec_in + i));
                sc->dec_in += n;
                return 0;
            }
            if (p[0] != 0x1f)
                return lz_fail(&sc->err, LZ_CORRUPT,
                               "not a gzip member at offset %llu (garbage after the stream)",
                               (unsigned long long)sc->dec_in);
            if (gz_member_start(sc))
                return -1;
            continue;
        }
        int r = gz_step(sc, &p, &n);
        if (r < 0)
            return -1;
        if (r > 0 && n > 0)
            return lz_fail(&sc->err, LZ_CORRUPT, "inflate stalled at compressed offset %llu",
                           (unsigned long long)sc->dec_in);
    }
    return 0;
}

static int gz_finish(scanner_t *sc)
{
    /* Drain output ISA-L still holds, then the member must be complete. */
    while (sc->gz_phase == GZ_IN) {
        const uint8_t *p = (const uint8_t *)"";
        size_t n = 0;
        int r = gz_step(sc, &p, &n);
        if (r < 0)
            return -1;
        if (r > 0)
            break;
    }
    if (sc->gz_phase == GZ_IN)
        return lz_fail(&sc->err, LZ_TRUNCATED,
                       "gzip stream ends at offset %llu inside the member starting at %llu",
                       (unsigned long long)sc->dec_in, (unsigned long long)sc->member_start);
    return 0;
}

/* ---------------- zstd ---------------- */

static int z_feed(scanner_t *sc, const uint8_t *p, size_t n, int draining)
{
    ZSTD_inBuffer in = {p, n, 0};
    uint64_t base = sc->dec_in;
    for (;;) {
        if (sc->z_cp_pending && in.pos < in.size) {
            sc->z_cp_pending = 0;
            lz_checkpoint *last = (lz_checkpoint *)(sc->cps.p + sc->cps.len) - 1;
            if (sc->cps.len == 0 || last->uoff != sc->out_total)
                if (add_checkpoint(sc, CK_ZSTD_FRAME, sc->z_cp_coff, 0, 0))
                    return -1;
        }
        if (out_ensure(sc, MIN_AVAIL))
            return -1;
        if (draining && !sc->z_in_frame)
            break;
        ZSTD_outBuffer out = {out_ptr(sc), out_avail(sc), 0};
        size_t in_before = in.pos;
        size_t r = ZSTD_decompressStream(sc->zd, &out, &in);
        out_commit(sc, out.pos);
        sc->dec_in = base + in.pos;
        if (ZSTD_isError(r))
            return lz_fail(&sc->err, LZ_CORRUPT, "zstd: %s near compressed offset %llu",
                           ZSTD_getErrorName(r), (unsigned long long)sc->dec_in);
        if (r == 0) {
            sc->z_in_frame = 0;
            sc->z_cp_pending = 1;
            sc->z_cp_coff = sc->dec_in;
        } else if (in.pos > in_before || out.pos > 0) {
            sc->z_in_frame = 1;
        }
        int full = out.pos == out.size;
        if (in.pos == in.size && !full)
            break;
        if (draining && out.pos == 0 && in.pos == in.size)
            break;
    }
    return 0;
}

/* ---------------- pipeline ---------------- */

scanner_t *scanner_new(uint64_t span_size, uint64_t chunk_size, int want_diff, int format,
                       int threaded, lz_err *err)
{
    scanner_t *sc = calloc(1, sizeof *sc);
    if (!sc) {
        lz_nomem(err);
        return NULL;
    }
    sc->span_size = span_size;
    sc->threaded = threaded;
    sc->format = format;
    SHA256_Init(&sc->blob_ctx);
    tar_init(&sc->tar, chunk_size, want_diff);
    sc->nblocks = threaded ? LZ_NBLOCKS : 1;
    for (int i = 0; i < sc->nblocks; i++) {
        sc->blocks[i].mem = malloc(LZ_HIST + LZ_BLOCK);
        if (!sc->blocks[i].mem)
            goto nomem;
    }
    sc->cur = &sc->blocks[0];
    if (threaded) {
        for (int i = 1; i < sc->nblocks; i++)
            sc->free_list[sc->free_count++] = i;
        pthread_mutex_init(&sc->mu, NULL);
        pthread_cond_init(&sc->cv_prod, NULL);
        pthread_cond_init(&sc->cv_cons, NULL);
        if (pthread_create(&sc->thread, NULL, consumer_main, sc)) {
            lz_fail(err, LZ_NOMEM, "cannot start the hash thread");
            pthread_mutex_destroy(&sc->mu);
            pthread_cond_destroy(&sc->cv_prod);
            pthread_cond_destroy(&sc->cv_cons);
            sc->threaded = 0;
            scanner_free(sc);
            return NULL;
        }
        sc->thread_started = 1;
    }
    return sc;
nomem:
    lz_nomem(err);
    scanner_free(sc);
    return NULL;
}

static void stop_thread(scanner_t *sc)
{
    if (!sc->thread_started)
        return;
    pthread_mutex_lock(&sc->mu);
    sc->eof = 1;
    pthread_cond_signal(&sc->cv_cons);
    pthread_mutex_unlock(&sc->mu);
    pthread_join(sc->thread, NULL);
    sc->thread_started = 0;
}

void scanner_free(scanner_t *sc)
{
    if (!sc)
        return;
    stop_thread(sc);
    if (sc->threaded) {
        pthread_mutex_destroy(&sc->mu);
        pthread_cond_destroy(&sc->cv_prod);
        pthread_cond_destroy(&sc->cv_cons);
    }
    for (int i = 0; i < LZ_NBLOCKS; i++)
        free(sc->blocks[i].mem);
    lz_checkpoint *c = (lz_checkpoint *)sc->cps.p;
    for (size_t i = 0; i < sc->cps.len / sizeof *c; i++)
        free(c[i].window);
    lz_buf_free(&sc->cps);
    free(sc->isal);
    if (sc->zd)
        ZSTD_freeDCtx(sc->zd);
    tar_free(&sc->tar);
    free(sc);
}

static int start_format(scanner_t *sc)
{
    if (sc->format == FMT_UNKNOWN) {
        const uint8_t *m = sc->magic;
        if (sc->magic_have >= 2 && m[0] == 0x1f && m[1] == 0x8b)
            sc->format = FMT_GZIP;
        else if (sc->magic_have >= 4 && m[0] == 0x28 && m[1] == 0xb5 && m[2] == 0x2f && m[3] == 0xfd)
            sc->format = FMT_ZSTD;
        else
            sc->format = FMT_TAR;
    }
    if (sc->format == FMT_GZIP) {
        sc->isal = malloc(sizeof *sc->isal);
        if (!sc->isal)
            return lz_nomem(&sc->err);
        isal_inflate_init(sc->isal);
        sc->gz_phase = GZ_BETWEEN;
    } else if (sc->format == FMT_ZSTD) {
        sc->zd = ZSTD_createDCtx();
        if (!sc->zd)
            return lz_nomem(&sc->err);
    }
    return add_checkpoint(sc, CK_STREAM_START, 0, 0, 0);
}

static int decode(scanner_t *sc, const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    switch (sc->format) {
    case FMT_GZIP: return gz_feed(sc, p, n);
    case FMT_ZSTD: return z_feed(sc, p, n, 0);
    default: return plain_feed(sc, p, n);
    }
}

static int feed_input(scanner_t *sc, const uint8_t *p, size_t n);

int scanner_feed(scanner_t *sc, const uint8_t *p, size_t n)
{
    if (sc->err.kind)
        return -1;
    if (sc->finished)
        return lz_fail(&sc->err, LZ_INVALID, "scanner already finished");
    if (!sc->threaded) {
        SHA256_Update(&sc->blob_ctx, p, n);
    } else if (n) {
        pthread_mutex_lock(&sc->mu);
        sc->in_job_p = p;
        sc->in_job_n = n;
        sc->in_job_done = 0;
        sc->queue[(sc->q_head + sc->q_count) % LZ_QCAP] = -1;
        sc->q_count++;
        pthread_cond_signal(&sc->cv_cons);
        pthread_mutex_unlock(&sc->mu);
    }
    sc->in_total += n;
    int rc = feed_input(sc, p, n);
    if (sc->threaded && n) {
        pthread_mutex_lock(&sc->mu);
        while (!sc->in_job_done)
            pthread_cond_wait(&sc->cv_prod, &sc->mu);
        pthread_mutex_unlock(&sc->mu);
    }
    return rc;
}

static int feed_input(scanner_t *sc, const uint8_t *p, size_t n)
{
    if (sc->cps.len == 0) {  /* format not started yet: collect the magic bytes */
        size_t take = sc->format == FMT_UNKNOWN ? LZ_MIN(n, 4 - sc->magic_have) : 0;
        memcpy(sc->magic + sc->magic_have, p, take);
        sc->magic_have += take;
        p += take;
        n -= take;
        if (sc->format == FMT_UNKNOWN && sc->magic_have < 4)
            return 0;
        if (start_format(sc) || decode(sc, sc->magic, sc->magic_have))
            return -1;
    }
    return decode(sc, p, n);
}

int scanner_finish(scanner_t *sc, uint8_t blob[32], uint8_t diff[32])
{
    if (sc->err.kind)
        return -1;
    if (sc->finished)
        return lz_fail(&sc->err, LZ_INVALID, "scanner already finished");
    sc->finished = 1;
    if (sc->cps.len == 0 && (start_format(sc) || decode(sc, sc->magic, sc->magic_have)))
        goto fail;
    if (sc->format == FMT_GZIP && gz_finish(sc))
        goto fail;
    if (sc->format == FMT_ZSTD) {
        if (z_feed(sc, (const uint8_t *)"", 0, 1))
            goto fail;
        if (sc->z_in_frame)
            return lz_fail(&sc->err, LZ_TRUNCATED,
                           "zstd stream ends at offset %llu inside a frame",
                           (unsigned long long)sc->dec_in);
    }
    if (flush_block(sc))
        goto fail;
    stop_thread(sc);
    if (sc->cons_failed)
        return tar_error(sc);
    if (tar_finish(&sc->tar, diff))
        return tar_error(sc);
    SHA256_Final(blob, &sc->blob_ctx);
    return 0;
fail:
    stop_thread(sc);
    return -1;
}
