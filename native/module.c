/* Python bindings of the lazysnap C core: snapshotter._core.
 *
 * A narrow surface over buffers: Scanner (streaming one-pass indexer), decompress_range,
 * sha256, verify_chunks.  Every byte loop runs with the GIL released; errors become
 * typed exceptions kept in module state (no C globals). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "buildinfo.h"
#include "chunkfiles.h"
#include "layerfile.h"
#include "indexbuild.h"
#include "range.h"
#include "scanner.h"
#include "window_refs.h"
#include "zstream.h"

typedef struct {
    PyObject *LayerError, *CorruptLayerError, *TruncatedLayerError;
    PyObject *ScannerType, *ZstdStreamType;
} core_state;

static inline core_state *get_state(PyObject *module) { return PyModule_GetState(module); }

static PyObject *raise_err(core_state *st, const lz_err *e)
{
    switch (e->kind) {
    case LZ_CORRUPT: PyErr_SetString(st->CorruptLayerError, e->msg); break;
    case LZ_TRUNCATED: PyErr_SetString(st->TruncatedLayerError, e->msg); break;
    case LZ_NOMEM: PyErr_NoMemory(); break;
    default: PyErr_SetString(PyExc_ValueError, e->msg[0] ? e->msg : "invalid argument");
    }
    return NULL;
}

static int parse_format(PyObject *o, int *fmt)
{
    if (o == NULL || o == Py_None) {
        *fmt = FMT_UNKNOWN;
        return 0;
    }
    if (!PyUnicode_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "format must be 'gzip', 'zstd', 'tar' or None");
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(o, "gzip") == 0)
        *fmt = FMT_GZIP;
    else if (PyUnicode_CompareWithASCIIString(o, "zstd") == 0)
        *fmt = FMT_ZSTD;
    else if (PyUnicode_CompareWithASCIIString(o, "tar") == 0)
        *fmt = FMT_TAR;
    else {
        PyErr_SetString(PyExc_ValueError, "format must be 'gzip', 'zstd', 'tar' or None");
        return -1;
    }
    return 0;
}

static const char *format_name(int fmt)
{
    return fmt == FMT_GZIP ? "gzip" : fmt == FMT_ZSTD ? "zstd" : "tar";
}

/* ---------------- Scanner ---------------- */

typedef struct {
    PyObject_HEAD
    PyObject *module;
    scanner_t *sc;
    int busy;
    int want_diff;
    lz_layer_file_sink *file_sink;  /* layer_file=: the scan writes its chunks into one file */
    lz_index_builder *builder;  /* build_index=True: entries applied as scanned, none kept */
} ScannerObject;

/* layer_file=(fd, budget bytes, smallest file), as ChunkStore.layer_file_target gives it:
 * the fd stays the caller's and must outlive the scan. */
static lz_layer_file_sink *file_sink_new(PyObject *spec, unsigned long long *min_file)
{
    int fd;
    unsigned long long budget;
    if (!PyArg_ParseTuple(spec, "iKK:layer_file", &fd, &budget, min_file))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "layer_file needs an open file descriptor");
        return NULL;
    }
    lz_layer_file_sink *s = calloc(1, sizeof *s);
    if (!s) {
        PyErr_NoMemory();
        return NULL;
    }
    s->fd = fd;
    s->budget = budget;
    return s;
}

static int Scanner_init(ScannerObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"span_size", "chunk_size", "diff_id", "format", "hash_thread",
                             "simd", "sparse_windows", "build_index", "layer_file", NULL};
    unsigned long long span = 4u << 20, chunk = 1u << 20;
    int diff = 0, threaded = 1, simd = 1, sparse = 1, build = 0;
    PyObject *fmt_o = Py_None, *file_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|KKpOppppO:Scanner", kwlist, &span, &chunk, &diff,
                                     &fmt_o, &threaded, &simd, &sparse, &build, &file_o))
        return -1;
    if (build && chunk > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "build_index needs a chunk_size below 2**32");
        return -1;
    }
    if (span < 1024 || chunk < 1 || chunk > (1ull << 40)) {
        PyErr_SetString(PyExc_ValueError, "span_size must be >= 1024 and chunk_size in 1..2**40");
        return -1;
    }
    int fmt;
    if (parse_format(fmt_o, &fmt))
        return -1;
    if (self->sc) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner already initialised");
        return -1;
    }
    lz_layer_file_sink *file_sink = NULL;
    unsigned long long min_file = 0;
    if (file_o != Py_None && !(file_sink = file_sink_new(file_o, &min_file)))
        return -1;
    lz_index_builder *builder = NULL;
    if (build && !(builder = lz_index_builder_new(chunk))) {
        free(file_sink);
        PyErr_NoMemory();
        return -1;
    }
    lz_err err = {0};
    scanner_t *sc;
    Py_BEGIN_ALLOW_THREADS
    sc = scanner_new(span, chunk, diff, fmt, threaded, simd, sparse, &err);
    Py_END_ALLOW_THREADS
    if (!sc) {
        free(file_sink);
        lz_index_builder_free(builder);
        raise_err(get_state(self->module), &err);
        return -1;
    }
    if (file_sink)
        tar_set_sink(&sc->tar, lz_layer_file_sink_write, file_sink, min_file);
    if (builder)
        tar_set_consumer(&sc->tar, lz_index_apply, builder);
    self->sc = sc;
    self->file_sink = file_sink;
    self->builder = builder;
    self->want_diff = diff;
    return 0;
}

