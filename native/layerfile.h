/* A layer file: one file per layer holding the bytes of the chunks a scan cuts, each at
 * its offset in the layer's tar (see layerfile.c). */
#ifndef LZ_LAYERFILE_H
#define LZ_LAYERFILE_H

#include <stddef.h>
#include <stdint.h>

/* A scan's chunk sink (tar_set_sink) writing into the open file `fd` (not owned), up to
 * `budget` bytes written (the store's room): past it, -EDQUOT and no more. */
typedef struct {
    int fd;
    uint64_t budget;
} lz_layer_file_sink;

int lz_layer_file_sink_write(void *sink, size_t n, const uint8_t *const *digest, const uint8_t *const *data,
                             const size_t *len, const uint64_t *offset, int *status);

#endif
