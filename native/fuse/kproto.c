/* The kernel's FUSE protocol (see kproto.h for why it is spoken here and not by libfuse). */
#include "kproto.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* Fixed argument size of each opcode we answer; opcodes not listed are answered ENOSYS
 * without looking at their arguments. */
static size_t fixed_args(uint32_t opcode)
{
    switch (opcode) {
    case FUSE_INIT:
        return 16; /* major, minor, max_readahead, flags: what every kernel sends */
    case FUSE_FORGET:
        return sizeof(struct fuse_forget_in);
    case FUSE_BATCH_FORGET:
        return sizeof(struct fuse_batch_forget_in);
    case FUSE_GETATTR:
        return sizeof(struct fuse_getattr_in);
    case FUSE_OPEN:
    case FUSE_OPENDIR:
        return sizeof(struct fuse_open_in);
    case FUSE_READ:
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        return sizeof(struct fuse_read_in);
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
        return sizeof(struct fuse_release_in);
    case FUSE_GETXATTR:
    case FUSE_LISTXATTR:
        return sizeof(struct fuse_getxattr_in);
    case FUSE_INTERRUPT:
        return sizeof(struct fuse_interrupt_in);
    default:
        return 0;
    }
}

int lzk_parse(const void *buf, size_t n, lzk_req *out, const char **msg)
{
    const struct fuse_in_header *h = buf;
    if (n < sizeof *h) {
        *msg = "request shorter than its header";
        return -EPROTO;
    }
    if (h->len != n) {
        *msg = "request length does not match what was read";
        return -EPROTO;
    }
    out->h = h;
    out->arg = (const char *)buf + sizeof *h;
    out->arg_len = n - sizeof *h;
    if (out->arg_len < fixed_args(h->opcode)) {
        *msg = "request arguments shorter than the opcode's";
        return -EPROTO;
    }
    if (h->opcode == FUSE_LOOKUP || h->opcode == FUSE_GETXATTR) {
        size_t skip = h->opcode == FUSE_GETXATTR ? sizeof(struct fuse_getxattr_in) : 0;
        if (out->arg_len <= skip || !memchr((const char *)out->arg + skip, 0, out->arg_len - skip)) {
            *msg = "name argument not terminated";
            return -EPROTO;
        }
    }
    return 0;
}

const char *lzk_name(const lzk_req *r)
{
    return (const char *)r->arg + (r->h->opcode == FUSE_GETXATTR ? sizeof(struct fuse_getxattr_in) : 0);
}

static int write_all(int fd, struct iovec *iov, int n, size_t total)
{
    for (;;) {
        ssize_t w = writev(fd, iov, n);
        if (w >= 0)
            return (size_t)w == total ? 0 : -EIO; /* /dev/fuse takes a message whole or not at all */
        if (errno == EINTR)
            continue;
        /* ENOENT: the kernel no longer waits for this request (interrupted, or the
         * connection was aborted and the request dropped): nobody is left to tell */
        return errno == ENOENT ? 0 : -errno;
    }
}

int lzk_reply(int fd, uint64_t unique, int error, const void *a, size_t a_len, const void *b, size_t b_len)
{
    struct fuse_out_header h = {.error = -error, .unique = unique};
    struct iovec iov[3] = {{&h, sizeof h}};
    int n = 1;
    if (!error) {
        if (a_len)
            iov[n++] = (struct iovec){(void *)a, a_len};
        if (b_len)
            iov[n++] = (struct iovec){(void *)b, b_len};
    }
    size_t total = sizeof h + (error ? 0 : a_len + b_len);
    h.len = (uint32_t)total;
    return write_all(fd, iov, n, total);
}

int lzk_reply_err(int fd, uint64_t unique, int error) { return lzk_reply(fd, unique, error, NULL, 0, NULL, 0); }

