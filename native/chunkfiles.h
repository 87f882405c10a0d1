/* Writing chunk files of the content-addressed store in one call (see chunkfiles.c). */
#ifndef LZ_CHUNKFILES_H
#define LZ_CHUNKFILES_H

#include <stddef.h>
#include <stdint.h>

enum { LZ_FSYNC_NONE = 0, LZ_FSYNC_FILE = 1, LZ_FSYNC_FULL = 2 };

/* Store chunk i (digest[i], data[i], len[i]) as <dir>/<hex[0:2]>/<hex[2:]> through
 * <tmp>/<hex>.<tag>.<i> + rename.  status[i]: 1 written, 0 already present, or -errno
 * (and the temp file is removed).  Returns 0; the caller turns statuses into results. */
int lz_write_chunks(const char *dir, const char *tmp, const char *tag, size_t n, const uint8_t *const *digest,
                    const uint8_t *const *data, const size_t *len, int fsync_policy, int *status);

#endif
