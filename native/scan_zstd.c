/* zstd decoding for the scanner: frames become checkpoints. */
#include "scanner_int.h"

int lz_zstd_feed(scanner_t *sc, const uint8_t *p, size_t n, int draining)
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
        /* room for a whole zstd block (128 KiB): zstd then decodes straight into ours */
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
