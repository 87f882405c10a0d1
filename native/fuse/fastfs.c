/* FUSE low-level operations of the daemon's filesystem (see fastfs.h for why).
 *
 * Threads: `threads` C workers read /dev/fuse (non-blocking fd + poll, so close() can stop
 * them without relying on unmount semantics) and answer requests under a read lock of the
 * layer table; add/remove of a layer takes the write lock, so a layer is never freed under
 * a request.  Inode numbers: FUSE root = 1; layer slot s owns (s << 32) | local. */
#include "fastfs.h"
#include "kproto.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SLOT_SHIFT 32
#define LOCAL_MASK 0xffffffffull
#define IMMUTABLE_TIMEOUT 86400 /* seconds; layers never change while registered */
#define ROOT_TIMEOUT 1          /* the top directory changes as layers come and go */
#define MAX_THREADS 16
#define READAHEAD_CHUNKS 2
#define ACCESS_LIMIT (1u << 20)

const char *const lzfs_counter_names[LZC_N] = {
    "lookup", "getattr", "readlink", "opendir", "readdir", "statfs", "getxattr", "listxattr",
    "open", "read", "read_local", "read_forwarded", "chunk_hits", "access_dropped", "open_passthrough",
    "backing_files", "resent",
};

/* A regular file's opens, when the session may pass files through: the kernel runs an
 * inode either through us (cached) or through one backing file, never both at once, so a
 * file passes through only while no open of it is served by us, and once one does, every
 * open does until the last is released.  Our counts lead the kernel's: we count an open
 * before replying and uncount it at RELEASE, which the kernel sends after letting go. */
typedef struct {
    int32_t backing_id; /* > 0: registered */
    int32_t backing_fd; /* with backing_id: our own fd of the backing file, for opens served by us */
    uint32_t cached_opens, passthrough_opens;
} pt_node;

#define PT_FH (1ull << 63) /* in a file handle: the open passes through */

typedef struct {
    uint32_t slot;
    char *name;
    size_t name_len;
    void *blob;
    const lzt_node *nodes;
    uint32_t n_nodes;
    const lzt_child *children;
    uint32_t n_children;
    const lzt_xattr *xattrs;
    uint32_t n_xattrs;
    const char *strings;
    uint64_t strings_len;
    uint8_t *digests;
    uint64_t n_chunks;
    char *chunks_dir;
    size_t chunks_dir_len;
    uint64_t chunk_size;
    uint64_t total_size;
    atomic_int failed;
    pt_node *pt; /* per node, when the session may pass files through; under pt_mu */
    pthread_mutex_t pt_mu;
    /* the layer file (lzfs_set_layer_file): chunk i is at file_off[i] in file_fd, or not
     * there (LZFS_NOT_IN_FILE); set and swapped under the table write lock */
    uint64_t *file_off;
    int file_fd;
} layer_t;

typedef struct {
    uint8_t *keys;  /* cap * 32 */
    uint8_t *state; /* 0 empty, 1 live, 2 deleted */
    size_t cap, used, live;
    pthread_mutex_t mu;
} digest_set;

typedef struct {
    uint64_t token;
    uint64_t unique; /* the kernel's id of the READ this answers */
} inflight_t;

typedef struct {
    lzfs_miss miss;
    uint64_t unique;
} queued_t;

/* A request being answered: replies go to fs->fd tagged with the kernel's unique. */
typedef struct {
    lzfs *fs;
    uint64_t unique;
} req_t;

struct lzfs {
    int fd; /* /dev/fuse */
    unsigned flags;
    atomic_int passthrough; /* agreed at INIT */
    char *mountpoint;
    int n_threads, started;
    pthread_t threads[MAX_THREADS];
    int stop_fd, notify_fd;
    atomic_int stopping, initialized;
    uint64_t started_ns;

    pthread_rwlock_t table_lock;
    layer_t **by_slot;
    size_t slot_cap, n_layers;

    digest_set verified;

    pthread_mutex_t q_mu; /* guards everything below */
    queued_t *queued;
    size_t n_queued, cap_queued;
    inflight_t *inflight;
    size_t n_inflight, cap_inflight;
    uint64_t next_token;
    lzfs_access *acc;
    size_t n_acc, cap_acc;
    int signalled;

    atomic_uint_fast64_t counters[LZC_N];
};

/* ------------------------------------------------------------------ small helpers */

static inline void count(lzfs *fs, int c) { atomic_fetch_add_explicit(&fs->counters[c], 1, memory_order_relaxed); }

static uint64_t now_ns(int clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void split_ns(int64_t ns, uint64_t *sec, uint32_t *nsec)
{
    int64_t s = ns / 1000000000;
    int64_t rem = ns % 1000000000;
    if (rem < 0) {
        rem += 1000000000;
        s -= 1;
    }
    *sec = (uint64_t)s;
    *nsec = (uint32_t)rem;
}

/* Replies.  A failed write means the connection is gone (unmounted or aborted): the
 * workers see that on their next read, so there is nothing to do here. */
static void reply_err(req_t req, int err) { (void)lzk_reply_err(req.fs->fd, req.unique, err); }
static void reply_buf(req_t req, const void *buf, size_t len)
{
    (void)lzk_reply(req.fs->fd, req.unique, 0, buf, len, NULL, 0);
}
static void reply_entry(req_t req, const struct fuse_entry_out *e) { reply_buf(req, e, sizeof *e); }

static void signal_python(lzfs *fs) /* q_mu held */
{
    if (!fs->signalled) {
        uint64_t one = 1;
        fs->signalled = 1;
        if (write(fs->notify_fd, &one, sizeof one) < 0) {
            /* eventfd counter cannot overflow at 1 per drain; nothing to do */
        }
    }
}

static int grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *p = realloc(*arr, n * elem);
    if (!p)
        return -ENOMEM;
    *arr = p;
    *cap = n;
    return 0;
}

/* ------------------------------------------------------------------ verified digests */

static size_t dhash(const uint8_t *d, size_t mask)
{
    uint64_t h;
    memcpy(&h, d, sizeof h); /* a SHA-256: already uniform */
    return (size_t)h & mask;
}

static int dset_resize(digest_set *s, size_t cap)
{
    uint8_t *keys = malloc(cap * 32), *state = calloc(cap, 1);
    if (!keys || !state) {
        free(keys);
        free(state);
        return -ENOMEM;
    }
    for (size_t i = 0; i < s->cap; i++) {
        if (s->state[i] != 1)
            continue;
        size_t j = dhash(s->keys + 32 * i, cap - 1);
        while (state[j])
            j = (j + 1) & (cap - 1);
        memcpy(keys + 32 * j, s->keys + 32 * i, 32);
        state[j] = 1;
    }
    free(s->keys);
    free(s->state);
    s->keys = keys;
    s->state = state;
    s->cap = cap;
    s->used = s->live;
    return 0;
}

