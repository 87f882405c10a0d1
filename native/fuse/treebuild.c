/* A layer's tree blob built from an index's entry records (see treebuild.h).
 *
 * It reproduces snapshotter/fs/tree.py (LayerTree.build, then compile_tree) byte for byte
 * on every index it accepts: nodes are numbered in record order, children sorted by name
 * bytes, strings interned in the order compile_tree meets them.  The one addition is the
 * node's last field (record): for a regular file, its record number + 1, so Python can
 * find the entry a forwarded read needs without a tree of its own. */
#include "treebuild.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "../indexrecord.h"
#include "../siphash.h"
#include "fastfs.h"

enum { T_REG, T_HARDLINK, T_SYMLINK, T_CHAR, T_BLOCK, T_DIR, T_FIFO, T_COUNT }; /* model.EntryType */
#define FLAG_EXTRA 1u

#define WH_PREFIX ".wh."
#define WH_LEN 4
#define OPAQUE_MARKER ".wh..wh..opq"
#define OPAQUE_KEY "trusted.overlay.opaque"
#define TRUSTED "trusted."

enum { K_PLAIN = 1, K_WHITEOUT = 2, K_OPAQUE = 4 }; /* per node */

typedef struct {
    const uint8_t *name, *strings; /* the name; its block's string area */
    size_t strings_len;
    uint64_t size;
    int64_t mtime;
    uint32_t parent, uid, gid, a, b, extra_off;
    uint16_t nlen, mode;
    uint8_t type, flags, sparse; /* sparse: a non-empty sparse map (Python serves the bytes) */
} rec_t;

typedef struct {
    const uint8_t *name;
    uint32_t dir, node, len, name_off; /* name_off: in the string table, once emitted */
} link_t;

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    uint32_t *off, *slen; /* open addressing: offset + 1 (0 = empty) and length per slot */
    size_t slots, used;
    lz_hash_key key;      /* names are the layer's choice (siphash.h) */
} strtab;

typedef struct {
    const lzt_source *src;
    rec_t *recs;
    uint32_t *node_of; /* per record: the node it made (0: none, or not a link target) */
    lzt_node *nodes;   /* [0] unused, [1] the root */
    uint32_t *rec_of;  /* per node: the record that made it */
    uint8_t *kind;     /* per node: K_* bits */
    uint32_t n_nodes;
    link_t *links;
    uint32_t n_links;
    lzt_xattr *xattrs;
    size_t n_xattrs, cap_xattrs;
    strtab st;
    uint64_t files, total;
} builder;

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* ------------------------------------------------------------------ strings */

static int st_rehash(strtab *t, size_t slots)
{
    uint32_t *off = calloc(slots, sizeof *off), *slen = calloc(slots, sizeof *slen);
    if (!off || !slen) {
        free(off);
        free(slen);
        return -ENOMEM;
    }
    for (size_t i = 0; i < t->slots; i++) {
        if (!t->off[i])
            continue;
        size_t j = lz_siphash(&t->key, t->buf + t->off[i] - 1, t->slen[i]) & (slots - 1);
        while (off[j])
            j = (j + 1) & (slots - 1);
        off[j] = t->off[i];
        slen[j] = t->slen[i];
    }
    free(t->off);
    free(t->slen);
    t->off = off;
    t->slen = slen;
    t->slots = slots;
    return 0;
}

/* The offset of s in the table, appending it the first time (compile_tree's intern). */
static int st_intern(strtab *t, const uint8_t *s, size_t n, uint32_t *at)
{
    if ((t->used + 1) * 2 > t->slots) {
        int r = st_rehash(t, t->slots ? t->slots * 2 : 4096);
        if (r)
            return r;
    }
    size_t mask = t->slots - 1, j = lz_siphash(&t->key, s, n) & mask;
    while (t->off[j]) {
        if (t->slen[j] == n && memcmp(t->buf + t->off[j] - 1, s, n) == 0) {
            *at = t->off[j] - 1;
            return 0;
        }
        j = (j + 1) & mask;
    }
    if (t->len + n >= UINT32_MAX)
        return -EOVERFLOW;
    if (t->len + n > t->cap) {
        size_t cap = t->cap ? t->cap : 1 << 16;
        while (cap < t->len + n)
            cap *= 2;
        uint8_t *buf = realloc(t->buf, cap);
        if (!buf)
            return -ENOMEM;
        t->buf = buf;
        t->cap = cap;
    }
    if (n)
        memcpy(t->buf + t->len, s, n);
    *at = (uint32_t)t->len;
    t->off[j] = (uint32_t)t->len + 1;
    t->slen[j] = (uint32_t)n;
    t->len += n;
    t->used++;
    return 0;
}

