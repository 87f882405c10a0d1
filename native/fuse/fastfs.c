/* FUSE low-level operations of the daemon's filesystem (see fastfs.h for why).
 *
 * Threads: `threads` C workers read /dev/fuse (non-blocking fd + poll, so close() can stop
 * them without relying on unmount semantics) and answer requests under a read lock of the
 * layer table; add/remove of a layer takes the write lock, so a layer is never freed under
 * a request.  Inode numbers: FUSE root = 1; layer slot s owns (s << 32) | local. */
#define FUSE_USE_VERSION 34
#include "fastfs.h"

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
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
#define IMMUTABLE_TIMEOUT 86400.0 /* layers never change while registered */
#define ROOT_TIMEOUT 1.0          /* the top directory changes as layers come and go */
#define MAX_THREADS 16
#define READAHEAD_CHUNKS 2
#define ACCESS_LIMIT (1u << 20)

const char *const lzfs_counter_names[LZC_N] = {
    "lookup", "getattr", "readlink", "opendir", "readdir", "statfs", "getxattr", "listxattr",
    "open", "read", "read_local", "read_forwarded", "chunk_hits", "access_dropped",
};

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
} layer_t;

typedef struct {
    uint8_t *keys;  /* cap * 32 */
    uint8_t *state; /* 0 empty, 1 live, 2 deleted */
    size_t cap, used, live;
    pthread_mutex_t mu;
} digest_set;

typedef struct {
    uint64_t token;
    fuse_req_t req;
} inflight_t;

typedef struct {
    lzfs_miss miss;
    fuse_req_t req;
} queued_t;

struct lzfs {
    struct fuse_session *se;
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

static void set_time(struct timespec *ts, int64_t ns)
{
    int64_t sec = ns / 1000000000;
    int64_t rem = ns % 1000000000;
    if (rem < 0) {
        rem += 1000000000;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

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
    free(l);
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
    return fuse_lowlevel_notify_inval_entry(fs->se, FUSE_ROOT_ID, name, name_len);
}

/* ------------------------------------------------------------------ resolving inodes */

static layer_t *layer_of(lzfs *fs, fuse_ino_t ino) /* table read lock held */
{
    uint64_t slot = (uint64_t)ino >> SLOT_SHIFT;
    return slot < fs->slot_cap ? fs->by_slot[slot] : NULL;
}

static const lzt_node *node_of(layer_t *l, fuse_ino_t ino)
{
    uint64_t local = (uint64_t)ino & LOCAL_MASK;
    return local > 0 && local < l->n_nodes ? &l->nodes[local] : NULL;
}

/* The node of a layer inode with the table read-locked, or NULL (lock released). */
static const lzt_node *lock_node(lzfs *fs, fuse_ino_t ino, layer_t **layer)
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
static const lzt_node *lock_kind(fuse_req_t req, lzfs *fs, fuse_ino_t ino, mode_t kind, int wrong, layer_t **layer)
{
    const lzt_node *n = lock_node(fs, ino, layer);
    if (n && (n->mode & S_IFMT) == kind)
        return n;
    if (n)
        pthread_rwlock_unlock(&fs->table_lock);
    fuse_reply_err(req, n ? wrong : ENOENT);
    return NULL;
}

static void node_stat(struct stat *st, fuse_ino_t ino, const lzt_node *n)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = n->mode;
    st->st_nlink = n->nlink;
    st->st_uid = n->uid;
    st->st_gid = n->gid;
    st->st_rdev = n->rdev;
    st->st_size = (off_t)n->size;
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)((n->size + 511) / 512);
    set_time(&st->st_atim, n->mtime_ns);
    set_time(&st->st_mtim, n->mtime_ns);
    set_time(&st->st_ctim, n->mtime_ns);
}

static void root_stat(lzfs *fs, struct stat *st) /* table read lock held */
{
    memset(st, 0, sizeof *st);
    st->st_ino = FUSE_ROOT_ID;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2 + fs->n_layers;
    st->st_size = 4096;
    st->st_blksize = 4096;
    set_time(&st->st_atim, (int64_t)fs->started_ns);
    st->st_mtim = st->st_ctim = st->st_atim;
}

