/* module.c — the CPython/NumPy face of the vlmfo1 core; the only C translation unit that knows about Python.
 *
 * This file holds what every binding shares: status codes -> exceptions (raise_status), NumPy -> C conversion
 * (to_weight, to_f32_vec, get_int, get_int_list, table_from_dict / bind_from_dict: a dict of arrays -> a name ->
 * tensor table for a network's bind function), the Workspace type (a thread pool + growing scratch block that
 * calls reuse) and its lease, the four-stage backbone forward (DaViT, Swin), and the module table. Each
 * network's binding is its own header, included once here: py_qwen2.h (Qwen2Model, Qwen2State), py_vit.h
 * (VisionModel), py_davit.h, py_swin.h, py_upn.h, py_hfre.h, py_fo1.h (FO1Model: the vision side in one call),
 * py_ops.h (single ops and UPN's deformable-DETR ops, tests), py_gemm.h (matmul, quantize, peak probes).
 * Arguments are checked and outputs allocated with the GIL held; the compute runs with the GIL
 * released; a vlm_status becomes a Python exception on the way out. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "common.h"
#include "gemm.h"
#include "ops.h"
#include "peak.h"
#include "qwen2.h"
#include "qwen_vit.h"
#include "tensors.h"
#include "workspace.h"

/* ---------------------------------------------------------------- errors */

static PyObject *raise_status(vlm_status st, const vlm_err *err) {
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case VLM_ERR_NOMEM: type = PyExc_MemoryError; break;
    case VLM_ERR_IO: type = PyExc_OSError; break;
    case VLM_ERR_FORMAT: case VLM_ERR_SHAPE: case VLM_ERR_ARG: type = PyExc_ValueError; break;
    case VLM_ERR_KEY: type = PyExc_KeyError; break;
    case VLM_ERR_TYPE: type = PyExc_TypeError; break;
    default: break;
    }
    PyErr_SetString(type, err && err->msg[0] ? err->msg : "vlmfo1 core error");
    return NULL;
}

/* A weight array: 2-D, C-contiguous, float32, uint16 (bf16 bits), int8 or uint8 (int4 codes: k = 2 columns; the
 * caller adds scale, wsum and sub). */
static int to_weight(PyObject *obj, const char *name, vlm_weight *w) {
    if (!PyArray_Check(obj)) { PyErr_Format(PyExc_TypeError, "%s: expected a numpy array", name); return -1; }
    PyArrayObject *a = (PyArrayObject *)obj;
    memset(w, 0, sizeof *w);
    if (PyArray_TYPE(a) == NPY_INT8 && PyArray_NDIM(a) == 4) { /* packed int8 (pack_i8): n = P * 32 until the caller
                                                                 reads it from the scale vector (packed_rows) */
        if (!PyArray_IS_C_CONTIGUOUS(a) || PyArray_DIM(a, 2) != VLM_I8_PANEL || PyArray_DIM(a, 3) != 4 ||
            PyArray_DIM(a, 0) < 1 || PyArray_DIM(a, 1) < 1) {
            PyErr_Format(PyExc_ValueError, "%s: a packed int8 weight is a C-contiguous [panels][k / 4][%d][4] array",
                         name, VLM_I8_PANEL);
            return -1;
        }
        w->dtype = VLM_I8;
        w->packed = 1;
        w->n = PyArray_DIM(a, 0) * VLM_I8_PANEL;
        w->k = 4 * PyArray_DIM(a, 1);
        w->data = PyArray_DATA(a);
        return 0;
    }
    if (PyArray_NDIM(a) != 2) { PyErr_Format(PyExc_ValueError, "%s: expected a 2-D array, got %d-D", name, PyArray_NDIM(a)); return -1; }
    if (!PyArray_IS_C_CONTIGUOUS(a)) { PyErr_Format(PyExc_ValueError, "%s: array must be C-contiguous", name); return -1; }
    int t = PyArray_TYPE(a);
    if (t == NPY_FLOAT32) w->dtype = VLM_F32;
    else if (t == NPY_UINT16) w->dtype = VLM_BF16;
    else if (t == NPY_INT8) w->dtype = VLM_I8;
    else if (t == NPY_UINT8) w->dtype = VLM_I4;
    else {
        PyErr_Format(PyExc_TypeError, "%s: dtype must be float32, uint16 (bf16 bits), int8 or uint8 (int4 codes)", name);
        return -1;
    }
    w->n = PyArray_DIM(a, 0);
    w->k = t == NPY_UINT8 ? 2 * PyArray_DIM(a, 1) : PyArray_DIM(a, 1);
    w->data = PyArray_DATA(a);
    w->bias = w->scale = w->wsum = NULL;
    w->sub = NULL;
    return 0;
}

