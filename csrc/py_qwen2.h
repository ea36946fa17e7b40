/* py_qwen2.h — Python bindings of the Qwen2.5 decoder core, csrc/qwen2.c (included by module.c after its shared
 * helpers: raise_status, to_weight, get_item, get_int, bind_from_dict, check_threads, lease_begin/lease_end).
 *
 * Qwen2Model(config, tensors, ...): read-only weights borrowed from NumPy arrays (typically views of memory-mapped
 * safetensors files; the object keeps the dict alive). Qwen2State(model, max_context, n_threads, ...): one
 * request's KV cache + scratch + pool, one thread at a time. */


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

static PyObject *Qwen2State_get_flops(Qwen2State *self, void *c) {
    uint64_t n[VLM_FLOPS_KINDS] = {0, 0};
    if (self->s) vlm_qwen2_state_flops(self->s, n);
    return flops_dict(n);
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
    {"flops", (getter)Qwen2State_get_flops, NULL, "{'gemm': FLOPs, 'attention': FLOPs} of every forward so far "
     "(csrc/pool.h)", NULL},
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

static int py_qwen2_register(PyObject *mod) {
    if (PyType_Ready(&Qwen2ModelType) < 0 || PyType_Ready(&Qwen2StateType) < 0) return -1;
    if (PyModule_AddObjectRef(mod, "Qwen2Model", (PyObject *)&Qwen2ModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "Qwen2State", (PyObject *)&Qwen2StateType);
}
