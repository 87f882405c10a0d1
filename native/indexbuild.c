/* The index sections of a scanned layer: see indexbuild.h. The steps mirror
 * snapshotter/index/builder.py (apply entries in tar order, as the tar stage completes
 * them; renumber chunks, check the chunking) and snapshotter/index/format.py (_entry_sections: breadth-first records,
 * children sorted by name bytes, block-local strings, deduplicated extras). */
#include "indexbuild.h"

#include <zstd.h>

#include "siphash.h"

#define NO_NODE UINT32_MAX
#define NO_XATTRS UINT32_MAX

/* One path of the tree being applied, 80 bytes, plus its name in b->bytes. Its attributes
 * are the applied entry's (or, for owners, mode and mtime, a later hard link header's:
 * builder.py _apply_link_header). */
typedef struct {
    uint64_t name;        /* offset of the last path component in b->bytes */
    uint64_t size;
    int64_t mtime_ns;
    uint64_t data;        /* regular file: data offset; symlink: target offset in b->bytes */
    uint32_t name_len, parent;  /* the root's parent is NO_NODE */
    uint32_t uid, gid;
    uint32_t entry;       /* ordinal of the tar entry applied (NO_NODE: a synthesized directory) */
    uint32_t xattrs;      /* its xattr set in b->sets, NO_XATTRS: none */
    uint32_t rec, next_sib;
    /* regular file: scanner's first chunk, chunk count, renumbered first chunk;
     * directory: first child, record of the first child, number of children;
     * device: major, minor; symlink: target length;
     * hard link: the node holding the data, that node's entry when linked */
    uint32_t u1, u2, u3;
    uint16_t mode;
    uint8_t type;
} node;

typedef struct {
    uint64_t off;         /* an extra record (format.py _encode_extra) in b->bytes */
    uint32_t len;
} xattr_set;

typedef struct {
    uint32_t id;          /* node id + 1, 0 = empty */
    uint32_t hash;
} slot;

struct lz_index_builder {
    uint64_t chunk_size;
    lz_buf nodes;         /* node[] */
    lz_buf bytes;         /* names, link targets, xattr sets */
    lz_buf sets;          /* xattr_set[] */
    slot *slots;          /* (parent, name) -> node, open addressing */
    size_t nslots;
    lz_buf scratch;       /* path cleaning */
    lz_buf dir;           /* the parent path resolved last, and its node: entries come */
    uint32_t dir_node;    /* grouped by directory, so most need no walk from the root */
    uint32_t applied;     /* entries applied: the next one's ordinal */
    int state;            /* 0, LZ_INDEX_DECLINED or -1 */
    char declined[160];
    lz_err err;
    lz_index_sections *out;  /* lz_index_finish's */
    lz_hash_key key;      /* of every table here: names are the layer's choice */
};

typedef lz_index_builder builder;

static inline node *N(builder *b, uint32_t i) { return (node *)b->nodes.p + i; }
static inline size_t node_count(const builder *b) { return b->nodes.len / sizeof(node); }
static inline const uint8_t *name_of(builder *b, const node *n) { return b->bytes.p + n->name; }

static int decline(builder *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->declined, sizeof b->declined, fmt, ap);
    va_end(ap);
    return LZ_INDEX_DECLINED;
}

static uint64_t hash_bytes(const builder *b, const uint8_t *p, size_t n) { return lz_siphash(&b->key, p, n); }

static uint32_t hash_child(const builder *b, uint32_t parent, const uint8_t *name, size_t len)
{
    uint64_t h = hash_bytes(b, name, len) + (uint64_t)parent * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h ^ (h >> 32));
}

static int grow_slots(builder *b, size_t want)
{
    size_t ns = b->nslots ? b->nslots : 1024;
    while (ns < want * 2)
        ns *= 2;
    slot *s = calloc(ns, sizeof *s);
    if (!s)
        return lz_nomem(&b->err);
    for (size_t i = 0; i < b->nslots; i++) {
        if (!b->slots[i].id)
            continue;
        size_t j = b->slots[i].hash & (ns - 1);
        while (s[j].id)
            j = (j + 1) & (ns - 1);
        s[j] = b->slots[i];
    }
    free(b->slots);
    b->slots = s;
    b->nslots = ns;
    return 0;
}

