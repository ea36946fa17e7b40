/* py_upn.h — Python binding of UPN, csrc/upn.c (included by module.c after py_swin.h, whose SwinModel it takes;
 * uses module.c's raise_status, get_item, get_int, bind_from_dict, check_threads, lease_begin/lease_end).
 * Only module.c includes it.
 *
 * UPNModel(swin: SwinModel, config: dict, tensors: dict): the proposal network's weights (the object keeps the
 * backbone and the dict alive; vlm_upn_bind in upn.c names the tensors). config keys: d_model, heads, points,
 * enc_layers, dec_layers, ffn, queries, groups, temperature, eps, compute (0 f32 / 1 bf16).
 * forward(pixels [3, H, W] float32, prompt=0, n_threads=1, workspace=None, taps=False) -> (logits [Q],
 * boxes [Q, 4] cxcywh normalized), plus a dict of intermediate tensors with taps=True (see vlm_upn_taps). */
#include "upn.h"

typedef struct {
    PyObject_HEAD
    vlm_upn m;             /* m.tgt == NULL: not (successfully) initialised */
    PyObject *swin, *tensors;
    double seconds[VLM_UPN_STAGES];   /* stage times of the last forward */
    int seconds_py_set;
} UPNModel;

static void UPNModel_dealloc(UPNModel *self) {
    Py_XDECREF(self->swin);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int UPNModel_init(UPNModel *self, PyObject *args, PyObject *kw) {
    PyObject *sw, *cfg, *t;
    static char *kwlist[] = {"swin", "config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!O!", kwlist, &SwinModelType, &sw, &PyDict_Type, &cfg, &PyDict_Type,
                                     &t))
        return -1;
    if (!((SwinModel *)sw)->m.blocks[0]) { PyErr_SetString(PyExc_ValueError, "the backbone is not initialised"); return -1; }
    vlm_upn *m = &self->m;
    int compute = 0;
    memset(m, 0, sizeof *m);
    vlm_upn_config *c = &m->cfg;
    if (get_int(cfg, "d_model", &c->d_model) || get_int(cfg, "heads", &c->heads) || get_int(cfg, "points", &c->points) ||
        get_int(cfg, "enc_layers", &c->enc_layers) || get_int(cfg, "dec_layers", &c->dec_layers) ||
        get_int(cfg, "ffn", &c->ffn) || get_int(cfg, "queries", &c->queries) || get_int(cfg, "groups", &c->groups) ||
        get_int(cfg, "compute", &compute))
        return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    const char *fk[2] = {"temperature", "eps"};
    float *fv[2] = {&c->temperature, &c->eps};
    for (int i = 0; i < 2; i++) {
        PyObject *v = get_item(cfg, fk[i]);
        if (!v) return -1;
        *fv[i] = (float)PyFloat_AsDouble(v);
        if (PyErr_Occurred()) return -1;
    }
    m->swin = &((SwinModel *)sw)->m;
    Py_XSETREF(self->swin, Py_NewRef(sw));
    Py_XSETREF(self->tensors, Py_NewRef(t));
    if (bind_from_dict(t, (bind_fn)vlm_upn_bind, m)) { m->tgt = NULL; return -1; }
    return 0;
}

/* a new float32 / int32 array of the given shape into *out (and its data into *ptr); -1 on failure */
static int upn_new(PyObject *dict, const char *key, int nd, npy_intp *dims, int type, void **ptr) {
    PyObject *a = PyArray_ZEROS(nd, dims, type, 0);
    if (!a) return -1;
    *ptr = PyArray_DATA((PyArrayObject *)a);
    int rc = PyDict_SetItemString(dict, key, a);
    Py_DECREF(a);
    return rc;
}

