/* A zstd stream decoder whose every call produces at most a given number of bytes.
 *
 * Why: a start-up pack comes from the registry and is decoded as it streams.  One zstd
 * block of a few bytes can expand to 128 KiB, so a hostile pack of a few megabytes could
 * make a decoder without an output bound allocate gigabytes in one call, before any size
 * check ran.  Here the caller sets the bound and keeps the input not yet consumed. */
#ifndef LZ_ZSTREAM_H
#define LZ_ZSTREAM_H

#include "lz.h"

typedef struct lz_zstream lz_zstream;

lz_zstream *lz_zstream_new(void); /* NULL: out of memory */
void lz_zstream_free(lz_zstream *z);

/* Decodes from in[0..in_len) into out[0..out_cap) until out is full, the input is used up
 * or the frame ends (*eof = 1; input after it is left unconsumed).  *used / *made: bytes
 * consumed and produced.  0, or -1 with err set (LZ_CORRUPT). */
int lz_zstream_decode(lz_zstream *z, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
                      size_t *used, size_t *made, int *eof, lz_err *err);

#endif