static fuse_ino_t ino_of(const layer_t *l, uint32_t local) { return ((fuse_ino_t)l->slot << SLOT_SHIFT) | local; }

static void node_entry(struct fuse_entry_param *e, const layer_t *l, uint32_t local)
{
    memset(e, 0, sizeof *e);
    e->ino = ino_of(l, local);
    e->attr_timeout = e->entry_timeout = IMMUTABLE_TIMEOUT;
    node_stat(&e->attr, e->ino, &l->nodes[local]);
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

static void op_init(void *ud, struct fuse_conn_info *conn)
{
    lzfs *fs = ud;
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS; /* layers are immutable: readlink once */
    atomic_store(&fs->initialized, 1);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    lzfs *fs = fuse_req_userdata(req);
    struct fuse_entry_param e;
    count(fs, LZC_LOOKUP);
    pthread_rwlock_rdlock(&fs->table_lock);
    if (parent == FUSE_ROOT_ID) {
        layer_t *l = layer_named(fs, name);
        if (l) {
            node_entry(&e, l, 1);
        } else {
            memset(&e, 0, sizeof e);
            if (strcmp(name, "..") == 0 || strcmp(name, ".") == 0) {
                e.ino = FUSE_ROOT_ID;
                root_stat(fs, &e.attr);
                e.attr_timeout = e.entry_timeout = ROOT_TIMEOUT;
            } else {
                pthread_rwlock_unlock(&fs->table_lock);
                fuse_reply_err(req, ENOENT); /* not cached: layers come and go */
                return;
            }
        }
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_entry(req, &e);
        return;
    }
    layer_t *l = layer_of(fs, parent);
    const lzt_node *dir = l ? node_of(l, parent) : NULL;
    if (!dir) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (!S_ISDIR(dir->mode)) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_err(req, ENOTDIR);
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
        memset(&e, 0, sizeof e);
        e.ino = FUSE_ROOT_ID;
        root_stat(fs, &e.attr);
        e.attr_timeout = e.entry_timeout = ROOT_TIMEOUT;
    } else {
        /* inode 0 + a timeout: the kernel caches the negative entry.  Python's import probes
         * thousands of absent names, and overlayfs asks every lower layer for each. */
        memset(&e, 0, sizeof e);
        e.entry_timeout = IMMUTABLE_TIMEOUT;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    fuse_reply_entry(req, &e);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    fuse_reply_none(req); /* inodes live as long as their layer is registered */
}

static void op_forget_multi(fuse_req_t req, size_t count_, struct fuse_forget_data *forgets)
{
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    lzfs *fs = fuse_req_userdata(req);
    struct stat st;
    double timeout = IMMUTABLE_TIMEOUT;
    count(fs, LZC_GETATTR);
    if (ino == FUSE_ROOT_ID) {
        pthread_rwlock_rdlock(&fs->table_lock);
        root_stat(fs, &st);
        timeout = ROOT_TIMEOUT;
    } else {
        layer_t *l;
        const lzt_node *n = lock_node(fs, ino, &l);
        if (!n) {
            fuse_reply_err(req, ENOENT);
            return;
        }
        node_stat(&st, ino, n);
    }
    pthread_rwlock_unlock(&fs->table_lock);
    fuse_reply_attr(req, &st, timeout);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_READLINK);
    layer_t *l;
    const lzt_node *n = lock_kind(req, fs, ino, S_IFLNK, EINVAL, &l);
    if (!n)
        return;
    char *target = strndup(l->strings + n->target_off, n->target_len);
    pthread_rwlock_unlock(&fs->table_lock);
    if (!target) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fuse_reply_readlink(req, target);
    free(target);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_OPENDIR);
    if (ino != FUSE_ROOT_ID) {
        layer_t *l;
        if (!lock_kind(req, fs, ino, S_IFDIR, ENOTDIR, &l))
            return;
        pthread_rwlock_unlock(&fs->table_lock);
        fi->cache_readdir = 1; /* the kernel keeps the listing: it never changes */
        fi->keep_cache = 1;
    }
    fi->fh = ino;
    fuse_reply_open(req, fi);
}