static int dset_add(digest_set *s, const uint8_t *d) /* mu held */
{
    if ((s->used + 1) * 2 > s->cap) { /* at most half full, counting deleted slots */
        size_t cap = s->cap ? s->cap : 1024;
        while ((s->live + 1) * 4 > cap)
            cap *= 2;
        int r = dset_resize(s, cap);
        if (r)
            return r;
    }
    size_t mask = s->cap - 1, j = dhash(d, mask), tomb = (size_t)-1;
    while (s->state[j]) {
        if (s->state[j] == 1 && memcmp(s->keys + 32 * j, d, 32) == 0)
            return 0;
        if (s->state[j] == 2 && tomb == (size_t)-1)
            tomb = j;
        j = (j + 1) & mask;
    }
    if (tomb != (size_t)-1)
        j = tomb;
    else
        s->used++;
    memcpy(s->keys + 32 * j, d, 32);
    s->state[j] = 1;
    s->live++;
    return 0;
}

static int dset_find(const digest_set *s, const uint8_t *d) /* mu held; slot or -1 */
{
    if (!s->cap)
        return -1;
    size_t mask = s->cap - 1, j = dhash(d, mask);
    while (s->state[j]) {
        if (s->state[j] == 1 && memcmp(s->keys + 32 * j, d, 32) == 0)
            return (int)j;
        j = (j + 1) & mask;
    }
    return -1;
}

static int verified(lzfs *fs, const uint8_t *d)
{
    pthread_mutex_lock(&fs->verified.mu);
    int r = dset_find(&fs->verified, d) >= 0;
    pthread_mutex_unlock(&fs->verified.mu);
    return r;
}

int lzfs_mark_verified(lzfs *fs, const uint8_t *digests, size_t n)
{
    int r = 0;
    pthread_mutex_lock(&fs->verified.mu);
    for (size_t i = 0; i < n && !r; i++)
        r = dset_add(&fs->verified, digests + 32 * i);
    pthread_mutex_unlock(&fs->verified.mu);
    return r;
}

void lzfs_forget_verified(lzfs *fs, const uint8_t *digest)
{
    pthread_mutex_lock(&fs->verified.mu);
    int j = dset_find(&fs->verified, digest);
    if (j >= 0) {
        fs->verified.state[j] = 2;
        fs->verified.live--;
    }
    pthread_mutex_unlock(&fs->verified.mu);
}

/* ------------------------------------------------------------------ layers */

static void layer_free(layer_t *l)
{
    if (!l)
        return;
    free(l->name);
    free(l->blob);
    free(l->digests);
    free(l->chunks_dir);
    for (uint32_t i = 0; l->pt && i < l->n_nodes; i++)
        if (l->pt[i].backing_id > 0)
            close(l->pt[i].backing_fd);
    free(l->pt);
    pthread_mutex_destroy(&l->pt_mu);
    free(l);
}

static void close_backings(lzfs *fs, layer_t *l) /* no request uses l */
{
    for (uint32_t i = 0; l && l->pt && i < l->n_nodes; i++)
        if (l->pt[i].backing_id > 0)
            lzk_backing_close(fs->fd, l->pt[i].backing_id);
}

static int in_strings(const layer_t *l, uint32_t off, uint32_t len)
{
    return (uint64_t)off + len <= l->strings_len;
}

/* Every offset and index in the blob is checked once here, so the request paths can trust
 * them. */
static int layer_check(layer_t *l, const char **msg)
{
    for (uint32_t i = 1; i < l->n_nodes; i++) {
        const lzt_node *n = &l->nodes[i];
        if (n->parent == 0 || n->parent >= l->n_nodes || (uint64_t)n->child_start + n->child_count > l->n_children ||
            (uint64_t)n->xattr_start + n->xattr_count > l->n_xattrs || !in_strings(l, n->target_off, n->target_len)) {
            *msg = "layer tree: node out of range";
            return -EINVAL;
        }
        if (S_ISREG(n->mode) && !(n->flags & LZT_NODE_PYDATA) && n->chunk_count &&
            (n->first_chunk > l->n_chunks || n->chunk_count > l->n_chunks - n->first_chunk ||
             n->size > (uint64_t)n->chunk_count * l->chunk_size)) {
            *msg = "layer tree: file chunks out of range";
            return -EINVAL;
        }
    }
    for (uint32_t i = 0; i < l->n_children; i++) {
        const lzt_child *c = &l->children[i];
        if (c->child == 0 || c->child >= l->n_nodes || !in_strings(l, c->name_off, c->name_len) || c->name_len == 0 ||
            c->name_len > 4000) {
            *msg = "layer tree: child out of range";
            return -EINVAL;
        }
    }
    for (uint32_t i = 0; i < l->n_xattrs; i++) {
        const lzt_xattr *x = &l->xattrs[i];
        if (!in_strings(l, x->name_off, x->name_len) || !in_strings(l, x->value_off, x->value_len)) {
            *msg = "layer tree: xattr out of range";
            return -EINVAL;
        }
    }
    return 0;
}

int lzfs_add_layer(lzfs *fs, uint32_t slot, const char *name, size_t name_len, const void *tree,
                   size_t tree_len, const void *digests, uint64_t n_chunks, const char *chunks_dir,
                   uint64_t chunk_size, const char **msg)
{
    lzt_header h;
    *msg = "layer tree: bad header";
    if (slot == 0 || tree_len < sizeof h || name_len == 0 || name_len > 255 || memchr(name, '/', name_len) ||
        chunk_size == 0)
        return -EINVAL;
    memcpy(&h, tree, sizeof h);
    if (h.magic != LZT_MAGIC || h.version != 1 || h.n_nodes < 2)
        return -EINVAL;
    uint64_t need = sizeof h + (uint64_t)h.n_nodes * sizeof(lzt_node) + (uint64_t)h.n_children * sizeof(lzt_child) +
                    (uint64_t)h.n_xattrs * sizeof(lzt_xattr) + h.strings_len;
    if (need != tree_len) {
        *msg = "layer tree: size does not match its header";
        return -EINVAL;
    }
    layer_t *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    pthread_mutex_init(&l->pt_mu, NULL);
    if ((fs->flags & LZFS_PASSTHROUGH) && !(l->pt = calloc(h.n_nodes, sizeof *l->pt))) {
        layer_free(l);
        *msg = "out of memory";
        return -ENOMEM;
    }
    l->blob = malloc(tree_len);
    l->name = malloc(name_len + 1);
    l->digests = malloc(n_chunks ? n_chunks * 32 : 1);
    l->chunks_dir_len = strlen(chunks_dir);
    l->chunks_dir = strdup(chunks_dir);
    if (!l->blob || !l->name || !l->digests || !l->chunks_dir) {
        layer_free(l);
        *msg = "out of memory";
        return -ENOMEM;
    }
    memcpy(l->blob, tree, tree_len); /* malloc is 16-aligned; every record size is a multiple of 4 */
    memcpy(l->name, name, name_len);
    l->name[name_len] = 0;
    l->name_len = name_len;
    if (n_chunks)
        memcpy(l->digests, digests, n_chunks * 32);
    const char *p = (const char *)l->blob + sizeof h;
    l->nodes = (const lzt_node *)p;
    l->n_nodes = h.n_nodes;
    p += (size_t)h.n_nodes * sizeof(lzt_node);
    l->children = (const lzt_child *)p;
    l->n_children = h.n_children;
    p += (size_t)h.n_children * sizeof(lzt_child);
    l->xattrs = (const lzt_xattr *)p;
    l->n_xattrs = h.n_xattrs;
    p += (size_t)h.n_xattrs * sizeof(lzt_xattr);
    l->strings = p;
    l->strings_len = h.strings_len;
    l->n_chunks = n_chunks;
    l->chunk_size = chunk_size;
    l->slot = slot;
    int r = layer_check(l, msg);
    if (r) {
        layer_free(l);
        return r;
    }
    for (uint32_t i = 1; i < l->n_nodes; i++)
        if (S_ISREG(l->nodes[i].mode))
            l->total_size += l->nodes[i].size;
    pthread_rwlock_wrlock(&fs->table_lock);
    if (slot >= fs->slot_cap) {
        size_t cap = fs->slot_cap ? fs->slot_cap : 16;
        while (cap <= slot)
            cap *= 2;
        layer_t **t = realloc(fs->by_slot, cap * sizeof *t);
        if (!t) {
            pthread_rwlock_unlock(&fs->table_lock);
            layer_free(l);
            *msg = "out of memory";
            return -ENOMEM;
        }
        memset(t + fs->slot_cap, 0, (cap - fs->slot_cap) * sizeof *t);
        fs->by_slot = t;
        fs->slot_cap = cap;
    }
    if (fs->by_slot[slot]) {
        pthread_rwlock_unlock(&fs->table_lock);
        layer_free(l);
        *msg = "layer slot already in use";
        return -EEXIST;
    }
    fs->by_slot[slot] = l;
    fs->n_layers++;
    pthread_rwlock_unlock(&fs->table_lock);
    return 0;
}