static PyObject *Scanner_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ScannerObject *self = (ScannerObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->module = PyType_GetModule(type);
    if (!self->module) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(self->module);
    return (PyObject *)self;
}

static void Scanner_dealloc(ScannerObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->sc) {
        scanner_t *sc = self->sc;
        self->sc = NULL;
        Py_BEGIN_ALLOW_THREADS
        scanner_free(sc);
        Py_END_ALLOW_THREADS
    }
    free(self->file_sink);
    lz_index_builder_free(self->builder);
    Py_XDECREF(self->module);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int acquire(ScannerObject *self)
{
    if (!self->sc) {
        PyErr_SetString(PyExc_ValueError, "Scanner is finished or not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner used from two threads at once");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static PyObject *Scanner_feed(ScannerObject *self, PyObject *arg)
{
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE))
        return NULL;
    if (acquire(self)) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int rc;
    scanner_t *sc = self->sc;
    Py_BEGIN_ALLOW_THREADS
    rc = scanner_feed(sc, buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&buf);
    if (rc)
        return raise_err(get_state(self->module), &sc->err);
    Py_RETURN_NONE;
}

static PyObject *u64(uint64_t v) { return PyLong_FromUnsignedLongLong(v); }
static PyObject *i64(int64_t v) { return PyLong_FromLongLong(v); }

static PyObject *build_entry(tar_t *t, const tar_entry *e)
{
    const uint8_t *a = t->arena.p;
    PyObject *xattrs = Py_None, *sparse = Py_None;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (e->xattr_count) {
        Py_DECREF(xattrs);
        xattrs = PyDict_New();
        if (!xattrs)
            goto fail;
        const tar_xattr *x = (const tar_xattr *)t->xattrs.p + e->xattr_first;
        for (size_t i = 0; i < e->xattr_count; i++) {
            PyObject *k = PyUnicode_DecodeUTF8((const char *)a + x[i].key_off,
                                               (Py_ssize_t)x[i].key_len, "surrogateescape");
            PyObject *v = PyBytes_FromStringAndSize((const char *)a + x[i].val_off,
                                                    (Py_ssize_t)x[i].val_len);
            int r = (k && v) ? PyDict_SetItem(xattrs, k, v) : -1;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (r)
                goto fail;
        }
    }
    if (e->sparse_count >= 0) {
        Py_DECREF(sparse);
        sparse = PyList_New((Py_ssize_t)e->sparse_count);
        if (!sparse)
            goto fail;
        const uint64_t *s = (const uint64_t *)t->sparse.p + 2 * e->sparse_first;
        for (int64_t i = 0; i < e->sparse_count; i++) {
            PyObject *tup = Py_BuildValue("(KK)", (unsigned long long)s[2 * i],
                                          (unsigned long long)s[2 * i + 1]);
            if (!tup)
                goto fail;
            PyList_SET_ITEM(sparse, (Py_ssize_t)i, tup);
        }
    }
    PyObject *tup = PyTuple_New(16);
    if (!tup)
        goto fail;
    PyObject *items[16] = {
        PyBytes_FromStringAndSize((const char *)a + e->path_off, (Py_ssize_t)e->path_len),
        PyLong_FromLong(e->type),
        PyLong_FromUnsignedLong(e->mode),
        i64(e->uid), i64(e->gid), i64(e->size), i64(e->mtime_ns),
        PyBytes_FromStringAndSize((const char *)a + e->link_off, (Py_ssize_t)e->link_len),
        i64(e->devmajor), i64(e->devminor),
        xattrs,
        u64(e->data_offset), u64(e->stored_size), u64(e->first_chunk), u64(e->chunk_count),
        sparse,
    };
    int bad = 0;
    for (int i = 0; i < 16; i++) {
        if (!items[i])
            bad = 1;
        else
            PyTuple_SET_ITEM(tup, i, items[i]);
    }
    if (bad) {
        /* fill holes so the tuple can be freed */
        for (int i = 0; i < 16; i++)
            if (!items[i]) {
                Py_INCREF(Py_None);
                PyTuple_SET_ITEM(tup, i, Py_None);
            }
        Py_DECREF(tup);
        return NULL;
    }
    return tup;
fail:
    Py_XDECREF(xattrs);
    Py_XDECREF(sparse);
    return NULL;
}

