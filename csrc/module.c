/* module.c — the CPython/NumPy face of the vlmfo1 core; the only C file that knows about Python.
 *
 * Types: Qwen2Model (read-only weights borrowed from NumPy arrays, typically views of memory-mapped
 * safetensors files; the object keeps them alive), Qwen2State (one request: KV cache + scratch +
 * threads), Workspace (a thread pool + growing scratch block the encoder calls reuse), VisionModel,
 * DavitModel / HFREModel (py_davit.h, py_hfre.h) and FO1Model (py_fo1.h: the vision side in one call). Functions: matmul, fma_peak, peak, gemm_info (for tests and benchmarks), op / ops (single ops, tests only),
 * msda / group_norm / sine_pos_embed_hw / sine_embed_boxes (UPN's deformable-DETR ops on whole arrays, py_ops.h).
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

static PyGetSetDef Workspace_getset[] = {
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

/* ---------------------------------------------------------------- Qwen2Model */

typedef struct {
    PyObject_HEAD
    vlm_qwen2 m;
    PyObject *tensors;  /* dict keeping every borrowed array alive */
} Qwen2Model;

static void Qwen2Model_dealloc(Qwen2Model *self) {
    vlm_qwen2_unbind(&self->m);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Qwen2Model_init(Qwen2Model *self, PyObject *args, PyObject *kw) {
    PyObject *cfg, *t;
    static char *kwlist[] = {"config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &t)) return -1;
    vlm_qwen2_config *c = &self->m.cfg;
    int compute = 0;
    if (get_int(cfg, "hidden", &c->hidden) || get_int(cfg, "n_layers", &c->n_layers) ||
        get_int(cfg, "n_heads", &c->n_heads) || get_int(cfg, "n_kv_heads", &c->n_kv_heads) ||
        get_int(cfg, "head_dim", &c->head_dim) || get_int(cfg, "inter", &c->inter) ||
        get_int(cfg, "vocab", &c->vocab) || get_int(cfg, "compute", &compute) ||
        get_int(cfg, "mrope_t", &c->mrope[0]) || get_int(cfg, "mrope_h", &c->mrope[1]) ||
        get_int(cfg, "mrope_w", &c->mrope[2]))
        return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    PyObject *eps = get_item(cfg, "eps");
    if (!eps) return -1;
    c->eps = (float)PyFloat_AsDouble(eps);
    if (PyErr_Occurred()) return -1;
    if (c->n_layers <= 0 || c->n_layers > 4096 || c->hidden <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0) {
        PyErr_SetString(PyExc_ValueError, "invalid decoder configuration");
        return -1;
    }
    Py_XSETREF(self->tensors, Py_NewRef(t));
    return bind_from_dict(t, (bind_fn)vlm_qwen2_bind, &self->m);
}

static PyObject *Qwen2Model_embed(Qwen2Model *self, PyObject *arg) {
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_INT32, NPY_ARRAY_IN_ARRAY);
    if (!ids) return NULL;
    if (PyArray_NDIM(ids) != 1) { Py_DECREF(ids); PyErr_SetString(PyExc_ValueError, "ids must be 1-D"); return NULL; }
    npy_intp T = PyArray_DIM(ids, 0);
    npy_intp dims[2] = {T, self->m.cfg.hidden};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!out) { Py_DECREF(ids); return NULL; }
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    st = vlm_qwen2_embed(&self->m, PyArray_DATA(ids), (int)T, PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(ids);
    if (st != VLM_OK) { Py_DECREF(out); return raise_status(st, &err); }
    return (PyObject *)out;
}

static PyMethodDef Qwen2Model_methods[] = {
    {"embed", (PyCFunction)Qwen2Model_embed, METH_O, "embed(ids) -> float32 [T, hidden] embedding rows"},
    {NULL}};

static PyTypeObject Qwen2ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.Qwen2Model",
    .tp_basicsize = sizeof(Qwen2Model),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Qwen2Model(config: dict, tensors: dict) - read-only decoder weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Qwen2Model_init,
    .tp_dealloc = (destructor)Qwen2Model_dealloc,
    .tp_methods = Qwen2Model_methods,
};

/* ---------------------------------------------------------------- Qwen2State */

typedef struct {
    PyObject_HEAD
    Qwen2Model *model;
    vlm_qwen2_state *s;
    atomic_int busy;
} Qwen2State;

static void Qwen2State_dealloc(Qwen2State *self) {
    vlm_qwen2_state_free(self->s);
    Py_XDECREF(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Qwen2State_init(Qwen2State *self, PyObject *args, PyObject *kw) {
    PyObject *model;
    int max_ctx, chunk = 512, n_threads = 1;
    static char *kwlist[] = {"model", "max_context", "chunk", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!i|ii", kwlist, &Qwen2ModelType, &model, &max_ctx, &chunk, &n_threads))
        return -1;
    if (self->s) { PyErr_SetString(PyExc_RuntimeError, "state already initialised"); return -1; }
    vlm_err err = {{0}};
    vlm_status st;
    vlm_qwen2_state *s = NULL;
    const vlm_qwen2 *m = &((Qwen2Model *)model)->m;
    if (!m->layers) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return -1; }
    Py_BEGIN_ALLOW_THREADS
    st = vlm_qwen2_state_create(m, max_ctx, chunk, n_threads, &s, &err);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); return -1; }
    self->s = s;
    Py_INCREF(model);
    self->model = (Qwen2Model *)model;
    return 0;
}

