/* Batched SHA-256 of many independent messages (chunk hashes, blob digest, diff ID).
 *
 * Why: on one core the scanner's cost is decompression plus SHA-256 of every byte
 * (uncompressed for the chunks, compressed for the blob digest).  SHA-NI on one message
 * is latency-bound (~1.4 GB/s here); sixteen messages hashed side by side in AVX-512
 * lanes reach ~2.4 GB/s.  So updates are queued (pointers into the caller's buffers, which
 * must stay valid until lz_mh_run) and a batch is hashed in 16 lanes, falling back to
 * one-message-at-a-time (OpenSSL, SHA-NI) for the tail of a batch or without AVX-512.
 *
 * Contexts live in numbered slots owned by the batch (so queued jobs never hold a pointer
 * that a realloc could move).  A slot has at most one queued job: a second update of the
 * same slot runs the batch first, which keeps every message's bytes in order. */
#ifndef LZ_SHA_MB_H
#define LZ_SHA_MB_H

#include "lz.h"

typedef struct {
    uint32_t h[8];
    uint64_t total;     /* bytes fed */
    uint8_t buf[64];    /* bytes after the last whole block (they follow any queued job) */
    uint32_t nbuf;
    int queued;         /* a job of this slot waits in the batch */
    int in_use;
} lz_sha;

typedef struct {
    size_t slot;
    const uint8_t *p;
    size_t nblocks;
} lz_mh_job;

typedef struct {
    lz_buf slots;       /* lz_sha[] */
    lz_buf free_slots;  /* size_t[] */
    lz_buf jobs;        /* lz_mh_job[] */
    int simd;           /* AVX-512 lanes usable on this CPU */
} lz_mh;

/* allow_simd = 0 forces the one-message path (tests compare both). */
void lz_mh_init(lz_mh *m, int allow_simd);
void lz_mh_free(lz_mh *m);
/* A fresh SHA-256 context; -1 on out of memory. */
int lz_mh_new(lz_mh *m, size_t *slot);
/* Queue n bytes at p for slot; p must stay valid until the next lz_mh_run.  -1: no memory. */
int lz_mh_update(lz_mh *m, size_t slot, const uint8_t *p, size_t n);
/* Hash every queued job. */
void lz_mh_run(lz_mh *m);
/* Digest of slot (runs the batch first if the slot has a queued job); frees the slot. */
void lz_mh_final(lz_mh *m, size_t slot, uint8_t out[32]);
/* Restart slot as an empty message. */
void lz_mh_reset(lz_mh *m, size_t slot);

#endif