static PyObject *build_result(scanner_t *sc, const uint8_t blob[32], const uint8_t diff[32],
                              int want_diff, int with_entries)
{
    tar_t *t = &sc->tar;
    PyObject *d = PyDict_New(), *v = NULL;
    if (!d)
        return NULL;
#define SET(key, expr)                                          \
    do {                                                        \
        v = (expr);                                             \
        if (!v || PyDict_SetItemString(d, key, v))              \
            goto fail;                                          \
        Py_DECREF(v);                                           \
        v = NULL;                                               \
    } while (0)
    SET("format", PyUnicode_FromString(format_name(sc->format)));
    SET("compressed_size", u64(sc->in_total));
    SET("uncompressed_size", u64(sc->out_total));
    SET("blob_digest", PyBytes_FromStringAndSize((const char *)blob, 32));
    if (want_diff)
        SET("diff_id", PyBytes_FromStringAndSize((const char *)diff, 32));
    else
        SET("diff_id", (Py_INCREF(Py_None), Py_None));
    int nframes = 0;
    const lz_checkpoint *cp = (const lz_checkpoint *)sc->cps.p;
    size_t ncp = sc->cps.len / sizeof *cp;
    for (size_t i = 0; i < ncp; i++)
        nframes += cp[i].kind == CK_STREAM_START || cp[i].kind == CK_ZSTD_FRAME;
    SET("sequential_only", PyBool_FromLong(sc->format == FMT_ZSTD && nframes <= 1));
    SET("hash_thread_cpu_ns", u64(sc->thread_cpu_ns));
    SET("stored", PyBytes_FromStringAndSize((const char *)t->stored.p, (Py_ssize_t)t->stored.len));
    SET("store_errno", PyLong_FromLong(t->sink_errno));

    size_t ne = with_entries ? tar_entry_count(t) : 0;
    v = PyList_New((Py_ssize_t)ne);
    if (!v)
        goto fail;
    for (size_t i = 0; i < ne; i++) {
        PyObject *e = build_entry(t, (const tar_entry *)t->entries.p + i);
        if (!e)
            goto fail;
        PyList_SET_ITEM(v, (Py_ssize_t)i, e);
    }
    if (PyDict_SetItemString(d, "entries", v))
        goto fail;
    Py_CLEAR(v);

    size_t nc = with_entries ? tar_chunk_count(t) : 0;
    v = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nc * LZ_CHUNK_RECORD));
    if (!v)
        goto fail;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(v);
    const tar_chunk *c = (const tar_chunk *)t->chunks.p;
    for (size_t i = 0; i < nc; i++) {
        tar_put_chunk_record(out + LZ_CHUNK_RECORD * i, &c[i]);
    }
    if (PyDict_SetItemString(d, "chunks", v))
        goto fail;
    Py_CLEAR(v);

    /* end marks as packed little-endian u64 pairs (uoff, coff) */
    v = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sc->marks.len);
    if (!v)
        goto fail;
    {
        const uint64_t *m = (const uint64_t *)sc->marks.p;
        uint8_t *mo = (uint8_t *)PyBytes_AS_STRING(v);
        for (size_t i = 0; i < sc->marks.len / sizeof *m; i++)
            lz_put_le64(mo + 8 * i, m[i]);
    }
    if (PyDict_SetItemString(d, "marks", v))
        goto fail;
    Py_CLEAR(v);

    v = PyList_New((Py_ssize_t)ncp);
    if (!v)
        goto fail;
    for (size_t i = 0; i < ncp; i++) {
        PyObject *tup = Py_BuildValue("(iKKiy#)", cp[i].kind, (unsigned long long)cp[i].coff,
                                      (unsigned long long)cp[i].uoff, cp[i].bits,
                                      cp[i].window ? (const char *)cp[i].window : "",
                                      (Py_ssize_t)cp[i].wlen);
        if (!tup)
            goto fail;
        PyList_SET_ITEM(v, (Py_ssize_t)i, tup);
    }
    if (PyDict_SetItemString(d, "checkpoints", v))
        goto fail;
    Py_CLEAR(v);