static PyObject *UPNModel_forward(UPNModel *self, PyObject *args, PyObject *kw) {
    PyObject *px_o, *ws_o = Py_None, *sel_o = Py_None;
    int prompt = 0, n_threads = 1, want_taps = 0;
    static char *kwlist[] = {"pixels", "prompt", "n_threads", "workspace", "taps", "select", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iiOpO", kwlist, &px_o, &prompt, &n_threads, &ws_o, &want_taps,
                                     &sel_o))
        return NULL;
    const vlm_upn *m = &self->m;
    if (!m->tgt) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    if (check_threads(n_threads)) return NULL;
    if (prompt != 0 && prompt != 1) { PyErr_SetString(PyExc_ValueError, "prompt must be 0 (fine) or 1 (coarse)"); return NULL; }
    PyArrayObject *px = (PyArrayObject *)PyArray_FROM_OTF(px_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!px) return NULL;
    PyObject *logits = NULL, *boxes = NULL, *tapd = NULL, *res = NULL;
    PyArrayObject *sel = NULL;
    vlm_upn_taps taps;
    memset(&taps, 0, sizeof taps);
    ws_lease wl;
    if (PyArray_NDIM(px) != 3 || PyArray_DIM(px, 0) != m->swin->cfg.in_chans || PyArray_DIM(px, 1) <= 0 ||
        PyArray_DIM(px, 2) <= 0 || PyArray_DIM(px, 1) > 16384 || PyArray_DIM(px, 2) > 16384) {
        PyErr_Format(PyExc_ValueError, "pixels must have shape [%d, H, W] with 1 <= H, W <= 16384", m->swin->cfg.in_chans);
        goto done;
    }
    const int H = (int)PyArray_DIM(px, 1), W = (int)PyArray_DIM(px, 2), Q = m->cfg.queries, d = m->cfg.d_model;
    int hs[VLM_UPN_LEVELS], ws[VLM_UPN_LEVELS];
    long S;
    vlm_err err = {{0}};
    vlm_status st = vlm_upn_levels(m, H, W, hs, ws, &S, &err);
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    if (sel_o != Py_None) {
        if (!want_taps) { PyErr_SetString(PyExc_ValueError, "select needs taps=True (a parity-test hook)"); goto done; }
        sel = (PyArrayObject *)PyArray_FROM_OTF(sel_o, NPY_INT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
        if (!sel) goto done;
        if (PyArray_NDIM(sel) != 1 || PyArray_DIM(sel, 0) != Q) {
            PyErr_Format(PyExc_ValueError, "select must hold %d token indices", Q);
            goto done;
        }
        taps.select = PyArray_DATA(sel);   /* indices checked in vlm_upn_forward */
    }
    npy_intp dq[2] = {Q, 4};
    logits = PyArray_SimpleNew(1, dq, NPY_FLOAT32);
    boxes = PyArray_SimpleNew(2, dq, NPY_FLOAT32);
    if (!logits || !boxes) goto done;
    if (want_taps) {
        if (!(tapd = PyDict_New())) goto done;
        char key[32];
        for (int l = 0; l < VLM_SWIN_STAGES; l++) {
            npy_intp db[3] = {hs[l], ws[l], (npy_intp)m->swin->cfg.embed << l};
            snprintf(key, sizeof key, "backbone%d", l);
            if (upn_new(tapd, key, 3, db, NPY_FLOAT32, (void **)&taps.backbone[l])) goto done;
        }
        const int D = m->cfg.dec_layers;
        npy_intp dsd[2] = {S, d}, ds[1] = {S}, dQ[1] = {Q}, dr[2] = {Q, 4}, dh[3] = {D, Q, d}, drs[3] = {D + 1, Q, 4};
        if (upn_new(tapd, "srcs", 2, dsd, NPY_FLOAT32, (void **)&taps.srcs) ||
            upn_new(tapd, "pos", 2, dsd, NPY_FLOAT32, (void **)&taps.pos) ||
            upn_new(tapd, "memory", 2, dsd, NPY_FLOAT32, (void **)&taps.memory) ||
            upn_new(tapd, "enc_logits", 1, ds, NPY_FLOAT32, (void **)&taps.enc_logits) ||
            upn_new(tapd, "topk", 1, dQ, NPY_INT32, (void **)&taps.topk) ||
            upn_new(tapd, "ref0", 2, dr, NPY_FLOAT32, (void **)&taps.ref0) ||
            upn_new(tapd, "hs", 3, dh, NPY_FLOAT32, (void **)&taps.hs) ||
            upn_new(tapd, "refs", 3, drs, NPY_FLOAT32, (void **)&taps.refs))
            goto done;
        npy_intp dl[2] = {VLM_UPN_LEVELS, 2};
        PyObject *shapes = PyArray_SimpleNew(2, dl, NPY_INT64);
        if (!shapes) goto done;
        int64_t *sp = PyArray_DATA((PyArrayObject *)shapes);
        for (int l = 0; l < VLM_UPN_LEVELS; l++) { sp[2 * l] = hs[l]; sp[2 * l + 1] = ws[l]; }
        int rc = PyDict_SetItemString(tapd, "shapes", shapes);
        Py_DECREF(shapes);
        if (rc) goto done;
    }
    size_t ss = vlm_upn_scratch_size(m, H, W, n_threads);
    if (lease_begin(&wl, ws_o)) goto done;
    float *lp = PyArray_DATA((PyArrayObject *)logits), *bp = PyArray_DATA((PyArrayObject *)boxes);
    double sec[VLM_UPN_STAGES] = {0};
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK)
        st = vlm_upn_forward(m, pool, PyArray_DATA(px), H, W, prompt, lp, bp, want_taps ? &taps : NULL, sec, scratch, ss,
                             &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    self->seconds_py_set = 1;
    memcpy(self->seconds, sec, sizeof sec);
    res = want_taps ? PyTuple_Pack(3, logits, boxes, tapd) : PyTuple_Pack(2, logits, boxes);
done:
    Py_XDECREF(px);
    Py_XDECREF(sel);
    Py_XDECREF(logits);
    Py_XDECREF(boxes);
    Py_XDECREF(tapd);
    return res;
}

