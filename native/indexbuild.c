/* The index sections of a scanned layer: see indexbuild.h. The steps mirror
 * snapshotter/index/builder.py (apply entries in tar order, renumber chunks, check the
 * chunking) and snapshotter/index/format.py (_entry_sections: breadth-first records,
 * children sorted by name bytes, block-local strings, deduplicated extras). */
#include "indexbuild.h"

#include <zstd.h>

#define NO_NODE UINT32_MAX
#define IN_TAR (1ull << 63)  /* a path's bytes are the tar arena's own (most are) */

/* One path of the tree being applied: 88 bytes, the builder's memory per entry. */
typedef struct {
    uint64_t path;         /* offset in b->paths, or | IN_TAR: in the tar arena */
    uint32_t path_len, name_at;   /* the last component starts at name_at */
    uint32_t parent;       /* node id (the root's is NO_NODE) */
    int32_t entry;         /* tar entry holding the attributes, -1: a synthesized directory */
    int32_t xattr_entry;   /* tar entry whose xattrs apply, -1: none */
    int32_t target_entry;  /* hard links: the target's entry when linked (another later: replaced) */
    uint32_t target;       /* hard links: the node holding the data */
    uint32_t first_kid, next_sib, rec;
    uint32_t kids_at, kid_count;  /* record of the first child, number of children */
    uint32_t first_chunk;  /* renumbered */
    /* owners, mode and mtime: the entry's, or a later hard link's header (builder.py
     * _apply_link_header) */
    uint32_t uid, gid, mode;
    int64_t mtime_ns;
    uint8_t type;
} node;

typedef struct {
    uint32_t id;           /* node id + 1, 0 = empty */
    uint32_t hash;
} slot;

typedef struct {
    const tar_t *t;
    lz_buf nodes;          /* node[] */
    lz_buf paths;          /* cleaned paths that are not the tar's own bytes */
    slot *slots;           /* path hash table, open addressing */
    size_t nslots;
    lz_buf scratch;        /* path cleaning */
    uint32_t *node_of;     /* tar entry -> the node it was applied to */
    lz_index_sections *out;
    lz_err *err;
} builder;

static inline node *N(builder *b, uint32_t i) { return (node *)b->nodes.p + i; }
static inline size_t node_count(const builder *b) { return b->nodes.len / sizeof(node); }
static inline const tar_entry *E(const builder *b, int64_t i) { return (const tar_entry *)b->t->entries.p + i; }

static inline const uint8_t *path_of(builder *b, const node *n)
{
    return n->path & IN_TAR ? b->t->arena.p + (n->path & ~IN_TAR) : b->paths.p + n->path;
}