#undef SET
    return d;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

static PyObject *bytes_of(const lz_buf *b)
{
    return PyBytes_FromStringAndSize((const char *)b->p, (Py_ssize_t)b->len);
}

/* The "index" item of a finish(index_chunk_size=N) result: the sections, or None. */
static int set_index(PyObject *d, int built, lz_index_sections *ix)
{
    PyObject *v = built ? Py_BuildValue("(NNNNKKK)", bytes_of(&ix->blocks), bytes_of(&ix->blockidx),
                                        bytes_of(&ix->extras), bytes_of(&ix->chunks),
                                        (unsigned long long)ix->entry_count,
                                        (unsigned long long)ix->reg_count,
                                        (unsigned long long)ix->chunk_count)
                        : (Py_INCREF(Py_None), Py_None);
    if (!v || PyDict_SetItemString(d, "index", v)) {
        Py_XDECREF(v);
        return -1;
    }
    Py_DECREF(v);
    v = built ? (Py_INCREF(Py_None), Py_None) : PyUnicode_FromString(ix->declined);
    int r = !v || PyDict_SetItemString(d, "index_declined", v);
    Py_XDECREF(v);
    return r ? -1 : 0;
}

static PyObject *Scanner_finish(ScannerObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index_chunk_size", NULL};
    unsigned long long index_chunk = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|K:finish", kwlist, &index_chunk))
        return NULL;
    if (index_chunk > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "index_chunk_size must be below 2**32");
        return NULL;
    }
    if (acquire(self))
        return NULL;
    scanner_t *sc = self->sc;
    uint8_t blob[32], diff[32];
    int rc, built = LZ_INDEX_DECLINED;
    lz_index_sections ix = {0};
    lz_err ierr = {0};
    lz_index_builder *builder = self->builder;
    self->builder = NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = scanner_finish(sc, blob, diff);
    if (!rc && builder)
        built = lz_index_finish(builder, &sc->tar, 6, &ix, &ierr);
    else if (!rc && index_chunk)
        built = lz_index_build(&sc->tar, index_chunk, 6, &ix, &ierr);
    lz_index_builder_free(builder);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyObject *res = NULL;
    if (rc)
        raise_err(get_state(self->module), &sc->err);
    else if (built < 0)
        raise_err(get_state(self->module), &ierr);
    else {
        res = build_result(sc, blob, diff, self->want_diff, built != LZ_INDEX_BUILT && !builder);
        if (res && (index_chunk || builder) && set_index(res, built == LZ_INDEX_BUILT, &ix))
            Py_CLEAR(res);
        PyObject *kept = PyBool_FromLong(!builder);
        if (res && PyDict_SetItemString(res, "entries_kept", kept))
            Py_CLEAR(res);
        Py_DECREF(kept);
    }
    lz_index_sections_free(&ix);
    self->sc = NULL;
    Py_BEGIN_ALLOW_THREADS
    scanner_free(sc);
    Py_END_ALLOW_THREADS
    return res;
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_O,
     "feed(buffer): the next compressed bytes of the layer, in order."},
    {"finish", (PyCFunction)(void (*)(void))Scanner_finish, METH_VARARGS | METH_KEYWORDS,
     "finish(index_chunk_size=0) -> dict: end of input; returns the scan result, with the "
     "index sections built in C when index_chunk_size is given or the scanner was made with "
     "build_index=True (see snapshotter/native.py)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Scanner_slots[] = {
    {Py_tp_new, Scanner_new},
    {Py_tp_init, Scanner_init},
    {Py_tp_dealloc, Scanner_dealloc},
    {Py_tp_methods, Scanner_methods},
    {Py_tp_doc, "Scanner(span_size=4<<20, chunk_size=1<<20, diff_id=False, format=None, "
                "hash_thread=True, simd=True, sparse_windows=True, build_index=False, layer_file=None): "
                "one-pass streaming layer indexer."},
    {0, NULL},
};

static PyType_Spec Scanner_spec = {
    "snapshotter._core.Scanner", sizeof(ScannerObject), 0,
    Py_TPFLAGS_DEFAULT, Scanner_slots,
};

/* ---------------- ZstdStream ---------------- */

typedef struct {
    PyObject_HEAD
    lz_zstream *z;
    int busy; /* a call released the GIL and still uses z (checked and set under the GIL) */
} ZstdStreamObject;

