/* One-pass layer scanner: format detection, decompression with checkpoints, tar scan,
 * chunk hashing, blob digest and optional diff ID.  No Python, no global state. */
#ifndef LZ_SCANNER_H
#define LZ_SCANNER_H

#include <pthread.h>
#include <isa-l/igzip_lib.h>
#include <zstd.h>

#include "lz.h"
#include "tar.h"

enum { FMT_UNKNOWN = 0, FMT_TAR = 1, FMT_GZIP = 2, FMT_ZSTD = 3 };
enum { CK_STREAM_START = 0, CK_DEFLATE = 1, CK_GZIP_MEMBER = 2, CK_ZSTD_FRAME = 3 };

#define LZ_HIST (32u << 10)          /* deflate window: what a DEFLATE checkpoint keeps */
#define LZ_BLOCK (1u << 18)          /* uncompressed bytes per block with a hash thread */
/* Without a hash thread and with AVX-512, bigger blocks: the tar stage queues the SHA-256
 * of every chunk in a block and hashes them 16 at a time (sha_mb.h), which needs 16+
 * chunks per block. */
#define LZ_BLOCK_BATCH (16u << 20)
#define LZ_NBLOCKS 8                 /* blocks in flight when a hash thread is used */
#define LZ_QCAP (LZ_NBLOCKS + 2)     /* queue: blocks plus the blob-hash job */

typedef struct {
    int kind;
    uint64_t coff, uoff;
    int bits;
    uint8_t *window;
    size_t wlen;
} lz_checkpoint;

typedef struct {
    uint8_t *mem;  /* LZ_HIST bytes of history, then up to block_size bytes of payload */
    size_t len;
} lz_block;

typedef struct {
    /* configuration */
    uint64_t span_size;
    int threaded;
    int sparse;              /* zero the window bytes nothing after a checkpoint uses */
    /* input */
    int format;
    uint8_t magic[4];
    size_t magic_have;
    size_t blob_slot;        /* blob digest: a slot of tar.mh (hashed with the chunks) */
    uint64_t in_total;       /* compressed bytes fed */
    uint64_t dec_in;         /* compressed bytes consumed by the decoder */
    /* output */
    uint64_t out_total;      /* uncompressed bytes produced */
    size_t block_size;       /* LZ_BLOCK or LZ_BLOCK_BATCH */
    lz_block blocks[LZ_NBLOCKS];
    int nblocks;
    lz_block *cur;
    /* tar stage, and the optional hash thread that runs it */
    tar_t tar;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv_prod, cv_cons;
    int queue[LZ_QCAP], q_head, q_count;  /* block index, or -1: hash the fed input */
    const uint8_t *in_job_p;
    size_t in_job_n;
    int in_job_done;
    int free_list[LZ_NBLOCKS], free_count;
    int eof, cons_failed;
    uint64_t thread_cpu_ns;  /* CPU time the hash thread used (for benchmarks) */
    /* checkpoints */
    lz_buf cps;              /* lz_checkpoint[] */
    lz_buf marks;            /* uint64_t pairs (uoff, coff): every output byte before uoff was
                              * produced from compressed bytes before coff (see lz_add_mark) */
    uint64_t last_mark_u;    /* uoff of the newest mark */
    /* gzip */
    struct inflate_state *isal;
    int gz_phase, gz_hunting, gz_zero_tail;
    uint64_t member_start, next_cp, hunt_base, gz_target, members;
    /* sparse windows (scan_gzip.c): compressed input kept from sp_base until every
     * checkpoint from cps index sp_next on has had its window's references found */
    lz_buf sp_in;
    uint64_t sp_base;
    size_t sp_next;
    /* zstd */
    ZSTD_DCtx *zd;
    int z_in_frame, z_cp_pending;
    lz_buf z_stage, z_stage2;  /* a frame start cut short by the caller's input (scan_zstd.c) */
    int z_stage_off;
    uint64_t z_cp_coff;
    int finished;
    lz_err err;
} scanner_t;

/* format: FMT_UNKNOWN to detect from magic bytes; simd: allow AVX-512 batched SHA-256;
 * sparse: DEFLATE checkpoint windows keep only the bytes later data refers to
 * (window_refs.h).  Returns NULL on out of memory. */
scanner_t *scanner_new(uint64_t span_size, uint64_t chunk_size, int want_diff, int format,
                       int threaded, int simd, int sparse, lz_err *err);
int scanner_feed(scanner_t *sc, const uint8_t *p, size_t n);
/* Flushes, joins the hash thread, checks the end of stream; digests are written out. */
int scanner_finish(scanner_t *sc, uint8_t blob[32], uint8_t diff[32]);
void scanner_free(scanner_t *sc);

const char *lz_isal_error_name(int r);

#endif