int lzk_reply_init(int fd, const lzk_req *r, uint64_t want, uint32_t max_pages, uint64_t *agreed, uint32_t *minor)
{
    const struct fuse_init_in *in = r->arg;
    struct fuse_init_out out;
    memset(&out, 0, sizeof out);
    *agreed = 0;
    *minor = 0;
    out.major = FUSE_KERNEL_VERSION;
    out.minor = LZK_MINOR;
    if (in->major > FUSE_KERNEL_VERSION) /* the kernel offers a newer major: ask for ours */
        return lzk_reply(fd, r->h->unique, 0, &out, sizeof out, NULL, 0);
    if (in->major < FUSE_KERNEL_VERSION || in->minor < 23) {
        lzk_reply_err(fd, r->h->unique, EPROTO);
        return -EPROTO; /* older than Linux 4.20's protocol: not supported */
    }
    uint64_t offered = in->flags;
    if ((in->flags & FUSE_INIT_EXT) && r->arg_len >= offsetof(struct fuse_init_in, flags2) + 4)
        offered |= (uint64_t)in->flags2 << 32;
    uint64_t flags = offered & want;
    out.max_readahead = in->max_readahead;
    out.flags = (uint32_t)flags | (offered & FUSE_INIT_EXT ? FUSE_INIT_EXT : 0);
    out.flags2 = (uint32_t)(flags >> 32);
    out.max_write = LZK_MAX_WRITE;
    out.time_gran = 1;
    if (flags & FUSE_MAX_PAGES)
        out.max_pages = (uint16_t)max_pages;
    if (flags & FUSE_PASSTHROUGH) {
        /* backing files live on a filesystem that stacks on nothing (ext4, xfs), so ours
         * is one level up, and overlayfs can still stack on it (the kernel allows two) */
        uint32_t depth = 1;
        memcpy((char *)&out + LZK_INIT_MAX_STACK_DEPTH_OFF, &depth, sizeof depth);
    }
    int rc = lzk_reply(fd, r->h->unique, 0, &out, sizeof out, NULL, 0);
    if (rc == 0) {
        *agreed = flags;
        *minor = in->minor < LZK_MINOR ? in->minor : LZK_MINOR;
    }
    return rc;
}

int lzk_backing_open(int fd, int backing_fd)
{
    struct fuse_backing_map map = {.fd = backing_fd};
    int id = ioctl(fd, FUSE_DEV_IOC_BACKING_OPEN, &map);
    return id < 0 ? -errno : id;
}

int lzk_backing_close(int fd, int32_t backing_id)
{
    uint32_t id = (uint32_t)backing_id;
    return ioctl(fd, FUSE_DEV_IOC_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}

static size_t fill_dirent(char *p, const char *name, size_t name_len, uint64_t ino, uint32_t mode, uint64_t next_off)
{
    struct fuse_dirent d = {.ino = ino, .off = next_off, .namelen = (uint32_t)name_len, .type = (mode & S_IFMT) >> 12};
    size_t rec = FUSE_DIRENT_SIZE(&d);
    memcpy(p, &d, FUSE_NAME_OFFSET);
    memcpy(p + FUSE_NAME_OFFSET, name, name_len);
    memset(p + FUSE_NAME_OFFSET + name_len, 0, rec - FUSE_NAME_OFFSET - name_len);
    return rec;
}

size_t lzk_add_dirent(char *buf, size_t cap, const char *name, size_t name_len, uint64_t ino, uint32_t mode,
                      uint64_t next_off)
{
    size_t rec = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + name_len);
    if (rec > cap)
        return rec;
    return fill_dirent(buf, name, name_len, ino, mode, next_off);
}

size_t lzk_add_direntplus(char *buf, size_t cap, const char *name, size_t name_len, const struct fuse_entry_out *e,
                          uint64_t next_off)
{
    size_t rec = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET_DIRENTPLUS + name_len);
    if (rec > cap)
        return rec;
    memcpy(buf, e, sizeof *e);
    fill_dirent(buf + sizeof *e, name, name_len, e->nodeid, e->attr.mode, next_off);
    return rec;
}

/* A notification (unique 0, the code in `error`); unlike a reply, every errno is the
 * caller's to hear (ENOENT: nothing to invalidate; ENOSYS: the kernel lacks it). */