static int acquire(Qwen2State *self) {
    if (!self->s) { PyErr_SetString(PyExc_RuntimeError, "state is not initialised"); return -1; }
    int expected = 0;
    if (!atomic_compare_exchange_strong(&self->busy, &expected, 1)) {
        PyErr_SetString(PyExc_RuntimeError, "this session is in use by another thread; create one session per thread");
        return -1;
    }
    return 0;
}

/* forward(ids, embeds, positions, logits) ; logits: 0 none, 1 last row, 2 all rows */
static PyObject *Qwen2State_forward(Qwen2State *self, PyObject *args, PyObject *kw) {
    PyObject *ids_o = Py_None, *emb_o = Py_None, *pos_o;
    int mode = 1;
    static char *kwlist[] = {"ids", "embeds", "positions", "logits", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|i", kwlist, &ids_o, &emb_o, &pos_o, &mode)) return NULL;
    const vlm_qwen2 *m = &self->model->m;
    PyArrayObject *ids = NULL, *emb = NULL, *pos = NULL, *out = NULL;
    npy_intp T;
    if ((ids_o == Py_None) == (emb_o == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "give exactly one of ids / embeds");
        return NULL;
    }
    if (ids_o != Py_None) {
        ids = (PyArrayObject *)PyArray_FROM_OTF(ids_o, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
        if (!ids) return NULL;
        if (PyArray_NDIM(ids) != 1) { PyErr_SetString(PyExc_ValueError, "ids must be 1-D"); goto fail; }
        T = PyArray_DIM(ids, 0);
    } else {
        emb = (PyArrayObject *)PyArray_FROM_OTF(emb_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
        if (!emb) return NULL;
        if (PyArray_NDIM(emb) != 2 || PyArray_DIM(emb, 1) != m->cfg.hidden) {
            PyErr_Format(PyExc_ValueError, "embeds must have shape [T, %d]", m->cfg.hidden);
            goto fail;
        }
        T = PyArray_DIM(emb, 0);
    }
    pos = (PyArrayObject *)PyArray_FROM_OTF(pos_o, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!pos) goto fail;
    if (PyArray_NDIM(pos) != 2 || PyArray_DIM(pos, 0) != 3 || PyArray_DIM(pos, 1) != T) {
        PyErr_SetString(PyExc_ValueError, "positions must have shape [3, T]");
        goto fail;
    }
    if (T > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "too many tokens"); goto fail; }
    if (mode == 1) {
        npy_intp d[1] = {m->cfg.vocab};
        out = (PyArrayObject *)PyArray_SimpleNew(1, d, NPY_FLOAT32);
    } else if (mode == 2) {
        npy_intp d[2] = {T, m->cfg.vocab};
        out = (PyArrayObject *)PyArray_SimpleNew(2, d, NPY_FLOAT32);
    } else if (mode != 0) {
        PyErr_SetString(PyExc_ValueError, "logits must be 0, 1 or 2");
        goto fail;
    }
    if (mode && !out) goto fail;
    if (acquire(self)) goto fail;
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    st = vlm_qwen2_forward(m, self->s, ids ? PyArray_DATA(ids) : NULL, emb ? PyArray_DATA(emb) : NULL,
                           PyArray_DATA(pos), (int)T, out ? PyArray_DATA(out) : NULL, mode == 2, &err);
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    Py_XDECREF(ids); Py_XDECREF(emb); Py_XDECREF(pos);
    if (st != VLM_OK) { Py_XDECREF(out); return raise_status(st, &err); }
    if (!out) Py_RETURN_NONE;
    return (PyObject *)out;
fail:
    Py_XDECREF(ids); Py_XDECREF(emb); Py_XDECREF(pos); Py_XDECREF(out);
    return NULL;
}

static PyObject *Qwen2State_truncate(Qwen2State *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > INT_MAX) return PyErr_Format(PyExc_ValueError, "truncate: %ld is not a cache length", n);
    if (acquire(self)) return NULL;
    vlm_err err = {{0}};
    vlm_status st = vlm_qwen2_state_truncate(self->s, (int)n, &err);
    atomic_store(&self->busy, 0);
    if (st != VLM_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

/* save_kv(n) -> float32 [n_layers, 2, n_kv_heads, n, head_dim]: the cached K/V of positions [0, n) */
static PyObject *Qwen2State_save_kv(Qwen2State *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (!self->s) { PyErr_SetString(PyExc_RuntimeError, "state is not initialised"); return NULL; }
    if (n < 0 || n > vlm_qwen2_state_len(self->s))
        return PyErr_Format(PyExc_ValueError, "save_kv: %ld positions asked, the context holds %d", n,
                            vlm_qwen2_state_len(self->s));
    const vlm_qwen2 *m = &self->model->m;
    npy_intp d[5] = {m->cfg.n_layers, 2, m->cfg.n_kv_heads, n, m->cfg.head_dim};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(5, d, NPY_FLOAT32);
    if (!out) return NULL;
    if (acquire(self)) { Py_DECREF(out); return NULL; }
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    st = vlm_qwen2_state_save(m, self->s, (int)n, PyArray_DATA(out), &err);
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    if (st != VLM_OK) { Py_DECREF(out); return raise_status(st, &err); }
    return (PyObject *)out;
}

/* load_kv(kv): the context becomes the saved prefix (kv as save_kv returns it) */
static PyObject *Qwen2State_load_kv(Qwen2State *self, PyObject *arg) {
    if (!self->s) { PyErr_SetString(PyExc_RuntimeError, "state is not initialised"); return NULL; }
    const vlm_qwen2 *m = &self->model->m;
    PyArrayObject *kv = (PyArrayObject *)PyArray_FROM_OTF(arg, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!kv) return NULL;
    if (PyArray_NDIM(kv) != 5 || PyArray_DIM(kv, 0) != m->cfg.n_layers || PyArray_DIM(kv, 1) != 2 ||
        PyArray_DIM(kv, 2) != m->cfg.n_kv_heads || PyArray_DIM(kv, 4) != m->cfg.head_dim ||
        PyArray_DIM(kv, 3) > INT_MAX) {
        Py_DECREF(kv);
        return PyErr_Format(PyExc_ValueError, "load_kv: expected a float32 array [%d, 2, %d, n, %d] from save_kv",
                            m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim);
    }
    if (acquire(self)) { Py_DECREF(kv); return NULL; }
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    st = vlm_qwen2_state_load(m, self->s, PyArray_DATA(kv), (int)PyArray_DIM(kv, 3), &err);
    Py_END_ALLOW_THREADS
    atomic_store(&self->busy, 0);
    Py_DECREF(kv);
    if (st != VLM_OK) return raise_status(st, &err);
    Py_RETURN_NONE;
}

static PyObject *Qwen2State_get_len(Qwen2State *self, void *c) { return PyLong_FromLong(self->s ? vlm_qwen2_state_len(self->s) : 0); }
static PyObject *Qwen2State_get_max(Qwen2State *self, void *c) { return PyLong_FromLong(self->s ? vlm_qwen2_state_max(self->s) : 0); }
static PyObject *Qwen2State_get_nbytes(Qwen2State *self, void *c) {
    return PyLong_FromSize_t(self->s ? vlm_qwen2_state_bytes(self->s) : 0);
}

static PyMethodDef Qwen2State_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Qwen2State_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(ids, embeds, positions, logits=1) -> logits of the last token (1), all new tokens (2) or None (0)"},
    {"truncate", (PyCFunction)Qwen2State_truncate, METH_O, "truncate(n): keep the first n cached tokens"},
    {"save_kv", (PyCFunction)Qwen2State_save_kv, METH_O,
     "save_kv(n) -> float32 [n_layers, 2, n_kv_heads, n, head_dim]: the cached K/V of the first n positions"},
    {"load_kv", (PyCFunction)Qwen2State_load_kv, METH_O, "load_kv(kv): continue from a prefix saved by save_kv"},
    {NULL}};

static PyGetSetDef Qwen2State_getset[] = {
    {"n_past", (getter)Qwen2State_get_len, NULL, "tokens in the KV cache", NULL},
    {"max_context", (getter)Qwen2State_get_max, NULL, "capacity of the KV cache", NULL},
    {"nbytes", (getter)Qwen2State_get_nbytes, NULL, "bytes held by the state (KV cache + scratch)", NULL},
    {NULL}};

static PyTypeObject Qwen2StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.Qwen2State",
    .tp_basicsize = sizeof(Qwen2State),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Qwen2State(model, max_context, chunk=512, n_threads=1) - one request: KV cache, scratch, threads",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Qwen2State_init,
    .tp_dealloc = (destructor)Qwen2State_dealloc,
    .tp_methods = Qwen2State_methods,
    .tp_getset = Qwen2State_getset,
};

/* ---------------------------------------------------------------- VisionModel */

typedef struct {
    PyObject_HEAD
    vlm_vit m;
    PyObject *tensors;
} VisionModel;

static void VisionModel_dealloc(VisionModel *self) {
    vlm_vit_unbind(&self->m);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int VisionModel_init(VisionModel *self, PyObject *args, PyObject *kw) {
    PyObject *cfg, *t, *full;
    static char *kwlist[] = {"config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &t)) return -1;
    vlm_vit_config *c = &self->m.cfg;
    int compute = 0;
    memset(c, 0, sizeof *c);
    if (get_int(cfg, "depth", &c->depth) || get_int(cfg, "hidden", &c->hidden) || get_int(cfg, "n_heads", &c->n_heads) ||
        get_int(cfg, "inter", &c->inter) || get_int(cfg, "out_hidden", &c->out_hidden) ||
        get_int(cfg, "in_dim", &c->in_dim) || get_int(cfg, "patch", &c->patch) || get_int(cfg, "merge", &c->merge) ||
        get_int(cfg, "window", &c->window) || get_int(cfg, "compute", &compute))
        return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    PyObject *eps = get_item(cfg, "eps");
    if (!eps) return -1;
    c->eps = (float)PyFloat_AsDouble(eps);
    if (PyErr_Occurred()) return -1;
    if (c->depth <= 0 || c->depth > VLM_VIT_MAX_DEPTH) {
        PyErr_Format(PyExc_ValueError, "vision depth must be in [1, %d]", VLM_VIT_MAX_DEPTH);
        return -1;
    }
    if (c->n_heads <= 0 || c->hidden <= 0 || c->hidden % c->n_heads) {  /* before D / n_heads below */
        PyErr_SetString(PyExc_ValueError, "vision hidden_size must be a positive multiple of num_heads");
        return -1;
    }
    if (!(full = get_item(cfg, "fullatt"))) return -1;
    PyObject *seq = PySequence_Fast(full, "fullatt must be a sequence of block indexes");
    if (!seq) return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long b = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((b == -1 && PyErr_Occurred()) || b < 0 || b >= c->depth) {
            Py_DECREF(seq);
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "fullatt_block_indexes: %ld is not a block index", b);
            return -1;
        }
        c->fullatt[b] = 1;
    }
    Py_DECREF(seq);
    Py_XSETREF(self->tensors, Py_NewRef(t));
    return bind_from_dict(t, (bind_fn)vlm_vit_bind, &self->m);
}

/* forward(pixels [N, in_dim] float32, gh, gw, n_threads=1, features=False) -> tokens or (tokens, feats) */
static PyObject *VisionModel_forward(VisionModel *self, PyObject *args, PyObject *kw) {
    PyObject *px_o, *ws_o = Py_None;
    int gh, gw, n_threads = 1, want_feats = 0;
    static char *kwlist[] = {"pixels", "gh", "gw", "n_threads", "features", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oii|ipO", kwlist, &px_o, &gh, &gw, &n_threads, &want_feats, &ws_o))
        return NULL;
    const vlm_vit *m = &self->m;
    if (!m->blocks) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    if (check_threads(n_threads)) return NULL;
    if (gh <= 0 || gw <= 0 || gh % 2 || gw % 2 || (long)gh * gw > (1L << 22)) {
        PyErr_Format(PyExc_ValueError, "invalid patch grid %dx%d (both sides positive and even)", gh, gw);
        return NULL;
    }
    PyArrayObject *px = (PyArrayObject *)PyArray_FROM_OTF(px_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!px) return NULL;
    PyArrayObject *out = NULL, *feats = NULL;
    PyObject *res = NULL;
    ws_lease wl;
    if (PyArray_NDIM(px) != 2 || PyArray_DIM(px, 0) != (npy_intp)gh * gw || PyArray_DIM(px, 1) != m->cfg.in_dim) {
        PyErr_Format(PyExc_ValueError, "pixels must have shape [%d, %d] for a %dx%d grid", gh * gw, m->cfg.in_dim, gh, gw);
        goto done;
    }
    npy_intp od[2] = {(npy_intp)gh * gw / 4, m->cfg.out_hidden};
    out = (PyArrayObject *)PyArray_SimpleNew(2, od, NPY_FLOAT32);
    if (!out) goto done;
    int nf = vlm_vit_n_full(m);
    if (want_feats) {
        npy_intp fd[4] = {nf, gh, gw, m->cfg.hidden};
        feats = (PyArrayObject *)PyArray_SimpleNew(4, fd, NPY_FLOAT32);
        if (!feats) goto done;
    }
    size_t ss = vlm_vit_scratch_size(m, gh, gw, n_threads);
    vlm_err err = {{0}};
    vlm_status st;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK)
        st = vlm_vit_forward(m, pool, PyArray_DATA(px), gh, gw, PyArray_DATA(out), feats ? PyArray_DATA(feats) : NULL,
                             scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = want_feats ? Py_BuildValue("OO", out, feats) : Py_NewRef(out);
done:
    Py_XDECREF(px); Py_XDECREF(out); Py_XDECREF(feats);
    return res;
}

static PyObject *VisionModel_get_nfull(VisionModel *self, void *c) { return PyLong_FromLong(self->m.blocks ? vlm_vit_n_full(&self->m) : 0); }

static PyMethodDef VisionModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))VisionModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(pixels, gh, gw, n_threads=1, features=False, workspace=None) -> tokens [gh*gw/4, out] "
     "(, feats [n_full, gh, gw, hidden])"},
    {NULL}};
