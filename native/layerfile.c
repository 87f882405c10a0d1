/* The layer file sink: a streamed layer's chunks written into one file, each at its offset
 * in the tar.
 *
 * Why one file: no create, rename and directory entry per chunk, one sequential writer for
 * the page cache, and the chunks' places need no table of their own (the scan's chunk
 * records say where each is: the file's holes are the headers and the files the scan
 * leaves out). The C filesystem then reads a chunk from (fd, offset). */
#include "layerfile.h"

#include <errno.h>

#include "fileio.h"

int lz_layer_file_sink_write(void *sink, size_t n, const uint8_t *const *digest, const uint8_t *const *data,
                             const size_t *len, const uint64_t *offset, int *status)
{
    lz_layer_file_sink *s = sink;
    int err = 0;
    for (size_t i = 0; i < n; i++) {
        if (err) {
            status[i] = err;
            continue;
        }
        if (len[i] > s->budget) {
            status[i] = err = -EDQUOT;
            continue;
        }
        status[i] = lz_pwrite_all(s->fd, data[i], len[i], offset[i]);
        if (status[i] < 0) {
            err = status[i];
            continue;
        }
        s->budget -= len[i];
        status[i] = 1;
    }
    return err;
}