int lzfs_remove_layer(lzfs *fs, uint32_t slot)
{
    layer_t *l = NULL;
    pthread_rwlock_wrlock(&fs->table_lock); /* waits for requests that use the layer */
    if (slot < fs->slot_cap) {
        l = fs->by_slot[slot];
        fs->by_slot[slot] = NULL;
        if (l)
            fs->n_layers--;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    close_backings(fs, l);
    layer_free(l);
    return l ? 0 : -ENOENT;
}

int lzfs_set_failed(lzfs *fs, uint32_t slot)
{
    int r = -ENOENT;
    pthread_rwlock_rdlock(&fs->table_lock);
    if (slot < fs->slot_cap && fs->by_slot[slot]) {
        atomic_store(&fs->by_slot[slot]->failed, 1);
        r = 0;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    return r;
}

int lzfs_inval_root_entry(lzfs *fs, const char *name, size_t name_len)
{
    return lzk_notify_inval_entry(fs->fd, FUSE_ROOT_ID, name, name_len);
}

/* ------------------------------------------------------------------ resolving inodes */

static layer_t *layer_of(lzfs *fs, uint64_t ino) /* table read lock held */
{
    uint64_t slot = (uint64_t)ino >> SLOT_SHIFT;
    return slot < fs->slot_cap ? fs->by_slot[slot] : NULL;
}

static const lzt_node *node_of(layer_t *l, uint64_t ino)
{
    uint64_t local = (uint64_t)ino & LOCAL_MASK;
    return local > 0 && local < l->n_nodes ? &l->nodes[local] : NULL;
}

/* The node of a layer inode with the table read-locked, or NULL (lock released). */
static const lzt_node *lock_node(lzfs *fs, uint64_t ino, layer_t **layer)
{
    pthread_rwlock_rdlock(&fs->table_lock);
    layer_t *l = ino == FUSE_ROOT_ID ? NULL : layer_of(fs, ino);
    const lzt_node *n = l ? node_of(l, ino) : NULL;
    if (!n)
        pthread_rwlock_unlock(&fs->table_lock);
    *layer = l;
    return n;
}

/* lock_node for an inode that must be of file type `kind`: answers the request itself
 * (ENOENT, or `wrong` for another type) and returns NULL when it is not. */
static const lzt_node *lock_kind(req_t req, lzfs *fs, uint64_t ino, mode_t kind, int wrong, layer_t **layer)
{
    const lzt_node *n = lock_node(fs, ino, layer);
    if (n && (n->mode & S_IFMT) == kind)
        return n;
    if (n)
        pthread_rwlock_unlock(&fs->table_lock);
    reply_err(req, n ? wrong : ENOENT);
    return NULL;
}

static void node_attr(struct fuse_attr *a, uint64_t ino, const lzt_node *n)
{
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->mode = n->mode;
    a->nlink = n->nlink;
    a->uid = n->uid;
    a->gid = n->gid;
    a->rdev = (uint32_t)n->rdev; /* the kernel's new_encode_dev form, as glibc's makedev for 32 bits */
    a->size = n->size;
    a->blksize = 4096;
    a->blocks = (n->size + 511) / 512;
    split_ns(n->mtime_ns, &a->mtime, &a->mtimensec);
    a->atime = a->ctime = a->mtime;
    a->atimensec = a->ctimensec = a->mtimensec;
}

static void root_attr(lzfs *fs, struct fuse_attr *a) /* table read lock held */
{
    memset(a, 0, sizeof *a);
    a->ino = FUSE_ROOT_ID;
    a->mode = S_IFDIR | 0755;
    a->nlink = 2 + (uint32_t)fs->n_layers;
    a->size = 4096;
    a->blksize = 4096;
    split_ns((int64_t)fs->started_ns, &a->mtime, &a->mtimensec);
    a->atime = a->ctime = a->mtime;
    a->atimensec = a->ctimensec = a->mtimensec;
}

static uint64_t ino_of(const layer_t *l, uint32_t local) { return ((uint64_t)l->slot << SLOT_SHIFT) | local; }

static void node_entry(struct fuse_entry_out *e, const layer_t *l, uint32_t local)
{
    memset(e, 0, sizeof *e);
    e->nodeid = ino_of(l, local);
    e->attr_valid = e->entry_valid = IMMUTABLE_TIMEOUT;
    node_attr(&e->attr, e->nodeid, &l->nodes[local]);
}

static void root_entry(lzfs *fs, struct fuse_entry_out *e) /* table read lock held */
{
    memset(e, 0, sizeof *e);
    e->nodeid = FUSE_ROOT_ID;
    e->attr_valid = e->entry_valid = ROOT_TIMEOUT;
    root_attr(fs, &e->attr);
}

static int name_cmp(const layer_t *l, const lzt_child *c, const char *name, size_t len)
{
    size_t m = c->name_len < len ? c->name_len : len;
    int r = memcmp(l->strings + c->name_off, name, m);
    if (r)
        return r;
    return c->name_len < len ? -1 : c->name_len > len ? 1 : 0;
}

/* children are sorted by name (bytewise, shorter first on a common prefix) */
static uint32_t child_lookup(const layer_t *l, const lzt_node *dir, const char *name)
{
    size_t len = strlen(name);
    uint32_t lo = dir->child_start, hi = dir->child_start + dir->child_count;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        int r = name_cmp(l, &l->children[mid], name, len);
        if (r == 0)
            return l->children[mid].child;
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static layer_t *layer_named(lzfs *fs, const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; i < fs->slot_cap; i++) {
        layer_t *l = fs->by_slot[i];
        if (l && l->name_len == len && memcmp(l->name, name, len) == 0)
            return l;
    }
    return NULL;
}

/* ------------------------------------------------------------------ metadata operations */

/* What we ask for at INIT, where the kernel offers it: reads in parallel and 1 MiB
 * requests (MAX_PAGES), lookups in one directory in parallel, READDIRPLUS (attributes with
 * the listing, so `ls -l` and overlayfs' copy-up checks cost no GETATTR each), and symlinks
 * cached (layers are immutable: readlink once). */
#define WANT_FLAGS                                                                                 \
    (FUSE_ASYNC_READ | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO | \
     FUSE_CACHE_SYMLINKS | FUSE_MAX_PAGES)
#define MAX_PAGES 256 /* 1 MiB reads */

static void op_init(lzfs *fs, const lzk_req *r)
{
    uint64_t agreed;
    uint32_t minor;
    uint64_t want = WANT_FLAGS | ((fs->flags & LZFS_PASSTHROUGH) ? FUSE_PASSTHROUGH : 0);
    if (lzk_reply_init(fs->fd, r, want, MAX_PAGES, &agreed, &minor) == 0 && minor) {
        atomic_store(&fs->passthrough, (agreed & FUSE_PASSTHROUGH) != 0);
        atomic_store(&fs->initialized, 1);
    }
}

static void op_lookup(req_t req, uint64_t parent, const char *name)
{
    lzfs *fs = req.fs;
    struct fuse_entry_out e;
    count(fs, LZC_LOOKUP);
    pthread_rwlock_rdlock(&fs->table_lock);
    if (parent == FUSE_ROOT_ID) {
        layer_t *l = layer_named(fs, name);
        if (l) {
            node_entry(&e, l, 1);
        } else {
            if (strcmp(name, "..") == 0 || strcmp(name, ".") == 0) {
                root_entry(fs, &e);
            } else {
                pthread_rwlock_unlock(&fs->table_lock);
                reply_err(req, ENOENT); /* not cached: layers come and go */
                return;
            }
        }
        pthread_rwlock_unlock(&fs->table_lock);
        reply_entry(req, &e);
        return;
    }
    layer_t *l = layer_of(fs, parent);
    const lzt_node *dir = l ? node_of(l, parent) : NULL;
    if (!dir) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_err(req, ENOENT);
        return;
    }
    if (!S_ISDIR(dir->mode)) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_err(req, ENOTDIR);
        return;
    }
    uint32_t local;
    if (strcmp(name, ".") == 0)
        local = (uint32_t)(parent & LOCAL_MASK);
    else if (strcmp(name, "..") == 0)
        local = (parent & LOCAL_MASK) == 1 ? 0 : dir->parent;
    else
        local = child_lookup(l, dir, name);
    if (local) {
        node_entry(&e, l, local);
    } else if (strcmp(name, "..") == 0) {
        root_entry(fs, &e);
    } else {
        /* inode 0 + a timeout: the kernel caches the negative entry.  Python's import probes
         * thousands of absent names, and overlayfs asks every lower layer for each. */
        memset(&e, 0, sizeof e);
        e.entry_valid = IMMUTABLE_TIMEOUT;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_entry(req, &e);
}

static void op_getattr(req_t req, uint64_t ino)
{
    lzfs *fs = req.fs;
    struct fuse_attr_out out;
    memset(&out, 0, sizeof out);
    count(fs, LZC_GETATTR);
    if (ino == FUSE_ROOT_ID) {
        pthread_rwlock_rdlock(&fs->table_lock);
        root_attr(fs, &out.attr);
        out.attr_valid = ROOT_TIMEOUT;
    } else {
        layer_t *l;
        const lzt_node *n = lock_node(fs, ino, &l);
        if (!n) {
            reply_err(req, ENOENT);
            return;
        }
        node_attr(&out.attr, ino, n);
        out.attr_valid = IMMUTABLE_TIMEOUT;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_buf(req, &out, sizeof out);
}

static void op_readlink(req_t req, uint64_t ino)
{
    lzfs *fs = req.fs;
    count(fs, LZC_READLINK);
    layer_t *l;
    const lzt_node *n = lock_kind(req, fs, ino, S_IFLNK, EINVAL, &l);
    if (!n)
        return;
    size_t len = n->target_len;
    char *target = malloc(len ? len : 1);
    if (target)
        memcpy(target, l->strings + n->target_off, len);
    pthread_rwlock_unlock(&fs->table_lock);
    if (!target) {
        reply_err(req, ENOMEM);
        return;
    }
    reply_buf(req, target, len);
    free(target);
}

static void reply_open(req_t req, uint64_t fh, uint32_t open_flags)
{
    struct fuse_open_out out = {.fh = fh, .open_flags = open_flags};
    reply_buf(req, &out, sizeof out);
}

static void op_opendir(req_t req, uint64_t ino)
{
    lzfs *fs = req.fs;
    uint32_t flags = 0;
    count(fs, LZC_OPENDIR);
    if (ino != FUSE_ROOT_ID) {
        layer_t *l;
        if (!lock_kind(req, fs, ino, S_IFDIR, ENOTDIR, &l))
            return;
        pthread_rwlock_unlock(&fs->table_lock);
        flags = FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE; /* the kernel keeps the listing: it never changes */
    }
    reply_open(req, ino, flags);
}

static int layer_name_cmp(const void *a, const void *b)
{
    const layer_t *x = *(layer_t *const *)a, *y = *(layer_t *const *)b;
    return strcmp(x->name, y->name);
}

static void do_readdir(req_t req, uint64_t ino, size_t size, uint64_t off, int plus)
{
    lzfs *fs = req.fs;
    count(fs, LZC_READDIR);
    if (size > (1u << 20))
        size = 1u << 20;
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        reply_err(req, ENOMEM);
        return;
    }
    size_t pos = 0;
    struct fuse_entry_out e;
    pthread_rwlock_rdlock(&fs->table_lock);
    if (ino == FUSE_ROOT_ID) {
        layer_t **sorted = malloc((fs->n_layers ? fs->n_layers : 1) * sizeof *sorted);
        size_t n = 0;
        if (!sorted) {
            pthread_rwlock_unlock(&fs->table_lock);
            free(buf);
            reply_err(req, ENOMEM);
            return;
        }
        for (size_t i = 0; i < fs->slot_cap; i++)
            if (fs->by_slot[i])
                sorted[n++] = fs->by_slot[i];
        qsort(sorted, n, sizeof *sorted, layer_name_cmp);
        for (size_t i = (size_t)off; i < n; i++) {
            const char *name = sorted[i]->name;
            size_t len = sorted[i]->name_len;
            node_entry(&e, sorted[i], 1);
            size_t need = plus ? lzk_add_direntplus(buf + pos, size - pos, name, len, &e, i + 1)
                               : lzk_add_dirent(buf + pos, size - pos, name, len, e.nodeid, e.attr.mode, i + 1);
            if (need > size - pos)
                break;
            pos += need;
        }
        free(sorted);
    } else {
        layer_t *l = layer_of(fs, ino);
        const lzt_node *dir = l ? node_of(l, ino) : NULL;
        if (!dir || !S_ISDIR(dir->mode)) {
            pthread_rwlock_unlock(&fs->table_lock);
            free(buf);
            reply_err(req, dir ? ENOTDIR : ENOENT);
            return;
        }
        for (uint64_t i = off; i < dir->child_count; i++) {
            const lzt_child *c = &l->children[dir->child_start + i];
            const char *name = l->strings + c->name_off; /* in bounds: checked at add */
            node_entry(&e, l, c->child);
            size_t need = plus ? lzk_add_direntplus(buf + pos, size - pos, name, c->name_len, &e, i + 1)
                               : lzk_add_dirent(buf + pos, size - pos, name, c->name_len, e.nodeid, e.attr.mode, i + 1);
            if (need > size - pos)
                break;
            pos += need;
        }
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_buf(req, buf, pos);
    free(buf);
}

static void op_statfs(req_t req)
{
    lzfs *fs = req.fs;
    struct fuse_statfs_out out;
    uint64_t total = 0, files = 1;
    count(fs, LZC_STATFS);
    pthread_rwlock_rdlock(&fs->table_lock);
    for (size_t i = 0; i < fs->slot_cap; i++) {
        layer_t *l = fs->by_slot[i];
        if (l) {
            total += l->total_size;
            files += l->n_nodes - 1;
        }
    }
    pthread_rwlock_unlock(&fs->table_lock);
    memset(&out, 0, sizeof out);
    out.st.bsize = out.st.frsize = 4096;
    out.st.blocks = (total + 4095) / 4096;
    out.st.files = files;
    out.st.namelen = 255;
    reply_buf(req, &out, sizeof out);
}

static void reply_xattr_size(req_t req, size_t size)
{
    struct fuse_getxattr_out out = {.size = (uint32_t)size};
    reply_buf(req, &out, sizeof out);
}

static void op_getxattr(req_t req, uint64_t ino, const char *name, size_t size)
{
    lzfs *fs = req.fs;
    count(fs, LZC_GETXATTR);
    layer_t *l;
    const lzt_node *n = lock_node(fs, ino, &l);
    if (!n) {
        reply_err(req, ino == FUSE_ROOT_ID ? ENODATA : ENOENT);
        return;
    }
    size_t len = strlen(name);
    for (uint32_t i = 0; i < n->xattr_count; i++) {
        const lzt_xattr *x = &l->xattrs[n->xattr_start + i];
        if (x->name_len != len || memcmp(l->strings + x->name_off, name, len) != 0)
            continue;
        uint32_t vlen = x->value_len;
        if (size == 0) {
            pthread_rwlock_unlock(&fs->table_lock);
            reply_xattr_size(req, vlen);
        } else if (size < vlen) {
            pthread_rwlock_unlock(&fs->table_lock);
            reply_err(req, ERANGE);
        } else {
            char *v = malloc(vlen ? vlen : 1);
            if (v)
                memcpy(v, l->strings + x->value_off, vlen);
            pthread_rwlock_unlock(&fs->table_lock);
            if (v)
                reply_buf(req, v, vlen);
            else
                reply_err(req, ENOMEM);
            free(v);
        }
        return;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_err(req, ENODATA);
}

static void op_listxattr(req_t req, uint64_t ino, size_t size)
{
    lzfs *fs = req.fs;
    count(fs, LZC_LISTXATTR);
    if (ino == FUSE_ROOT_ID) {
        if (size == 0)
            reply_xattr_size(req, 0);
        else
            reply_buf(req, NULL, 0);
        return;
    }
    layer_t *l;
    const lzt_node *n = lock_node(fs, ino, &l);
    if (!n) {
        reply_err(req, ENOENT);
        return;
    }
    size_t need = 0;
    for (uint32_t i = 0; i < n->xattr_count; i++)
        need += l->xattrs[n->xattr_start + i].name_len + 1;
    if (size == 0) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_xattr_size(req, need);
        return;
    }
    if (size < need) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_err(req, ERANGE);
        return;
    }
    char *buf = malloc(need ? need : 1);
    if (!buf) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_err(req, ENOMEM);
        return;
    }
    size_t pos = 0;
    for (uint32_t i = 0; i < n->xattr_count; i++) {
        const lzt_xattr *x = &l->xattrs[n->xattr_start + i];
        memcpy(buf + pos, l->strings + x->name_off, x->name_len);
        pos += x->name_len;
        buf[pos++] = 0;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_buf(req, buf, pos);
    free(buf);
}

/* ------------------------------------------------------------------ data */

static void op_open(req_t req, uint64_t ino, uint32_t flags)
{
    lzfs *fs = req.fs;
    count(fs, LZC_OPEN);
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_TRUNC | O_APPEND))) {
        reply_err(req, EROFS);
        return;
    }
    layer_t *l;
    if (!lock_kind(req, fs, ino, S_IFREG, EINVAL, &l))
        return;
    if (l->pt) {
        if (atomic_load(&l->failed)) {
            /* quarantined: its reads fail, and a backing file must not serve them instead
             * (files already open keep the backing the kernel gave them) */
            pthread_rwlock_unlock(&fs->table_lock);
            reply_err(req, EIO);
            return;
        }
        pt_node *p = &l->pt[ino & LOCAL_MASK];
        pthread_mutex_lock(&l->pt_mu);
        int through = p->passthrough_opens > 0 || (p->backing_id > 0 && p->cached_opens == 0);
        if (through)
            p->passthrough_opens++;
        else
            p->cached_opens++;
        struct lzk_open_out out = {.fh = ino | (through ? PT_FH : 0),
                                   .open_flags = through ? FOPEN_PASSTHROUGH : FOPEN_KEEP_CACHE,
                                   .backing_id = through ? p->backing_id : 0};
        pthread_mutex_unlock(&l->pt_mu);
        pthread_rwlock_unlock(&fs->table_lock);
        if (through)
            count(fs, LZC_OPEN_PASSTHROUGH);
        reply_buf(req, &out, sizeof out);
        return;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    reply_open(req, ino, FOPEN_KEEP_CACHE); /* page cache survives close/open: the file never changes */
}