static PyGetSetDef VisionModel_getset[] = {{"n_full", (getter)VisionModel_get_nfull, NULL, "number of full-attention blocks", NULL}, {NULL}};

static PyTypeObject VisionModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.VisionModel",
    .tp_basicsize = sizeof(VisionModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "VisionModel(config: dict, tensors: dict) - Qwen2.5-VL vision transformer weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)VisionModel_init,
    .tp_dealloc = (destructor)VisionModel_dealloc,
    .tp_methods = VisionModel_methods,
    .tp_getset = VisionModel_getset,
};

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

/* ---------------------------------------------------------------- DaViT and HFRE bindings */

#include "py_davit.h"
#include "py_swin.h"
#include "py_upn.h"
#include "py_hfre.h"
#include "py_fo1.h"
#include "py_ops.h"

/* ---------------------------------------------------------------- functions */

/* compute= of matmul / matmul_multi: "f32" or "bf16"; -1 with a ValueError otherwise. */
static int parse_compute(const char *s, vlm_compute *cm) {
    if (!strcmp(s, "f32")) *cm = VLM_COMPUTE_F32;
    else if (!strcmp(s, "bf16")) *cm = VLM_COMPUTE_BF16;
    else { PyErr_SetString(PyExc_ValueError, "compute must be 'f32' or 'bf16'"); return -1; }
    return 0;
}

