/* py_vit.h — Python binding of the Qwen2.5-VL vision tower core, csrc/qwen_vit.c (included by module.c after its
 * shared helpers: raise_status, get_item, get_int, bind_from_dict, check_threads, lease_begin/lease_end).
 * VisionModel(config, tensors): read-only weights borrowed from NumPy arrays; forward(...) runs one image. */


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

static int py_vit_register(PyObject *mod) {
    if (PyType_Ready(&VisionModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "VisionModel", (PyObject *)&VisionModelType);
}
