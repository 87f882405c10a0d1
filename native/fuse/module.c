/* snapshotter._fuse: Python handle of the C FUSE filesystem (fastfs.c).
 *
 * Every call that may wait (mount, unmount, joining workers, the table write lock, replies
 * to the kernel) releases the GIL.  The C workers never touch Python objects. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <unistd.h>

#include "fastfs.h"
#include "kproto.h"
#include "treebuild.h"

typedef struct {
    PyObject_HEAD
    lzfs *fs;
    int busy; /* calls that released the GIL and still use fs (changed under the GIL only) */
} SessionObject;

/* Run stmt with the GIL released; close() from another thread waits for it to finish. */
#define UNLOCKED(self, stmt)                                                                       \
    do {                                                                                           \
        (self)->busy++;                                                                            \
        Py_BEGIN_ALLOW_THREADS                                                                     \
        stmt;                                                                                      \
        Py_END_ALLOW_THREADS                                                                       \
        (self)->busy--;                                                                            \
    } while (0)

static PyObject *os_error(int neg_errno, const char *msg)
{
    PyObject *args = Py_BuildValue("(is)", -neg_errno, msg && *msg ? msg : strerror(-neg_errno));
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static lzfs *live(SessionObject *self)
{
    if (!self->fs)
        PyErr_SetString(PyExc_ValueError, "FUSE session is closed");
    return self->fs;
}

static int slot_arg(PyObject *arg, uint32_t *slot)
{
    unsigned long v = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return -1;
    if (v > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "layer slot out of range");
        return -1;
    }
    *slot = (uint32_t)v;
    return 0;
}

