/* gzip decoding for the scanner: ISA-L inflate, members, deflate-block checkpoints. */
#include "scanner_int.h"
#include "window_refs.h"

#define GZ_HUNT_SLICE 32            /* input slice while looking for a block boundary */
#define GZ_HUNT_AVAIL (160u << 10)  /* output room that 32 input bytes cannot overflow */
/* Output per isal_inflate call outside hunting: ISA-L checks the CRC32 of each call's
 * output at its end, so a call's output should still be in cache (blocks are 16 MiB
 * without a hash thread). */
#define GZ_CALL_OUT (256u << 10)

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

/*
 * Deflate block boundaries with ISA-L.  isal_inflate returns in state ISAL_BLOCK_HDR
 * (partial header parked in tmp_in_buffer, read_in rewound to the header start) or
 * ISAL_BLOCK_NEW_HDR when its input runs out at or inside a block header.  Once a span's
 * worth of compressed bytes has passed, input is fed in 32-byte slices (shorter than any
 * dynamic-Huffman header), so the next such header is caught; its bit position is
 *     8 * consumed - 8 * tmp_in_size - read_in_length.
 * Stored blocks have 5-byte headers that slicing would mostly miss, but inside one
 * (ISAL_BLOCK_TYPE0) its end is known exactly, so the slice is cut to end there.
 * Slices are aligned to absolute offsets and boundaries taken only at aligned (or
 * stored-block-end) returns, so checkpoints do not depend on how the caller slices its
 * input.  tests/test_native.py checks every checkpoint against zlib's Z_BLOCK boundaries
 * and resumes from it.
 */

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
        return lz_add_checkpoint(sc, CK_GZIP_MEMBER, sc->dec_in, 0, 0);
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
    if (!sc->gz_hunting && avail > GZ_CALL_OUT)
        avail = GZ_CALL_OUT;
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
    if (lz_note_progress(sc))
        return -1;
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
            if (lz_add_checkpoint(sc, CK_DEFLATE, (uint64_t)bp >> 3, (int)(bp & 7), 1))
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

static int gz_feed_all(scanner_t *sc, const uint8_t *p, size_t n)
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

/* ---------------- sparse windows (window_refs.h) ---------------- */

/* Compressed bytes after a checkpoint that always hold its next 32 KiB of output: at
 * worst 9 bits per literal plus block headers.  Fewer only at the end of the stream. */
#define SP_NEED (64u << 10)
/* Input kept behind the decoder: a checkpoint's header may start in bytes ISA-L took in
 * an earlier feed (its header buffer and bit buffer hold a few hundred bytes). */
#define SP_TAIL (4u << 10)

/* Zero the window bytes of `c` that nothing in `in` refers to.  A walk that cannot
 * finish (input too short, or a stream ISA-L accepts and window_refs.c does not) leaves
 * the window whole: never smaller than decoding needs. */
static int sparse_window(lz_checkpoint *c, const uint8_t *in, size_t n)
{
    uint8_t *used = calloc(c->wlen ? c->wlen : 1, 1);
    if (!used)
        return -1;
    if (lz_window_refs(in, n, c->bits, c->wlen, used) == LZ_REFS_OK)
        for (size_t i = 0; i < c->wlen; i++)
            if (!used[i])
                c->window[i] = 0;
    free(used);
    return 0;
}

/* After the decoder took p[0, n) at compressed offset `start` (sp_in holds the input
 * from sp_base up to `start`): make sparse the window of every pending checkpoint that
 * now has SP_NEED bytes after it (every one at the end of the stream), then keep only
 * the input the others still need, at most SP_NEED bytes. */
static int sparse_step(scanner_t *sc, const uint8_t *p, size_t n, uint64_t start, int at_end)
{
    if (!sc->sparse)
        return 0;
    uint64_t end = start + n;
    size_t have = 0;  /* bytes of p appended to sp_in */
    lz_checkpoint *cps = (lz_checkpoint *)sc->cps.p;
    size_t ncp = sc->cps.len / sizeof *cps;
    for (; sc->sp_next < ncp; sc->sp_next++) {
        lz_checkpoint *c = &cps[sc->sp_next];
        if (c->kind != CK_DEFLATE || c->coff < sc->sp_base)
            continue;  /* no window, or (never expected) its input is gone: kept whole */
        if (end - c->coff < SP_NEED && !at_end)
            break;
        size_t len = (size_t)LZ_MIN((uint64_t)SP_NEED, end - c->coff);
        const uint8_t *src;
        if (c->coff >= start) {
            src = p + (c->coff - start);
        } else {
            size_t want = (size_t)(c->coff + len - start);
            if (want > have) {
                if (lz_buf_append(&sc->sp_in, p + have, want - have))
                    return lz_nomem(&sc->err);
                have = want;
            }
            src = sc->sp_in.p + (c->coff - sc->sp_base);
        }
        if (sparse_window(c, src, len))
            return lz_nomem(&sc->err);
    }
    uint64_t keep = end > SP_TAIL ? end - SP_TAIL : 0;
    for (size_t i = sc->sp_next; i < ncp; i++)
        if (cps[i].kind == CK_DEFLATE) {
            keep = LZ_MIN(keep, cps[i].coff);
            break;
        }
    keep = LZ_MAX(keep, sc->sp_base);
    if (keep >= start + have) {
        sc->sp_in.len = 0;
        if (lz_buf_append(&sc->sp_in, p + (keep - start), (size_t)(end - keep)))
            return lz_nomem(&sc->err);
    } else {
        size_t drop = (size_t)(keep - sc->sp_base);
        memmove(sc->sp_in.p, sc->sp_in.p + drop, sc->sp_in.len - drop);
        sc->sp_in.len -= drop;
        if (lz_buf_append(&sc->sp_in, p + have, n - have))
            return lz_nomem(&sc->err);
    }
    sc->sp_base = keep;
    return 0;
}

int lz_gz_feed(scanner_t *sc, const uint8_t *p, size_t n)
{
    uint64_t start = sc->dec_in;
    if (gz_feed_all(sc, p, n))
        return -1;
    return sparse_step(sc, p, n, start, 0);
}

int lz_gz_finish(scanner_t *sc)
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
    return sparse_step(sc, (const uint8_t *)"", 0, sc->dec_in, 1);
}
