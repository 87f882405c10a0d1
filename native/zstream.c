/* Bounded zstd stream decoding (see zstream.h). */
#include "zstream.h"

#include <zstd.h>

struct lz_zstream {
    ZSTD_DCtx *dctx;
    int eof;
};

lz_zstream *lz_zstream_new(void)
{
    lz_zstream *z = calloc(1, sizeof *z);
    if (!z)
        return NULL;
    z->dctx = ZSTD_createDCtx();
    if (!z->dctx) {
        free(z);
        return NULL;
    }
    return z;
}

void lz_zstream_free(lz_zstream *z)
{
    if (!z)
        return;
    ZSTD_freeDCtx(z->dctx);
    free(z);
}

int lz_zstream_decode(lz_zstream *z, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
                      size_t *used, size_t *made, int *eof, lz_err *err)
{
    ZSTD_inBuffer ib = {in, in_len, 0};
    ZSTD_outBuffer ob = {out, out_cap, 0};
    while (!z->eof && ob.pos < ob.size) {
        size_t before_in = ib.pos, before_out = ob.pos;
        size_t r = ZSTD_decompressStream(z->dctx, &ob, &ib);
        if (ZSTD_isError(r)) {
            *used = ib.pos;
            *made = ob.pos;
            *eof = 0;
            return lz_fail(err, LZ_CORRUPT, "zstd: %s", ZSTD_getErrorName(r));
        }
        if (r == 0)
            z->eof = 1; /* the frame is complete and flushed */
        else if (ib.pos == before_in && ob.pos == before_out)
            break; /* needs more input */
    }
    *used = ib.pos;
    *made = ob.pos;
    *eof = z->eof;
    return 0;
}