static int Session_init(SessionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mountpoint", "options", "threads", "fuse_fd", "passthrough", NULL};
    const char *mountpoint, *options = "";
    int threads = 2, fuse_fd = -1, passthrough = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|siip:Session", kwlist, &mountpoint, &options, &threads, &fuse_fd,
                                     &passthrough))
        return -1;
    if (fuse_fd >= 0) { /* ours from here on, as a session that mounted itself owns its fd */
        fuse_fd = dup(fuse_fd);
        if (fuse_fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    if (self->fs) {
        PyErr_SetString(PyExc_RuntimeError, "Session already initialised");
        return -1;
    }
    const char *msg = "";
    lzfs *fs;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = lzfs_new(&fs, mountpoint, options, threads, fuse_fd, passthrough ? LZFS_PASSTHROUGH : 0, &msg);
    Py_END_ALLOW_THREADS
    if (r) {
        os_error(r, msg);
        return -1;
    }
    self->fs = fs;
    return 0;
}

static void close_session(SessionObject *self, int unmount)
{
    lzfs *fs = self->fs;
    self->fs = NULL; /* no new call starts */
    if (!fs)
        return;
    while (self->busy > 0) { /* let calls on other threads that hold fs finish first */
        Py_BEGIN_ALLOW_THREADS
        usleep(1000);
        Py_END_ALLOW_THREADS
    }
    Py_BEGIN_ALLOW_THREADS
    lzfs_close(fs, unmount);
    Py_END_ALLOW_THREADS
}

static void Session_dealloc(SessionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    close_session(self, 1); /* busy is 0 here: a call in progress holds a reference */
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *Session_start(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    int r = lzfs_start(fs);
    if (r)
        return os_error(r, "cannot start the FUSE workers");
    Py_RETURN_NONE;
}

static PyObject *Session_close(SessionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"unmount", NULL};
    int unmount = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:close", kwlist, &unmount))
        return NULL;
    close_session(self, unmount);
    Py_RETURN_NONE;
}

static PyObject *Session_fuse_fileno(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    return fs ? PyLong_FromLong(lzfs_fuse_fd(fs)) : NULL;
}

static PyObject *Session_passthrough(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    return fs ? PyBool_FromLong(lzfs_passthrough(fs)) : NULL;
}

static PyObject *Session_set_backing(SessionObject *self, PyObject *args)
{
    unsigned int slot, local;
    const char *path;
    lzfs *fs = live(self);
    if (!fs || !PyArg_ParseTuple(args, "IIs:set_backing", &slot, &local, &path))
        return NULL;
    const char *msg = "";
    int r;
    UNLOCKED(self, r = lzfs_set_backing(fs, slot, local, path, &msg));
    if (r)
        return os_error(r, msg);
    Py_RETURN_NONE;
}

static PyObject *Session_set_layer_file(SessionObject *self, PyObject *args)
{
    unsigned int slot;
    const char *path;
    Py_buffer offsets;
    lzfs *fs = live(self);
    if (!fs || !PyArg_ParseTuple(args, "Isy*:set_layer_file", &slot, &path, &offsets))
        return NULL;
    if (offsets.len % 8) {
        PyBuffer_Release(&offsets);
        PyErr_SetString(PyExc_ValueError, "offsets must be 8 bytes (u64, native order) per chunk");
        return NULL;
    }
    const char *msg = "";
    int r;
    UNLOCKED(self, r = lzfs_set_layer_file(fs, slot, path, offsets.buf, (uint64_t)offsets.len / 8, &msg));
    PyBuffer_Release(&offsets);
    if (r == -EINVAL) {
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    if (r)
        return os_error(r, msg);
    Py_RETURN_NONE;
}

static PyObject *Session_resend(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    int r = lzfs_resend(fs);
    if (r)
        return os_error(r, "the kernel cannot send unanswered FUSE requests again (FUSE_NOTIFY_RESEND, Linux >= 6.9)");
    Py_RETURN_NONE;
}

static PyObject *Session_initialized(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    return fs ? PyBool_FromLong(lzfs_initialized(fs)) : NULL;
}

static PyObject *Session_fileno(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    return fs ? PyLong_FromLong(lzfs_notify_fd(fs)) : NULL;
}

static PyObject *Session_add_layer(SessionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"slot", "name", "tree", "digests", "chunks_dir", "chunk_size", NULL};
    unsigned int slot;
    const char *name, *chunks_dir;
    Py_ssize_t name_len;
    Py_buffer tree, digests;
    unsigned long long chunk_size;
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Is#y*y*sK:add_layer", kwlist, &slot, &name, &name_len, &tree,
                                     &digests, &chunks_dir, &chunk_size))
        return NULL;
    if (digests.len % 32) {
        PyBuffer_Release(&tree);
        PyBuffer_Release(&digests);
        PyErr_SetString(PyExc_ValueError, "digests must be 32 bytes per chunk");
        return NULL;
    }
    const char *msg = "";
    int r;
    UNLOCKED(self, r = lzfs_add_layer(fs, slot, name, (size_t)name_len, tree.buf, (size_t)tree.len, digests.buf,
                       (uint64_t)digests.len / 32, chunks_dir, chunk_size, &msg));
    PyBuffer_Release(&tree);
    PyBuffer_Release(&digests);
    if (r == -EINVAL || r == -EEXIST) {
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    if (r)
        return os_error(r, msg);
    Py_RETURN_NONE;
}

static PyObject *Session_remove_layer(SessionObject *self, PyObject *arg)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    uint32_t slot;
    if (slot_arg(arg, &slot) < 0)
        return NULL;
    int r;
    UNLOCKED(self, r = lzfs_remove_layer(fs, slot));
    return PyBool_FromLong(r == 0);
}

static PyObject *Session_set_failed(SessionObject *self, PyObject *arg)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    uint32_t slot;
    if (slot_arg(arg, &slot) < 0)
        return NULL;
    return PyBool_FromLong(lzfs_set_failed(fs, slot) == 0);
}

static PyObject *Session_invalidate_entry(SessionObject *self, PyObject *arg)
{
    lzfs *fs = live(self);
    char *name;
    Py_ssize_t len;
    if (!fs || PyBytes_AsStringAndSize(arg, &name, &len) < 0)
        return NULL;
    int r;
    UNLOCKED(self, r = lzfs_inval_root_entry(fs, name, (size_t)len));
    if (r)
        return os_error(r < 0 ? r : -EIO, "cannot invalidate the entry");
    Py_RETURN_NONE;
}

/* A buffer of n >= 1 SHA-256 digests (32 bytes each); release it after use. */
static int digests_arg(PyObject *arg, Py_buffer *b)
{
    if (PyObject_GetBuffer(arg, b, PyBUF_SIMPLE) < 0)
        return -1;
    if (b->len == 0 || b->len % 32) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "digests must be 32 bytes each");
        return -1;
    }
    return 0;
}