/* ------------------------------------------------------------------ records */

/* Checks record r's extras; *sparse: a non-empty sparse map. -ENOTSUP for repeated or
 * unsorted keys (Python's dict semantics decide those). */
static int extras_check(const lzt_source *s, const rec_t *r, int *sparse, const char **msg)
{
    *sparse = 0;
    if (!(r->flags & FLAG_EXTRA))
        return 0;
    const uint8_t *x = s->extras;
    size_t len = s->extras_len, pos = r->extra_off;
    if (pos + 10 > len) {
        *msg = "extras record out of range";
        return -EINVAL;
    }
    uint16_t nx = rd16(x + pos);
    uint32_t ns = rd32(x + pos + 2), has_sparse = rd32(x + pos + 6);
    pos += 10;
    const uint8_t *prev = NULL;
    size_t prev_len = 0;
    for (uint32_t i = 0; i < nx; i++) {
        if (pos + 6 > len) {
            *msg = "extras record out of range";
            return -EINVAL;
        }
        size_t kl = rd16(x + pos), vl = rd32(x + pos + 2);
        pos += 6;
        if (pos + kl + vl > len) {
            *msg = "extras record out of range";
            return -EINVAL;
        }
        if (prev) {
            int c = memcmp(prev, x + pos, prev_len < kl ? prev_len : kl);
            if (c > 0 || (c == 0 && prev_len >= kl)) {
                *msg = "xattr keys repeated or out of order";
                return -ENOTSUP;
            }
        }
        prev = x + pos;
        prev_len = kl;
        pos += kl + vl;
    }
    if (pos + 16 * (uint64_t)ns > len) {
        *msg = "extras record out of range";
        return -EINVAL;
    }
    *sparse = has_sparse && ns > 0;
    return 0;
}