static int layer_name_cmp(const void *a, const void *b)
{
    const layer_t *x = *(layer_t *const *)a, *y = *(layer_t *const *)b;
    return strcmp(x->name, y->name);
}

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_READDIR);
    if (size > (1u << 20))
        size = 1u << 20;
    char *buf = malloc(size ? size : 1), name[4096];
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t pos = 0;
    struct fuse_entry_param e;
    pthread_rwlock_rdlock(&fs->table_lock);
    if (ino == FUSE_ROOT_ID) {
        layer_t **sorted = malloc((fs->n_layers ? fs->n_layers : 1) * sizeof *sorted);
        size_t n = 0;
        if (!sorted) {
            pthread_rwlock_unlock(&fs->table_lock);
            free(buf);
            fuse_reply_err(req, ENOMEM);
            return;
        }
        for (size_t i = 0; i < fs->slot_cap; i++)
            if (fs->by_slot[i])
                sorted[n++] = fs->by_slot[i];
        qsort(sorted, n, sizeof *sorted, layer_name_cmp);
        for (size_t i = (size_t)off; i < n; i++) {
            node_entry(&e, sorted[i], 1);
            size_t need = plus ? fuse_add_direntry_plus(req, buf + pos, size - pos, sorted[i]->name, &e, (off_t)i + 1)
                               : fuse_add_direntry(req, buf + pos, size - pos, sorted[i]->name, &e.attr, (off_t)i + 1);
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
            fuse_reply_err(req, dir ? ENOTDIR : ENOENT);
            return;
        }
        for (uint64_t i = (uint64_t)off; i < dir->child_count; i++) {
            const lzt_child *c = &l->children[dir->child_start + i];
            memcpy(name, l->strings + c->name_off, c->name_len); /* checked <= 4000 at add */
            name[c->name_len] = 0;
            node_entry(&e, l, c->child);
            size_t need = plus ? fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, (off_t)i + 1)
                               : fuse_add_direntry(req, buf + pos, size - pos, name, &e.attr, (off_t)i + 1);
            if (need > size - pos)
                break;
            pos += need;
        }
    }
    pthread_rwlock_unlock(&fs->table_lock);
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    do_readdir(req, ino, size, off, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    lzfs *fs = fuse_req_userdata(req);
    struct statvfs s;
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
    memset(&s, 0, sizeof s);
    s.f_bsize = s.f_frsize = 4096;
    s.f_blocks = (total + 4095) / 4096;
    s.f_files = files;
    s.f_namemax = 255;
    fuse_reply_statfs(req, &s);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_GETXATTR);
    layer_t *l;
    const lzt_node *n = lock_node(fs, ino, &l);
    if (!n) {
        fuse_reply_err(req, ino == FUSE_ROOT_ID ? ENODATA : ENOENT);
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
            fuse_reply_xattr(req, vlen);
        } else if (size < vlen) {
            pthread_rwlock_unlock(&fs->table_lock);
            fuse_reply_err(req, ERANGE);
        } else {
            char *v = malloc(vlen ? vlen : 1);
            if (v)
                memcpy(v, l->strings + x->value_off, vlen);
            pthread_rwlock_unlock(&fs->table_lock);
            if (v)
                fuse_reply_buf(req, v, vlen);
            else
                fuse_reply_err(req, ENOMEM);
            free(v);
        }
        return;
    }
    pthread_rwlock_unlock(&fs->table_lock);
    fuse_reply_err(req, ENODATA);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_LISTXATTR);
    if (ino == FUSE_ROOT_ID) {
        if (size == 0)
            fuse_reply_xattr(req, 0);
        else
            fuse_reply_buf(req, NULL, 0);
        return;
    }
    layer_t *l;
    const lzt_node *n = lock_node(fs, ino, &l);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    size_t need = 0;
    for (uint32_t i = 0; i < n->xattr_count; i++)
        need += l->xattrs[n->xattr_start + i].name_len + 1;
    if (size == 0) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_xattr(req, need);
        return;
    }
    if (size < need) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_err(req, ERANGE);
        return;
    }
    char *buf = malloc(need ? need : 1);
    if (!buf) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_err(req, ENOMEM);
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
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