static PyObject *ZstdStream_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, ":ZstdStream") || (kw && PyDict_Size(kw))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "ZstdStream() takes no arguments");
        return NULL;
    }
    ZstdStreamObject *self = (ZstdStreamObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->z = lz_zstream_new();
    if (!self->z) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void ZstdStream_dealloc(ZstdStreamObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    lz_zstream_free(self->z);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *ZstdStream_decompress(ZstdStreamObject *self, PyObject *args)
{
    Py_buffer in;
    Py_ssize_t max_output;
    if (!PyArg_ParseTuple(args, "y*n:decompress", &in, &max_output))
        return NULL;
    if (max_output < 0 || self->busy) {
        PyBuffer_Release(&in);
        PyErr_SetString(self->busy ? PyExc_RuntimeError : PyExc_ValueError,
                        self->busy ? "ZstdStream is in use by another thread" : "max_output must be >= 0");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, max_output);
    if (!out) {
        PyBuffer_Release(&in);
        return NULL;
    }
    size_t used = 0, made = 0;
    int eof = 0, rc;
    lz_err err = {0};
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = lz_zstream_decode(self->z, in.buf, (size_t)in.len, (uint8_t *)PyBytes_AS_STRING(out), (size_t)max_output,
                           &used, &made, &eof, &err);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&in);
    if (rc) {
        Py_DECREF(out);
        return raise_err(PyType_GetModuleState(Py_TYPE(self)), &err);
    }
    if ((size_t)max_output != made && _PyBytes_Resize(&out, (Py_ssize_t)made))
        return NULL;
    return Py_BuildValue("(NnO)", out, (Py_ssize_t)used, eof ? Py_True : Py_False);
}

static PyMethodDef ZstdStream_methods[] = {
    {"decompress", (PyCFunction)ZstdStream_decompress, METH_VARARGS,
     "decompress(data, max_output) -> (output, bytes of data consumed, frame ended)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ZstdStream_slots[] = {
    {Py_tp_new, ZstdStream_new},
    {Py_tp_dealloc, ZstdStream_dealloc},
    {Py_tp_methods, ZstdStream_methods},
    {Py_tp_doc, "ZstdStream(): one zstd frame decoded in calls that each produce at most max_output bytes."},
    {0, NULL},
};

static PyType_Spec ZstdStream_spec = {
    "snapshotter._core.ZstdStream", sizeof(ZstdStreamObject), 0, Py_TPFLAGS_DEFAULT, ZstdStream_slots,
};

/* ---------------- functions ---------------- */

static PyObject *core_decompress_range(PyObject *module, PyObject *args)
{
    PyObject *fmt_o;
    int kind, bits;
    Py_buffer win, data;
    unsigned long long skip, length;
    if (!PyArg_ParseTuple(args, "Oiiy*y*KK:decompress_range", &fmt_o, &kind, &bits, &win, &data,
                          &skip, &length))
        return NULL;
    PyObject *res = NULL;
    int fmt;
    if (parse_format(fmt_o, &fmt) || fmt == FMT_UNKNOWN) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "format is required");
        goto done;
    }
    if (length > (unsigned long long)PY_SSIZE_T_MAX || win.len > (Py_ssize_t)LZ_HIST) {
        PyErr_SetString(PyExc_ValueError, "length too large or window over 32 KiB");
        goto done;
    }
    res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
    if (!res)
        goto done;
    lz_err err = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lz_decompress_range(fmt, kind, bits, win.buf, (size_t)win.len, data.buf,
                             (size_t)data.len, skip, (uint8_t *)PyBytes_AS_STRING(res),
                             (size_t)length, &err);
    Py_END_ALLOW_THREADS
    if (rc) {
        Py_CLEAR(res);
        raise_err(get_state(module), &err);
    }
done:
    PyBuffer_Release(&win);
    PyBuffer_Release(&data);
    return res;
}

static PyObject *core_sha256(PyObject *module, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE))
        return NULL;
    uint8_t md[32];
    if (b.len > 65536) {
        Py_BEGIN_ALLOW_THREADS
        SHA256(b.buf, (size_t)b.len, md);
        Py_END_ALLOW_THREADS
    } else {
        SHA256(b.buf, (size_t)b.len, md);
    }
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)md, 32);
}