static void op_release(req_t req, uint64_t ino, uint64_t fh)
{
    lzfs *fs = req.fs;
    if (!(fs->flags & LZFS_PASSTHROUGH)) { /* nothing counted: no lock on this path */
        reply_err(req, 0);
        return;
    }
    layer_t *l;
    const lzt_node *n = lock_node(fs, ino, &l);
    if (n && l->pt) {
        pt_node *p = &l->pt[ino & LOCAL_MASK];
        pthread_mutex_lock(&l->pt_mu);
        uint32_t *opens = (fh & PT_FH) ? &p->passthrough_opens : &p->cached_opens;
        if (*opens > 0)
            (*opens)--;
        pthread_mutex_unlock(&l->pt_mu);
    }
    if (n)
        pthread_rwlock_unlock(&fs->table_lock);
    reply_err(req, 0);
}

int lzfs_passthrough(lzfs *fs) { return atomic_load(&fs->passthrough); }

int lzfs_set_backing(lzfs *fs, uint32_t slot, uint32_t local, const char *path, const char **msg)
{
    if (!atomic_load(&fs->passthrough)) {
        *msg = "the kernel did not agree to FUSE passthrough for this session";
        return -ENOTSUP;
    }
    int bfd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (bfd < 0) {
        *msg = "cannot open the backing file";
        return -errno;
    }
    struct stat st;
    int r = fstat(bfd, &st) ? -errno : 0;
    pthread_rwlock_rdlock(&fs->table_lock);
    layer_t *l = slot < fs->slot_cap ? fs->by_slot[slot] : NULL;
    const lzt_node *n = l && local > 0 && local < l->n_nodes ? &l->nodes[local] : NULL;
    if (r) {
        *msg = "cannot stat the backing file";
    } else if (!n || !l->pt || !S_ISREG(n->mode) || (n->flags & LZT_NODE_PYDATA)) {
        *msg = "no such regular file in a registered layer";
        r = -ENOENT;
    } else if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != n->size) {
        *msg = "the backing file's size differs from the file's";
        r = -EINVAL;
    } else {
        pt_node *p = &l->pt[local];
        pthread_mutex_lock(&l->pt_mu);
        if (p->backing_id > 0) {
            r = 0; /* registered already (and maybe in use: never swapped under open files) */
        } else {
            int id = lzk_backing_open(fs->fd, bfd);
            if (id > 0) {
                p->backing_id = id;
                p->backing_fd = bfd; /* the store may drop the file's chunk files now */
                bfd = -1;
                count(fs, LZC_BACKING_FILES);
            } else {
                *msg = "the kernel refused the backing file (FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN "
                       "and a file on a filesystem that stacks on nothing)";
                r = id < 0 ? id : -EIO;
            }
        }
        pthread_mutex_unlock(&l->pt_mu);
    }
    pthread_rwlock_unlock(&fs->table_lock);
    if (bfd >= 0)
        close(bfd);
    return r;
}