static PyObject *py_matmul(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *x_o, *w_o, *b_o = Py_None, *out_o = Py_None, *ws_o = Py_None, *sc_o = Py_None, *ws8_o = Py_None;
    PyObject *sub_o = Py_None;
    const char *compute = "f32";
    int n_threads = 1, accumulate = 0;
    static char *kwlist[] = {"x", "w", "bias", "compute", "n_threads", "out", "accumulate", "workspace", "scale",
                             "wsum", "sub", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OsiOpOOOO", kwlist, &x_o, &w_o, &b_o, &compute, &n_threads, &out_o,
                                     &accumulate, &ws_o, &sc_o, &ws8_o, &sub_o))
        return NULL;
    vlm_compute cm;
    if (parse_compute(compute, &cm)) return NULL;
    if (check_threads(n_threads)) return NULL;
    vlm_weight w;
    PyArrayObject *x = NULL, *out = NULL;
    PyObject *res = NULL;
    ws_lease wl;
    if (!PyArray_Check(w_o)) { PyErr_SetString(PyExc_TypeError, "w must be a numpy array"); return NULL; }
    if (to_weight(w_o, "w", &w)) return NULL;
    x = (PyArrayObject *)PyArray_FROM_OTF(x_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!x) return NULL;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) != w.k) {
        PyErr_Format(PyExc_ValueError, "x must have shape [m, %lld]", (long long)w.k);
        goto done;
    }
    if (b_o != Py_None && !(w.bias = to_f32_vec(b_o, "bias", w.n))) goto done;
    if (w.dtype == VLM_I8 || w.dtype == VLM_I4) {
        if (sc_o == Py_None || ws8_o == Py_None || (w.dtype == VLM_I4 && sub_o == Py_None)) {
            PyErr_SetString(PyExc_TypeError, w.dtype == VLM_I8 ? "an int8 w needs scale= and wsum= (see quantize_i8)"
                                                               : "a uint8 (int4) w needs scale=, wsum= and sub= (see "
                                                                 "quantize_i4)");
            goto done;
        }
        if (!(w.scale = to_f32_vec(sc_o, "scale", w.n)) || !(w.wsum = to_f32_vec(ws8_o, "wsum", w.n))) goto done;
    } else if (sc_o != Py_None || ws8_o != Py_None) {
        PyErr_SetString(PyExc_TypeError, "scale= and wsum= are for int8 and int4 weights only");
        goto done;
    }
    if (w.dtype == VLM_I4) {
        if (!PyArray_Check(sub_o) || PyArray_TYPE((PyArrayObject *)sub_o) != NPY_UINT8 ||
            PyArray_NDIM((PyArrayObject *)sub_o) != 2 || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)sub_o)) {
            PyErr_SetString(PyExc_TypeError, "sub: expected a contiguous 2-D uint8 array");
            goto done;
        }
        if (PyArray_DIM((PyArrayObject *)sub_o, 0) != w.n ||
            PyArray_DIM((PyArrayObject *)sub_o, 1) != vlm_i4_sub_stride(w.k)) {
            PyErr_Format(PyExc_ValueError, "sub: expected shape [%lld, %lld] for int4 codes of shape [%lld, %lld]",
                         (long long)w.n, (long long)vlm_i4_sub_stride(w.k), (long long)w.n, (long long)(w.k / 2));
            goto done;
        }
        w.sub = PyArray_DATA((PyArrayObject *)sub_o);
    } else if (sub_o != Py_None) {
        PyErr_SetString(PyExc_TypeError, "sub= is for int4 (uint8) weights only");
        goto done;
    }
    npy_intp m = PyArray_DIM(x, 0);
    if (out_o != Py_None) {
        if (!PyArray_Check(out_o) || PyArray_TYPE((PyArrayObject *)out_o) != NPY_FLOAT32 ||
            PyArray_NDIM((PyArrayObject *)out_o) != 2 || PyArray_DIM((PyArrayObject *)out_o, 0) != m ||
            PyArray_DIM((PyArrayObject *)out_o, 1) != w.n || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)out_o) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)out_o)) {
            PyErr_SetString(PyExc_ValueError, "out must be a writable C-contiguous float32 array of shape [m, n]");
            goto done;
        }
        out = (PyArrayObject *)Py_NewRef(out_o);
    } else {
        npy_intp d[2] = {m, (npy_intp)w.n};
        out = (PyArrayObject *)(accumulate ? PyArray_ZEROS(2, d, NPY_FLOAT32, 0) : PyArray_SimpleNew(2, d, NPY_FLOAT32));
        if (!out) goto done;
    }
    size_t ss = vlm_matmul_scratch_size(m, &w, cm, n_threads);
    vlm_err err = {{0}};
    vlm_status st;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK)
        st = vlm_matmul(pool, PyArray_DATA(out), w.n, PyArray_DATA(x), w.k, m, &w, cm, accumulate, scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(x);
    Py_XDECREF(out);
    return res;
}

