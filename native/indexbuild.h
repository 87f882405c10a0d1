/* A layer's index entry, chunk and extras sections straight from the tar scan: the tree
 * containerd's applier would make (snapshotter/index/builder.py) serialized as the index
 * file holds it (snapshotter/index/format.py), with no per-entry Python.
 *
 * The Python builder stays the reference: this one declines (returns LZ_INDEX_DECLINED
 * with the reason) every layer it does not handle byte for byte the same way (hard
 * links, sparse files, a directory replaced by a non-directory, merged directory xattrs,
 * non-ASCII xattr names) and every layer the reference refuses, which the reference then
 * builds or refuses with its own message. Tests compare the two on generated layers. */
#ifndef LZ_INDEXBUILD_H
#define LZ_INDEXBUILD_H

#include "indexrecord.h"
#include "lz.h"
#include "tar.h"

/* The index's binary records (format.py ENTRY, CHUNK, BLOCK_RECORDS; snapshotter.native
 * refuses a core that lays them out differently). The entry record: indexrecord.h. */
#define LZ_INDEX_ENTRY_RECORD LZ_IE_SIZE
#define LZ_INDEX_CHUNK_RECORD 44  /* u64 offset, u32 length, SHA-256 */
#define LZ_INDEX_BLOCK_RECORDS 256
#define LZ_INDEX_MAX_NAME 4096
#define LZ_INDEX_MAX_LINK 4096
#define LZ_INDEX_NO_EXTRA 0xFFFFFFFFu
#define LZ_INDEX_FLAG_EXTRA 1
/* Linux's xattr limits (index/model.py MAX_XATTR_*) */
#define LZ_XATTR_NAME_MAX 255
#define LZ_XATTR_VALUE_MAX 65536
#define LZ_XATTR_ENTRY_MAX (1u << 20)

enum { LZ_INDEX_BUILT = 0, LZ_INDEX_DECLINED = 1 };

typedef struct {
    lz_buf blocks;       /* entry blocks, each zstd-compressed on its own */
    lz_buf blockidx;     /* u64 LE offsets of the blocks inside `blocks`, plus the end */
    lz_buf extras;       /* deduplicated xattr records */
    lz_buf chunks;       /* LZ_INDEX_CHUNK_RECORD records of live files, in stream order */
    uint64_t entry_count, reg_count, chunk_count;
    char declined[160];  /* why, when LZ_INDEX_DECLINED */
} lz_index_sections;

/* The tree being applied. It copies what it needs of each entry (names, link targets,
 * xattrs: ~80 bytes and the name per path), so the tar stage need not keep entries: made
 * the tar stage's consumer (tar_set_consumer(t, lz_index_apply, b)) it builds as the layer
 * is scanned, in memory that grows with the tree, not with the layer's headers. */
typedef struct lz_index_builder lz_index_builder;

/* NULL when out of memory. */
lz_index_builder *lz_index_builder_new(uint64_t chunk_size);
void lz_index_builder_free(lz_index_builder *b);
/* A tar_entry_fn: applies entry i of t. 0, LZ_INDEX_DECLINED (the build is over: the
 * reason is kept for lz_index_finish), or -1 (out of memory, kept likewise). */
int lz_index_apply(void *builder, const tar_t *t, size_t i);
/* The sections of what was applied. Uses t's chunk table (the digests are only final once
 * the tar stage finished) and, when built, takes it over in place as out->chunks.
 * Returns LZ_INDEX_BUILT, LZ_INDEX_DECLINED (out->declined says why), or -1 with err set
 * (out of memory, compression failure). out must be zeroed; free it with
 * lz_index_sections_free either way. */
int lz_index_finish(lz_index_builder *b, tar_t *t, int zstd_level, lz_index_sections *out, lz_err *err);
/* Every entry t kept, applied, then lz_index_finish. */
int lz_index_build(tar_t *t, uint64_t chunk_size, int zstd_level, lz_index_sections *out, lz_err *err);
void lz_index_sections_free(lz_index_sections *s);

#endif