static int decode(builder *b, const char **msg)
{
    const lzt_source *s = b->src;
    uint32_t rpb = s->records_per_block;
    if (!rpb || s->n_blocks != (s->entry_count + (uint64_t)rpb - 1) / rpb) {
        *msg = "entry block count does not match the entry count";
        return -EINVAL;
    }
    for (size_t bk = 0; bk < s->n_blocks; bk++) {
        uint32_t first = (uint32_t)(bk * rpb), nrec = s->entry_count - first < rpb ? s->entry_count - first : rpb;
        size_t base = (size_t)nrec * LZT_ENTRY_SIZE, blen = s->block_lens[bk];
        const uint8_t *blk = s->blocks[bk];
        if (blen < base) {
            *msg = "an entry block is short";
            return -EINVAL;
        }
        for (uint32_t i = 0; i < nrec; i++) {
            const uint8_t *p = blk + (size_t)i * LZT_ENTRY_SIZE;
            rec_t *r = &b->recs[first + i];
            r->parent = rd32(p + LZ_IE_parent);
            uint32_t noff = rd32(p + LZ_IE_name_off);
            r->nlen = rd16(p + LZ_IE_name_len);
            r->type = p[LZ_IE_type];
            r->flags = p[LZ_IE_flags];
            r->mode = rd16(p + LZ_IE_mode);
            r->uid = rd32(p + LZ_IE_uid);
            r->gid = rd32(p + LZ_IE_gid);
            r->size = rd64(p + LZ_IE_size);
            r->mtime = (int64_t)rd64(p + LZ_IE_mtime_ns);
            r->a = rd32(p + LZ_IE_a);
            r->b = rd32(p + LZ_IE_b);
            r->extra_off = rd32(p + LZ_IE_extra);
            r->strings = blk + base;
            r->strings_len = blen - base;
            if (first + i == 0) { /* the root's name is never read */
                r->name = r->strings;
                r->nlen = 0;
            } else if ((uint64_t)noff + r->nlen > r->strings_len) {
                *msg = "string reference out of range";
                return -EINVAL;
            } else {
                r->name = r->strings + noff;
            }
            if (r->type >= T_COUNT) {
                *msg = "entry of unknown type";
                return -EINVAL;
            }
            /* what decoding the entry checks in Python, whatever the entry becomes */
            if (r->type == T_REG && (uint64_t)r->a + r->b > s->chunk_count) {
                *msg = "entry chunk range out of bounds";
                return -EINVAL;
            }
            if (r->type == T_SYMLINK && (uint64_t)r->a + r->b > r->strings_len) {
                *msg = "string reference out of range";
                return -EINVAL;
            }
            if (r->type == T_HARDLINK && r->a >= s->entry_count) {
                *msg = "a hard link's target is out of range";
                return -EINVAL;
            }
            int sparse, rc = extras_check(s, r, &sparse, msg);
            if (rc)
                return rc;
            r->sparse = (uint8_t)sparse;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ nodes and links */

static uint32_t new_node(builder *b, uint32_t rec, uint32_t mode, uint32_t parent, uint8_t kind)
{
    const rec_t *r = &b->recs[rec];
    uint32_t local = b->n_nodes++;
    lzt_node *n = &b->nodes[local];
    memset(n, 0, sizeof *n);
    n->mode = mode;
    n->uid = r->uid;
    n->gid = r->gid;
    n->mtime_ns = r->mtime;
    n->nlink = 1;
    n->parent = parent;
    b->rec_of[local] = rec;
    b->kind[local] = kind;
    return local;
}

static void add_link(builder *b, uint32_t dir, const uint8_t *name, uint32_t len, uint32_t node)
{
    b->links[b->n_links++] = (link_t){.name = name, .dir = dir, .node = node, .len = len};
}

static int is_dot_name(const uint8_t *p, size_t n)
{
    return (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.');
}

static int same(const uint8_t *p, size_t n, const char *lit)
{
    size_t m = strlen(lit);
    return n == m && memcmp(p, lit, m) == 0;
}

/* The directory node a record lives in (the parent record's node). */
static int parent_dir(builder *b, uint32_t rec, uint32_t *dir, const char **msg)
{
    const rec_t *r = &b->recs[rec];
    if (r->parent >= rec) {
        *msg = "an entry has its parent after it";
        return -EINVAL;
    }
    uint32_t d = b->node_of[r->parent];
    if (!d || !S_ISDIR(b->nodes[d].mode)) {
        *msg = "an entry under a non-directory or a whiteout";
        return -ENOTSUP;
    }
    *dir = d;
    return 0;
}

static void set_attrs(builder *b, uint32_t local, const rec_t *r, uint32_t type_bits)
{
    lzt_node *n = &b->nodes[local];
    n->mode = type_bits | (r->mode & 07777u);
    if (r->sparse && S_ISREG(n->mode))
        n->flags |= LZT_NODE_PYDATA;
}

static int add_record(builder *b, uint32_t i, uint32_t *deferred, uint32_t *n_deferred, const char **msg)
{
    const rec_t *r = &b->recs[i];
    if (r->nlen == 0 || memchr(r->name, '/', r->nlen) || memchr(r->name, 0, r->nlen) || is_dot_name(r->name, r->nlen)) {
        *msg = "an entry name that is empty, '.', '..' or holds '/' or NUL";
        return -ENOTSUP;
    }
    int whiteout = r->nlen >= WH_LEN && memcmp(r->name, WH_PREFIX, WH_LEN) == 0;
    if (r->type == T_HARDLINK) {
        if (whiteout) {
            *msg = "a hard link named like a whiteout";
            return -ENOTSUP;
        }
        deferred[(*n_deferred)++] = i; /* a link may come before its target */
        return 0;
    }
    uint32_t dir;
    int rc = parent_dir(b, i, &dir, msg);
    if (rc)
        return rc;
    if (same(r->name, r->nlen, OPAQUE_MARKER)) {
        b->kind[dir] |= K_OPAQUE;
        return 0;
    }
    if (whiteout) {
        const uint8_t *real = r->name + WH_LEN;
        uint32_t real_len = r->nlen - WH_LEN;
        if (real_len == 0 || is_dot_name(real, real_len)) {
            *msg = "a whiteout of an empty, '.' or '..' name";
            return -ENOTSUP;
        }
        add_link(b, dir, real, real_len, new_node(b, i, S_IFCHR, dir, K_WHITEOUT)); /* char 0/0, mode 0 */
        return 0;
    }
    static const uint32_t type_bits[T_COUNT] = {
        [T_REG] = S_IFREG, [T_SYMLINK] = S_IFLNK, [T_CHAR] = S_IFCHR, [T_BLOCK] = S_IFBLK,
        [T_DIR] = S_IFDIR, [T_FIFO] = S_IFIFO,
    };
    uint32_t local = new_node(b, i, type_bits[r->type], dir, K_PLAIN);
    set_attrs(b, local, r, type_bits[r->type]);
    lzt_node *n = &b->nodes[local];
    switch (r->type) {
    case T_REG:
        n->size = r->size;
        n->first_chunk = r->a;
        n->chunk_count = r->b;
        n->record = i + 1;
        b->files++;
        b->total += r->size;
        break;
    case T_SYMLINK:
        n->mode = S_IFLNK | 0777; /* Linux symlinks have no mode of their own */
        n->size = r->b;
        break;
    case T_CHAR:
    case T_BLOCK:
        n->rdev = makedev(r->a, r->b);
        break;
    default:
        break;
    }
    b->node_of[i] = local;
    add_link(b, dir, r->name, r->nlen, local);
    return 0;
}

static int add_hardlink(builder *b, uint32_t i, const char **msg)
{
    const rec_t *r = &b->recs[i];
    uint32_t target = b->node_of[r->a], dir;
    if (!target || S_ISDIR(b->nodes[target].mode)) {
        *msg = "a hard link to a directory, a link or a whiteout";
        return -ENOTSUP;
    }
    int rc = parent_dir(b, i, &dir, msg);
    if (rc)
        return rc;
    b->nodes[target].nlink++;
    add_link(b, dir, r->name, r->nlen, target);
    return 0;
}

static int link_cmp(const void *pa, const void *pb)
{
    const link_t *x = pa, *y = pb;
    if (x->dir != y->dir)
        return x->dir < y->dir ? -1 : 1;
    int c = memcmp(x->name, y->name, x->len < y->len ? x->len : y->len);
    if (c)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* ------------------------------------------------------------------ the blob */

static int push_xattr(builder *b, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    if (b->n_xattrs == b->cap_xattrs) {
        size_t cap = b->cap_xattrs ? b->cap_xattrs * 2 : 256;
        lzt_xattr *x = realloc(b->xattrs, cap * sizeof *x);
        if (!x)
            return -ENOMEM;
        b->xattrs = x;
        b->cap_xattrs = cap;
    }
    lzt_xattr *x = &b->xattrs[b->n_xattrs];
    int rc = st_intern(&b->st, k, kl, &x->name_off);
    if (!rc)
        rc = st_intern(&b->st, v, vl, &x->value_off);
    if (rc)
        return rc;
    x->name_len = (uint32_t)kl;
    x->value_len = (uint32_t)vl;
    b->n_xattrs++;
    return 0;
}

/* Strings in compile_tree's order: each node's children's names, its xattrs, its target. */
static int emit(builder *b)
{
    const lzt_source *s = b->src;
    uint32_t j = 0;
    for (uint32_t local = 1; local < b->n_nodes; local++) {
        lzt_node *n = &b->nodes[local];
        n->child_start = j;
        for (; j < b->n_links && b->links[j].dir == local; j++) {
            uint32_t at;
            int rc = st_intern(&b->st, b->links[j].name, b->links[j].len, &at);
            if (rc)
                return rc;
            b->links[j].name_off = at;
        }
        n->child_count = j - n->child_start;
        n->xattr_start = (uint32_t)b->n_xattrs;
        const rec_t *r = &b->recs[b->rec_of[local]];
        if ((b->kind[local] & K_PLAIN) && (r->flags & FLAG_EXTRA)) {
            const uint8_t *x = s->extras;
            size_t pos = r->extra_off;
            uint16_t nx = rd16(x + pos);
            pos += 10;
            for (uint32_t i = 0; i < nx; i++) {
                size_t kl = rd16(x + pos), vl = rd32(x + pos + 2);
                pos += 6;
                int trusted = kl >= strlen(TRUSTED) && memcmp(x + pos, TRUSTED, strlen(TRUSTED)) == 0;
                if (!trusted) {
                    int rc = push_xattr(b, x + pos, kl, x + pos + kl, vl);
                    if (rc)
                        return rc;
                }
                pos += kl + vl;
            }
        }
        if (b->kind[local] & K_OPAQUE) {
            int rc = push_xattr(b, (const uint8_t *)OPAQUE_KEY, strlen(OPAQUE_KEY), (const uint8_t *)"y", 1);
            if (rc)
                return rc;
        }
        n->xattr_count = (uint32_t)(b->n_xattrs - n->xattr_start);
        if (S_ISLNK(n->mode) && (b->kind[local] & K_PLAIN) && r->b) {
            int rc = st_intern(&b->st, r->strings + r->a, r->b, &n->target_off);
            if (rc)
                return rc;
            n->target_len = r->b;
        }
    }
    return 0;
}

static int assemble(builder *b, lzt_built *out)
{
    if (b->n_xattrs > UINT32_MAX)
        return -EOVERFLOW;
    lzt_header h = {.magic = LZT_MAGIC, .version = 1, .n_nodes = b->n_nodes, .n_children = b->n_links,
                    .n_xattrs = (uint32_t)b->n_xattrs, .strings_len = b->st.len};
    size_t len = sizeof h + (size_t)b->n_nodes * sizeof(lzt_node) + (size_t)b->n_links * sizeof(lzt_child) +
                 b->n_xattrs * sizeof(lzt_xattr) + b->st.len;
    uint8_t *blob = malloc(len), *p = blob;
    if (!blob)
        return -ENOMEM;
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    memcpy(p, b->nodes, (size_t)b->n_nodes * sizeof(lzt_node));
    p += (size_t)b->n_nodes * sizeof(lzt_node);
    for (uint32_t i = 0; i < b->n_links; i++) {
        const link_t *l = &b->links[i];
        lzt_child c = {.name_off = l->name_off, .name_len = l->len, .child = l->node};
        memcpy(p, &c, sizeof c);
        p += sizeof c;
    }
    if (b->n_xattrs)
        memcpy(p, b->xattrs, b->n_xattrs * sizeof(lzt_xattr));
    p += b->n_xattrs * sizeof(lzt_xattr);
    if (b->st.len)
        memcpy(p, b->st.buf, b->st.len);
    out->blob = blob;
    out->len = len;
    out->files = b->files;
    out->total_size = b->total;
    return 0;
}

static void builder_free(builder *b)
{
    free(b->recs);
    free(b->node_of);
    free(b->nodes);
    free(b->rec_of);
    free(b->kind);
    free(b->links);
    free(b->xattrs);
    free(b->st.buf);
    free(b->st.off);
    free(b->st.slen);
}

static int build(builder *b, const char **msg)
{
    const lzt_source *s = b->src;
    uint32_t count = s->entry_count;
    int rc = decode(b, msg);
    if (rc)
        return rc;
    const rec_t *root = &b->recs[0];
    if (root->type != T_DIR) {
        *msg = "the first record is not the root directory";
        return -ENOTSUP;
    }
    b->n_nodes = 1; /* slot 0 stays zero */
    uint32_t top = new_node(b, 0, S_IFDIR, 1, K_PLAIN); /* the root is its own parent */
    set_attrs(b, top, root, S_IFDIR);
    b->node_of[0] = top;
    uint32_t *deferred = malloc((size_t)count * sizeof *deferred), n_deferred = 0;
    if (!deferred)
        return -ENOMEM;
    for (uint32_t i = 1; i < count && !rc; i++)
        rc = add_record(b, i, deferred, &n_deferred, msg);
    for (uint32_t k = 0; k < n_deferred && !rc; k++)
        rc = add_hardlink(b, deferred[k], msg);
    free(deferred);
    if (rc)
        return rc;
    qsort(b->links, b->n_links, sizeof *b->links, link_cmp);
    for (uint32_t j = 0; j < b->n_links; j++) {
        const link_t *l = &b->links[j];
        if (j && link_cmp(l - 1, l) == 0) {
            *msg = "a name appears twice in one directory (a whiteout beside what it hides?)";
            return -ENOTSUP;
        }
        if (S_ISDIR(b->nodes[l->node].mode))
            b->nodes[l->dir].nlink++;
    }
    for (uint32_t local = 1; local < b->n_nodes; local++) {
        lzt_node *n = &b->nodes[local];
        if (S_ISDIR(n->mode)) { /* as ext4 shows them; nlink = 2 + subdirectories */
            n->size = 4096;
            n->nlink += 1;
        }
    }
    return emit(b);
}

int lzt_build(const lzt_source *src, lzt_built *out, const char **msg)
{
    *msg = "out of memory";
    memset(out, 0, sizeof *out);
    if (src->entry_count == 0) {
        *msg = "no entries";
        return -EINVAL;
    }
    if (src->entry_count >= UINT32_MAX - 2) {
        *msg = "too many entries";
        return -EINVAL;
    }
    size_t n = src->entry_count;
    builder b = {.src = src};
    lz_hash_key_new(&b.st.key);
    b.recs = malloc(n * sizeof *b.recs);
    b.node_of = calloc(n, sizeof *b.node_of);
    b.nodes = malloc((n + 2) * sizeof *b.nodes);
    b.rec_of = malloc((n + 2) * sizeof *b.rec_of);
    b.kind = calloc(n + 2, 1);
    b.links = malloc(n * sizeof *b.links);
    int rc = -ENOMEM;
    if (b.recs && b.node_of && b.nodes && b.rec_of && b.kind && b.links) {
        memset(&b.nodes[0], 0, sizeof b.nodes[0]);
        rc = build(&b, msg);
        if (!rc)
            rc = assemble(&b, out);
        if (rc == -ENOMEM || rc == -EOVERFLOW)
            *msg = rc == -ENOMEM ? "out of memory" : "layer tree: over 4 GiB of strings or 2^32 xattrs";
    }
    builder_free(&b);
    return rc;
}
