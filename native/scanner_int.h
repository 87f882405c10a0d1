/* Internals shared by the scanner pipeline (scanner.c) and its decoders
 * (scan_gzip.c, scan_zstd.c): the output-block helpers and checkpoint recording. */
#ifndef LZ_SCANNER_INT_H
#define LZ_SCANNER_INT_H

#include "scanner.h"

#define MIN_AVAIL (64u << 10)  /* output room asked for before each decoder call */

enum { GZ_BETWEEN = 0, GZ_IN = 1 };  /* scanner_t.gz_phase */

/* Hand the current block to the tar stage and start a new one (keeps 32 KiB history). */
int lz_flush_block(scanner_t *sc);
#define LZ_MARK_STEP (256u << 10)  /* output between end marks (their resolution) */
int lz_add_mark(scanner_t *sc);
/* After a decoder call: a mark every LZ_MARK_STEP bytes of output, whatever the block size. */
static inline int lz_note_progress(scanner_t *sc)
{
    return sc->out_total - sc->last_mark_u >= LZ_MARK_STEP ? lz_add_mark(sc) : 0;
}
int lz_add_checkpoint(scanner_t *sc, int kind, uint64_t coff, int bits, int with_window);

static inline uint8_t *out_ptr(scanner_t *sc) { return sc->cur->mem + LZ_HIST + sc->cur->len; }
static inline size_t out_avail(scanner_t *sc) { return sc->block_size - sc->cur->len; }
static inline void out_commit(scanner_t *sc, size_t n)
{
    sc->cur->len += n;
    sc->out_total += n;
}
static inline int out_ensure(scanner_t *sc, size_t min)
{
    return out_avail(sc) < min ? lz_flush_block(sc) : 0;
}

int lz_gz_feed(scanner_t *sc, const uint8_t *p, size_t n);
int lz_gz_finish(scanner_t *sc);
int lz_zstd_feed(scanner_t *sc, const uint8_t *p, size_t n, int draining);

#endif