/* matmul_multi(x, ws, biases=None, compute='f32', n_threads=1) -> [x @ w.T + b for w, b in zip(ws, biases)]: float32
 * or bf16 weights with the same k in one vlm_matmul_multi call (the fused q/k/v and gate/up of the decoder; tests). */
static PyObject *py_matmul_multi(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *x_o, *ws_o, *bs_o = Py_None;
    const char *compute = "f32";
    int n_threads = 1;
    static char *kwlist[] = {"x", "ws", "biases", "compute", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Osi", kwlist, &x_o, &ws_o, &bs_o, &compute, &n_threads)) return NULL;
    vlm_compute cm;
    if (parse_compute(compute, &cm)) return NULL;
    if (check_threads(n_threads)) return NULL;
    if (!PyList_Check(ws_o) || PyList_GET_SIZE(ws_o) < 1 || PyList_GET_SIZE(ws_o) > VLM_MM_MULTI_MAX) {
        PyErr_Format(PyExc_ValueError, "ws must be a list of 1 to %d weights", VLM_MM_MULTI_MAX);
        return NULL;
    }
    int nw = (int)PyList_GET_SIZE(ws_o);
    if (bs_o != Py_None && (!PyList_Check(bs_o) || PyList_GET_SIZE(bs_o) != nw)) {
        PyErr_SetString(PyExc_ValueError, "biases must be None or a list as long as ws");
        return NULL;
    }
    vlm_weight w[VLM_MM_MULTI_MAX];
    const vlm_weight *wp[VLM_MM_MULTI_MAX];
    float *outp[VLM_MM_MULTI_MAX];
    int64_t ldo[VLM_MM_MULTI_MAX];
    PyArrayObject *x = NULL;
    PyObject *res = NULL, *outs = NULL;
    size_t ss = 0;
    for (int i = 0; i < nw; i++) {   /* k is checked by vlm_matmul_multi */
        char name[16];
        snprintf(name, sizeof name, "ws[%d]", i);
        if (to_weight(PyList_GET_ITEM(ws_o, i), name, &w[i])) return NULL;
        if (w[i].dtype != VLM_F32 && w[i].dtype != VLM_BF16) {
            PyErr_Format(PyExc_TypeError, "%s: matmul_multi takes float32 or bf16 weights only", name);
            return NULL;
        }
        wp[i] = &w[i];
    }
    x = (PyArrayObject *)PyArray_FROM_OTF(x_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!x) return NULL;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) != w[0].k) {
        PyErr_Format(PyExc_ValueError, "x must have shape [m, %lld]", (long long)w[0].k);
        goto done;
    }
    npy_intp m = PyArray_DIM(x, 0);
    if (!(outs = PyList_New(nw))) goto done;
    for (int i = 0; i < nw; i++) {
        if (bs_o != Py_None && PyList_GET_ITEM(bs_o, i) != Py_None &&
            !(w[i].bias = to_f32_vec(PyList_GET_ITEM(bs_o, i), "bias", w[i].n)))
            goto done;
        npy_intp d[2] = {m, (npy_intp)w[i].n};
        PyObject *o = PyArray_SimpleNew(2, d, NPY_FLOAT32);
        if (!o) goto done;
        PyList_SET_ITEM(outs, i, o);
        outp[i] = PyArray_DATA((PyArrayObject *)o);
        ldo[i] = w[i].n;
        ss = vlm_matmul_scratch_max(ss, m, &w[i], cm, n_threads);
    }
    vlm_err err = {{0}};
    vlm_status st;
    ws_lease wl;
    if (lease_begin(&wl, Py_None)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK) st = vlm_matmul_multi(pool, nw, outp, ldo, PyArray_DATA(x), w[0].k, m, wp, cm, scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = outs;
    outs = NULL;
done:
    Py_XDECREF(x);
    Py_XDECREF(outs);
    return res;
}