static int decline(builder *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->out->declined, sizeof b->out->declined, fmt, ap);
    va_end(ap);
    return LZ_INDEX_DECLINED;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;  /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static int grow_slots(builder *b, size_t want)
{
    size_t ns = b->nslots ? b->nslots : 1024;
    while (ns < want * 2)
        ns *= 2;
    slot *s = calloc(ns, sizeof *s);
    if (!s)
        return lz_nomem(b->err);
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

/* The slot of `path` (hash h): holding its node, or empty where it would go. */
static size_t find_slot(builder *b, const uint8_t *path, size_t len, uint32_t h)
{
    size_t j = h & (b->nslots - 1);
    while (b->slots[j].id) {
        if (b->slots[j].hash == h) {
            node *n = N(b, b->slots[j].id - 1);
            if (n->path_len == len && (len == 0 || memcmp(path_of(b, n), path, len) == 0))
                break;
        }
        j = (j + 1) & (b->nslots - 1);
    }
    return j;
}

static uint32_t lookup(builder *b, const uint8_t *path, size_t len)
{
    size_t j = find_slot(b, path, len, (uint32_t)hash_bytes(path, len));
    return b->slots[j].id ? b->slots[j].id - 1 : NO_NODE;
}

static void set_entry(builder *b, node *n, int64_t ei)
{
    const tar_entry *e = E(b, ei);
    n->entry = (int32_t)ei;
    n->type = (uint8_t)e->type;
    n->uid = (uint32_t)e->uid;
    n->gid = (uint32_t)e->gid;
    n->mtime_ns = e->mtime_ns;
    n->mode = e->mode & 07777;
    n->target = NO_NODE;
    b->node_of[ei] = (uint32_t)(n - N(b, 0));
}

/* A new node for `path`, whose parent is `parent`: the path's bytes are referenced where
 * they are the tar's own, else copied. */
static int add_node(builder *b, const uint8_t *path, size_t len, uint32_t parent, int64_t entry,
                    int type, uint32_t *id)
{
    if ((node_count(b) + 1) * 2 > b->nslots && grow_slots(b, node_count(b) + 1))
        return -1;
    if (node_count(b) >= NO_NODE - 1 || len > UINT32_MAX)
        return lz_fail(b->err, LZ_INVALID, "too many entries");
    if (lz_buf_reserve(&b->nodes, sizeof(node)))
        return lz_nomem(b->err);
    const uint8_t *arena = b->t->arena.p;
    uint64_t ref;
    if (len && arena && path >= arena && path + len <= arena + b->t->arena.len) {
        ref = (uint64_t)(path - arena) | IN_TAR;
    } else {
        ref = b->paths.len;
        if (lz_buf_append(&b->paths, path, len))
            return lz_nomem(b->err);
    }
    size_t name_at = len;
    while (name_at && path[name_at - 1] != '/')
        name_at--;
    *id = (uint32_t)node_count(b);
    node *n = (node *)(b->nodes.p + b->nodes.len);
    b->nodes.len += sizeof(node);
    *n = (node){.path = ref, .path_len = (uint32_t)len, .name_at = (uint32_t)name_at, .parent = parent,
                .entry = -1, .xattr_entry = -1, .target_entry = -1, .target = NO_NODE,
                .first_kid = NO_NODE, .next_sib = NO_NODE, .type = (uint8_t)type, .mode = 0755};
    if (entry >= 0) {
        set_entry(b, n, entry);
        n->xattr_entry = E(b, entry)->xattr_count ? (int32_t)entry : -1;
    }
    uint32_t h = (uint32_t)hash_bytes(path, len);
    size_t j = find_slot(b, path, len, h);
    b->slots[j] = (slot){*id + 1, h};
    return 0;
}

static size_t parent_len(const uint8_t *p, size_t len)
{
    while (len && p[len - 1] != '/')
        len--;
    return len ? len - 1 : 0;
}

/* The node of `path`'s parent directory, synthesizing missing ancestors (mode 0755,
 * owner 0, mtime 0) as builder.py's _ensure_parents does; NO_NODE when declined. */
static int ensure_parent(builder *b, const uint8_t *path, size_t len, uint32_t *out, int *declined)
{
    size_t plen = parent_len(path, len);
    uint32_t id = lookup(b, path, plen);
    if (id == NO_NODE) {
        /* find the nearest existing ancestor, then create downwards */
        size_t have = plen;
        uint32_t anc;
        do {
            have = parent_len(path, have);
            anc = lookup(b, path, have);
        } while (anc == NO_NODE);
        if (N(b, anc)->type != ET_DIR) {
            *declined = decline(b, "a path below a non-directory");
            return 0;
        }
        while (have < plen) {
            size_t next = have ? have + 1 : 0;
            while (next < plen && path[next] != '/')
                next++;
            if (add_node(b, path, next, anc, -1, ET_DIR, &anc))
                return -1;
            have = next;
        }
        id = anc;
    } else if (N(b, id)->type != ET_DIR) {
        *declined = decline(b, "a path below a non-directory");
        return 0;
    }
    *out = id;
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
        return lz_nomem(b->err);
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

static int check_entry(builder *b, const tar_entry *e)
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
    const uint8_t *a = b->t->arena.p;
    if (e->link_len && memchr(a + e->link_off, 0, e->link_len))
        return decline(b, "a NUL byte in a link target");
    const tar_xattr *x = (const tar_xattr *)b->t->xattrs.p + e->xattr_first;
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
static int link_target(builder *b, const tar_entry *e, uint32_t *out)
{
    const uint8_t *path = NULL;
    size_t len = 0;
    int r = clean_path(b, b->t->arena.p + e->link_off, e->link_len, &path, &len);
    if (r)
        return r;
    uint32_t t = len ? lookup(b, path, len) : NO_NODE;
    if (t == NO_NODE)
        return decline(b, "a hard link to a missing entry");
    for (size_t hops = 0; N(b, t)->type == ET_HARDLINK; hops++) {
        if (hops > node_count(b) || N(b, t)->target == NO_NODE)
            return decline(b, "a hard link chain that does not end");
        t = N(b, t)->target;
    }
    if (N(b, t)->type == ET_DIR)
        return decline(b, "a hard link to a directory");
    *out = t;
    return 0;
}

/* builder.py _Tree.put */
static int apply(builder *b, int64_t ei)
{
    const tar_entry *e = E(b, ei);
    int r = check_entry(b, e);
    if (r)
        return r;
    uint32_t target = NO_NODE;
    if (e->type == ET_HARDLINK && (r = link_target(b, e, &target)))
        return r;
    const uint8_t *path = NULL;
    size_t len = 0;
    if ((r = clean_path(b, b->t->arena.p + e->path_off, e->path_len, &path, &len)))
        return r;
    if (len == 0) {
        if (e->type != ET_DIR)
            return decline(b, "a layer root that is not a directory");
        node *root = N(b, 0);
        set_entry(b, root, ei);
        root->xattr_entry = e->xattr_count ? (int32_t)ei : -1;
        return 0;
    }
    uint32_t parent = NO_NODE;
    int declined = 0;
    if (ensure_parent(b, path, len, &parent, &declined))
        return -1;
    if (declined)
        return declined;
    uint32_t id = lookup(b, path, len);
    if (target != NO_NODE && target == id)
        return decline(b, "a hard link replacing its own target");
    if (target != NO_NODE) {  /* containerd links, then applies the link's header to the inode */
        node *t = N(b, target);
        t->uid = e->uid;
        t->gid = e->gid;
        t->mtime_ns = e->mtime_ns;
        if (t->type != ET_SYMLINK)
            t->mode = e->mode & 07777;
        if (e->xattr_count && t->xattr_entry >= 0)
            return decline(b, "hard link xattrs to merge");
        if (e->xattr_count)
            t->xattr_entry = (int32_t)ei;
    }
    if (id == NO_NODE) {
        if (add_node(b, path, len, parent, ei, e->type, &id))
            return -1;
    } else {
        node *n = N(b, id);
        if (n->type == ET_DIR && e->type != ET_DIR)
            return decline(b, "a directory replaced by a non-directory");
        if (n->type == ET_DIR) {  /* a directory entry merges into the existing one */
            if (e->xattr_count && n->xattr_entry >= 0)
                return decline(b, "directory xattrs to merge");
            if (e->xattr_count)
                n->xattr_entry = (int32_t)ei;
        } else {
            n->xattr_entry = e->xattr_count ? (int32_t)ei : -1;
        }
        set_entry(b, n, ei);
    }
    if (target != NO_NODE) {
        N(b, id)->target = target;
        N(b, id)->target_entry = N(b, target)->entry;
    }
    return 0;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

/* builder.py _renumber_chunks + _check_chunking: live files' chunks in stream order (the
 * tar entries' order; the scanner numbers chunks in it, which is checked) */
static int renumber_chunks(builder *b, uint64_t cs)
{
    size_t ne = tar_entry_count(b->t);
    size_t total = tar_chunk_count(b->t);
    const tar_chunk *tc = (const tar_chunk *)b->t->chunks.p;
    uint64_t next = 0, seen = 0;
    if (total && lz_buf_reserve(&b->out->chunks, total * LZ_INDEX_CHUNK_RECORD))
        return lz_nomem(b->err);
    for (size_t ei = 0; ei < ne; ei++) {
        const tar_entry *e = E(b, (int64_t)ei);
        if (e->type != ET_REG || !e->chunk_count)
            continue;
        node *n = N(b, b->node_of[ei]);
        if (n->entry != (int32_t)ei)
            continue;  /* replaced by a later entry */
        if (e->first_chunk < seen || e->first_chunk > total || e->chunk_count > total - e->first_chunk)
            return decline(b, "a chunk range beyond the chunk table");
        seen = e->first_chunk + e->chunk_count;
        n->first_chunk = (uint32_t)next;
        for (uint64_t k = 0; k < e->chunk_count; k++) {
            const tar_chunk *c = tc + e->first_chunk + k;
            if (k * cs >= e->stored_size || c->offset != e->data_offset + k * cs ||
                c->length != LZ_MIN(cs, e->stored_size - k * cs))
                return decline(b, "chunks not matching the chunk size");
            uint8_t *rec = b->out->chunks.p + b->out->chunks.len;
            put64(rec, c->offset);
            put32(rec + 8, (uint32_t)c->length);
            memcpy(rec + 12, c->sha, 32);
            b->out->chunks.len += LZ_INDEX_CHUNK_RECORD;
        }
        if (e->chunk_count * cs < e->stored_size)
            return decline(b, "chunks not covering a file");
        next += e->chunk_count;
        if (next > UINT32_MAX)
            return decline(b, "more chunks than an index holds");
    }
    size_t nn = node_count(b);
    for (uint32_t i = 0; i < nn; i++) {
        node *n = N(b, i);
        if (n->type != ET_REG)
            continue;
        const tar_entry *e = E(b, n->entry);
        if (!e->chunk_count) {
            if (e->stored_size)
                return decline(b, "chunks not covering a file");
            n->first_chunk = (uint32_t)next;
        }
    }
    b->out->chunk_count = next;
    return 0;
}

/* ---- serialization (format.py _entry_sections) ---- */

static void name_of(builder *b, const node *n, const uint8_t **p, size_t *len)
{
    *p = path_of(b, n) + n->name_at;
    *len = n->path_len - n->name_at;
}

static int by_name(const void *pa, const void *pb, void *ctx)
{
    builder *b = ctx;
    const uint8_t *x, *y;
    size_t xl, yl;
    name_of(b, N(b, *(const uint32_t *)pa), &x, &xl);
    name_of(b, N(b, *(const uint32_t *)pb), &y, &yl);
    int c = memcmp(x, y, LZ_MIN(xl, yl));
    return c ? c : (xl > yl) - (xl < yl);
}

typedef struct {
    lz_buf recs, strings;
    uint32_t slot_off[1024], slot_len[1024];  /* block-local interned strings, len+1 (0: empty) */
} block_state;

/* format.py intern: the offset of `s` in the block's string area, added once */
static int intern(block_state *bs, const uint8_t *s, size_t n, uint32_t *off)
{
    size_t j = hash_bytes(s, n) & 1023;
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

static int by_key(const void *pa, const void *pb, void *ctx)
{
    const uint8_t *a = ctx;
    const tar_xattr *x = pa, *y = pb;
    int c = memcmp(a + x->key_off, a + y->key_off, LZ_MIN(x->key_len, y->key_len));
    return c ? c : (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

/* format.py _encode_extra for an entry with xattrs and no sparse map, deduplicated */
static int extra_of(builder *b, extras_table *et, int64_t ei, lz_buf *tmp, uint32_t *off)
{
    const tar_entry *e = E(b, ei);
    const uint8_t *a = b->t->arena.p;
    tar_xattr xs[64], *x = xs;
    if (e->xattr_count > 64 && !(x = malloc(e->xattr_count * sizeof *x)))
        return lz_nomem(b->err);
    memcpy(x, (const tar_xattr *)b->t->xattrs.p + e->xattr_first, e->xattr_count * sizeof *x);
    qsort_r(x, e->xattr_count, sizeof *x, by_key, (void *)a);
    tmp->len = 0;
    uint8_t h[10];
    size_t total = 0;
    int r = 0;
    put16(h, (uint16_t)e->xattr_count);
    put32(h + 2, 0);
    put32(h + 6, 0);
    if (e->xattr_count > UINT16_MAX)
        r = decline(b, "more xattrs than an index entry holds");
    else if (lz_buf_append(tmp, h, 10))
        r = lz_nomem(b->err);
    for (size_t i = 0; i < e->xattr_count && !r; i++) {
        total += x[i].key_len + x[i].val_len;
        if (x[i].key_len > LZ_XATTR_NAME_MAX || x[i].val_len > LZ_XATTR_VALUE_MAX || total > LZ_XATTR_ENTRY_MAX) {
            r = decline(b, "an xattr larger than Linux allows");
            break;
        }
        put16(h, (uint16_t)x[i].key_len);
        put32(h + 2, (uint32_t)x[i].val_len);
        if (lz_buf_append(tmp, h, 6) || lz_buf_append(tmp, a + x[i].key_off, x[i].key_len) ||
            lz_buf_append(tmp, a + x[i].val_off, x[i].val_len))
            r = lz_nomem(b->err);
    }
    if (x != xs)
        free(x);
    if (r)
        return r;
    if ((et->count + 1) * 2 > et->nslots) {
        size_t ns = et->nslots ? et->nslots * 2 : 256;
        uint32_t *s = calloc(ns, sizeof *s), *l = calloc(ns, sizeof *l);
        if (!s || !l) {
            free(s);
            free(l);
            return lz_nomem(b->err);
        }
        for (size_t i = 0; i < et->nslots; i++) {
            if (!et->slots[i])
                continue;
            size_t j = hash_bytes(b->out->extras.p + et->slots[i] - 1, et->lens[i]) & (ns - 1);
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
    size_t j = hash_bytes(tmp->p, tmp->len) & (et->nslots - 1);
    while (et->slots[j]) {
        if (et->lens[j] == tmp->len && memcmp(b->out->extras.p + et->slots[j] - 1, tmp->p, tmp->len) == 0) {
            *off = et->slots[j] - 1;
            return 0;
        }
        j = (j + 1) & (et->nslots - 1);
    }
    if (b->out->extras.len + tmp->len >= UINT32_MAX)
        return decline(b, "more extras than an index holds");
    *off = (uint32_t)b->out->extras.len;
    if (lz_buf_append(&b->out->extras, tmp->p, tmp->len))
        return lz_nomem(b->err);
    et->slots[j] = *off + 1;
    et->lens[j] = (uint32_t)tmp->len;
    et->count++;
    return 0;
}

static int flush_block(builder *b, block_state *bs, ZSTD_CCtx *cctx, int level)
{
    lz_index_sections *o = b->out;
    if (lz_buf_append(&bs->recs, bs->strings.p, bs->strings.len))
        return lz_nomem(b->err);
    size_t bound = ZSTD_compressBound(bs->recs.len);
    if (lz_buf_reserve(&o->blocks, bound))
        return lz_nomem(b->err);
    size_t n = ZSTD_compressCCtx(cctx, o->blocks.p + o->blocks.len, bound, bs->recs.p, bs->recs.len, level);
    if (ZSTD_isError(n))
        return lz_fail(b->err, LZ_INVALID, "zstd: %s", ZSTD_getErrorName(n));
    o->blocks.len += n;
    uint8_t off[8];
    put64(off, o->blocks.len);
    if (lz_buf_append(&o->blockidx, off, 8))
        return lz_nomem(b->err);
    bs->recs.len = bs->strings.len = 0;
    memset(bs->slot_len, 0, sizeof bs->slot_len);
    return 0;
}

static int serialize(builder *b, int level)
{
    size_t nn = node_count(b);
    /* children lists, then breadth-first order with each directory's children by name */
    for (uint32_t i = (uint32_t)nn; i-- > 1;) {
        node *n = N(b, i), *p = N(b, n->parent);
        n->next_sib = p->first_kid;
        p->first_kid = i;
    }
    uint32_t *order = malloc(nn * sizeof *order);
    block_state *bs = calloc(1, sizeof *bs);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    extras_table et = {0};
    lz_buf tmp = {0};
    int r = 0;
    if (!order || !bs || !cctx) {
        r = lz_nomem(b->err);
        goto out;
    }
    size_t len = 1;
    order[0] = 0;
    N(b, 0)->rec = 0;
    for (size_t i = 0; i < len; i++) {
        node *d = N(b, order[i]);
        if (d->type != ET_DIR)
            continue;
        size_t start = len;
        for (uint32_t k = d->first_kid; k != NO_NODE; k = N(b, k)->next_sib)
            order[len++] = k;
        qsort_r(order + start, len - start, sizeof *order, by_name, b);
        d->kids_at = (uint32_t)start;  /* format.py: where the block starts, even when empty */
        d->kid_count = (uint32_t)(len - start);
        for (size_t k = start; k < len; k++)
            N(b, order[k])->rec = (uint32_t)k;
    }
    uint8_t zero[8] = {0};
    if (lz_buf_append(&b->out->blockidx, zero, 8)) {
        r = lz_nomem(b->err);
        goto out;
    }
    const uint8_t *arena = b->t->arena.p;
    for (size_t i = 0; i < len && !r; i++) {
        node *n = N(b, order[i]);
        const tar_entry *e = n->entry >= 0 ? E(b, n->entry) : NULL;
        const uint8_t *name;
        size_t name_len;
        name_of(b, n, &name, &name_len);
        if (name_len > LZ_INDEX_MAX_NAME) {
            r = decline(b, "a name longer than Linux allows");
            break;
        }
        uint32_t a = 0, bb = 0, name_off, extra = LZ_INDEX_NO_EXTRA;
        uint8_t flags = 0;
        if (n->type == ET_REG) {
            b->out->reg_count++;
            a = (uint32_t)n->first_chunk;
            bb = (uint32_t)e->chunk_count;
        } else if (n->type == ET_DIR) {
            a = n->kids_at;
            bb = n->kid_count;
        } else if (n->type == ET_CHAR || n->type == ET_BLOCK) {
            a = (uint32_t)e->devmajor;
            bb = (uint32_t)e->devminor;
        } else if (n->type == ET_HARDLINK) {
            a = N(b, n->target)->rec;
        } else if (n->type == ET_SYMLINK) {
            if (e->link_len > LZ_INDEX_MAX_LINK) {
                r = decline(b, "a symlink target longer than Linux allows");
                break;
            }
            if (intern(bs, arena + e->link_off, e->link_len, &a)) {
                r = lz_nomem(b->err);
                break;
            }
            bb = (uint32_t)e->link_len;
        }
        if (n->xattr_entry >= 0) {
            if ((r = extra_of(b, &et, n->xattr_entry, &tmp, &extra)))
                break;
            flags |= LZ_INDEX_FLAG_EXTRA;
        }
        if (intern(bs, name, name_len, &name_off)) {
            r = lz_nomem(b->err);
            break;
        }
        uint8_t rec[LZ_INDEX_ENTRY_RECORD];
        put32(rec, i ? N(b, n->parent)->rec : 0);
        put32(rec + 4, name_off);
        put16(rec + 8, (uint16_t)name_len);
        rec[10] = (uint8_t)n->type;
        rec[11] = flags;
        put16(rec + 12, (uint16_t)n->mode);
        put32(rec + 14, (uint32_t)n->uid);
        put32(rec + 18, (uint32_t)n->gid);
        put64(rec + 22, e && n->type != ET_HARDLINK ? (uint64_t)e->size : 0);
        put64(rec + 30, (uint64_t)n->mtime_ns);
        put64(rec + 38, e && n->type == ET_REG ? e->data_offset : 0);
        put32(rec + 46, a);
        put32(rec + 50, bb);
        put32(rec + 54, extra);
        if (lz_buf_append(&bs->recs, rec, sizeof rec)) {
            r = lz_nomem(b->err);
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
    lz_buf_free(&tmp);
    return r;
}

int lz_index_build(const tar_t *t, uint64_t chunk_size, int zstd_level, lz_index_sections *out,
                   lz_err *err)
{
    builder b = {.t = t, .out = out, .err = err};
    int r;
    if (chunk_size == 0 || chunk_size > UINT32_MAX)
        return lz_fail(err, LZ_INVALID, "chunk size must be in 1..2**32-1");
    uint32_t root;
    size_t ne = tar_entry_count(t);
    if (ne >= INT32_MAX)
        return lz_fail(err, LZ_INVALID, "too many entries");
    b.node_of = malloc((ne + 1) * sizeof *b.node_of);
    /* sized for every entry a node at once: synthesized directories are few */
    if (!b.node_of || lz_buf_reserve(&b.paths, 4096) || lz_buf_reserve(&b.nodes, (ne + 64) * sizeof(node))) {
        r = lz_nomem(err);
        goto out;
    }
    if (grow_slots(&b, ne + 64) || add_node(&b, (const uint8_t *)"", 0, NO_NODE, -1, ET_DIR, &root)) {
        r = -1;
        goto out;
    }
    r = 0;
    for (size_t i = 0; i < ne && !r; i++)
        r = apply(&b, (int64_t)i);
    for (size_t i = 0; i < node_count(&b) && !r; i++) {
        const node *n = N(&b, (uint32_t)i);
        if (n->type == ET_HARDLINK && N(&b, n->target)->entry != n->target_entry)
            r = decline(&b, "a hard link whose target was replaced");  /* builder.py promotes one */
    }
    if (!r)
        r = renumber_chunks(&b, chunk_size);
    if (!r)
        r = serialize(&b, zstd_level);
out:
    lz_buf_free(&b.nodes);
    lz_buf_free(&b.paths);
    lz_buf_free(&b.scratch);
    free(b.slots);
    free(b.node_of);
    return r;
}

void lz_index_sections_free(lz_index_sections *s)
{
    lz_buf_free(&s->blocks);
    lz_buf_free(&s->blockidx);
    lz_buf_free(&s->extras);
    lz_buf_free(&s->chunks);
}