int lzfs_set_layer_file(lzfs *fs, uint32_t slot, const char *path, const void *offsets, uint64_t n,
                        const char **msg)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        *msg = "cannot open the layer file";
        return -errno;
    }
    uint64_t *copy = malloc(n ? n * sizeof *copy : 1);
    if (!copy) {
        close(fd);
        *msg = "out of memory";
        return -ENOMEM;
    }
    if (n)
        memcpy(copy, offsets, n * sizeof *copy);
    int r = 0;
    pthread_rwlock_wrlock(&fs->table_lock); /* no read is using the old one */
    layer_t *l = slot < fs->slot_cap ? fs->by_slot[slot] : NULL;
    if (!l) {
        *msg = "no layer in that slot";
        r = -ENOENT;
    } else if (n != l->n_chunks) {
        *msg = "the layer file's table does not have one offset per chunk of the layer";
        r = -EINVAL;
    } else {
        uint64_t *old_off = l->file_off;
        int old_fd = l->file_fd;
        l->file_off = copy;
        l->file_fd = fd;
        copy = NULL;
        fd = -1;
        if (old_off) {
            free(old_off);
            close(old_fd);
        }
    }
    pthread_rwlock_unlock(&fs->table_lock);
    free(copy);
    if (fd >= 0)
        close(fd);
    return r;
}

