/* The kernel's FUSE protocol, spoken directly on a /dev/fuse fd: mount, parse a request,
 * write a reply or a notification.
 *
 * Why not libfuse: Debian 12's libfuse 3.14 owns the fd and its loop, so a session cannot be
 * handed to another process (it answers every request before INIT with EIO), cannot ask the
 * kernel to replay requests a dead server read but never answered (FUSE_NOTIFY_RESEND), and
 * cannot register passthrough backing files.  The restart-safe holder and kernel-native reads
 * need all three; the protocol itself is small and stable (linux/fuse.h, which also defines
 * every layout used here).
 *
 * Plain C11, no global state: every function takes the fd or the buffer it works on. */
#ifndef LZ_KPROTO_H
#define LZ_KPROTO_H

#include <linux/fuse.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

/* Protocol 7.40 (Linux 6.9) additions missing from older uapi headers (Debian 12 has 7.38). */
#ifndef FUSE_HAS_RESEND
#define FUSE_HAS_RESEND (1ull << 39)
#endif
#ifndef FUSE_NOTIFY_RESEND
#define FUSE_NOTIFY_RESEND 7
#endif
#ifndef FUSE_PASSTHROUGH
#define FUSE_PASSTHROUGH (1ull << 37)
#define FOPEN_PASSTHROUGH (1u << 7)
struct fuse_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define FUSE_DEV_IOC_BACKING_OPEN _IOW(FUSE_DEV_IOC_MAGIC, 1, struct fuse_backing_map)
#define FUSE_DEV_IOC_BACKING_CLOSE _IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t)
#endif
/* 7.40 fuse_open_out: the padding became the backing id; fuse_init_out: unused[0] became
 * max_stack_depth.  Our own layouts, the same size as the header's. */
struct lzk_open_out {
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};
_Static_assert(sizeof(struct lzk_open_out) == sizeof(struct fuse_open_out), "fuse_open_out layout");
#define LZK_INIT_MAX_STACK_DEPTH_OFF 36 /* in fuse_init_out: right after flags2 */
_Static_assert(offsetof(struct fuse_init_out, flags2) + 4 == LZK_INIT_MAX_STACK_DEPTH_OFF, "fuse_init_out layout");

#define LZK_UNIQUE_RESEND (1ull << 63) /* in a request's unique: sent again (FUSE_NOTIFY_RESEND) */
#define LZK_MINOR 38            /* what we answer at INIT (the kernel uses the lower of both) */
#define LZK_MAX_WRITE (128u << 10) /* we never accept writes; the kernel still sizes buffers by it */
#define LZK_BUFSIZE (LZK_MAX_WRITE + 4096u) /* one request always fits (FUSE_MIN_READ_BUFFER is 8 KiB) */

/* One request as read from the fd: the header, then the opcode's arguments. */
typedef struct {
    const struct fuse_in_header *h;
    const void *arg;
    size_t arg_len;
} lzk_req;

/* Checks that buf[0..n) is one whole request whose fixed arguments fit and whose names are
 * NUL-terminated inside it.  0, or -EPROTO with *msg saying what is wrong. */
int lzk_parse(const void *buf, size_t n, lzk_req *out, const char **msg);

/* The name argument of LOOKUP (arg itself) and GETXATTR (after fuse_getxattr_in); parse
 * checked that both are terminated. */
const char *lzk_name(const lzk_req *r);

/* Replies: error is a positive errno or 0; the payload is a then b (either may be empty).
 * A reply to a request the kernel already dropped (interrupted, aborted) is not an error. */
int lzk_reply(int fd, uint64_t unique, int error, const void *a, size_t a_len, const void *b, size_t b_len);
int lzk_reply_err(int fd, uint64_t unique, int error);

/* INIT: answers with our minor, max_pages and the wanted flags the kernel offered; returns
 * the flags agreed (0 and *minor = 0 when only the major was answered and the kernel will
 * send INIT again). */
int lzk_reply_init(int fd, const lzk_req *r, uint64_t want, uint32_t max_pages, uint64_t *agreed, uint32_t *minor);

/* Passthrough (Linux >= 6.9, CAP_SYS_ADMIN): register an open file as the backing of the
 * files opened with its id (> 0), and drop the registration (opened files keep theirs). */
int lzk_backing_open(int fd, int backing_fd);
int lzk_backing_close(int fd, int32_t backing_id);

/* Directory listing records; return the record's size, which may exceed cap (then nothing
 * was written and the listing stops there). */
size_t lzk_add_dirent(char *buf, size_t cap, const char *name, size_t name_len, uint64_t ino, uint32_t mode,
                      uint64_t next_off);
size_t lzk_add_direntplus(char *buf, size_t cap, const char *name, size_t name_len, const struct fuse_entry_out *e,
                          uint64_t next_off);

/* Notifications (unique 0). */
int lzk_notify_inval_entry(int fd, uint64_t parent, const char *name, size_t name_len);
int lzk_notify_resend(int fd);

/* Mounts a FUSE filesystem at mountpoint on a fresh /dev/fuse fd (as root: mount(2), no
 * fusermount).  options: comma-separated fsname=, subtype=, ro, rw, suid, dev, exec, noexec,
 * allow_other, default_permissions, max_read=N; nosuid,nodev unless suid/dev (as libfuse).
 * Returns the fd (>= 0) or a negative errno with *msg. */
int lzk_mount(const char *mountpoint, const char *options, const char **msg);
/* Lazy unmount (MNT_DETACH): containers holding files open keep them. */
int lzk_unmount(const char *mountpoint);

#endif