static PyObject *UPNModel_scratch_bytes(UPNModel *self, PyObject *args, PyObject *kw) {
    int H, W, n_threads = 1;
    static char *kwlist[] = {"height", "width", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|i", kwlist, &H, &W, &n_threads)) return NULL;
    if (!self->m.tgt) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    return PyLong_FromSize_t(vlm_upn_scratch_size(&self->m, H, W, n_threads));
}

static PyObject *UPNModel_get_seconds(UPNModel *self, void *c) {
    if (!self->seconds_py_set) Py_RETURN_NONE;
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:d}", "backbone", self->seconds[0], "neck", self->seconds[1], "encoder",
                         self->seconds[2], "two_stage", self->seconds[3], "decoder", self->seconds[4]);
}

static PyGetSetDef UPNModel_getset[] = {
    {"seconds", (getter)UPNModel_get_seconds, NULL, "stage wall times of the last forward (dict) or None", NULL},
    {NULL}};

static PyMethodDef UPNModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))UPNModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(pixels [3, H, W] float32, prompt=0, n_threads=1, workspace=None, taps=False) -> (logits [Q], boxes "
     "[Q, 4] cxcywh normalized[, taps dict])"},
    {"scratch_bytes", (PyCFunction)(void (*)(void))UPNModel_scratch_bytes, METH_VARARGS | METH_KEYWORDS,
     "scratch_bytes(height, width, n_threads=1) -> bytes of scratch a forward pass allocates"},
    {NULL}};

static PyTypeObject UPNModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.UPNModel",
    .tp_basicsize = sizeof(UPNModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "UPNModel(swin: SwinModel, config: dict, tensors: dict) - UPN proposal network weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)UPNModel_init,
    .tp_dealloc = (destructor)UPNModel_dealloc,
    .tp_methods = UPNModel_methods,
    .tp_getset = UPNModel_getset,
};

static int py_upn_register(PyObject *mod) {
    if (PyType_Ready(&UPNModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "UPNModel", (PyObject *)&UPNModelType);
}