static uint64_t file_offset(const layer_t *l, uint64_t chunk) /* table read lock held */
{
    return l->file_off ? l->file_off[chunk] : LZFS_NOT_IN_FILE;
}

static void chunk_path(const layer_t *l, uint64_t chunk, char *out)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *d = l->digests + 32 * chunk;
    memcpy(out, l->chunks_dir, l->chunks_dir_len);
    char *p = out + l->chunks_dir_len;
    *p++ = '/';
    for (int i = 0; i < 32; i++) {
        *p++ = hex[d[i] >> 4];
        *p++ = hex[d[i] & 15];
        if (i == 0)
            *p++ = '/';
    }
    *p = 0;
}

static int pread_all(int fd, char *dst, size_t n, uint64_t off) /* 0, or -EIO on error or a short file */
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, dst + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    return got == n ? 0 : -EIO;
}

static int read_chunk(const layer_t *l, uint64_t chunk, uint64_t lo, size_t n, char *dst)
{
    uint64_t at = file_offset(l, chunk);
    if (at != LZFS_NOT_IN_FILE)
        return pread_all(l->file_fd, dst, n, at + lo);
    char path[4200];
    if (l->chunks_dir_len > 4000)
        return -ENAMETOOLONG;
    chunk_path(l, chunk, path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int r = pread_all(fd, dst, n, lo);
    close(fd);
    return r;
}

static void hint_chunk(const layer_t *l, uint64_t chunk)
{
    uint64_t at = file_offset(l, chunk);
    if (at != LZFS_NOT_IN_FILE) {
        posix_fadvise(l->file_fd, (off_t)at, (off_t)l->chunk_size, POSIX_FADV_WILLNEED);
        return;
    }
    char path[4200];
    if (l->chunks_dir_len > 4000)
        return;
    chunk_path(l, chunk, path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
        close(fd);
    }
}

/* A chunk C may read: in the layer file, or verified on disk as a chunk file. */
static int chunk_local(lzfs *fs, const layer_t *l, uint64_t chunk)
{
    return file_offset(l, chunk) != LZFS_NOT_IN_FILE || verified(fs, l->digests + 32 * chunk);
}

static void forward(lzfs *fs, req_t req, uint64_t ino, uint64_t off, size_t size)
{
    count(fs, LZC_READ_FORWARDED);
    pthread_mutex_lock(&fs->q_mu);
    if (grow((void **)&fs->queued, &fs->cap_queued, fs->n_queued + 1, sizeof *fs->queued)) {
        pthread_mutex_unlock(&fs->q_mu);
        reply_err(req, ENOMEM);
        return;
    }
    fs->queued[fs->n_queued++] = (queued_t){{++fs->next_token, ino, off, (uint32_t)size}, req.unique};
    signal_python(fs);
    pthread_mutex_unlock(&fs->q_mu);
}

static void record_access(lzfs *fs, uint64_t ino, uint64_t off, size_t size)
{
    uint64_t t = now_ns(CLOCK_MONOTONIC);
    pthread_mutex_lock(&fs->q_mu);
    if (fs->n_acc >= ACCESS_LIMIT ||
        grow((void **)&fs->acc, &fs->cap_acc, fs->n_acc + 1, sizeof *fs->acc)) {
        pthread_mutex_unlock(&fs->q_mu);
        count(fs, LZC_ACCESS_DROPPED);
        return;
    }
    fs->acc[fs->n_acc++] = (lzfs_access){.ino = ino, .off = off, .t_ns = t, .size = (uint32_t)size};
    signal_python(fs);
    pthread_mutex_unlock(&fs->q_mu);
}

static int backing_fd(layer_t *l, uint64_t ino) /* table read lock held */
{
    if (!l->pt)
        return -1;
    pt_node *p = &l->pt[ino & LOCAL_MASK];
    pthread_mutex_lock(&l->pt_mu);
    int fd = p->backing_id > 0 ? p->backing_fd : -1;
    pthread_mutex_unlock(&l->pt_mu);
    return fd;
}

/* A file with a backing file, opened through us (before its backing came, or while an
 * earlier open through us was outstanding): its bytes come from the backing file, checked
 * whole when it was made, whose chunks the store may have dropped.  Table read lock held:
 * the fd lives as long as the layer. */
static void read_backed(req_t req, int bfd, uint64_t ino, uint64_t off, size_t len)
{
    lzfs *fs = req.fs;
    char *buf = malloc(len);
    int err = !buf ? ENOMEM : pread_all(bfd, buf, len, off) ? EIO : 0;
    pthread_rwlock_unlock(&fs->table_lock);
    if (err) {
        free(buf);
        reply_err(req, err);
        return;
    }
    count(fs, LZC_READ_LOCAL);
    record_access(fs, ino, off, len);
    reply_buf(req, buf, len);
    free(buf);
}

static void op_read(req_t req, uint64_t ino, size_t size, uint64_t off)
{
    lzfs *fs = req.fs;
    count(fs, LZC_READ);
    layer_t *l;
    const lzt_node *n = lock_kind(req, fs, ino, S_IFREG, EINVAL, &l);
    if (!n)
        return;
    if (atomic_load(&l->failed))
        goto to_python; /* Python answers EIO and logs the quarantine reason */
    if (off >= n->size || size == 0) {
        pthread_rwlock_unlock(&fs->table_lock);
        reply_buf(req, NULL, 0);
        return;
    }
    size_t len = size < n->size - off ? size : (size_t)(n->size - off);
    int bfd = backing_fd(l, ino);
    if (bfd >= 0) {
        read_backed(req, bfd, ino, off, len);
        return;
    }
    uint64_t cs = l->chunk_size, first = off / cs, last = (off + len - 1) / cs;
    if ((n->flags & LZT_NODE_PYDATA) || last >= n->chunk_count)
        goto to_python;
    for (uint64_t k = first; k <= last; k++)
        if (!chunk_local(fs, l, n->first_chunk + k))
            goto to_python;
    char *buf = malloc(len);
    if (!buf)
        goto to_python;
    uint64_t pos = off, end = off + len;
    for (uint64_t k = first; k <= last; k++) {
        uint64_t c_lo = k * cs, c_end = c_lo + cs < end ? c_lo + cs : end;
        if (read_chunk(l, n->first_chunk + k, pos - c_lo, (size_t)(c_end - pos), buf + (pos - off))) {
            /* evicted or damaged since it was verified: Python re-checks and refetches */
            if (file_offset(l, n->first_chunk + k) == LZFS_NOT_IN_FILE)
                lzfs_forget_verified(fs, l->digests + 32 * (n->first_chunk + k));
            free(buf);
            goto to_python;
        }
        pos = c_end;
    }
    if ((off + len - 1) % cs >= cs / 2) {
        /* past the middle of a chunk: let the kernel read the next chunk files ahead */
        for (uint64_t k = last + 1; k <= last + READAHEAD_CHUNKS && k < n->chunk_count; k++)
            if (chunk_local(fs, l, n->first_chunk + k))
                hint_chunk(l, n->first_chunk + k);
    }
    atomic_fetch_add_explicit(&fs->counters[LZC_CHUNK_HITS], last - first + 1, memory_order_relaxed);
    pthread_rwlock_unlock(&fs->table_lock);
    count(fs, LZC_READ_LOCAL);
    record_access(fs, ino, off, len);
    reply_buf(req, buf, len);
    free(buf);
    return;
to_python:
    pthread_rwlock_unlock(&fs->table_lock);
    forward(fs, req, ino, off, size);
}

/* ------------------------------------------------------------------ Python's side of misses */

int lzfs_take(lzfs *fs, lzfs_miss **misses, size_t *n_misses, lzfs_access **acc, size_t *n_acc)
{
    uint64_t drain;
    if (read(fs->notify_fd, &drain, sizeof drain) < 0) {
        /* EAGAIN: nothing signalled; the queues are still checked below */
    }
    pthread_mutex_lock(&fs->q_mu);
    fs->signalled = 0;
    *misses = NULL;
    *n_misses = 0;
    if (fs->n_queued) {
        if (grow((void **)&fs->inflight, &fs->cap_inflight, fs->n_inflight + fs->n_queued, sizeof *fs->inflight)) {
            pthread_mutex_unlock(&fs->q_mu);
            return -ENOMEM;
        }
        lzfs_miss *out = malloc(fs->n_queued * sizeof *out);
        if (!out) {
            pthread_mutex_unlock(&fs->q_mu);
            return -ENOMEM;
        }
        for (size_t i = 0; i < fs->n_queued; i++) {
            out[i] = fs->queued[i].miss;
            fs->inflight[fs->n_inflight++] = (inflight_t){fs->queued[i].miss.token, fs->queued[i].unique};
        }
        *misses = out;
        *n_misses = fs->n_queued;
        fs->n_queued = 0;
    }
    *acc = fs->acc;
    *n_acc = fs->n_acc;
    fs->acc = NULL;
    fs->n_acc = fs->cap_acc = 0;
    pthread_mutex_unlock(&fs->q_mu);
    return 0;
}

/* The request a token stands for, taken out of the in-flight set (unique 0: none; the
 * kernel never uses 0 for a request). */
static req_t claim(lzfs *fs, uint64_t token)
{
    req_t req = {fs, 0};
    pthread_mutex_lock(&fs->q_mu);
    for (size_t i = 0; i < fs->n_inflight; i++) {
        if (fs->inflight[i].token == token) {
            req.unique = fs->inflight[i].unique;
            fs->inflight[i] = fs->inflight[--fs->n_inflight];
            break;
        }
    }
    pthread_mutex_unlock(&fs->q_mu);
    return req;
}

int lzfs_reply_data(lzfs *fs, uint64_t token, const void *data, size_t len)
{
    req_t req = claim(fs, token);
    if (!req.unique)
        return -ENOENT;
    reply_buf(req, data, len);
    return 0;
}

int lzfs_reply_error(lzfs *fs, uint64_t token, int err)
{
    req_t req = claim(fs, token);
    if (!req.unique)
        return -ENOENT;
    reply_err(req, err > 0 ? err : EIO);
    return 0;
}

uint64_t lzfs_unique(lzfs *fs, uint64_t token)
{
    uint64_t unique = 0;
    pthread_mutex_lock(&fs->q_mu);
    for (size_t i = 0; i < fs->n_inflight; i++) {
        if (fs->inflight[i].token == token) {
            unique = fs->inflight[i].unique;
            break;
        }
    }
    pthread_mutex_unlock(&fs->q_mu);
    return unique;
}

int lzfs_forget(lzfs *fs, uint64_t token) { return claim(fs, token).unique ? 0 : -ENOENT; }

void lzfs_counters(lzfs *fs, uint64_t out[LZC_N])
{
    for (int i = 0; i < LZC_N; i++)
        out[i] = atomic_load_explicit(&fs->counters[i], memory_order_relaxed);
}

/* ------------------------------------------------------------------ session */

/* One request, answered here or queued for Python.  FORGET/BATCH_FORGET need no reply
 * (inodes live as long as their layer is registered); INTERRUPT is not acted on (a
 * forwarded read is answered or failed within the fetch deadline anyway); opcodes we do
 * not implement get ENOSYS, which the kernel remembers (FLUSH, ACCESS, STATX, ...). */
static void dispatch(lzfs *fs, const lzk_req *r)
{
    req_t req = {fs, r->h->unique};
    uint64_t ino = r->h->nodeid;
    if (r->h->unique & LZK_UNIQUE_RESEND)
        count(fs, LZC_RESENT);
    const struct fuse_read_in *rd = r->arg;
    const struct fuse_getxattr_in *gx = r->arg;
    switch (r->h->opcode) {
    case FUSE_INIT:
        op_init(fs, r);
        break;
    case FUSE_LOOKUP:
        op_lookup(req, ino, lzk_name(r));
        break;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
        break;
    case FUSE_GETATTR:
        op_getattr(req, ino);
        break;
    case FUSE_READLINK:
        op_readlink(req, ino);
        break;
    case FUSE_OPEN:
        op_open(req, ino, ((const struct fuse_open_in *)r->arg)->flags);
        break;
    case FUSE_OPENDIR:
        op_opendir(req, ino);
        break;
    case FUSE_READ:
        op_read(req, ino, rd->size, rd->offset);
        break;
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        do_readdir(req, ino, rd->size, rd->offset, r->h->opcode == FUSE_READDIRPLUS);
        break;
    case FUSE_RELEASE:
        op_release(req, ino, ((const struct fuse_release_in *)r->arg)->fh);
        break;
    case FUSE_RELEASEDIR:
    case FUSE_DESTROY:
        reply_err(req, 0);
        break;
    case FUSE_STATFS:
        op_statfs(req);
        break;
    case FUSE_GETXATTR:
        op_getxattr(req, ino, lzk_name(r), gx->size);
        break;
    case FUSE_LISTXATTR:
        op_listxattr(req, ino, gx->size);
        break;
    default:
        reply_err(req, ENOSYS);
    }
}

int lzfs_new(lzfs **out, const char *mountpoint, const char *options, int threads, int fuse_fd, unsigned flags,
             const char **msg)
{
    *out = NULL;
    if (threads < 1 || threads > MAX_THREADS) {
        *msg = "threads must be 1..16";
        return -EINVAL;
    }
    lzfs *fs = calloc(1, sizeof *fs);
    if (!fs) {
        *msg = "out of memory";
        return -ENOMEM;
    }
    fs->n_threads = threads;
    /* a session taken over: what the last server counted of open files is lost, and a
     * wrong count makes the kernel fail an open (ETXTBSY), so no passthrough on it */
    fs->flags = fuse_fd < 0 ? flags : flags & ~LZFS_PASSTHROUGH;
    fs->fd = fs->stop_fd = fs->notify_fd = -1;
    fs->started_ns = now_ns(CLOCK_REALTIME);
    /* writers first: a steady stream of overlapping requests must not starve remove_layer
     * (no request takes the read lock twice, so this cannot deadlock) */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&fs->table_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    pthread_mutex_init(&fs->verified.mu, NULL);
    pthread_mutex_init(&fs->q_mu, NULL);
    fs->mountpoint = strdup(mountpoint);
    fs->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fs->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!fs->mountpoint || fs->stop_fd < 0 || fs->notify_fd < 0) {
        *msg = "cannot allocate the session";
        lzfs_close(fs, 0);
        if (fuse_fd >= 0)
            close(fuse_fd);
        return -ENOMEM;
    }
    int fd = fuse_fd;
    if (fd < 0) {
        fd = lzk_mount(mountpoint, options, msg);
        if (fd < 0) {
            lzfs_close(fs, 0);
            return fd;
        }
    } else {
        atomic_store(&fs->initialized, 1); /* the previous server answered INIT */
    }
    fs->fd = fd;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    *out = fs;
    return 0;
}

