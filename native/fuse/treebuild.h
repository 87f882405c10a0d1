/* A layer's tree blob (fastfs.h's format) built straight from an index's entry records.
 *
 * Why in C: the daemon builds one tree per layer at its first Prepare, on the pull's
 * critical path; in Python (index entries -> LayerTree -> compile_tree) the inference
 * image's 45k entries took ~0.57 s of CPU under one GIL.  The records are already one
 * per path with their parent, so the overlayfs conventions (whiteouts, opaque markers,
 * hard links, trusted.* xattrs dropped) are applied in one pass.  Anything unusual
 * (a whiteout and a name colliding, links to odd targets, entries under a whiteout) is
 * declined: Python's LayerTree, which remains the reference, builds those. */
#ifndef LZ_TREEBUILD_H
#define LZ_TREEBUILD_H

#include <stddef.h>
#include <stdint.h>

#include "../indexrecord.h"

#define LZT_ENTRY_SIZE LZ_IE_SIZE /* native/indexrecord.h */

typedef struct {
    const uint8_t *const *blocks; /* decompressed entry blocks: records, then their strings */
    const size_t *block_lens;
    size_t n_blocks;
    uint32_t records_per_block;
    uint32_t entry_count;
    const uint8_t *extras; /* the index's extras section (xattrs, sparse maps) */
    size_t extras_len;
    uint64_t chunk_count;
} lzt_source;

typedef struct {
    uint8_t *blob; /* malloc'd; the caller frees */
    size_t len;
    uint64_t files, total_size; /* regular files (hard links not counted) and their bytes */
} lzt_built;

/* 0; -EINVAL: the index is malformed (*msg says how); -ENOTSUP: the layer needs the general
 * builder (*msg says why); -ENOMEM. */
int lzt_build(const lzt_source *src, lzt_built *out, const char **msg);

#endif