static PyObject *core_verify_chunks(PyObject *module, PyObject *args)
{
    Py_buffer data, rec;
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "y*Ky*:verify_chunks", &data, &base, &rec))
        return NULL;
    PyObject *res = NULL;
    if (rec.len % LZ_CHUNK_RECORD) {
        PyErr_SetString(PyExc_ValueError, "records must be a multiple of 48 bytes");
        goto done;
    }
    size_t n = (size_t)rec.len / LZ_CHUNK_RECORD;
    const uint8_t *r = rec.buf;
    for (size_t i = 0; i < n; i++) {
        uint64_t off = lz_get_le64(r + LZ_CHUNK_RECORD * i), len = lz_get_le64(r + LZ_CHUNK_RECORD * i + 8);
        if (off < base || off - base > (uint64_t)data.len || len > (uint64_t)data.len - (off - base)) {
            PyErr_Format(PyExc_ValueError, "chunk record %zu lies outside the data", i);
            goto done;
        }
    }
    long long bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) {
        uint8_t md[32];
        uint64_t off = lz_get_le64(r + LZ_CHUNK_RECORD * i), len = lz_get_le64(r + LZ_CHUNK_RECORD * i + 8);
        SHA256((const uint8_t *)data.buf + (off - base), (size_t)len, md);
        if (memcmp(md, r + LZ_CHUNK_RECORD * i + 16, 32)) {
            bad = (long long)i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    res = PyLong_FromLongLong(bad);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&rec);
    return res;
}

static PyObject *core_write_chunks(PyObject *module, PyObject *args)
{
    const char *dir, *tmp, *tag;
    PyObject *items;
    int policy;
    if (!PyArg_ParseTuple(args, "sssOi:write_chunks", &dir, &tmp, &tag, &items, &policy))
        return NULL;
    if (policy < LZ_FSYNC_NONE || policy > LZ_FSYNC_FULL) {
        PyErr_SetString(PyExc_ValueError, "fsync policy must be 0, 1 or 2");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(items, "items must be a sequence of (digest, data)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    Py_buffer *bufs = PyMem_Calloc(n ? (size_t)n : 1, sizeof *bufs);
    const uint8_t **dig = PyMem_Calloc(n ? (size_t)n : 1, sizeof *dig), **dat = PyMem_Calloc(n ? (size_t)n : 1, sizeof *dat);
    size_t *len = PyMem_Calloc(n ? (size_t)n : 1, sizeof *len);
    int *status = PyMem_Calloc(n ? (size_t)n : 1, sizeof *status);
    PyObject *res = NULL;
    if (!bufs || !dig || !dat || !len || !status) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, got), *d;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 2 || !PyBytes_Check(d = PyTuple_GET_ITEM(it, 0)) ||
            PyBytes_GET_SIZE(d) != 32) {
            PyErr_SetString(PyExc_ValueError, "each item must be (32-byte digest, data)");
            goto done;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(it, 1), &bufs[got], PyBUF_SIMPLE) < 0)
            goto done;
        dig[got] = (const uint8_t *)PyBytes_AS_STRING(d);
        dat[got] = bufs[got].buf;
        len[got] = (size_t)bufs[got].len;
    }
    Py_BEGIN_ALLOW_THREADS
    lz_write_chunks(dir, tmp, tag, (size_t)n, dig, dat, len, policy, status);
    Py_END_ALLOW_THREADS
    res = PyList_New(n);
    for (Py_ssize_t i = 0; res && i < n; i++) {
        PyObject *v = PyLong_FromLong(status[i]);
        if (!v) {
            Py_CLEAR(res);
            break;
        }
        PyList_SET_ITEM(res, i, v);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(dig);
    PyMem_Free(dat);
    PyMem_Free(len);
    PyMem_Free(status);
    Py_DECREF(seq);
    return res;
}

static PyObject *core_zlib_block_boundaries(PyObject *module, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE))
        return NULL;
    lz_buf out = {0};
    lz_err err = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lz_zlib_boundaries(b.buf, (size_t)b.len, &out, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    PyObject *res = NULL;
    if (rc) {
        raise_err(get_state(module), &err);
    } else {
        size_t n = out.len / 8;
        res = PyList_New((Py_ssize_t)n);
        for (size_t i = 0; res && i < n; i++) {
            PyObject *v = u64(((uint64_t *)out.p)[i]);
            if (!v) {
                Py_CLEAR(res);
                break;
            }
            PyList_SET_ITEM(res, (Py_ssize_t)i, v);
        }
    }
    lz_buf_free(&out);
    return res;
}