static const float *to_f32_vec(PyObject *obj, const char *name, npy_intp n) {
    if (!obj) return NULL;  /* get_item() failed: KeyError already set */
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)obj) != 1 || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous 1-D float32 array", name);
        return NULL;
    }
    if (PyArray_DIM((PyArrayObject *)obj, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd values, got %zd", name, (Py_ssize_t)n,
                     (Py_ssize_t)PyArray_DIM((PyArrayObject *)obj, 0));
        return NULL;
    }
    return PyArray_DATA((PyArrayObject *)obj);
}

static PyObject *get_item(PyObject *dict, const char *key) {
    PyObject *v = PyDict_GetItemString(dict, key);  /* borrowed */
    if (!v) PyErr_Format(PyExc_KeyError, "missing tensor '%s'", key);
    return v;
}

static int get_int(PyObject *dict, const char *key, int *out) {
    PyObject *v = get_item(dict, key);
    if (!v) return -1;
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT_MIN || x > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "config value '%s' = %ld is out of range", key, x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* out[0 .. n-1] = the config entry `key`, a sequence of exactly n ints ("<net> config '<key>'" in errors). */
static int get_int_list(PyObject *cfg, const char *net, const char *key, int *out, int n) {
    PyObject *v = get_item(cfg, key);
    if (!v) return -1;
    PyObject *seq = PySequence_Fast(v, "config lists must be sequences");
    if (!seq) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s config '%s' must have %d entries", net, key, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        long x = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (x == -1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
        if (x < INT32_MIN || x > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "%s config '%s' out of range", net, key);
            return -1;
        }
        out[i] = (int)x;
    }
    Py_DECREF(seq);
    return 0;
}

/* The entries of a tensors dict as a vlm_tensor_table (names and data borrowed from the dict, which the
 * caller keeps alive). t->items is PyMem-allocated: free it with PyMem_Free. */
static int table_from_dict(PyObject *dict, vlm_tensor_table *t) {
    Py_ssize_t pos = 0, n = PyDict_Size(dict);
    PyObject *k, *v;
    vlm_tensor *items = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *items);
    if (!items) { PyErr_NoMemory(); return -1; }
    t->items = items;
    t->n = 0;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) continue;   /* never looked up */
        vlm_tensor *e = &items[t->n];
        if (!(e->name = PyUnicode_AsUTF8(k))) { PyMem_Free(items); t->items = NULL; return -1; }
        e->ndim = e->dtype = -1;
        if (PyArray_Check(v)) {
            PyArrayObject *a = (PyArrayObject *)v;
            int type = PyArray_TYPE(a);
            e->ndim = PyArray_NDIM(a);
            for (int d = 0; d < e->ndim && d < VLM_TENSOR_MAX_DIMS; d++) e->shape[d] = PyArray_DIM(a, d);
            e->dtype = type == NPY_FLOAT32 ? VLM_F32 : type == NPY_UINT16 ? VLM_BF16 : type == NPY_INT8 ? VLM_I8 : type == NPY_UINT8 ? VLM_I4 : -1;
            e->contiguous = PyArray_IS_C_CONTIGUOUS(a);
            e->data = PyArray_DATA(a);
        }
        t->n++;
    }
    return 0;
}

/* net = the network bound from the tensors dict by its vlm_<net>_bind; -1 with the exception on failure. */
typedef vlm_status (*bind_fn)(void *net, const vlm_tensor_table *t, vlm_err *err);
static int bind_from_dict(PyObject *dict, bind_fn bind, void *net) {
    vlm_tensor_table t;
    if (table_from_dict(dict, &t)) return -1;
    vlm_err err = {{0}};
    vlm_status st = bind(net, &t, &err);
    PyMem_Free((void *)t.items);
    if (st != VLM_OK) { raise_status(st, &err); return -1; }
    return 0;
}

/* ---------------------------------------------------------------- Workspace */

/* Workspace(n_threads=1, reserve=0): the pool and scratch block of the encoder calls (VisionModel.forward,
 * DavitModel.forward, HFREModel.regions / project, matmul), kept between calls when passed as
 * workspace=, and the state of FO1Model.encode (reserve: bytes allocated up front, e.g.
 * FO1Model.arena_bytes of the largest request). One thread at a time: a second concurrent user gets a
 * RuntimeError. */
typedef struct {
    PyObject_HEAD
    vlm_workspace ws;
    atomic_int busy;
} Workspace;

