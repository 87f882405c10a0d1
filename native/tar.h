/* Streaming tar parser: fed the uncompressed tar in order, in slices of any size.
 *
 * It records entries (after folding GNU long names and PAX records), and cuts each
 * regular file's stored data into file-aligned chunks with one SHA-256 each. */
#ifndef LZ_TAR_H
#define LZ_TAR_H

#include "lz.h"
#include "sha_mb.h"

enum { ET_REG = 0, ET_HARDLINK = 1, ET_SYMLINK = 2, ET_CHAR = 3, ET_BLOCK = 4, ET_DIR = 5,
       ET_FIFO = 6 };

typedef struct {
    size_t path_off, path_len, link_off, link_len;  /* in tar_t.arena */
    int type;
    uint32_t mode;
    int64_t uid, gid, size, mtime_ns;
    int64_t devmajor, devminor;
    size_t xattr_first, xattr_count;                /* in tar_t.xattrs */
    uint64_t data_offset, stored_size, first_chunk, chunk_count;
    int64_t sparse_first, sparse_count;             /* in tar_t.sparse; -1 = not sparse */
} tar_entry;

typedef struct {
    size_t key_off, key_len, val_off, val_len;      /* in tar_t.arena */
} tar_xattr;

typedef struct {
    uint64_t offset;
    uint64_t length;
    uint8_t sha[32];
} tar_chunk;

/* What extended headers (PAX 'x', GNU 'L'/'K') say about the next entry. */
typedef struct {
    int has_path, has_link, has_size, has_uid, has_gid, has_mtime;
    lz_buf path, link;
    uint64_t size;
    int64_t uid, gid, mtime_ns;
    lz_buf xattr_data;      /* u64 key length, key, u64 value length, value; repeated */
    size_t xattr_count;
    int sparse_major, sparse_minor, has_sparse_realsize;
    uint64_t sparse_realsize;
    int has_sparse_name;
    lz_buf sparse_name;
    lz_buf sparse_map;      /* (u64 offset, u64 length) pairs, PAX 0.0 / 0.1 */
    int has_sparse_map;
    int64_t pending_offset; /* PAX 0.0: GNU.sparse.offset waiting for numbytes */
} tar_pending;

/* Where finished chunks go once their digest is known (tar_set_sink): n chunks, their
 * digests, bytes, lengths and offsets in the tar stream.  status[i]: 1 stored, 0 there
 * already, < 0 not stored (-errno).
 * Returns 0, or -errno to be called no more (the scan itself goes on: a sink that cannot
 * keep chunks costs their copies, never the scan). */
typedef int (*tar_sink_fn)(void *ctx, size_t n, const uint8_t *const *digest, const uint8_t *const *data,
                           const size_t *len, const uint64_t *offset, int *status);

typedef struct tar_t tar_t;

/* Where complete entries go (tar_set_consumer): entry i of t, its arena bytes, xattrs and
 * sparse map readable for the call only. Returns 0, or nonzero to be called no more. */
typedef int (*tar_entry_fn)(void *ctx, const tar_t *t, size_t i);

struct tar_t {
    /* configuration */
    uint64_t chunk_size;
    int want_diff;
    /* state */
    lz_mh mh;               /* batched SHA-256: chunks, diff ID (and the scanner's blob) */
    size_t diff_slot;
    uint64_t off;           /* uncompressed bytes seen */
    int state;
    uint8_t hdr[512];
    size_t hdr_have;
    uint64_t hdr_off;       /* offset of the current header */
    uint64_t remaining;     /* bytes left in the current region */
    uint64_t region_end;    /* end of the current entry's data incl. padding */
    int ext_type;
    int skip_is_pad;        /* T_SKIP over padding after data (EOF there is fine) */
    lz_buf ext;
    tar_pending pend;
    /* the regular file being hashed */
    tar_entry *cur;
    size_t cur_index;
    uint64_t chunk_fill, chunk_start;
    size_t chunk_slot;      /* the open chunk's SHA-256 */
    lz_buf finals;          /* (slot, chunk index) pairs whose digest is due at the flush */
    uint64_t sparse_map_numbers_needed;  /* PAX 1.0 sparse map parsing: lines needed */
    uint64_t sparse_map_newlines;        /* and lines seen so far */
    /* the chunk sink (tar_set_sink): finished chunks' bytes wait in keep for their digest */
    tar_sink_fn sink;
    void *sink_ctx;
    uint64_t sink_min_file; /* smaller files' chunks are not handed to the sink */
    int cur_sunk;           /* the current file's chunks go to the sink */
    lz_buf keep;            /* bytes of the chunks finished since the last flush, then the open one's */
    size_t keep_done;       /* bytes of keep that belong to finished chunks */
    size_t sunk;            /* chunks handed to the sink (or skipped) so far */
    lz_buf sunk_flags;      /* with a sink: one byte per chunk, 1 if its bytes go to the sink */
    int sink_errno;         /* why the sink was dropped, 0 while it is in use */
    /* the entry consumer (tar_set_consumer): entries are handed over, then forgotten */
    tar_entry_fn consume;
    void *consume_ctx;
    int consume_done;       /* it asked to be called no more */
    /* results */
    lz_buf entries;         /* tar_entry[] */
    lz_buf chunks;          /* tar_chunk[] */
    lz_buf arena;
    lz_buf xattrs;          /* tar_xattr[] */
    lz_buf sparse;          /* uint64_t pairs */
    lz_buf stored;          /* LZ_CHUNK_RECORD records of the chunks the sink stored */
    lz_err err;
};

/* simd: allow AVX-512 batched hashing (0 forces one message at a time). */
int tar_init(tar_t *t, uint64_t chunk_size, int want_diff, int simd);
void tar_free(tar_t *t);
/* Returns 0, or -1 with t->err set (further calls keep failing).  Hashing of p's bytes is
 * batched and done before it returns, so p need not outlive the call. */
int tar_feed(tar_t *t, const uint8_t *p, size_t n);
/* Hand every chunk of each file of at least `min_file` bytes to `sink` as soon as its
 * digest is known (before any tar_feed). */
void tar_set_sink(tar_t *t, tar_sink_fn sink, void *ctx, uint64_t min_file);
/* Hand each entry to `fn` once it is complete (its headers and data seen: when the next
 * entry's header or the end comes), then forget it (before any tar_feed): the entries,
 * arena, xattrs and sparse tables then hold the entry being read and nothing before it. */
void tar_set_consumer(tar_t *t, tar_entry_fn fn, void *ctx);
/* End of the uncompressed stream; checks the tar did not end inside an entry. */
int tar_finish(tar_t *t, uint8_t diff_out[32]);

static inline size_t tar_entry_count(const tar_t *t) { return t->entries.len / sizeof(tar_entry); }
static inline size_t tar_chunk_count(const tar_t *t) { return t->chunks.len / sizeof(tar_chunk); }

/* A chunk as an LZ_CHUNK_RECORD (index.model.CHUNK_RECORD): offset, length, SHA-256. */
static inline void tar_put_chunk_record(uint8_t *out, const tar_chunk *c)
{
    lz_put_le64(out, c->offset);
    lz_put_le64(out + 8, c->length);
    memcpy(out + 16, c->sha, 32);
}

#endif
