/* The daemon's FUSE filesystem in C: every request whose answer is already known (metadata
 * of registered layers, reads of verified local chunks) is answered on C threads without
 * Python; a read that needs a fetch is queued for the Python event loop, which replies later.
 *
 * Why: with every chunk local, a container start of the benchmark image costs ~8,400 FUSE
 * requests; answered in Python (pyfuse3 on asyncio) each took ~150 us and the start ran
 * 1.5x slower than from ext4.  Python keeps what needs policy: fetching, verification,
 * quarantine, recording. */
#ifndef LZ_FASTFS_H
#define LZ_FASTFS_H

#include <stddef.h>
#include <stdint.h>

/* Layer tree blob (built by treebuild.c, or snapshotter/fs/compiled.py from a Python tree;
 * little-endian, fixed records). */
#define LZT_MAGIC 0x31545a4cu /* "LZT1" */
#define LZT_NODE_PYDATA 1u    /* a regular file whose bytes only Python produces (sparse) */

typedef struct {
    uint64_t size;
    int64_t mtime_ns;
    uint64_t rdev;
    uint64_t first_chunk;
    uint32_t mode, uid, gid, nlink;
    uint32_t parent, child_start, child_count, xattr_start;
    uint32_t xattr_count, target_off, target_len, chunk_count;
    uint32_t flags;
    uint32_t record; /* a regular file's index record + 1 (treebuild.c; for Python only) */
} lzt_node;

typedef struct {
    uint32_t name_off, name_len, child;
} lzt_child;

typedef struct {
    uint32_t name_off, name_len, value_off, value_len;
} lzt_xattr;

typedef struct {
    uint32_t magic, version;
    uint32_t n_nodes, n_children; /* n_nodes counts slot 0 (unused); node 1 is the root */
    uint32_t n_xattrs, pad;
    uint64_t strings_len;
} lzt_header;

typedef struct lzfs lzfs;

/* Counters (all monotonic). */
enum {
    LZC_LOOKUP, LZC_GETATTR, LZC_READLINK, LZC_OPENDIR, LZC_READDIR, LZC_STATFS, LZC_GETXATTR,
    LZC_LISTXATTR, LZC_OPEN, LZC_READ,
    LZC_READ_LOCAL,      /* reads answered from verified local chunks */
    LZC_READ_FORWARDED,  /* reads queued for Python */
    LZC_CHUNK_HITS,      /* chunk reads answered from local chunk files */
    LZC_ACCESS_DROPPED,  /* access records lost because Python did not drain them */
    LZC_OPEN_PASSTHROUGH, /* opens answered with a backing file: reads never reach us */
    LZC_BACKING_FILES,   /* backing files registered */
    LZC_RESENT,          /* requests the kernel sent again: a previous server read them, never answered */
    LZC_N
};
extern const char *const lzfs_counter_names[LZC_N];

typedef struct {
    uint64_t token, ino, off;
    uint32_t size;
} lzfs_miss;

typedef struct {
    uint64_t ino, off, t_ns;
    uint32_t size;
} lzfs_access;

/* All functions return 0 or a negative errno; *msg (static text) says what failed.
 * fuse_fd < 0: mount a new filesystem at mountpoint; otherwise serve the live session
 * of that /dev/fuse fd (taken over from a process that left it: the mount exists and INIT
 * was answered), which the session then owns. */
#define LZFS_PASSTHROUGH 1u /* ask for FUSE passthrough at INIT (never on a taken-over session) */
int lzfs_new(lzfs **out, const char *mountpoint, const char *options, int threads, int fuse_fd, unsigned flags,
             const char **msg);
int lzfs_start(lzfs *fs);
int lzfs_initialized(lzfs *fs);
int lzfs_notify_fd(lzfs *fs);
int lzfs_fuse_fd(lzfs *fs);
/* Ask the kernel to send again every request read from this session and not answered
 * (by a process that left it); -ENOSYS before Linux 6.9. */
int lzfs_resend(lzfs *fs);
/* Stop the workers and free.  unmount: fail queued reads with EIO and unmount; otherwise
 * leave both to whoever else holds the fd (queued reads stay unanswered in the kernel,
 * to be sent again to the next server with lzfs_resend). */
void lzfs_close(lzfs *fs, int unmount);

int lzfs_add_layer(lzfs *fs, uint32_t slot, const char *name, size_t name_len, const void *tree,
                   size_t tree_len, const void *digests, uint64_t n_chunks, const char *chunks_dir,
                   uint64_t chunk_size, const char **msg);
int lzfs_remove_layer(lzfs *fs, uint32_t slot);
int lzfs_set_failed(lzfs *fs, uint32_t slot);
int lzfs_inval_root_entry(lzfs *fs, const char *name, size_t name_len);

/* Passthrough: whether the kernel agreed at INIT, and the file whose bytes are exactly those
 * of node `local` of layer `slot` (size checked): its next open passes through to it, once
 * no open of the node is served by us (the kernel refuses to mix the two). */
int lzfs_passthrough(lzfs *fs);
int lzfs_set_backing(lzfs *fs, uint32_t slot, uint32_t local, const char *path, const char **msg);

/* The layer file of a layer (one file holding its chunks, written by the scan that hashed
 * them, so trusted like verified chunk files): chunk i of the layer is at offsets[i] in
 * `path`, or not there (LZFS_NOT_IN_FILE); n is the layer's chunk count. Replaces an
 * earlier one. */
#define LZFS_NOT_IN_FILE UINT64_MAX
int lzfs_set_layer_file(lzfs *fs, uint32_t slot, const char *path, const void *offsets, uint64_t n,
                        const char **msg);
int lzfs_mark_verified(lzfs *fs, const uint8_t *digests, size_t n);
void lzfs_forget_verified(lzfs *fs, const uint8_t *digest);

/* Hands the queued misses and access records to the caller (malloc'd arrays it frees). */
int lzfs_take(lzfs *fs, lzfs_miss **misses, size_t *n_misses, lzfs_access **acc, size_t *n_acc);
int lzfs_reply_data(lzfs *fs, uint64_t token, const void *data, size_t len);
int lzfs_reply_error(lzfs *fs, uint64_t token, int err);
/* The kernel's unique of a forwarded read still in flight (0: none), so that another
 * process holding the /dev/fuse fd (the daemon, behind a FUSE holder) can answer it. */
uint64_t lzfs_unique(lzfs *fs, uint64_t token);
/* Forget a forwarded read answered elsewhere: the session will not answer it. -ENOENT: unknown. */
int lzfs_forget(lzfs *fs, uint64_t token);
void lzfs_counters(lzfs *fs, uint64_t out[LZC_N]);

#endif