static void *worker(void *arg)
{
    lzfs *fs = arg;
    char *buf = malloc(LZK_BUFSIZE);
    if (!buf)
        return NULL; /* the other workers serve; with none, requests wait until close */
    struct pollfd pfd[2] = {{.fd = fs->fd, .events = POLLIN}, {.fd = fs->stop_fd, .events = POLLIN}};
    while (!atomic_load(&fs->stopping)) {
        int r = poll(pfd, 2, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd[1].revents)
            break;
        if (!(pfd[0].revents & POLLIN))
            break; /* POLLERR/POLLHUP: the connection was aborted or unmounted */
        ssize_t n = read(fs->fd, buf, LZK_BUFSIZE);
        if (n < 0) {
            /* EAGAIN: another worker took it; ENOENT: interrupted before we read it */
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            break; /* ENODEV: unmounted */
        }
        lzk_req req;
        const char *msg;
        if (lzk_parse(buf, (size_t)n, &req, &msg) == 0)
            dispatch(fs, &req);
        else if ((size_t)n >= sizeof(struct fuse_in_header))
            lzk_reply_err(fs->fd, ((const struct fuse_in_header *)buf)->unique, EIO);
    }
    free(buf);
    return NULL;
}

int lzfs_start(lzfs *fs)
{
    if (fs->started)
        return -EALREADY;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* workers inherit it: signals go to Python's thread */
    int r = 0;
    for (int i = 0; i < fs->n_threads; i++) {
        if (pthread_create(&fs->threads[i], NULL, worker, fs) != 0) {
            r = -EAGAIN;
            break;
        }
        fs->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return r;
}

int lzfs_initialized(lzfs *fs) { return atomic_load(&fs->initialized); }
int lzfs_notify_fd(lzfs *fs) { return fs->notify_fd; }
int lzfs_fuse_fd(lzfs *fs) { return fs->fd; }
int lzfs_resend(lzfs *fs) { return lzk_notify_resend(fs->fd); }

void lzfs_close(lzfs *fs, int unmount)
{
    if (!fs)
        return;
    atomic_store(&fs->stopping, 1);
    if (fs->stop_fd >= 0) {
        uint64_t one = 1;
        if (write(fs->stop_fd, &one, sizeof one) < 0) {
            /* the workers also leave on unmount */
        }
    }
    for (int i = 0; i < fs->started; i++)
        pthread_join(fs->threads[i], NULL);
    /* no worker runs now: fail what Python was still answering or never took */
    for (size_t i = 0; unmount && i < fs->n_queued; i++)
        lzk_reply_err(fs->fd, fs->queued[i].unique, EIO);
    for (size_t i = 0; unmount && i < fs->n_inflight; i++)
        lzk_reply_err(fs->fd, fs->inflight[i].unique, EIO);
    fs->n_queued = fs->n_inflight = 0;
    if (fs->fd >= 0 && !unmount) {
        for (size_t i = 0; i < fs->slot_cap; i++)
            close_backings(fs, fs->by_slot[i]); /* the connection lives on: the next server registers its own */
        close(fs->fd);
    } else if (fs->fd >= 0) {
        /* unmount only our own mount: if the connection is already gone (unmounted or
         * aborted by someone else), something else may be mounted there by now */
        struct pollfd p = {.fd = fs->fd, .events = 0};
        if (!(poll(&p, 1, 0) == 1 && (p.revents & POLLERR)))
            lzk_unmount(fs->mountpoint);
        close(fs->fd);
    }
    for (size_t i = 0; i < fs->slot_cap; i++)
        layer_free(fs->by_slot[i]);
    free(fs->by_slot);
    free(fs->verified.keys);
    free(fs->verified.state);
    free(fs->queued);
    free(fs->inflight);
    free(fs->acc);
    free(fs->mountpoint);
    if (fs->stop_fd >= 0)
        close(fs->stop_fd);
    if (fs->notify_fd >= 0)
        close(fs->notify_fd);
    pthread_rwlock_destroy(&fs->table_lock);
    pthread_mutex_destroy(&fs->verified.mu);
    pthread_mutex_destroy(&fs->q_mu);
    free(fs);
}
