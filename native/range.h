/* Random access: decompress an exact uncompressed range starting from a checkpoint. */
#ifndef LZ_RANGE_H
#define LZ_RANGE_H

#include "lz.h"

/* data: compressed bytes from the checkpoint's compressed offset on (maybe up to the blob
 * end). Writes exactly `length` bytes to out after discarding `skip`. 0 or -1 + err. */
int lz_decompress_range(int format, int kind, int bits, const uint8_t *window, size_t wlen,
                        const uint8_t *data, size_t n, uint64_t skip, uint8_t *out,
                        size_t length, lz_err *err);

/* Every deflate block boundary (bit offsets) of a gzip stream per zlib Z_BLOCK, for tests. */
int lz_zlib_boundaries(const uint8_t *data, size_t n, lz_buf *out, lz_err *err);

#endif