/* The slot of `parent`'s child `name` (hash h): holding its node, or empty where it goes. */
static size_t find_slot(builder *b, uint32_t parent, const uint8_t *name, size_t len, uint32_t h)
{
    size_t j = h & (b->nslots - 1);
    while (b->slots[j].id) {
        if (b->slots[j].hash == h) {
            node *n = N(b, b->slots[j].id - 1);
            if (n->parent == parent && n->name_len == len && (len == 0 || memcmp(name_of(b, n), name, len) == 0))
                break;
        }
        j = (j + 1) & (b->nslots - 1);
    }
    return j;
}

static uint32_t child(builder *b, uint32_t parent, const uint8_t *name, size_t len)
{
    size_t j = find_slot(b, parent, name, len, hash_child(b, parent, name, len));
    return b->slots[j].id ? b->slots[j].id - 1 : NO_NODE;
}

/* A new node `name` under `parent` (a synthesized directory until an entry is taken). */
static int add_node(builder *b, uint32_t parent, const uint8_t *name, size_t len, uint32_t *id)
{
    if ((node_count(b) + 1) * 2 > b->nslots && grow_slots(b, node_count(b) + 1))
        return -1;
    if (node_count(b) >= NO_NODE - 1)
        return decline(b, "more entries than an index holds");
    if (len > LZ_INDEX_MAX_NAME)
        return decline(b, "a name longer than Linux allows");
    uint64_t at = b->bytes.len;
    if (lz_buf_append(&b->bytes, name, len) || lz_buf_reserve(&b->nodes, sizeof(node)))
        return lz_nomem(&b->err);
    *id = (uint32_t)node_count(b);
    node *n = (node *)(b->nodes.p + b->nodes.len);
    b->nodes.len += sizeof(node);
    *n = (node){.name = at, .name_len = (uint32_t)len, .parent = parent, .entry = NO_NODE,
                .xattrs = NO_XATTRS, .u1 = NO_NODE, .type = ET_DIR, .mode = 0755};
    uint32_t h = hash_child(b, parent, name, len);
    b->slots[find_slot(b, parent, name, len, h)] = (slot){*id + 1, h};
    return 0;
}

static size_t parent_len(const uint8_t *p, size_t len)
{
    while (len && p[len - 1] != '/')
        len--;
    return len ? len - 1 : 0;
}

/* The node of the directory `path` (cleaned, "" the root): with `create`, missing
 * directories are synthesized (mode 0755, owner 0, mtime 0: builder.py _ensure_parents);
 * else NO_NODE when missing. A non-directory on the way declines. */
static int resolve_dir(builder *b, const uint8_t *path, size_t len, int create, uint32_t *out)
{
    if (len == b->dir.len && (len == 0 || memcmp(path, b->dir.p, len) == 0)) {
        *out = b->dir_node;
        return 0;
    }
    uint32_t at = 0;
    for (size_t i = 0; i < len;) {
        size_t j = i;
        while (j < len && path[j] != '/')
            j++;
        uint32_t next = child(b, at, path + i, j - i);
        if (next == NO_NODE) {
            if (!create) {
                *out = NO_NODE;
                return 0;
            }
            int r = add_node(b, at, path + i, j - i, &next);
            if (r)
                return r;
        } else if (N(b, next)->type != ET_DIR) {
            if (!create) {  /* nothing is below a non-directory */
                *out = NO_NODE;
                return 0;
            }
            return decline(b, "a path below a non-directory");
        }
        at = next;
        i = j + 1;
    }
    b->dir.len = 0;
    if (lz_buf_append(&b->dir, path, len))
        return lz_nomem(&b->err);
    b->dir_node = at;
    *out = at;
    return 0;
}

/* builder.py clean_path: the layer-relative form ("" is the root) in b->scratch, or declined
 * for a NUL byte or a path climbing above the root. */
static int clean_path(builder *b, const uint8_t *raw, size_t len, const uint8_t **out, size_t *olen)
{
    if (len == 0) {
        *out = raw;
        *olen = 0;
        return 0;
    }
    if (memchr(raw, 0, len))
        return decline(b, "a NUL byte in a path");
    int clean = len && raw[0] != '/' && raw[0] != '.' && raw[len - 1] != '/';
    for (size_t i = 0; clean && i + 1 < len; i++)
        if (raw[i] == '/' && (raw[i + 1] == '/' || raw[i + 1] == '.'))
            clean = 0;
    if (clean) {
        *out = raw;
        *olen = len;
        return 0;
    }
    b->scratch.len = 0;
    if (lz_buf_reserve(&b->scratch, len + 1))
        return lz_nomem(&b->err);
    uint8_t *s = b->scratch.p;
    size_t n = 0;
    for (size_t i = 0; i <= len;) {
        size_t j = i;
        while (j < len && raw[j] != '/')
            j++;
        size_t pl = j - i;
        if (pl == 0 || (pl == 1 && raw[i] == '.')) {
            /* skip */
        } else if (pl == 2 && raw[i] == '.' && raw[i + 1] == '.') {
            if (n == 0)
                return decline(b, "a path escaping the layer root");
            n = parent_len(s, n);
        } else {
            if (n)
                s[n++] = '/';
            memcpy(s + n, raw + i, pl);
            n += pl;
        }
        i = j + 1;
    }
    *out = s;
    *olen = n;
    return 0;
}