/* quantize_i8(w, n_threads=1) -> (q int8 [n][k], scale float32 [n], wsum float32 [n]) (see gemm.h). */
/* The arguments of quantize_i8 / quantize_i4: w (a nonempty float32 or bf16 2-D weight) and n_threads. */
static int quant_args(PyObject *args, PyObject *kw, vlm_weight *w, int *n_threads) {
    PyObject *w_o;
    static char *kwlist[] = {"w", "n_threads", NULL};
    *n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i", kwlist, &w_o, n_threads)) return -1;
    if (check_threads(*n_threads) || to_weight(w_o, "w", w)) return -1;
    if (w->dtype == VLM_I8 || w->dtype == VLM_I4) {
        PyErr_SetString(PyExc_TypeError, w->dtype == VLM_I8 ? "w: already int8" : "w: already int4 (uint8 codes)");
        return -1;
    }
    if (w->n == 0 || w->k == 0) {
        PyErr_SetString(PyExc_ValueError, "w: empty matrix");
        return -1;
    }
    return 0;
}

static PyObject *py_quantize_i8(PyObject *mod, PyObject *args, PyObject *kw) {
    vlm_weight w;
    int n_threads;
    if (quant_args(args, kw, &w, &n_threads)) return NULL;
    npy_intp dq[2] = {(npy_intp)w.n, (npy_intp)w.k}, dn[1] = {(npy_intp)w.n};
    PyArrayObject *q = (PyArrayObject *)PyArray_SimpleNew(2, dq, NPY_INT8);
    PyArrayObject *sc = (PyArrayObject *)PyArray_SimpleNew(1, dn, NPY_FLOAT32);
    PyArrayObject *su = (PyArrayObject *)PyArray_SimpleNew(1, dn, NPY_FLOAT32);
    PyObject *res = NULL;
    if (!q || !sc || !su) goto done;
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool = n_threads > 1 ? vlm_pool_create(n_threads) : NULL;
    st = n_threads > 1 && !pool ? vlm_fail(&err, VLM_ERR_NOMEM, "quantize_i8: cannot start %d threads", n_threads)
                                : VLM_OK;
    if (st == VLM_OK)
        st = vlm_quantize_i8(pool, w.data, w.dtype, w.n, w.k, PyArray_DATA(q), PyArray_DATA(sc), PyArray_DATA(su),
                             &err);
    vlm_pool_free(pool);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = PyTuple_Pack(3, (PyObject *)q, (PyObject *)sc, (PyObject *)su);
done:
    Py_XDECREF(q);
    Py_XDECREF(sc);
    Py_XDECREF(su);
    return res;
}