static int notify(int fd, int code, struct iovec *iov, int n)
{
    struct fuse_out_header h = {.error = code, .unique = 0};
    size_t total = sizeof h;
    for (int i = 1; i < n; i++)
        total += iov[i].iov_len;
    h.len = (uint32_t)total;
    iov[0] = (struct iovec){&h, sizeof h};
    for (;;) {
        if (writev(fd, iov, n) >= 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

int lzk_notify_inval_entry(int fd, uint64_t parent, const char *name, size_t name_len)
{
    struct fuse_notify_inval_entry_out arg = {.parent = parent, .namelen = (uint32_t)name_len};
    char nul = 0;
    struct iovec iov[4] = {{NULL, 0}, {&arg, sizeof arg}, {(void *)name, name_len}, {&nul, 1}};
    return notify(fd, FUSE_NOTIFY_INVAL_ENTRY, iov, 4);
}

int lzk_notify_resend(int fd)
{
    struct iovec iov[1] = {{NULL, 0}};
    return notify(fd, FUSE_NOTIFY_RESEND, iov, 1); /* ENOSYS before Linux 6.9 */
}

/* ------------------------------------------------------------------ mount */

static int opt_is(const char *opt, size_t len, const char *name)
{
    return strlen(name) == len && memcmp(opt, name, len) == 0;
}

static int opt_value(const char *opt, size_t len, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    if (len <= n || memcmp(opt, name, n) != 0 || len - n >= cap)
        return 0;
    memcpy(out, opt + n, len - n);
    out[len - n] = 0;
    return 1;
}

int lzk_mount(const char *mountpoint, const char *options, const char **msg)
{
    char source[256] = "", subtype[256] = "", kernel[512] = "", num[32];
    unsigned long flags = MS_NOSUID | MS_NODEV;
    for (const char *p = options ? options : ""; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == 0) {
        } else if (opt_value(p, len, "fsname=", source, sizeof source) ||
                   opt_value(p, len, "subtype=", subtype, sizeof subtype)) {
        } else if (opt_is(p, len, "ro")) {
            flags |= MS_RDONLY;
        } else if (opt_is(p, len, "rw")) {
            flags &= ~(unsigned long)MS_RDONLY;
        } else if (opt_is(p, len, "suid")) {
            flags &= ~(unsigned long)MS_NOSUID;
        } else if (opt_is(p, len, "dev")) {
            flags &= ~(unsigned long)MS_NODEV;
        } else if (opt_is(p, len, "noexec")) {
            flags |= MS_NOEXEC;
        } else if (opt_is(p, len, "exec")) {
            flags &= ~(unsigned long)MS_NOEXEC;
        } else if (opt_is(p, len, "allow_other") || opt_is(p, len, "default_permissions") ||
                   opt_value(p, len, "max_read=", num, sizeof num)) {
            size_t used = strlen(kernel);
            if (used + len + 2 > sizeof kernel) {
                *msg = "mount options too long";
                return -EINVAL;
            }
            kernel[used] = ',';
            memcpy(kernel + used + 1, p, len);
            kernel[used + 1 + len] = 0;
        } else {
            *msg = "unknown FUSE mount option";
            return -EINVAL;
        }
        p += len + (end ? 1 : 0);
    }
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        *msg = "cannot open /dev/fuse";
        return -errno;
    }
    char type[300], data[700];
    snprintf(type, sizeof type, "%s%s", *subtype ? "fuse." : "fuse", subtype);
    snprintf(data, sizeof data, "fd=%d,rootmode=%o,user_id=%u,group_id=%u%s", fd, S_IFDIR, (unsigned)getuid(),
             (unsigned)getgid(), kernel);
    if (mount(*source ? source : *subtype ? subtype : "fuse", mountpoint, type, flags, data) != 0) {
        int e = errno;
        close(fd);
        *msg = "cannot mount the FUSE filesystem";
        return -e;
    }
    return fd;
}

int lzk_unmount(const char *mountpoint) { return umount2(mountpoint, MNT_DETACH) == 0 ? 0 : -errno; }