static PyObject *core_window_refs(PyObject *module, PyObject *args)
{
    Py_buffer b;
    int bits;
    Py_ssize_t wlen;
    if (!PyArg_ParseTuple(args, "y*in:window_refs", &b, &bits, &wlen))
        return NULL;
    if (wlen < 0 || wlen > (Py_ssize_t)LZ_HIST || bits < 0 || bits > 7) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "window length must be 0..32768 and bits 0..7");
        return NULL;
    }
    PyObject *used = PyBytes_FromStringAndSize(NULL, wlen);
    if (!used) {
        PyBuffer_Release(&b);
        return NULL;
    }
    uint8_t *u = (uint8_t *)PyBytes_AS_STRING(used);
    memset(u, 0, (size_t)wlen);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lz_window_refs(b.buf, (size_t)b.len, bits, (size_t)wlen, u);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (rc == LZ_REFS_OK)
        return used;
    Py_DECREF(used);
    return PyUnicode_FromString(rc == LZ_REFS_SHORT ? "short" : "invalid");
}

static PyObject *core_build_info(PyObject *self, PyObject *unused)
{
    lz_build_info bi;
    lz_get_build_info(&bi);
    return Py_BuildValue("{s:s,s:s,s:O,s:{s:s,s:s,s:s,s:s}}", "compiler", bi.compiler, "cflags", bi.cflags,
                         "sanitize", bi.sanitize ? Py_True : Py_False, "libraries", "zlib", bi.zlib,
                         "zstd", bi.zstd, "openssl", bi.openssl, "isal", bi.isal);
}

static PyMethodDef core_methods[] = {
    {"build_info", core_build_info, METH_NOARGS,
     "build_info() -> {compiler, cflags, sanitize, libraries: {zlib, zstd, openssl, isal}}"},
    {"decompress_range", core_decompress_range, METH_VARARGS,
     "decompress_range(format, kind, bits, window, data, skip, length) -> bytes"},
    {"sha256", core_sha256, METH_O, "sha256(buffer) -> 32 bytes"},
    {"verify_chunks", core_verify_chunks, METH_VARARGS,
     "verify_chunks(data, data_offset, records) -> index of the first bad record or -1"},
    {"write_chunks", core_write_chunks, METH_VARARGS,
     "write_chunks(dir, tmp, tag, [(digest, data)], fsync) -> [1 written | 0 present | -errno]"},
    {"zlib_block_boundaries", core_zlib_block_boundaries, METH_O,
     "zlib_block_boundaries(gzip_bytes) -> [bit offsets of deflate block boundaries] (tests)"},
    {"window_refs", core_window_refs, METH_VARARGS,
     "window_refs(deflate, bits, wlen) -> bytes (1 per window byte referenced) | 'short' | 'invalid' (tests)"},
    {NULL, NULL, 0, NULL},
};

static int core_traverse(PyObject *m, visitproc visit, void *arg)
{
    core_state *st = get_state(m);
    Py_VISIT(st->LayerError);
    Py_VISIT(st->CorruptLayerError);
    Py_VISIT(st->TruncatedLayerError);
    Py_VISIT(st->ScannerType);
    Py_VISIT(st->ZstdStreamType);
    return 0;
}

static int core_clear(PyObject *m)
{
    core_state *st = get_state(m);
    Py_CLEAR(st->LayerError);
    Py_CLEAR(st->CorruptLayerError);
    Py_CLEAR(st->TruncatedLayerError);
    Py_CLEAR(st->ScannerType);
    Py_CLEAR(st->ZstdStreamType);
    return 0;
}

static void core_free(void *m) { core_clear((PyObject *)m); }

/* A new exception class named ``name`` deriving from ``first`` and the class ``attr`` of
 * ``errors`` (snapshotter.index.errors): one hierarchy for bad layer bytes, whether the C
 * core or Python found them, so one ``except`` catches both. */
static PyObject *new_error(const char *name, const char *doc, PyObject *first, PyObject *errors,
                           const char *attr)
{
    PyObject *py = PyObject_GetAttrString(errors, attr);
    if (!py)
        return NULL;
    PyObject *bases = PyTuple_Pack(2, first, py);
    Py_DECREF(py);
    if (!bases)
        return NULL;
    PyObject *exc = PyErr_NewExceptionWithDoc(name, doc, bases, NULL);
    Py_DECREF(bases);
    return exc;
}