static int check_threads(int n_threads) {
    if (n_threads >= 1 && n_threads <= 256) return 0;
    PyErr_SetString(PyExc_ValueError, "n_threads must be in [1, 256]");
    return -1;
}

static void Workspace_dealloc(Workspace *self) {
    vlm_workspace_clear(&self->ws);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Workspace_init(Workspace *self, PyObject *args, PyObject *kw) {
    int n_threads = 1;
    Py_ssize_t reserve = 0;
    static char *kwlist[] = {"n_threads", "reserve", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|in", kwlist, &n_threads, &reserve) || check_threads(n_threads)) return -1;
    if (reserve < 0) { PyErr_SetString(PyExc_ValueError, "reserve must be >= 0 bytes"); return -1; }
    int expected = 0;
    if (!atomic_compare_exchange_strong(&self->busy, &expected, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "this workspace is in use by another thread");
        return -1;
    }
    vlm_pool *pool;
    void *scratch;
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    vlm_workspace_clear(&self->ws);
    st = vlm_workspace_get(&self->ws, n_threads, (size_t)reserve, &pool, &scratch, &err);
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    if (st != VLM_OK) { raise_status(st, &err); return -1; }
    return 0;
}

static PyObject *Workspace_get_nbytes(Workspace *self, void *c) { return PyLong_FromSize_t(self->ws.cap); }
static PyObject *Workspace_get_nallocs(Workspace *self, void *c) { return PyLong_FromSize_t(self->ws.n_allocs); }
static PyObject *Workspace_get_npools(Workspace *self, void *c) { return PyLong_FromSize_t(self->ws.n_pools); }
static PyObject *Workspace_get_nthreads(Workspace *self, void *c) {
    return PyLong_FromLong(self->ws.pool ? vlm_pool_size(self->ws.pool) : 0);
}

/* {"gemm": FLOPs, "attention": FLOPs}: pool.h's work counters, as the flops attributes give them. */
static PyObject *flops_dict(const uint64_t c[VLM_FLOPS_KINDS]) {
    return Py_BuildValue("{sKsK}", "gemm", (unsigned long long)c[VLM_FLOPS_GEMM], "attention",
                         (unsigned long long)c[VLM_FLOPS_ATTN]);
}

static PyObject *Workspace_get_flops(Workspace *self, void *c) {
    uint64_t n[VLM_FLOPS_KINDS];
    vlm_pool_counts(self->ws.pool, n);
    return flops_dict(n);
}

static PyGetSetDef Workspace_getset[] = {
    {"flops", (getter)Workspace_get_flops, NULL, "{'gemm': FLOPs, 'attention': FLOPs} run on this workspace so far "
     "(csrc/pool.h: matmuls and attention products; elementwise work not counted)", NULL},
    {"nbytes", (getter)Workspace_get_nbytes, NULL, "bytes of scratch held (the largest any call needed)", NULL},
    {"n_allocs", (getter)Workspace_get_nallocs, NULL, "scratch allocations so far (grows only when a call needs more)", NULL},
    {"n_pools", (getter)Workspace_get_npools, NULL, "thread pools started so far (1 unless n_threads changed)", NULL},
    {"n_threads", (getter)Workspace_get_nthreads, NULL, "workers of the current pool", NULL},
    {NULL}};

static PyTypeObject WorkspaceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.Workspace",
    .tp_basicsize = sizeof(Workspace),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Workspace(n_threads=1, reserve=0) - a thread pool and a growing scratch block reused by encoder "
              "calls (workspace=) and FO1Model.encode (state); one thread at a time",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Workspace_init,
    .tp_dealloc = (destructor)Workspace_dealloc,
    .tp_getset = Workspace_getset,
};

/* The resources of one compute call: the caller's Workspace (marked busy until lease_end) or a private
 * one, freed at lease_end (the behaviour without workspace=). */
typedef struct {
    Workspace *owner;     /* NULL: private */
    vlm_workspace local;
    vlm_workspace *ws;
} ws_lease;

/* GIL held. obj: None or a Workspace. -1 with an exception set (wrong type, or in use by another thread).
 * Call it after every other check, right before the compute, and pair it with lease_end. */
static int lease_begin(ws_lease *l, PyObject *obj) {
    memset(l, 0, sizeof *l);
    l->ws = &l->local;
    if (!obj || obj == Py_None) return 0;
    if (!PyObject_TypeCheck(obj, &WorkspaceType)) {
        PyErr_Format(PyExc_TypeError, "workspace must be a vlmfo1._core.Workspace or None, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    Workspace *w = (Workspace *)obj;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&w->busy, &expected, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "this workspace is in use by another thread; use one workspace per thread");
        return -1;
    }
    l->owner = w;
    l->ws = &w->ws;
    return 0;
}

/* With or without the GIL (touches no Python object). */
static void lease_end(ws_lease *l) {
    if (l->owner) atomic_store(&l->owner->busy, 0);
    else vlm_workspace_clear(&l->local);
    l->owner = NULL;
}

/* ---------------------------------------------------------------- four-stage backbones (DaViT, Swin)
 * forward(pixels [in_chans, H, W] float32, n_threads=1, workspace=None) -> 4 float32 maps [H_s, W_s, C_s]: the
 * argument checks, output arrays, workspace lease and GIL release both backbone bindings share. */
typedef struct {
    const void *net;
    int in_chans, C[4];
    vlm_status (*sizes)(const void *net, int H, int W, int hs[4], int ws[4], vlm_err *err);
    size_t (*scratch)(const void *net, int H, int W, int n_threads);
    vlm_status (*forward)(const void *net, vlm_pool *pool, const float *px, int H, int W, float *out[4], void *scratch,
                          size_t size, vlm_err *err);
} backbone_call;

static PyObject *backbone_forward(const backbone_call *b, PyObject *args, PyObject *kw) {
    PyObject *px_o, *ws_o = Py_None;
    int n_threads = 1;
    static char *kwlist[] = {"pixels", "n_threads", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iO", kwlist, &px_o, &n_threads, &ws_o)) return NULL;
    if (check_threads(n_threads)) return NULL;
    PyArrayObject *px = (PyArrayObject *)PyArray_FROM_OTF(px_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!px) return NULL;
    PyArrayObject *outs[4] = {NULL};
    PyObject *res = NULL;
    ws_lease wl;
    if (PyArray_NDIM(px) != 3 || PyArray_DIM(px, 0) != b->in_chans || PyArray_DIM(px, 1) <= 0 ||
        PyArray_DIM(px, 2) <= 0 || PyArray_DIM(px, 1) > 16384 || PyArray_DIM(px, 2) > 16384) {
        PyErr_Format(PyExc_ValueError, "pixels must have shape [%d, H, W] with 1 <= H, W <= 16384", b->in_chans);
        goto done;
    }
    int H = (int)PyArray_DIM(px, 1), W = (int)PyArray_DIM(px, 2);
    int hs[4], ws[4];
    vlm_err err = {{0}};
    vlm_status st = b->sizes(b->net, H, W, hs, ws, &err);
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    float *optr[4];
    for (int s = 0; s < 4; s++) {
        npy_intp d[3] = {hs[s], ws[s], b->C[s]};
        outs[s] = (PyArrayObject *)PyArray_SimpleNew(3, d, NPY_FLOAT32);
        if (!outs[s]) goto done;
        optr[s] = PyArray_DATA(outs[s]);
    }
    size_t ss = b->scratch(b->net, H, W, n_threads);
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK) st = b->forward(b->net, pool, PyArray_DATA(px), H, W, optr, scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = PyTuple_Pack(4, outs[0], outs[1], outs[2], outs[3]);
done:
    Py_XDECREF(px);
    for (int s = 0; s < 4; s++) Py_XDECREF(outs[s]);
    return res;
}

/* ---------------------------------------------------------------- network and function bindings */

#include "py_qwen2.h"
#include "py_vit.h"
#include "py_davit.h"
#include "py_swin.h"
#include "py_upn.h"
#include "py_hfre.h"
#include "py_fo1.h"
#include "py_ops.h"
#include "py_gemm.h"

static PyMethodDef module_methods[] = {
    PY_GEMM_METHODS
    {"op", (PyCFunction)(void (*)(void))py_op, METH_VARARGS | METH_KEYWORDS,
     "op(name, arrays, ints=(), floats=(), n_threads=1): run one core op in place (tests only, see py_ops.h)"},
    {"ops", py_ops, METH_NOARGS, "ops() -> {name: (array dtypes, n_ints, n_floats)} of op() (tests only)"},
    PY_DETR_METHODS
    {NULL}};

static int module_exec(PyObject *mod) {
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    vlm_blas_single_thread();
    if (PyType_Ready(&WorkspaceType) < 0 || PyModule_AddObjectRef(mod, "Workspace", (PyObject *)&WorkspaceType) < 0)
        return -1;
    if (py_qwen2_register(mod) < 0 || py_vit_register(mod) < 0 || py_davit_register(mod) < 0 ||
        py_swin_register(mod) < 0 || py_upn_register(mod) < 0 || py_hfre_register(mod) < 0 || py_fo1_register(mod) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "vlmfo1._core", "vlmfo1 C core", 0, module_methods, module_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&moduledef); }
