/* The scanning pipeline (see scanner.h).
 *
 * Producer side (the caller's thread, GIL released): format detection, decompression
 * into blocks (scan_gzip.c, scan_zstd.c), checkpoint recording.  Consumer side: the tar
 * stage (tar.c: header parsing, chunk SHA-256, diff ID) and the blob SHA-256, all queued
 * in one batch hasher (sha_mb.h) that runs at the end of each block.  On one thread with
 * AVX-512, blocks are 16 MiB so a batch holds 16+ chunks for the SIMD lanes (the blob
 * bytes of the current feed ride along); otherwise 256 KiB, which stay in L2.
 * With `threaded` the consumer runs on a worker thread owned by this scanner: SHA-256
 * of every byte costs about as much as ISA-L inflate, so overlapping the two is what
 * lifts gzip indexing past one core's speed (the thread has its own blocks; the producer
 * waits only when all LZ_NBLOCKS are in flight).  Each block
 * starts with a copy of the 32 KiB of output before it, so a checkpoint's window is always
 * one contiguous slice and blocks can be handed over without further copies. */

#include "scanner_int.h"

#include <time.h>

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
            lz_mh_update(&sc->tar.mh, sc->blob_slot, sc->in_job_p, sc->in_job_n);
            lz_mh_run(&sc->tar.mh);
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

/* End mark: the decoder has consumed dec_in bytes and produced out_total, so a read ending
 * at or before out_total needs no compressed byte past dec_in (readers fetch up to here
 * instead of up to the next checkpoint).  Called after decoder calls and at block ends. */
int lz_add_mark(scanner_t *sc)
{
    if (sc->format == FMT_TAR || sc->out_total <= sc->last_mark_u)
        return 0;
    uint64_t mark[2] = {sc->out_total, sc->dec_in};
    if (lz_buf_append(&sc->marks, mark, sizeof mark))
        return lz_nomem(&sc->err);
    sc->last_mark_u = sc->out_total;
    return 0;
}

int lz_flush_block(scanner_t *sc)
{
    lz_block *old = sc->cur, *nb;
    if (old->len && lz_add_mark(sc))
        return -1;
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

int lz_add_checkpoint(scanner_t *sc, int kind, uint64_t coff, int bits, int with_window)
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

/* ---------------- pipeline ---------------- */

scanner_t *scanner_new(uint64_t span_size, uint64_t chunk_size, int want_diff, int format,
                       int threaded, int simd, int sparse, lz_err *err)
{
    scanner_t *sc = calloc(1, sizeof *sc);
    if (!sc) {
        lz_nomem(err);
        return NULL;
    }
    sc->span_size = span_size;
    sc->threaded = threaded;
    sc->sparse = sparse;
    sc->format = format;
    if (tar_init(&sc->tar, chunk_size, want_diff, simd) ||
        lz_mh_new(&sc->tar.mh, &sc->blob_slot))
        goto nomem;
    sc->nblocks = threaded ? LZ_NBLOCKS : 1;
    /* big blocks only pay where the batch is hashed in SIMD lanes */
    sc->block_size = threaded || !sc->tar.mh.simd ? LZ_BLOCK : LZ_BLOCK_BATCH;
    for (int i = 0; i < sc->nblocks; i++) {
        sc->blocks[i].mem = malloc(LZ_HIST + sc->block_size);
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
    lz_buf_free(&sc->marks);
    lz_buf_free(&sc->sp_in);
    free(sc->isal);
    if (sc->zd)
        ZSTD_freeDCtx(sc->zd);
    lz_buf_free(&sc->z_stage);
    lz_buf_free(&sc->z_stage2);
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
    return lz_add_checkpoint(sc, CK_STREAM_START, 0, 0, 0);
}

static int decode(scanner_t *sc, const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    switch (sc->format) {
    case FMT_GZIP: return lz_gz_feed(sc, p, n);
    case FMT_ZSTD: return lz_zstd_feed(sc, p, n, 0);
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
        /* queued: hashed with the first block's chunks, at the latest before returning */
        lz_mh_update(&sc->tar.mh, sc->blob_slot, p, n);
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
    if (!sc->threaded)
        lz_mh_run(&sc->tar.mh);  /* p is the caller's: nothing may point into it after return */
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
    if (sc->format == FMT_GZIP && lz_gz_finish(sc))
        goto fail;
    if (sc->format == FMT_ZSTD) {
        if (lz_zstd_feed(sc, (const uint8_t *)"", 0, 1))
            goto fail;
        if (sc->z_in_frame)
            return lz_fail(&sc->err, LZ_TRUNCATED,
                           "zstd stream ends at offset %llu inside a frame",
                           (unsigned long long)sc->dec_in);
    }
    if (lz_flush_block(sc))
        goto fail;
    stop_thread(sc);
    if (sc->cons_failed)
        return tar_error(sc);
    if (tar_finish(&sc->tar, diff))
        return tar_error(sc);
    lz_mh_final(&sc->tar.mh, sc->blob_slot, blob);
    return 0;
fail:
    stop_thread(sc);
    return -1;
}
