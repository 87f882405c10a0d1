/* zstd decoding for the scanner: frames become checkpoints.
 *
 * One-pass frames: ZSTD_decompressStream decodes a frame straight into our output block
 * (no window buffer, no copy) when, at the frame's start, its whole compressed frame is
 * in the input and the output has room for its content size.  So, at each frame start,
 * a block with too little room for a known content size is handed on first, and a frame
 * that the caller's input cuts short is staged (copied, compressed) until it is complete:
 * staging a compressed frame costs a quarter of copying its output.  Without a known size,
 * frames bigger than a block, or input that never completes a frame (corrupt, truncated),
 * decoding is plain streaming, which reports the error. */
#include "scanner_int.h"

#define Z_STAGE_MAX(sc) (2 * (sc)->block_size + (1u << 20))  /* give up staging beyond */
#define Z_STAGE_STEP (1u << 20)

static int zstd_decode(scanner_t *sc, const uint8_t *p, size_t n, int draining);

int lz_zstd_feed(scanner_t *sc, const uint8_t *p, size_t n, int draining)
{
    while (sc->z_stage.len && (n || draining)) {
        /* append in steps: only what completes the frame is copied, not a huge feed */
        size_t take = LZ_MIN(n, (size_t)Z_STAGE_STEP);
        if (lz_buf_append(&sc->z_stage, p, take))
            return lz_nomem(&sc->err);
        p += take;
        n -= take;
        int complete = !ZSTD_isError(ZSTD_findFrameCompressedSize(sc->z_stage.p, sc->z_stage.len));
        if (!complete && sc->z_stage.len < Z_STAGE_MAX(sc) && (n || !draining))
            continue;  /* frame still incomplete */
        /* Decode the staged bytes (the frame and whatever followed it).  A later frame
         * cut short may be staged again, into the other buffer; an incomplete one
         * (end of input, or never completing) is streamed, not staged again. */
        lz_buf staged = sc->z_stage;
        sc->z_stage = sc->z_stage2;
        sc->z_stage.len = 0;
        sc->z_stage_off = !complete;
        int rc = zstd_decode(sc, staged.p, staged.len, 0);
        sc->z_stage_off = 0;
        staged.len = 0;
        sc->z_stage2 = staged;
        if (rc)
            return rc;
    }
    if (sc->z_stage.len)
        return 0;  /* waiting for the rest of a staged frame */
    return zstd_decode(sc, p, n, draining);
}

static int zstd_decode(scanner_t *sc, const uint8_t *p, size_t n, int draining)
{
    ZSTD_inBuffer in = {p, n, 0};
    uint64_t base = sc->dec_in;
    for (;;) {
        if (sc->z_cp_pending && in.pos < in.size) {
            sc->z_cp_pending = 0;
            lz_checkpoint *last = (lz_checkpoint *)(sc->cps.p + sc->cps.len) - 1;
            if (sc->cps.len == 0 || last->uoff != sc->out_total)
                if (lz_add_checkpoint(sc, CK_ZSTD_FRAME, sc->z_cp_coff, 0, 0))
                    return -1;
        }
        /* At a frame start: set up a one-pass decode (see the top of this file). */
        if (!sc->z_in_frame && in.pos < in.size && !draining) {
            const uint8_t *fp = p + in.pos;
            size_t rem = in.size - in.pos;
            unsigned long long fcs = ZSTD_getFrameContentSize(fp, rem);
            if (fcs != ZSTD_CONTENTSIZE_UNKNOWN && fcs != ZSTD_CONTENTSIZE_ERROR &&
                fcs <= sc->block_size) {
                if (!sc->z_stage_off && ZSTD_isError(ZSTD_findFrameCompressedSize(fp, rem))) {
                    /* dec_in stays at the frame start: nothing of it is decoded yet */
                    if (lz_buf_append(&sc->z_stage, fp, rem))
                        return lz_nomem(&sc->err);
                    return 0;
                }
                if (fcs > out_avail(sc) && sc->cur->len && lz_flush_block(sc))
                    return -1;
            }
        }
        /* room for what one call may flush from zstd's window buffer (streaming frames) */
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
