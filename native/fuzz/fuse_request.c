/* Fuzz target: one request as a FUSE worker reads it from /dev/fuse, through the parser
 * and everything a worker does with a parsed request before touching a layer (the
 * opcode's arguments, the name, a listing record of that name, the INIT reply).
 *
 * libFuzzer: clang -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Inative/fuse \
 *            native/fuzz/fuse_request.c native/fuse/kproto.c
 * gcc (no libFuzzer): `make fuzz`, which links native/fuzz/driver.c instead. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kproto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int devnull = -1; /* replies go nowhere; opened once per process */
    if (devnull < 0)
        devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (size > LZK_BUFSIZE)
        return 0; /* the kernel never hands a worker more than its buffer */
    /* an exact-size copy, so that reading one byte past the request is caught */
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    lzk_req r;
    const char *msg = NULL;
    if (lzk_parse(buf, size, &r, &msg) != 0) {
        if (!msg || !*msg)
            abort(); /* every refusal says why */
        free(buf);
        return 0;
    }
    volatile uint64_t sink = 0;
    switch (r.h->opcode) {
    case FUSE_INIT: {
        uint64_t agreed;
        uint32_t minor;
        lzk_reply_init(devnull, &r, ~0ull, 256, &agreed, &minor);
        sink += agreed + minor;
        break;
    }
    case FUSE_LOOKUP:
    case FUSE_GETXATTR: {
        const char *name = lzk_name(&r);
        size_t len = strlen(name);
        char rec[512];
        struct fuse_entry_out e = {.nodeid = 2};
        size_t cap = size % sizeof rec;
        sink += lzk_add_dirent(rec, cap, name, len, 2, 0100644, 1);
        sink += lzk_add_direntplus(rec, cap, name, len, &e, 1);
        break;
    }
    case FUSE_READ:
    case FUSE_READDIR:
    case FUSE_READDIRPLUS: {
        const struct fuse_read_in *in = r.arg;
        sink += in->offset + in->size;
        break;
    }
    case FUSE_OPEN:
    case FUSE_OPENDIR:
        sink += ((const struct fuse_open_in *)r.arg)->flags;
        break;
    case FUSE_LISTXATTR:
        sink += ((const struct fuse_getxattr_in *)r.arg)->size;
        break;
    default:
        break;
    }
    lzk_reply_err(devnull, r.h->unique, ENOSYS);
    (void)sink;
    free(buf);
    return 0;
}