static int core_exec(PyObject *m)
{
    core_state *st = get_state(m);
    PyObject *errors = PyImport_ImportModule("snapshotter.index.errors");
    if (!errors)
        return -1;
    st->LayerError = new_error("snapshotter._core.LayerError", "A layer blob cannot be read.",
                               PyExc_ValueError, errors, "LayerDataError");
    if (st->LayerError)
        st->CorruptLayerError = new_error("snapshotter._core.CorruptLayerError",
                                          "The layer's bytes are invalid.", st->LayerError, errors,
                                          "CorruptLayerError");
    if (st->CorruptLayerError)
        st->TruncatedLayerError = new_error("snapshotter._core.TruncatedLayerError",
                                            "The layer's bytes end too early.", st->LayerError, errors,
                                            "TruncatedLayerError");
    Py_DECREF(errors);
    if (!st->TruncatedLayerError || PyModule_AddObjectRef(m, "LayerError", st->LayerError) ||
        PyModule_AddObjectRef(m, "CorruptLayerError", st->CorruptLayerError) ||
        PyModule_AddObjectRef(m, "TruncatedLayerError", st->TruncatedLayerError))
        return -1;
    if (PyModule_AddIntConstant(m, "CHUNK_RECORD_SIZE", LZ_CHUNK_RECORD) ||
        PyModule_AddIntConstant(m, "WINDOW_SIZE", LZ_HIST) ||
        PyModule_AddIntConstant(m, "MAX_SPARSE_SEGMENTS", LZ_MAX_SPARSE_SEGMENTS) ||
        PyModule_AddIntConstant(m, "INDEX_ENTRY_RECORD_SIZE", LZ_INDEX_ENTRY_RECORD) ||
        PyModule_AddIntConstant(m, "INDEX_CHUNK_RECORD_SIZE", LZ_INDEX_CHUNK_RECORD) ||
        PyModule_AddIntConstant(m, "INDEX_BLOCK_RECORDS", LZ_INDEX_BLOCK_RECORDS))
        return -1;
    /* the index entry record field by field (indexrecord.h), for snapshotter.native to check
     * against index.model's ENTRY_RECORD / ENTRY_FIELDS */
#define LZ_IE_TUPLE_(name, off, bytes, sign) "(siii)"
#define LZ_IE_ARGS_(name, off, bytes, sign) , #name, off, bytes, sign
    PyObject *layout = Py_BuildValue("(" LZ_IE_FIELDS(LZ_IE_TUPLE_) ")" LZ_IE_FIELDS(LZ_IE_ARGS_));
#undef LZ_IE_TUPLE_
#undef LZ_IE_ARGS_
    if (!layout || PyModule_AddObjectRef(m, "INDEX_ENTRY_LAYOUT", layout)) {
        Py_XDECREF(layout);
        return -1;
    }
    Py_DECREF(layout);
    /* the enums the scan results carry, by name: snapshotter.native checks them against
     * index.model's EntryType and CheckpointKind */
    static const struct { const char *name; int value; } entry_types[] = {
        {"REG", ET_REG}, {"HARDLINK", ET_HARDLINK}, {"SYMLINK", ET_SYMLINK}, {"CHAR", ET_CHAR},
        {"BLOCK", ET_BLOCK}, {"DIR", ET_DIR}, {"FIFO", ET_FIFO}};
    static const struct { const char *name; int value; } checkpoint_kinds[] = {
        {"STREAM_START", CK_STREAM_START}, {"DEFLATE", CK_DEFLATE}, {"GZIP_MEMBER", CK_GZIP_MEMBER},
        {"ZSTD_FRAME", CK_ZSTD_FRAME}};
    PyObject *types = PyDict_New(), *kinds = PyDict_New();
    int bad = !types || !kinds;
    for (size_t i = 0; !bad && i < sizeof entry_types / sizeof *entry_types; i++) {
        PyObject *v = PyLong_FromLong(entry_types[i].value);
        bad = !v || PyDict_SetItemString(types, entry_types[i].name, v);
        Py_XDECREF(v);
    }
    for (size_t i = 0; !bad && i < sizeof checkpoint_kinds / sizeof *checkpoint_kinds; i++) {
        PyObject *v = PyLong_FromLong(checkpoint_kinds[i].value);
        bad = !v || PyDict_SetItemString(kinds, checkpoint_kinds[i].name, v);
        Py_XDECREF(v);
    }
    bad = bad || PyModule_AddObjectRef(m, "ENTRY_TYPES", types) || PyModule_AddObjectRef(m, "CHECKPOINT_KINDS", kinds);
    Py_XDECREF(types);
    Py_XDECREF(kinds);
    if (bad)
        return -1;
    st->ScannerType = PyType_FromModuleAndSpec(m, &Scanner_spec, NULL);
    if (!st->ScannerType || PyModule_AddObjectRef(m, "Scanner", st->ScannerType))
        return -1;
    st->ZstdStreamType = PyType_FromModuleAndSpec(m, &ZstdStream_spec, NULL);
    if (!st->ZstdStreamType || PyModule_AddObjectRef(m, "ZstdStream", st->ZstdStreamType))
        return -1;
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "_core", "lazysnap C core: layer scanning and random access.",
    sizeof(core_state), core_methods, core_slots, core_traverse, core_clear, core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