static PyObject *Session_mark_verified(SessionObject *self, PyObject *arg)
{
    lzfs *fs = live(self);
    Py_buffer b;
    if (!fs || digests_arg(arg, &b) < 0)
        return NULL;
    int r = lzfs_mark_verified(fs, b.buf, (size_t)b.len / 32);
    PyBuffer_Release(&b);
    if (r)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Session_forget_verified(SessionObject *self, PyObject *arg)
{
    lzfs *fs = live(self);
    Py_buffer b;
    if (!fs || digests_arg(arg, &b) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < b.len; i += 32)
        lzfs_forget_verified(fs, (const uint8_t *)b.buf + i);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *Session_take(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    lzfs_miss *m;
    lzfs_access *a;
    size_t nm, na;
    if (lzfs_take(fs, &m, &nm, &a, &na))
        return PyErr_NoMemory();
    PyObject *misses = PyList_New((Py_ssize_t)nm), *acc = PyList_New((Py_ssize_t)na), *res = NULL;
    if (!misses || !acc)
        goto done;
    for (size_t i = 0; i < nm; i++) {
        PyObject *t = Py_BuildValue("(KKKI)", (unsigned long long)m[i].token, (unsigned long long)m[i].ino,
                                    (unsigned long long)m[i].off, m[i].size);
        if (!t)
            goto done; /* the tokens stay in flight: close() fails them with EIO */
        PyList_SET_ITEM(misses, (Py_ssize_t)i, t);
    }
    for (size_t i = 0; i < na; i++) {
        PyObject *t = Py_BuildValue("(KKIK)", (unsigned long long)a[i].ino, (unsigned long long)a[i].off, a[i].size,
                                    (unsigned long long)a[i].t_ns);
        if (!t)
            goto done;
        PyList_SET_ITEM(acc, (Py_ssize_t)i, t);
    }
    res = PyTuple_Pack(2, misses, acc);
done:
    free(m);
    free(a);
    Py_XDECREF(misses);
    Py_XDECREF(acc);
    return res;
}

static PyObject *Session_reply_data(SessionObject *self, PyObject *args)
{
    lzfs *fs = live(self);
    unsigned long long token;
    Py_buffer b;
    if (!fs || !PyArg_ParseTuple(args, "Ky*:reply_data", &token, &b))
        return NULL;
    int r;
    UNLOCKED(self, r = lzfs_reply_data(fs, token, b.buf, (size_t)b.len));
    PyBuffer_Release(&b);
    return PyBool_FromLong(r == 0);
}

static PyObject *Session_reply_error(SessionObject *self, PyObject *args)
{
    lzfs *fs = live(self);
    unsigned long long token;
    int err;
    if (!fs || !PyArg_ParseTuple(args, "Ki:reply_error", &token, &err))
        return NULL;
    int r;
    UNLOCKED(self, r = lzfs_reply_error(fs, token, err));
    return PyBool_FromLong(r == 0);
}

static PyObject *Session_unique(SessionObject *self, PyObject *args)
{
    lzfs *fs = live(self);
    unsigned long long token;
    if (!fs || !PyArg_ParseTuple(args, "K:unique", &token))
        return NULL;
    uint64_t u;
    UNLOCKED(self, u = lzfs_unique(fs, token));
    return PyLong_FromUnsignedLongLong(u);
}

static PyObject *Session_forget(SessionObject *self, PyObject *args)
{
    lzfs *fs = live(self);
    unsigned long long token;
    if (!fs || !PyArg_ParseTuple(args, "K:forget", &token))
        return NULL;
    int r;
    UNLOCKED(self, r = lzfs_forget(fs, token));
    return PyBool_FromLong(r == 0);
}

static PyObject *Session_counters(SessionObject *self, PyObject *unused)
{
    lzfs *fs = live(self);
    if (!fs)
        return NULL;
    uint64_t c[LZC_N];
    lzfs_counters(fs, c);
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < LZC_N; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c[i]);
        if (!v || PyDict_SetItemString(d, lzfs_counter_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef Session_methods[] = {
    {"start", (PyCFunction)Session_start, METH_NOARGS, "start the worker threads"},
    {"close", (PyCFunction)(void (*)(void))Session_close, METH_VARARGS | METH_KEYWORDS,
     "close(unmount=True): stop workers; unmount: fail pending reads (EIO) and unmount, else leave both to "
     "whoever else holds the /dev/fuse fd"},
    {"fuse_fileno", (PyCFunction)Session_fuse_fileno, METH_NOARGS, "the session's /dev/fuse fd (to hand over)"},
    {"passthrough", (PyCFunction)Session_passthrough, METH_NOARGS,
     "whether the kernel agreed to FUSE passthrough at INIT"},
    {"set_backing", (PyCFunction)Session_set_backing, METH_VARARGS,
     "set_backing(slot, local_ino, path): the file holding exactly that file's bytes; later opens pass through"},
    {"set_layer_file", (PyCFunction)Session_set_layer_file, METH_VARARGS,
     "set_layer_file(slot, path, offsets): chunk i of the layer is at offsets[i] (u64; 2**64-1: not there) in path"},
    {"resend", (PyCFunction)Session_resend, METH_NOARGS,
     "ask the kernel to send again the requests read and not answered (FUSE_NOTIFY_RESEND)"},
    {"initialized", (PyCFunction)Session_initialized, METH_NOARGS, "True once the kernel's INIT was answered"},
    {"fileno", (PyCFunction)Session_fileno, METH_NOARGS, "eventfd, readable when take() has something"},
    {"add_layer", (PyCFunction)(void (*)(void))Session_add_layer, METH_VARARGS | METH_KEYWORDS,
     "add_layer(slot, name, tree, digests, chunks_dir, chunk_size)"},
    {"remove_layer", (PyCFunction)Session_remove_layer, METH_O, "remove_layer(slot) -> bool"},
    {"set_failed", (PyCFunction)Session_set_failed, METH_O, "set_failed(slot): every read goes to Python"},
    {"invalidate_entry", (PyCFunction)Session_invalidate_entry, METH_O, "forget a top-level name in the kernel"},
    {"mark_verified", (PyCFunction)Session_mark_verified, METH_O, "mark_verified(digests: 32*n bytes)"},
    {"forget_verified", (PyCFunction)Session_forget_verified, METH_O, "forget_verified(digests: 32*n bytes)"},
    {"take", (PyCFunction)Session_take, METH_NOARGS,
     "take() -> ([(token, ino, off, size)], [(ino, off, size, t_ns)])"},
    {"reply_data", (PyCFunction)Session_reply_data, METH_VARARGS, "reply_data(token, data) -> bool"},
    {"reply_error", (PyCFunction)Session_reply_error, METH_VARARGS, "reply_error(token, errno) -> bool"},
    {"unique", (PyCFunction)Session_unique, METH_VARARGS,
     "unique(token) -> the kernel's id of that forwarded read (0: not in flight)"},
    {"forget", (PyCFunction)Session_forget, METH_VARARGS,
     "forget(token) -> bool: the read was answered by another holder of the fd; never answer it here"},
    {"counters", (PyCFunction)Session_counters, METH_NOARGS, "counters() -> {name: int}"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Session_slots[] = {
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Session_init},
    {Py_tp_dealloc, Session_dealloc},
    {Py_tp_methods, Session_methods},
    {Py_tp_doc, "Session(mountpoint, options='', threads=2): a mounted FUSE filesystem answered in C"},
    {0, NULL},
};

static PyType_Spec Session_spec = {
    "snapshotter._fuse.Session", sizeof(SessionObject), 0, Py_TPFLAGS_DEFAULT, Session_slots,
};

/* build_tree(blocks, records_per_block, entry_count, extras, chunk_count)
 *   -> (blob, files, total_size); ValueError: a malformed index; NotImplementedError: a
 *   layer only Python's LayerTree builds (the reason as its message). */
static PyObject *build_tree(PyObject *mod, PyObject *args)
{
    PyObject *list;
    unsigned int rpb, count;
    unsigned long long chunks;
    Py_buffer extras;
    if (!PyArg_ParseTuple(args, "O!IIy*K:build_tree", &PyList_Type, &list, &rpb, &count, &extras, &chunks))
        return NULL;
    PyObject *blocks = PyList_AsTuple(list); /* our own reference: the list may change meanwhile */
    Py_ssize_t nb = blocks ? PyTuple_GET_SIZE(blocks) : 0;
    const uint8_t **ptrs = PyMem_Calloc(nb ? (size_t)nb : 1, sizeof *ptrs);
    size_t *lens = PyMem_Calloc(nb ? (size_t)nb : 1, sizeof *lens);
    PyObject *result = NULL;
    if (!blocks || !ptrs || !lens) {
        if (blocks)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        PyObject *blk = PyTuple_GET_ITEM(blocks, i);
        if (!PyBytes_Check(blk)) {
            PyErr_SetString(PyExc_TypeError, "entry blocks must be bytes");
            goto done;
        }
        ptrs[i] = (const uint8_t *)PyBytes_AS_STRING(blk);
        lens[i] = (size_t)PyBytes_GET_SIZE(blk);
    }
    lzt_source src = {.blocks = ptrs, .block_lens = lens, .n_blocks = (size_t)nb, .records_per_block = rpb,
                      .entry_count = count, .extras = extras.buf, .extras_len = (size_t)extras.len,
                      .chunk_count = chunks};
    lzt_built out;
    const char *msg = "";
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = lzt_build(&src, &out, &msg);
    Py_END_ALLOW_THREADS
    if (r == -EINVAL)
        PyErr_SetString(PyExc_ValueError, msg);
    else if (r == -ENOTSUP)
        PyErr_SetString(PyExc_NotImplementedError, msg);
    else if (r)
        os_error(r, msg);
    else {
        result = Py_BuildValue("(y#KK)", (const char *)out.blob, (Py_ssize_t)out.len,
                               (unsigned long long)out.files, (unsigned long long)out.total_size);
        free(out.blob);
    }
done:
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_XDECREF(blocks);
    PyBuffer_Release(&extras);
    return result;
}

/* reply(fd, unique, data_or_errno): answer a request of the FUSE connection behind fd
 * directly; bytes are the reply's data, an int an error. A request the kernel no longer
 * waits for (answered, interrupted, replayed under another unique) is no error: nobody is
 * left to tell. Raises OSError otherwise (EBADF, ...). */
static PyObject *reply(PyObject *mod, PyObject *args)
{
    (void)mod;
    int fd;
    unsigned long long unique;
    PyObject *what;
    if (!PyArg_ParseTuple(args, "iKO:reply", &fd, &unique, &what))
        return NULL;
    int r;
    if (PyLong_Check(what)) {
        int err = PyLong_AsLong(what);
        if (err <= 0 || err > 4095) {
            PyErr_SetString(PyExc_ValueError, "errno must be 1..4095");
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS r = lzk_reply_err(fd, unique, err);
        Py_END_ALLOW_THREADS
    } else {
        Py_buffer b;
        if (PyObject_GetBuffer(what, &b, PyBUF_SIMPLE) < 0)
            return NULL;
        Py_BEGIN_ALLOW_THREADS r = lzk_reply(fd, unique, 0, b.buf, (size_t)b.len, NULL, 0);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&b);
    }
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef fuse_functions[] = {
    {"build_tree", build_tree, METH_VARARGS,
     "build_tree(blocks, records_per_block, entry_count, extras, chunk_count) -> (blob, files, total_size)"},
    {"reply", reply, METH_VARARGS,
     "reply(fd, unique, data: bytes | errno: int): answer a FUSE request on that /dev/fuse fd directly"},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ the tree blob's layout */

/* A field of a tree record as Python packs it: name, offset, size, signed. The records are
 * declared once, in fastfs.h; snapshotter/fs/compiled.py builds its struct formats from
 * these (TREE_LAYOUT), so a field added, moved or widened there reaches Python by itself. */
typedef struct {
    const char *name;
    size_t offset, size;
    int is_signed;
} tree_field;

#define SIGNED(x) _Generic((x), int8_t: 1, int16_t: 1, int32_t: 1, int64_t: 1, default: 0)
#define FIELD(T, m) {#m, offsetof(T, m), sizeof(((T *)0)->m), SIGNED(((T *)0)->m)}

static const tree_field header_fields[] = {
    FIELD(lzt_header, magic),    FIELD(lzt_header, version),  FIELD(lzt_header, n_nodes),
    FIELD(lzt_header, n_children), FIELD(lzt_header, n_xattrs), FIELD(lzt_header, pad),
    FIELD(lzt_header, strings_len), {NULL, sizeof(lzt_header), 0, 0},
};
static const tree_field node_fields[] = {
    FIELD(lzt_node, size),        FIELD(lzt_node, mtime_ns),    FIELD(lzt_node, rdev),
    FIELD(lzt_node, first_chunk), FIELD(lzt_node, mode),        FIELD(lzt_node, uid),
    FIELD(lzt_node, gid),         FIELD(lzt_node, nlink),       FIELD(lzt_node, parent),
    FIELD(lzt_node, child_start), FIELD(lzt_node, child_count), FIELD(lzt_node, xattr_start),
    FIELD(lzt_node, xattr_count), FIELD(lzt_node, target_off),  FIELD(lzt_node, target_len),
    FIELD(lzt_node, chunk_count), FIELD(lzt_node, flags),       FIELD(lzt_node, record),
    {NULL, sizeof(lzt_node), 0, 0},
};
static const tree_field child_fields[] = {
    FIELD(lzt_child, name_off), FIELD(lzt_child, name_len), FIELD(lzt_child, child),
    {NULL, sizeof(lzt_child), 0, 0},
};
static const tree_field xattr_fields[] = {
    FIELD(lzt_xattr, name_off), FIELD(lzt_xattr, name_len), FIELD(lzt_xattr, value_off),
    FIELD(lzt_xattr, value_len), {NULL, sizeof(lzt_xattr), 0, 0},
};

/* (size, ((name, offset, size, signed), ...)) of one record; the sentinel carries the size */
static PyObject *record_layout(const tree_field *f)
{
    PyObject *fields = PyList_New(0);
    if (!fields)
        return NULL;
    for (; f->name; f++) {
        PyObject *t = Py_BuildValue("(snnO)", f->name, (Py_ssize_t)f->offset, (Py_ssize_t)f->size,
                                    f->is_signed ? Py_True : Py_False);
        if (!t || PyList_Append(fields, t)) {
            Py_XDECREF(t);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(t);
    }
    PyObject *tuple = PyList_AsTuple(fields);
    Py_DECREF(fields);
    return tuple ? Py_BuildValue("(nN)", (Py_ssize_t)f->offset, tuple) : NULL;
}

static int add_tree_layout(PyObject *m)
{
    PyObject *d = Py_BuildValue("{sNsNsNsN}", "header", record_layout(header_fields), "node",
                                record_layout(node_fields), "child", record_layout(child_fields), "xattr",
                                record_layout(xattr_fields));
    if (!d)
        return -1;
    int r = PyModule_AddObjectRef(m, "TREE_LAYOUT", d);
    Py_DECREF(d);
    return r;
}

static int fuse_exec(PyObject *m)
{
    PyObject *t = PyType_FromModuleAndSpec(m, &Session_spec, NULL);
    if (!t || PyModule_AddObjectRef(m, "Session", t)) {
        Py_XDECREF(t);
        return -1;
    }
    Py_DECREF(t);
    /* the tree blob's records (TREE_LAYOUT), and the size of the index entry record the
     * tree builder reads: snapshotter/fs/compiled.py refuses an extension that disagrees */
    return add_tree_layout(m) || PyModule_AddIntConstant(m, "TREE_MAGIC", LZT_MAGIC) ||
           PyModule_AddIntConstant(m, "NODE_PYDATA", LZT_NODE_PYDATA) ||
           PyModule_AddIntConstant(m, "INDEX_ENTRY_RECORD_SIZE", LZT_ENTRY_SIZE);
}

static PyModuleDef_Slot fuse_slots[] = {
    {Py_mod_exec, fuse_exec},
    {0, NULL},
};

static struct PyModuleDef fuse_module = {
    PyModuleDef_HEAD_INIT, "_fuse", "lazysnap's FUSE filesystem: the hit path in C.", 0, fuse_functions, fuse_slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuse(void) { return PyModuleDef_Init(&fuse_module); }