/* quantize_i4(w, n_threads=1) -> (codes uint8 [n][k/2], sub uint8 [n][ceil(k/64)], scale float32 [n],
 * wsum float32 [n]) (see gemm.h). */
static PyObject *py_quantize_i4(PyObject *mod, PyObject *args, PyObject *kw) {
    vlm_weight w;
    int n_threads;
    if (quant_args(args, kw, &w, &n_threads)) return NULL;
    npy_intp dq[2] = {(npy_intp)w.n, (npy_intp)(w.k / 2)}, ds[2] = {(npy_intp)w.n, (npy_intp)vlm_i4_sub_stride(w.k)};
    npy_intp dn[1] = {(npy_intp)w.n};
    PyArrayObject *q = (PyArrayObject *)PyArray_SimpleNew(2, dq, NPY_UINT8);
    PyArrayObject *sb = (PyArrayObject *)PyArray_SimpleNew(2, ds, NPY_UINT8);
    PyArrayObject *sc = (PyArrayObject *)PyArray_SimpleNew(1, dn, NPY_FLOAT32);
    PyArrayObject *su = (PyArrayObject *)PyArray_SimpleNew(1, dn, NPY_FLOAT32);
    PyObject *res = NULL;
    if (!q || !sb || !sc || !su) goto done;
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool = n_threads > 1 ? vlm_pool_create(n_threads) : NULL;
    st = n_threads > 1 && !pool ? vlm_fail(&err, VLM_ERR_NOMEM, "quantize_i4: cannot start %d threads", n_threads)
                                : VLM_OK;
    if (st == VLM_OK)
        st = vlm_quantize_i4(pool, w.data, w.dtype, w.n, w.k, PyArray_DATA(q), PyArray_DATA(sb), PyArray_DATA(sc),
                             PyArray_DATA(su), &err);
    vlm_pool_free(pool);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = PyTuple_Pack(4, (PyObject *)q, (PyObject *)sb, (PyObject *)sc, (PyObject *)su);
done:
    Py_XDECREF(q);
    Py_XDECREF(sb);
    Py_XDECREF(sc);
    Py_XDECREF(su);
    return res;
}

static PyObject *py_fma_peak(PyObject *mod, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 256) { PyErr_SetString(PyExc_ValueError, "n_threads must be in [1, 256]"); return NULL; }
    double r;
    Py_BEGIN_ALLOW_THREADS
    r = vlm_measure_fma_peak((int)n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(r);
}

