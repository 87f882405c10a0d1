/* Whole writes to a file descriptor (chunk files, layer files). */
#ifndef LZ_FILEIO_H
#define LZ_FILEIO_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <unistd.h>

/* Write all n bytes at off (retrying short writes and EINTR): 0, or -errno (-EIO when the
 * file takes no more). */
static inline int lz_pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t off)
{
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

#endif
