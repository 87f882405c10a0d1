/* Sparse checkpoint windows: which bytes of a deflate checkpoint's window are used.
 *
 * A DEFLATE checkpoint keeps the 32 KiB of output before it, because back-references in
 * the data after it may copy from there.  Only the first 32 KiB of output after the
 * checkpoint can reach back that far, and in layer data they reach only ~10 % of the
 * window.  Zeroing the bytes nothing refers to leaves the output unchanged and makes the
 * zlib-packed window several times smaller (the same observation as rapidgzip's sparse
 * windows).  Decoding from such a window is checked like any other decode: every chunk
 * against its SHA-256. */
#ifndef LZ_WINDOW_REFS_H
#define LZ_WINDOW_REFS_H

#include <stddef.h>
#include <stdint.h>

enum { LZ_REFS_OK = 0, LZ_REFS_SHORT = 1, LZ_REFS_INVALID = 2 };

/* Walk the deflate blocks starting at bit `bits` (0-7, least significant first) of
 * in[0] until 32 KiB of output have been produced or the final block ends, and set
 * used[i] = 1 for each byte i of the `wlen`-byte window a match copies from (used[] is
 * not cleared first).  Returns LZ_REFS_SHORT if `in` ends first and LZ_REFS_INVALID on
 * a malformed stream (a distance beyond the window included): either way `used` is then
 * incomplete and the caller must keep the whole window. */
int lz_window_refs(const uint8_t *in, size_t n, int bits, size_t wlen, uint8_t *used);

#endif
