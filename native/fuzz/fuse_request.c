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

#include "fuzz.h"
#include "kproto.h"

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

static const uint32_t opcodes[] = {FUSE_INIT,    FUSE_LOOKUP,   FUSE_FORGET,   FUSE_BATCH_FORGET, FUSE_GETATTR,
                                   FUSE_READLINK, FUSE_OPEN,    FUSE_OPENDIR,  FUSE_READ,         FUSE_READDIR,
                                   FUSE_READDIRPLUS, FUSE_RELEASE, FUSE_RELEASEDIR, FUSE_STATFS,   FUSE_GETXATTR,
                                   FUSE_LISTXATTR, FUSE_INTERRUPT, FUSE_DESTROY, FUSE_FLUSH,       9999};

/* for driver.c: mostly well-formed FUSE requests of the opcodes the filesystem answers, then
 * damaged (length, missing NUL, random bytes) */
size_t lz_fuzz_generate(uint8_t *buf, size_t cap)
{
    size_t arg = lz_fuzz_rnd() % 300;
    if (lz_fuzz_rnd() % 8 == 0)
        arg = lz_fuzz_rnd() % 5000;
    size_t n = sizeof(struct fuse_in_header) + arg;
    if (n > cap)
        n = cap;
    for (size_t i = 0; i < n; i++)
        buf[i] = (uint8_t)lz_fuzz_rnd();
    struct fuse_in_header h = {.len = (uint32_t)n,
                               .opcode = opcodes[lz_fuzz_rnd() % (sizeof opcodes / sizeof *opcodes)],
                               .unique = lz_fuzz_rnd() | 1,
                               .nodeid = lz_fuzz_rnd() % 4 ? 1 + lz_fuzz_rnd() % 8 : lz_fuzz_rnd()};
    memcpy(buf, &h, sizeof h);
    if (h.opcode == FUSE_INIT && n >= sizeof h + 8) { /* mostly plausible versions */
        uint32_t v[2] = {lz_fuzz_rnd() % 4 ? 7 : (uint32_t)lz_fuzz_rnd() % 9, (uint32_t)(lz_fuzz_rnd() % 45)};
        memcpy(buf + sizeof h, v, sizeof v);
    }
    if (lz_fuzz_rnd() % 3 == 0 && n > sizeof h) /* a terminated name somewhere */
        buf[sizeof h + lz_fuzz_rnd() % (n - sizeof h)] = 0;
    if (lz_fuzz_rnd() % 6 == 0) { /* the header lies about the length */
        h.len = (uint32_t)lz_fuzz_rnd();
        memcpy(buf, &h.len, sizeof h.len);
    }
    return n; /* the driver cuts some inputs short */
}