static PyObject *py_peak(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"family", "n_threads", NULL};
    const char *name;
    long n;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sl:peak", kwlist, &name, &n)) return NULL;
    int family = vlm_peak_family_from_name(name);
    if (family < 0) {
        PyErr_Format(PyExc_ValueError, "unknown peak family '%s' (expected 'fma32', 'bf16dp', 'vnni' or 'bandwidth')",
                     name);
        return NULL;
    }
    if (n < 1 || n > 256) { PyErr_Format(PyExc_ValueError, "n_threads must be in [1, 256], got %ld", n); return NULL; }
    double r;
    Py_BEGIN_ALLOW_THREADS
    r = vlm_measure_peak(family, (int)n);
    Py_END_ALLOW_THREADS
    if (r < 0) return PyErr_Format(PyExc_MemoryError, "peak('%s'): could not allocate the probe's memory", name);
    return PyFloat_FromDouble(r);
}

static PyObject *py_gemm_info(PyObject *mod, PyObject *unused) {
    return Py_BuildValue("{ssssss}", "kernel", vlm_gemm_kernel_name(), "blas", vlm_blas_info(), "int8_kernel",
                         vlm_matmul_i8_kernel_name());
}

static PyMethodDef module_methods[] = {
    {"matmul_multi", (PyCFunction)(void (*)(void))py_matmul_multi, METH_VARARGS | METH_KEYWORDS,
     "matmul_multi(x, ws, biases=None, compute='f32', n_threads=1) -> list of x @ w.T + b (float32 / bf16 weights "
     "with the same k, one fused call)"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,
     "matmul(x, w, bias=None, compute='f32', n_threads=1, out=None, accumulate=False, workspace=None, scale=None, "
     "wsum=None, sub=None) -> x @ w.T + bias (int8 w: with its scale and wsum from quantize_i8; uint8 w: int4 "
     "codes with scale, wsum and sub from quantize_i4)"},
    {"quantize_i8", (PyCFunction)(void (*)(void))py_quantize_i8, METH_VARARGS | METH_KEYWORDS,
     "quantize_i8(w, n_threads=1) -> (q int8, scale float32, wsum float32): per-output-channel int8 weights"},
    {"quantize_i4", (PyCFunction)(void (*)(void))py_quantize_i4, METH_VARARGS | METH_KEYWORDS,
     "quantize_i4(w, n_threads=1) -> (codes uint8 [n][k/2], sub uint8 [n][ceil(k/64)], scale float32, wsum float32): "
     "4-bit blocks of 32 (csrc/gemm.h)"},
    {"fma_peak", py_fma_peak, METH_O, "fma_peak(n_threads) -> measured fp32 FMA peak in GFLOP/s"},
    {"peak", (PyCFunction)(void (*)(void))py_peak, METH_VARARGS | METH_KEYWORDS,
     "peak(family, n_threads) -> measured peak of an instruction family on n_threads threads: 'fma32' (fp32 FMA, "
     "GFLOP/s), 'bf16dp' (AVX512-BF16 vdpbf16ps, GFLOP/s), 'vnni' (AVX512-VNNI vpdpbusd, GOP/s), 'bandwidth' "
     "(streaming read of 1 GiB, GB/s); 0.0 for a family this CPU lacks"},
    {"gemm_info", py_gemm_info, METH_NOARGS, "gemm_info() -> dict(kernel=..., blas=...)"},
    {"op", (PyCFunction)(void (*)(void))py_op, METH_VARARGS | METH_KEYWORDS,
     "op(name, arrays, ints=(), floats=(), n_threads=1): run one core op in place (tests only, see py_ops.h)"},
    {"ops", py_ops, METH_NOARGS, "ops() -> {name: (array dtypes, n_ints, n_floats)} of op() (tests only)"},
    PY_DETR_METHODS
    {NULL}};

static int module_exec(PyObject *mod) {
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    vlm_blas_single_thread();
    if (PyType_Ready(&Qwen2ModelType) < 0 || PyType_Ready(&Qwen2StateType) < 0 || PyType_Ready(&VisionModelType) < 0 ||
        PyType_Ready(&WorkspaceType) < 0)
        return -1;
    if (PyModule_AddObjectRef(mod, "Workspace", (PyObject *)&WorkspaceType) < 0) return -1;
    if (PyModule_AddObjectRef(mod, "VisionModel", (PyObject *)&VisionModelType) < 0) return -1;
    if (py_davit_register(mod) < 0 || py_swin_register(mod) < 0 || py_upn_register(mod) < 0 || py_hfre_register(mod) < 0 || py_fo1_register(mod) < 0) return -1;
    if (PyModule_AddObjectRef(mod, "Qwen2Model", (PyObject *)&Qwen2ModelType) < 0) return -1;
    if (PyModule_AddObjectRef(mod, "Qwen2State", (PyObject *)&Qwen2StateType) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "vlmfo1._core", "vlmfo1 C core", 0, module_methods, module_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&moduledef); }
