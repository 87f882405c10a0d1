/* Chunk files: one call writes a whole decoded span's chunks with the GIL released.
 *
 * Why in C: a span of small files holds hundreds of chunks, and the Python store spent
 * five syscalls per chunk (stat, open, write, close, rename), each releasing and re-taking
 * the GIL; on a daemon whose other threads run Python every re-take can wait a switch
 * interval.  Same protocol as ChunkStore.put: temp file in the store's .tmp directory
 * (same filesystem), then rename, so a reader never sees half a chunk. */
#include "chunkfiles.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"

static void hexdigest(const uint8_t *d, char out[65])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[64] = 0;
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int r = fsync(fd) ? -errno : 0;
    close(fd);
    return r;
}

static int write_one(const char *dir, const char *tmp, const char *tag, size_t i, const uint8_t *digest,
                     const uint8_t *data, size_t len, int policy)
{
    char hex[65], sub[4096], final[4200], tmpname[4300];
    hexdigest(digest, hex);
    if (snprintf(sub, sizeof sub, "%s/%.2s", dir, hex) >= (int)sizeof sub)
        return -ENAMETOOLONG;
    snprintf(final, sizeof final, "%s/%s", sub, hex + 2);
    snprintf(tmpname, sizeof tmpname, "%s/%s.%s.%zu", tmp, hex, tag, i);
    struct stat st;
    if (stat(final, &st) == 0)
        return 0; /* content-addressed: whoever wrote it wrote the same bytes */
    if (mkdir(sub, 0700) && errno != EEXIST) /* image content: private to root */
        return -errno;
    int fd = open(tmpname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    int r = lz_pwrite_all(fd, data, len, 0);
    if (!r && policy != LZ_FSYNC_NONE && fsync(fd))
        r = -errno;
    if (close(fd) && !r)
        r = -errno;
    if (!r && rename(tmpname, final))
        r = -errno;
    if (r) {
        unlink(tmpname);
        return r;
    }
    if (policy == LZ_FSYNC_FULL && (r = fsync_dir(sub)) != 0)
        return r;
    return 1;
}

int lz_write_chunks(const char *dir, const char *tmp, const char *tag, size_t n, const uint8_t *const *digest,
                    const uint8_t *const *data, const size_t *len, int fsync_policy, int *status)
{
    for (size_t i = 0; i < n; i++)
        status[i] = write_one(dir, tmp, tag, i, digest[i], data[i], len[i], fsync_policy);
    return 0;
}