/* The node of a cleaned path, NO_NODE when missing. */
static int lookup(builder *b, const uint8_t *path, size_t len, uint32_t *out)
{
    if (len == 0) {
        *out = 0;
        return 0;
    }
    size_t plen = parent_len(path, len), at = plen ? plen + 1 : 0;
    uint32_t dir;
    int r = resolve_dir(b, path, plen, 0, &dir);
    if (r)
        return r;
    *out = dir == NO_NODE ? NO_NODE : child(b, dir, path + at, len - at);
    return 0;
}

static int by_key(const void *pa, const void *pb, void *ctx)
{
    const uint8_t *a = ctx;
    const tar_xattr *x = pa, *y = pb;
    int c = memcmp(a + x->key_off, a + y->key_off, LZ_MIN(x->key_len, y->key_len));
    return c ? c : (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

/* The entry's xattrs as an extra record (format.py _encode_extra, no sparse map) kept in
 * b->bytes: its index in b->sets. */
static int add_xattrs(builder *b, const tar_t *t, const tar_entry *e, uint32_t *set)
{
    const uint8_t *a = t->arena.p;
    if (e->xattr_count > UINT16_MAX)
        return decline(b, "more xattrs than an index entry holds");
    if (b->sets.len / sizeof(xattr_set) >= NO_XATTRS - 1)
        return decline(b, "more xattr sets than an index holds");
    tar_xattr xs[64], *x = xs;
    if (e->xattr_count > 64 && !(x = malloc(e->xattr_count * sizeof *x)))
        return lz_nomem(&b->err);
    memcpy(x, (const tar_xattr *)t->xattrs.p + e->xattr_first, e->xattr_count * sizeof *x);
    qsort_r(x, e->xattr_count, sizeof *x, by_key, (void *)a);
    uint8_t h[10];
    size_t total = 0;
    int r = 0;
    xattr_set xset = {b->bytes.len, 0};
    put16(h, (uint16_t)e->xattr_count);
    put32(h + 2, 0);
    put32(h + 6, 0);
    if (lz_buf_append(&b->bytes, h, 10))
        r = lz_nomem(&b->err);
    for (size_t i = 0; i < e->xattr_count && !r; i++) {
        total += x[i].key_len + x[i].val_len;
        if (x[i].key_len > LZ_XATTR_NAME_MAX || x[i].val_len > LZ_XATTR_VALUE_MAX || total > LZ_XATTR_ENTRY_MAX) {
            r = decline(b, "an xattr larger than Linux allows");
            break;
        }
        put16(h, (uint16_t)x[i].key_len);
        put32(h + 2, (uint32_t)x[i].val_len);
        if (lz_buf_append(&b->bytes, h, 6) || lz_buf_append(&b->bytes, a + x[i].key_off, x[i].key_len) ||
            lz_buf_append(&b->bytes, a + x[i].val_off, x[i].val_len))
            r = lz_nomem(&b->err);
    }
    if (x != xs)
        free(x);
    if (r)
        return r;
    xset.len = (uint32_t)(b->bytes.len - xset.off);
    *set = (uint32_t)(b->sets.len / sizeof(xattr_set));
    if (lz_buf_append(&b->sets, &xset, sizeof xset))
        return lz_nomem(&b->err);
    return 0;
}

static int check_entry(builder *b, const tar_t *t, const tar_entry *e)
{
    const int64_t u32 = UINT32_MAX;
    if (e->sparse_count >= 0)
        return decline(b, "a sparse file");
    if (e->type < ET_REG || e->type > ET_FIFO)
        return decline(b, "an unknown entry type");
    if (e->uid < 0 || e->uid > u32 || e->gid < 0 || e->gid > u32 || e->devmajor < 0 ||
        e->devmajor > u32 || e->devminor < 0 || e->devminor > u32 || e->size < 0 ||
        e->data_offset > INT64_MAX || e->stored_size > INT64_MAX)
        return decline(b, "a header number out of range");
    if (e->type == ET_REG && (uint64_t)e->size != e->stored_size)
        return decline(b, "a stored size differing from the size");
    if (e->type == ET_REG && (e->first_chunk > UINT32_MAX || e->chunk_count > UINT32_MAX - e->first_chunk))
        return decline(b, "more chunks than an index holds");
    const uint8_t *a = t->arena.p;
    if (e->link_len && memchr(a + e->link_off, 0, e->link_len))
        return decline(b, "a NUL byte in a link target");
    if (e->type == ET_SYMLINK && e->link_len > LZ_INDEX_MAX_LINK)
        return decline(b, "a symlink target longer than Linux allows");
    const tar_xattr *x = (const tar_xattr *)t->xattrs.p + e->xattr_first;
    for (size_t i = 0; i < e->xattr_count; i++) {
        const uint8_t *k = a + x[i].key_off;
        for (size_t c = 0; c < x[i].key_len; c++)
            if (k[c] == 0 || k[c] >= 0x80)
                return decline(b, "an xattr name that is not plain ASCII");
        for (size_t j = 0; j < i; j++)
            if (x[j].key_len == x[i].key_len && memcmp(a + x[j].key_off, k, x[i].key_len) == 0)
                return decline(b, "an xattr named twice");
    }
    return 0;
}

/* The node a hard link's data is in (builder.py: the link's target path cleaned, looked up
 * before the link is applied, chains of links followed). */
static int link_target(builder *b, const tar_t *t, const tar_entry *e, uint32_t *out)
{
    const uint8_t *path = NULL;
    size_t len = 0;
    int r = clean_path(b, t->arena.p + e->link_off, e->link_len, &path, &len);
    uint32_t n = NO_NODE;
    if (r || (len && (r = lookup(b, path, len, &n))))
        return r;
    if (n == NO_NODE)
        return decline(b, "a hard link to a missing entry");
    for (size_t hops = 0; N(b, n)->type == ET_HARDLINK; hops++) {
        const node *link = N(b, n);
        if (hops > node_count(b) || link->u1 == NO_NODE)
            return decline(b, "a hard link chain that does not end");
        if (N(b, link->u1)->entry != link->u2)  /* the data is an entry no path holds now */
            return decline(b, "a hard link whose target was replaced");
        n = link->u1;
    }
    if (N(b, n)->type == ET_DIR)
        return decline(b, "a hard link to a directory");
    *out = n;
    return 0;
}

/* Node n takes entry e (the applied entry's ordinal: b->applied). */
static int take_entry(builder *b, const tar_t *t, node *n, const tar_entry *e)
{
    uint32_t id = (uint32_t)(n - N(b, 0));
    n->entry = b->applied;
    n->type = (uint8_t)e->type;
    n->uid = (uint32_t)e->uid;
    n->gid = (uint32_t)e->gid;
    n->mtime_ns = e->mtime_ns;
    n->mode = (uint16_t)(e->mode & 07777);
    n->size = e->type == ET_HARDLINK ? 0 : (uint64_t)e->size;
    n->data = 0;
    n->u1 = n->u2 = n->u3 = 0;
    if (e->type == ET_REG) {
        n->data = e->data_offset;
        n->u1 = (uint32_t)e->first_chunk;
        n->u2 = (uint32_t)e->chunk_count;
    } else if (e->type == ET_CHAR || e->type == ET_BLOCK) {
        n->u1 = (uint32_t)e->devmajor;
        n->u2 = (uint32_t)e->devminor;
    } else if (e->type == ET_SYMLINK) {
        uint64_t at = b->bytes.len;
        if (lz_buf_append(&b->bytes, t->arena.p + e->link_off, e->link_len))
            return lz_nomem(&b->err);
        n = N(b, id);
        n->data = at;
        n->u1 = (uint32_t)e->link_len;
    } else if (e->type == ET_HARDLINK) {
        n->u1 = NO_NODE;
    }
    return 0;
}

/* builder.py _Tree.put */
static int apply(builder *b, const tar_t *t, const tar_entry *e)
{
    int r = check_entry(b, t, e);
    if (r)
        return r;
    if (b->applied >= INT32_MAX)
        return decline(b, "more entries than an index holds");
    uint32_t target = NO_NODE, set = NO_XATTRS;
    if (e->type == ET_HARDLINK && (r = link_target(b, t, e, &target)))
        return r;
    if (e->xattr_count && (r = add_xattrs(b, t, e, &set)))
        return r;
    const uint8_t *path = NULL;
    size_t len = 0;
    if ((r = clean_path(b, t->arena.p + e->path_off, e->path_len, &path, &len)))
        return r;
    if (len == 0) {
        if (e->type != ET_DIR)
            return decline(b, "a layer root that is not a directory");
        if ((r = take_entry(b, t, N(b, 0), e)))
            return r;
        N(b, 0)->xattrs = set;
        return 0;
    }
    size_t plen = parent_len(path, len), at = plen ? plen + 1 : 0;
    uint32_t parent;
    if ((r = resolve_dir(b, path, plen, 1, &parent)))
        return r;
    uint32_t id = child(b, parent, path + at, len - at);
    if (target != NO_NODE && target == id)
        return decline(b, "a hard link replacing its own target");
    if (target != NO_NODE) {  /* containerd links, then applies the link's header to the inode */
        node *tn = N(b, target);
        tn->uid = (uint32_t)e->uid;
        tn->gid = (uint32_t)e->gid;
        tn->mtime_ns = e->mtime_ns;
        if (tn->type != ET_SYMLINK)
            tn->mode = (uint16_t)(e->mode & 07777);
        if (set != NO_XATTRS && tn->xattrs != NO_XATTRS)
            return decline(b, "hard link xattrs to merge");
        if (set != NO_XATTRS)
            tn->xattrs = set;
    }
    if (id == NO_NODE) {
        if ((r = add_node(b, parent, path + at, len - at, &id)))
            return r;
        N(b, id)->xattrs = set;
    } else {
        node *n = N(b, id);
        if (n->type == ET_DIR && e->type != ET_DIR)
            return decline(b, "a directory replaced by a non-directory");
        if (n->type == ET_DIR) {  /* a directory entry merges into the existing one */
            if (set != NO_XATTRS && n->xattrs != NO_XATTRS)
                return decline(b, "directory xattrs to merge");
            if (set != NO_XATTRS)
                n->xattrs = set;
        } else {
            n->xattrs = set;
        }
    }
    if ((r = take_entry(b, t, N(b, id), e)))
        return r;
    if (target != NO_NODE) {
        N(b, id)->u1 = target;
        N(b, id)->u2 = N(b, target)->entry;
    }
    return 0;
}

lz_index_builder *lz_index_builder_new(uint64_t chunk_size)
{
    builder *b = calloc(1, sizeof *b);
    uint32_t root;
    if (b)
        lz_hash_key_new(&b->key);
    if (!b || grow_slots(b, 1024) || add_node(b, NO_NODE, (const uint8_t *)"", 0, &root)) {
        lz_index_builder_free(b);
        return NULL;
    }
    b->chunk_size = chunk_size;
    b->dir_node = root;  /* the root's path is "" (b->dir empty) */
    return b;
}

void lz_index_builder_free(lz_index_builder *b)
{
    if (!b)
        return;
    lz_buf_free(&b->nodes);
    lz_buf_free(&b->bytes);
    lz_buf_free(&b->sets);
    lz_buf_free(&b->scratch);
    lz_buf_free(&b->dir);
    free(b->slots);
    free(b);
}

int lz_index_apply(void *ctx, const tar_t *t, size_t i)
{
    builder *b = ctx;
    if (b->state)
        return b->state;
    b->state = apply(b, t, (const tar_entry *)t->entries.p + i);
    b->applied++;
    return b->state;
}

static int by_entry(const void *pa, const void *pb, void *ctx)
{
    builder *b = ctx;
    uint32_t x = N(b, *(const uint32_t *)pa)->entry, y = N(b, *(const uint32_t *)pb)->entry;
    return (x > y) - (x < y);
}

/* builder.py _renumber_chunks + _check_chunking: live files' chunks in stream order (the
 * entries' order; the scanner numbers chunks in it, which is checked). *live gets the
 * regular files with chunks in that order, for write_chunks. */
static int renumber_chunks(builder *b, const tar_t *t, uint32_t **live, size_t *nlive)
{
    uint64_t cs = b->chunk_size;
    size_t nn = node_count(b), total = tar_chunk_count(t), k = 0;
    const tar_chunk *tc = (const tar_chunk *)t->chunks.p;
    uint32_t *l = malloc((nn ? nn : 1) * sizeof *l);
    if (!l)
        return lz_nomem(&b->err);
    *live = l;
    for (uint32_t i = 0; i < nn; i++)
        if (N(b, i)->type == ET_REG && N(b, i)->u2)
            l[k++] = i;
    *nlive = k;
    qsort_r(l, k, sizeof *l, by_entry, b);
    uint64_t next = 0, seen = 0;
    for (size_t i = 0; i < k; i++) {
        node *n = N(b, l[i]);
        uint64_t first = n->u1, count = n->u2, stored = n->size;
        if (first < seen || first > total || count > total - first)
            return decline(b, "a chunk range beyond the chunk table");
        seen = first + count;
        n->u3 = (uint32_t)next;
        for (uint64_t c = 0; c < count; c++) {
            const tar_chunk *ch = tc + first + c;
            if (c * cs >= stored || ch->offset != n->data + c * cs || ch->length != LZ_MIN(cs, stored - c * cs))
                return decline(b, "chunks not matching the chunk size");
        }
        if (count * cs < stored)
            return decline(b, "chunks not covering a file");
        next += count;
        if (next > UINT32_MAX)
            return decline(b, "more chunks than an index holds");
    }
    for (uint32_t i = 0; i < nn; i++) {
        node *n = N(b, i);
        if (n->type == ET_REG && !n->u2) {
            if (n->size)
                return decline(b, "chunks not covering a file");
            n->u3 = (uint32_t)next;
        }
    }
    b->out->chunk_count = next;
    return 0;
}

/* The live files' chunk records, written over the tar's chunk table in place (a record
 * is smaller than a table entry and never ahead of the entry it comes from), which then
 * becomes out->chunks. */
static void write_chunks(builder *b, tar_t *t, const uint32_t *live, size_t nlive)
{
    const tar_chunk *tc = (const tar_chunk *)t->chunks.p;
    uint8_t *rec = t->chunks.p;
    size_t w = 0;
    for (size_t i = 0; i < nlive; i++) {
        const node *n = N(b, live[i]);
        for (uint32_t c = 0; c < n->u2; c++, w++) {
            tar_chunk ch = tc[n->u1 + c];
            put64(rec + w * LZ_INDEX_CHUNK_RECORD, ch.offset);
            put32(rec + w * LZ_INDEX_CHUNK_RECORD + 8, (uint32_t)ch.length);
            memcpy(rec + w * LZ_INDEX_CHUNK_RECORD + 12, ch.sha, 32);
        }
    }
    lz_buf_free(&b->out->chunks);
    b->out->chunks = t->chunks;
    b->out->chunks.len = w * LZ_INDEX_CHUNK_RECORD;
    t->chunks = (lz_buf){0};
}

/* ---- serialization (format.py _entry_sections) ---- */

static int by_name(const void *pa, const void *pb, void *ctx)
{
    builder *b = ctx;
    const node *x = N(b, *(const uint32_t *)pa), *y = N(b, *(const uint32_t *)pb);
    size_t n = LZ_MIN(x->name_len, y->name_len);
    int c = n ? memcmp(name_of(b, x), name_of(b, y), n) : 0;
    return c ? c : (x->name_len > y->name_len) - (x->name_len < y->name_len);
}

typedef struct {
    lz_buf recs, strings;
    uint32_t slot_off[1024], slot_len[1024];  /* block-local interned strings, len+1 (0: empty) */
    const lz_hash_key *key;
} block_state;

/* format.py intern: the offset of `s` in the block's string area, added once */
static int intern(block_state *bs, const uint8_t *s, size_t n, uint32_t *off)
{
    size_t j = lz_siphash(bs->key, s, n) & 1023;
    while (bs->slot_len[j]) {
        if (bs->slot_len[j] - 1 == n && (n == 0 || memcmp(bs->strings.p + bs->slot_off[j], s, n) == 0)) {
            *off = bs->slot_off[j];
            return 0;
        }
        j = (j + 1) & 1023;
    }
    if (bs->strings.len > UINT32_MAX || lz_buf_append(&bs->strings, s, n))
        return -1;
    bs->slot_off[j] = (uint32_t)(bs->strings.len - n);
    bs->slot_len[j] = (uint32_t)n + 1;
    *off = bs->slot_off[j];
    return 0;
}

typedef struct {
    uint32_t *slots;  /* extras offset + 1 */
    uint32_t *lens;
    size_t nslots, count;
} extras_table;

/* format.py _encode_extra: xattr set `set` in out->extras, deduplicated */
static int extra_of(builder *b, extras_table *et, uint32_t set, uint32_t *off)
{
    const xattr_set *xs = (const xattr_set *)b->sets.p + set;
    const uint8_t *rec = b->bytes.p + xs->off;
    if ((et->count + 1) * 2 > et->nslots) {
        size_t ns = et->nslots ? et->nslots * 2 : 256;
        uint32_t *s = calloc(ns, sizeof *s), *l = calloc(ns, sizeof *l);
        if (!s || !l) {
            free(s);
            free(l);
            return lz_nomem(&b->err);
        }
        for (size_t i = 0; i < et->nslots; i++) {
            if (!et->slots[i])
                continue;
            size_t j = hash_bytes(b, b->out->extras.p + et->slots[i] - 1, et->lens[i]) & (ns - 1);
            while (s[j])
                j = (j + 1) & (ns - 1);
            s[j] = et->slots[i];
            l[j] = et->lens[i];
        }
        free(et->slots);
        free(et->lens);
        et->slots = s;
        et->lens = l;
        et->nslots = ns;
    }
    size_t j = hash_bytes(b, rec, xs->len) & (et->nslots - 1);
    while (et->slots[j]) {
        if (et->lens[j] == xs->len && memcmp(b->out->extras.p + et->slots[j] - 1, rec, xs->len) == 0) {
            *off = et->slots[j] - 1;
            return 0;
        }
        j = (j + 1) & (et->nslots - 1);
    }
    if (b->out->extras.len + xs->len >= UINT32_MAX)
        return decline(b, "more extras than an index holds");
    *off = (uint32_t)b->out->extras.len;
    if (lz_buf_append(&b->out->extras, rec, xs->len))
        return lz_nomem(&b->err);
    et->slots[j] = *off + 1;
    et->lens[j] = xs->len;
    et->count++;
    return 0;
}

static int flush_block(builder *b, block_state *bs, ZSTD_CCtx *cctx, int level)
{
    lz_index_sections *o = b->out;
    if (lz_buf_append(&bs->recs, bs->strings.p, bs->strings.len))
        return lz_nomem(&b->err);
    size_t bound = ZSTD_compressBound(bs->recs.len);
    if (lz_buf_reserve(&o->blocks, bound))
        return lz_nomem(&b->err);
    size_t n = ZSTD_compressCCtx(cctx, o->blocks.p + o->blocks.len, bound, bs->recs.p, bs->recs.len, level);
    if (ZSTD_isError(n))
        return lz_fail(&b->err, LZ_INVALID, "zstd: %s", ZSTD_getErrorName(n));
    o->blocks.len += n;
    uint8_t off[8];
    put64(off, o->blocks.len);
    if (lz_buf_append(&o->blockidx, off, 8))
        return lz_nomem(&b->err);
    bs->recs.len = bs->strings.len = 0;
    memset(bs->slot_len, 0, sizeof bs->slot_len);
    return 0;
}

static int serialize(builder *b, int level)
{
    size_t nn = node_count(b);
    /* children lists, then breadth-first order with each directory's children by name */
    for (uint32_t i = 0; i < nn; i++)
        if (N(b, i)->type == ET_DIR)
            N(b, i)->u1 = NO_NODE;
    for (uint32_t i = (uint32_t)nn; i-- > 1;) {
        node *n = N(b, i), *p = N(b, n->parent);
        n->next_sib = p->u1;
        p->u1 = i;
    }
    uint32_t *order = malloc(nn * sizeof *order);
    block_state *bs = calloc(1, sizeof *bs);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    extras_table et = {0};
    int r = 0;
    if (!order || !bs || !cctx) {
        r = lz_nomem(&b->err);
        goto out;
    }
    bs->key = &b->key;
    size_t len = 1;
    order[0] = 0;
    N(b, 0)->rec = 0;
    for (size_t i = 0; i < len; i++) {
        node *d = N(b, order[i]);
        if (d->type != ET_DIR)
            continue;
        size_t start = len;
        for (uint32_t k = d->u1; k != NO_NODE; k = N(b, k)->next_sib)
            order[len++] = k;
        qsort_r(order + start, len - start, sizeof *order, by_name, b);
        d->u2 = (uint32_t)start;  /* format.py: where the block starts, even when empty */
        d->u3 = (uint32_t)(len - start);
        for (size_t k = start; k < len; k++)
            N(b, order[k])->rec = (uint32_t)k;
    }
    uint8_t zero[8] = {0};
    if (lz_buf_append(&b->out->blockidx, zero, 8)) {
        r = lz_nomem(&b->err);
        goto out;
    }
    for (size_t i = 0; i < len && !r; i++) {
        node *n = N(b, order[i]);
        uint32_t a = 0, bb = 0, name_off, extra = LZ_INDEX_NO_EXTRA;
        uint8_t flags = 0;
        if (n->type == ET_REG) {
            b->out->reg_count++;
            a = n->u3;
            bb = n->u2;
        } else if (n->type == ET_DIR) {
            a = n->u2;
            bb = n->u3;
        } else if (n->type == ET_CHAR || n->type == ET_BLOCK) {
            a = n->u1;
            bb = n->u2;
        } else if (n->type == ET_HARDLINK) {
            a = N(b, n->u1)->rec;
        } else if (n->type == ET_SYMLINK) {
            if (intern(bs, b->bytes.p + n->data, n->u1, &a)) {
                r = lz_nomem(&b->err);
                break;
            }
            bb = n->u1;
        }
        if (n->xattrs != NO_XATTRS) {
            if ((r = extra_of(b, &et, n->xattrs, &extra)))
                break;
            flags |= LZ_INDEX_FLAG_EXTRA;
        }
        if (intern(bs, name_of(b, n), n->name_len, &name_off)) {
            r = lz_nomem(&b->err);
            break;
        }
        uint8_t rec[LZ_INDEX_ENTRY_RECORD];
        put32(rec + LZ_IE_parent, i ? N(b, n->parent)->rec : 0);
        put32(rec + LZ_IE_name_off, name_off);
        put16(rec + LZ_IE_name_len, (uint16_t)n->name_len);
        rec[LZ_IE_type] = (uint8_t)n->type;
        rec[LZ_IE_flags] = flags;
        put16(rec + LZ_IE_mode, n->mode);
        put32(rec + LZ_IE_uid, n->uid);
        put32(rec + LZ_IE_gid, n->gid);
        put64(rec + LZ_IE_size, n->size);
        put64(rec + LZ_IE_mtime_ns, (uint64_t)n->mtime_ns);
        put64(rec + LZ_IE_data_offset, n->type == ET_REG ? n->data : 0);
        put32(rec + LZ_IE_a, a);
        put32(rec + LZ_IE_b, bb);
        put32(rec + LZ_IE_extra, extra);
        if (lz_buf_append(&bs->recs, rec, sizeof rec)) {
            r = lz_nomem(&b->err);
            break;
        }
        if ((i + 1) % LZ_INDEX_BLOCK_RECORDS == 0 || i + 1 == len)
            r = flush_block(b, bs, cctx, level);
    }
    b->out->entry_count = len;
out:
    free(order);
    if (bs) {
        lz_buf_free(&bs->recs);
        lz_buf_free(&bs->strings);
        free(bs);
    }
    ZSTD_freeCCtx(cctx);
    free(et.slots);
    free(et.lens);
    return r;
}

int lz_index_finish(lz_index_builder *b, tar_t *t, int zstd_level, lz_index_sections *out, lz_err *err)
{
    b->out = out;
    int r = b->state;
    uint32_t *live = NULL;
    size_t nlive = 0;
    if (b->chunk_size == 0 || b->chunk_size > UINT32_MAX)
        r = lz_fail(&b->err, LZ_INVALID, "chunk size must be in 1..2**32-1");
    for (size_t i = 0; i < node_count(b) && !r; i++) {
        const node *n = N(b, (uint32_t)i);
        if (n->type == ET_HARDLINK && N(b, n->u1)->entry != n->u2)
            r = decline(b, "a hard link whose target was replaced");  /* builder.py promotes one */
    }
    if (!r)
        r = renumber_chunks(b, t, &live, &nlive);
    if (!r)
        r = serialize(b, zstd_level);
    if (!r)
        write_chunks(b, t, live, nlive);
    free(live);
    b->state = r ? r : b->state;
    if (r == LZ_INDEX_DECLINED)
        memcpy(out->declined, b->declined, sizeof out->declined);
    else if (r < 0)
        *err = b->err;
    return r;
}

int lz_index_build(tar_t *t, uint64_t chunk_size, int zstd_level, lz_index_sections *out, lz_err *err)
{
    lz_index_builder *b = lz_index_builder_new(chunk_size);
    if (!b)
        return lz_nomem(err);
    size_t ne = tar_entry_count(t);
    for (size_t i = 0; i < ne && !b->state; i++)
        lz_index_apply(b, t, i);
    int r = lz_index_finish(b, t, zstd_level, out, err);
    lz_index_builder_free(b);
    return r;
}

void lz_index_sections_free(lz_index_sections *s)
{
    lz_buf_free(&s->blocks);
    lz_buf_free(&s->blockidx);
    lz_buf_free(&s->extras);
    lz_buf_free(&s->chunks);
}