/* ------------------------------------------------------------------ data */

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    lzfs *fs = fuse_req_userdata(req);
    count(fs, LZC_OPEN);
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & (O_TRUNC | O_APPEND))) {
        fuse_reply_err(req, EROFS);
        return;
    }
    layer_t *l;
    if (!lock_kind(req, fs, ino, S_IFREG, EINVAL, &l))
        return;
    pthread_rwlock_unlock(&fs->table_lock);
    fi->fh = ino;
    fi->keep_cache = 1; /* page cache survives close/open: the file never changes */
    fuse_reply_open(req, fi);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }

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

static int read_chunk(const layer_t *l, uint64_t chunk, uint64_t lo, size_t n, char *dst)
{
    char path[4200];
    if (l->chunks_dir_len > 4000)
        return -ENAMETOOLONG;
    chunk_path(l, chunk, path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, dst + got, n - got, (off_t)(lo + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    return got == n ? 0 : -EIO;
}

static void hint_chunk(const layer_t *l, uint64_t chunk)
{
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

static void forward(lzfs *fs, fuse_req_t req, fuse_ino_t ino, uint64_t off, size_t size)
{
    count(fs, LZC_READ_FORWARDED);
    pthread_mutex_lock(&fs->q_mu);
    if (grow((void **)&fs->queued, &fs->cap_queued, fs->n_queued + 1, sizeof *fs->queued)) {
        pthread_mutex_unlock(&fs->q_mu);
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fs->queued[fs->n_queued++] = (queued_t){{++fs->next_token, ino, off, (uint32_t)size}, req};
    signal_python(fs);
    pthread_mutex_unlock(&fs->q_mu);
}

static void record_access(lzfs *fs, fuse_ino_t ino, uint64_t off, size_t size)
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

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off_, struct fuse_file_info *fi)
{
    lzfs *fs = fuse_req_userdata(req);
    uint64_t off = (uint64_t)off_;
    count(fs, LZC_READ);
    layer_t *l;
    const lzt_node *n = lock_kind(req, fs, ino, S_IFREG, EINVAL, &l);
    if (!n)
        return;
    if (atomic_load(&l->failed))
        goto to_python; /* Python answers EIO and logs the quarantine reason */
    if (off >= n->size || size == 0) {
        pthread_rwlock_unlock(&fs->table_lock);
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    size_t len = size < n->size - off ? size : (size_t)(n->size - off);
    uint64_t cs = l->chunk_size, first = off / cs, last = (off + len - 1) / cs;
    if ((n->flags & LZT_NODE_PYDATA) || last >= n->chunk_count)
        goto to_python;
    for (uint64_t k = first; k <= last; k++)
        if (!verified(fs, l->digests + 32 * (n->first_chunk + k)))
            goto to_python;
    char *buf = malloc(len);
    if (!buf)
        goto to_python;
    uint64_t pos = off, end = off + len;
    for (uint64_t k = first; k <= last; k++) {
        uint64_t c_lo = k * cs, c_end = c_lo + cs < end ? c_lo + cs : end;
        if (read_chunk(l, n->first_chunk + k, pos - c_lo, (size_t)(c_end - pos), buf + (pos - off))) {
            /* evicted or damaged since it was verified: Python re-checks and refetches */
            lzfs_forget_verified(fs, l->digests + 32 * (n->first_chunk + k));
            free(buf);
            goto to_python;
        }
        pos = c_end;
    }
    if ((off + len - 1) % cs >= cs / 2) {
        /* past the middle of a chunk: let the kernel read the next chunk files ahead */
        for (uint64_t k = last + 1; k <= last + READAHEAD_CHUNKS && k < n->chunk_count; k++)
            if (verified(fs, l->digests + 32 * (n->first_chunk + k)))
                hint_chunk(l, n->first_chunk + k);
    }
    atomic_fetch_add_explicit(&fs->counters[LZC_CHUNK_HITS], last - first + 1, memory_order_relaxed);
    pthread_rwlock_unlock(&fs->table_lock);
    count(fs, LZC_READ_LOCAL);
    record_access(fs, ino, off, len);
    fuse_reply_buf(req, buf, len);
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
            fs->inflight[fs->n_inflight++] = (inflight_t){fs->queued[i].miss.token, fs->queued[i].req};
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

static fuse_req_t claim(lzfs *fs, uint64_t token)
{
    fuse_req_t req = NULL;
    pthread_mutex_lock(&fs->q_mu);
    for (size_t i = 0; i < fs->n_inflight; i++) {
        if (fs->inflight[i].token == token) {
            req = fs->inflight[i].req;
            fs->inflight[i] = fs->inflight[--fs->n_inflight];
            break;
        }
    }
    pthread_mutex_unlock(&fs->q_mu);
    return req;
}

int lzfs_reply_data(lzfs *fs, uint64_t token, const void *data, size_t len)
{
    fuse_req_t req = claim(fs, token);
    if (!req)
        return -ENOENT;
    fuse_reply_buf(req, data, len);
    return 0;
}

int lzfs_reply_error(lzfs *fs, uint64_t token, int err)
{
    fuse_req_t req = claim(fs, token);
    if (!req)
        return -ENOENT;
    fuse_reply_err(req, err > 0 ? err : EIO);
    return 0;
}

void lzfs_counters(lzfs *fs, uint64_t out[LZC_N])
{
    for (int i = 0; i < LZC_N; i++)
        out[i] = atomic_load_explicit(&fs->counters[i], memory_order_relaxed);
}

/* ------------------------------------------------------------------ session */

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .readlink = op_readlink,
    .open = op_open,
    .read = op_read,
    .release = op_release,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
    .statfs = op_statfs,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
};

int lzfs_new(lzfs **out, const char *mountpoint, const char *options, int threads, const char **msg)
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
    fs->stop_fd = fs->notify_fd = -1;
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
        lzfs_close(fs);
        return -ENOMEM;
    }
    char *argv[] = {"lazysnap", "-o", (char *)options, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(options && *options ? 3 : 1, argv);
    fs->se = fuse_session_new(&args, &ops, sizeof ops, fs);
    fuse_opt_free_args(&args);
    if (!fs->se) {
        *msg = "fuse_session_new failed (bad mount options?)";
        lzfs_close(fs);
        return -EINVAL;
    }
    if (fuse_session_mount(fs->se, mountpoint) != 0) {
        *msg = "cannot mount the FUSE filesystem";
        lzfs_close(fs);
        return -EIO;
    }
    int fd = fuse_session_fd(fs->se);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    *out = fs;
    return 0;
}

static void *worker(void *arg)
{
    lzfs *fs = arg;
    struct fuse_buf fbuf = {.mem = NULL};
    struct pollfd pfd[2] = {{.fd = fuse_session_fd(fs->se), .events = POLLIN}, {.fd = fs->stop_fd, .events = POLLIN}};
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
        int res = fuse_session_receive_buf(fs->se, &fbuf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0)
            break;
        fuse_session_process_buf(fs->se, &fbuf);
    }
    free(fbuf.mem);
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

void lzfs_close(lzfs *fs)
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
    for (size_t i = 0; i < fs->n_queued; i++)
        fuse_reply_err(fs->queued[i].req, EIO);
    for (size_t i = 0; i < fs->n_inflight; i++)
        fuse_reply_err(fs->inflight[i].req, EIO);
    fs->n_queued = fs->n_inflight = 0;
    if (fs->se) {
        fuse_session_unmount(fs->se);
        fuse_session_destroy(fs->se);
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
