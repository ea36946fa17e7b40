/* py_hfre.h — Python bindings of the hfre core (included by module.c, after its shared helpers:
 * raise_status, get_item, get_int, bind_from_dict, check_threads, lease_begin/lease_end).
 * Only module.c includes it.
 *
 * HFREModel(config: dict, tensors: dict): read-only HFRE + projector weights (borrowed arrays; the
 * object keeps the dict alive). vlmfo1/hfre.py builds both dicts from a checkpoint; vlm_hfre_bind and
 * vlm_mlp_bind (hfre.c) name the tensors.
 *   regions(aux, vt, boxes_a, boxes_q, n_threads=1, workspace=None) -> float32 [N, R]
 *   project(which, x, n_threads=1, workspace=None) -> float32 [m, n_out]   (which: 0 = mm_projector, 1 = mm_projector_aux)
 * With a Workspace, its pool and scratch are reused. */
#include "hfre.h"

typedef struct {
    PyObject_HEAD
    vlm_hfre m;
    vlm_mlp proj[2];
    int has_proj[2];
    PyObject *tensors;
} HFREModel;

static void HFREModel_dealloc(HFREModel *self) {
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int HFREModel_init(HFREModel *self, PyObject *args, PyObject *kw) {
    PyObject *cfg, *t;
    static char *kwlist[] = {"config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &t)) return -1;
    memset(&self->m, 0, sizeof self->m);
    memset(self->proj, 0, sizeof self->proj);
    vlm_hfre_config *c = &self->m.cfg;
    int compute = 0, n_proj[2] = {0, 0};
    if (get_int(cfg, "S", &c->S) || get_int(cfg, "R", &c->R) || get_int(cfg, "use_aux", &c->use_aux) ||
        get_int(cfg, "use_vt", &c->use_vt) || get_int(cfg, "simple_fpn", &c->simple_fpn) || get_int(cfg, "pe", &c->pe) ||
        get_int(cfg, "vt_c", &c->vt_c) || get_int(cfg, "n_vt", &c->n_vt) || get_int(cfg, "fpn_c", &c->fpn_c) ||
        get_int(cfg, "patch", &c->patch) || get_int(cfg, "compute", &compute) ||
        get_int(cfg, "n_proj_image", &n_proj[0]) || get_int(cfg, "n_proj_aux", &n_proj[1]))
        return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
        char k[32];
        snprintf(k, sizeof k, "aux_c%d", l);
        if (get_int(cfg, k, &c->aux_c[l])) return -1;
    }
    static const char *pname[2] = {"proj_image", "proj_aux"};
    for (int p = 0; p < 2; p++) {
        if (n_proj[p] < 0 || n_proj[p] > VLM_MLP_MAX_LAYERS) {
            PyErr_Format(PyExc_ValueError, "%s: %d layers (0..%d supported)", pname[p], n_proj[p], VLM_MLP_MAX_LAYERS);
            return -1;
        }
        self->has_proj[p] = n_proj[p] > 0;
        self->proj[p] = (vlm_mlp){.n_layers = n_proj[p], .compute = c->compute, .name = pname[p]};
    }
    Py_XSETREF(self->tensors, Py_NewRef(t));
    vlm_tensor_table tab;
    if (table_from_dict(t, &tab)) return -1;
    vlm_err err = {{0}};
    vlm_status st = vlm_hfre_bind(&self->m, &tab, &err);
    for (int p = 0; p < 2 && st == VLM_OK; p++)
        if (self->has_proj[p]) st = vlm_mlp_bind(&self->proj[p], &tab, &err);
    PyMem_Free((void *)tab.items);
    if (st != VLM_OK) { raise_status(st, &err); return -1; }
    return 0;
}

/* A 3-D float32 map [H][W][C] with C == want_c (converted to a C-contiguous array; new reference). */
static PyArrayObject *hfre_map(PyObject *o, int want_c, const char *what, int idx) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != 3 || PyArray_DIM(a, 2) != want_c || PyArray_DIM(a, 0) <= 0 || PyArray_DIM(a, 1) <= 0 ||
        PyArray_DIM(a, 0) > (1 << 20) || PyArray_DIM(a, 1) > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "%s map %d must have shape [H, W, %d] (channels last), got %d-D", what, idx,
                     want_c, PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static PyArrayObject *hfre_boxes(PyObject *o, npy_intp *N) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 1) != 4 || (*N >= 0 && PyArray_DIM(a, 0) != *N)) {
        PyErr_SetString(PyExc_ValueError, "boxes must have shape [N, 4] (the same N for aux and Qwen boxes)");
        Py_DECREF(a);
        return NULL;
    }
    *N = PyArray_DIM(a, 0);
    return a;
}

static PyObject *HFREModel_regions(HFREModel *self, PyObject *args, PyObject *kw) {
    PyObject *aux_o, *vt_o, *ba_o, *bq_o, *ws_o = Py_None;
    int n_threads = 1;
    static char *kwlist[] = {"aux", "vt", "boxes_a", "boxes_q", "n_threads", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|iO", kwlist, &aux_o, &vt_o, &ba_o, &bq_o, &n_threads, &ws_o))
        return NULL;
    const vlm_hfre_config *c = &self->m.cfg;
    if (!c->S) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    if (check_threads(n_threads)) return NULL;
    PyArrayObject *aux[VLM_HFRE_AUX_LEVELS] = {0}, *vt[VLM_HFRE_MAX_VT] = {0}, *ba = NULL, *bq = NULL, *out = NULL;
    PyObject *res = NULL, *seq = NULL;
    ws_lease wl;
    int aux_hw[VLM_HFRE_AUX_LEVELS][2] = {{0}};
    const float *auxp[VLM_HFRE_AUX_LEVELS] = {0}, *vtp[VLM_HFRE_MAX_VT] = {0};
    int gh = 0, gw = 0;
    npy_intp N = -1;
    if (c->use_aux) {
        if (!(seq = PySequence_Fast(aux_o, "aux must be a sequence of 4 maps"))) goto done;
        if (PySequence_Fast_GET_SIZE(seq) != VLM_HFRE_AUX_LEVELS) {
            PyErr_Format(PyExc_ValueError, "aux must hold %d maps, got %zd", VLM_HFRE_AUX_LEVELS, PySequence_Fast_GET_SIZE(seq));
            goto done;
        }
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
            if (!(aux[l] = hfre_map(PySequence_Fast_GET_ITEM(seq, l), c->aux_c[l], "aux", l))) goto done;
            aux_hw[l][0] = (int)PyArray_DIM(aux[l], 0);
            aux_hw[l][1] = (int)PyArray_DIM(aux[l], 1);
            auxp[l] = PyArray_DATA(aux[l]);
        }
        Py_CLEAR(seq);
        if (!(ba = hfre_boxes(ba_o, &N))) goto done;
    }
    if (c->use_vt) {
        if (!(seq = PySequence_Fast(vt_o, "vt must be a sequence of maps"))) goto done;
        if (PySequence_Fast_GET_SIZE(seq) != c->n_vt) {
            PyErr_Format(PyExc_ValueError, "vt must hold %d maps, got %zd", c->n_vt, PySequence_Fast_GET_SIZE(seq));
            goto done;
        }
        for (int k = 0; k < c->n_vt; k++) {
            if (c->simple_fpn && k < c->n_vt - 1) continue;   /* SimpleFP reads the last map only */
            if (!(vt[k] = hfre_map(PySequence_Fast_GET_ITEM(seq, k), c->vt_c, "vt", k))) goto done;
            int h = (int)PyArray_DIM(vt[k], 0), w = (int)PyArray_DIM(vt[k], 1);
            if (gh && (h != gh || w != gw)) {
                PyErr_SetString(PyExc_ValueError, "vt maps must all have the same [gh, gw]");
                goto done;
            }
            gh = h; gw = w;
            vtp[k] = PyArray_DATA(vt[k]);
        }
        Py_CLEAR(seq);
        if (!(bq = hfre_boxes(bq_o, &N))) goto done;
    }
    if (N > (1 << 24)) { PyErr_SetString(PyExc_ValueError, "too many boxes"); goto done; }
    npy_intp od[2] = {N, c->R};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, od, NPY_FLOAT32))) goto done;
    size_t ss = vlm_hfre_scratch_size(&self->m, (const int(*)[2])aux_hw, gh, gw, (int)N, n_threads);
    vlm_err err = {{0}};
    vlm_status st;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK)
        st = vlm_hfre_forward(&self->m, pool, auxp, (const int(*)[2])aux_hw, vtp, gh, gw, ba ? PyArray_DATA(ba) : NULL,
                              bq ? PyArray_DATA(bq) : NULL, (int)N, PyArray_DATA(out), scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = Py_NewRef(out);
done:
    Py_XDECREF(seq);
    for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) Py_XDECREF(aux[l]);
    for (int k = 0; k < VLM_HFRE_MAX_VT; k++) Py_XDECREF(vt[k]);
    Py_XDECREF(ba); Py_XDECREF(bq); Py_XDECREF(out);
    return res;
}

static PyObject *HFREModel_project(HFREModel *self, PyObject *args, PyObject *kw) {
    int which, n_threads = 1;
    PyObject *x_o, *ws_o = Py_None;
    static char *kwlist[] = {"which", "x", "n_threads", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO|iO", kwlist, &which, &x_o, &n_threads, &ws_o)) return NULL;
    if (which < 0 || which > 1 || !self->has_proj[which]) {
        PyErr_SetString(PyExc_ValueError, "no such projector (which must be 0 = image or 1 = aux, and have layers)");
        return NULL;
    }
    if (check_threads(n_threads)) return NULL;
    const vlm_mlp *P = &self->proj[which];
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(x_o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (!x) return NULL;
    PyArrayObject *out = NULL;
    PyObject *res = NULL;
    ws_lease wl;
    if (PyArray_NDIM(x) != 2 || PyArray_DIM(x, 1) != P->layers[0].k) {
        PyErr_Format(PyExc_ValueError, "projector input must have shape [m, %lld]", (long long)P->layers[0].k);
        goto done;
    }
    npy_intp m = PyArray_DIM(x, 0);
    npy_intp od[2] = {m, (npy_intp)P->layers[P->n_layers - 1].n};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, od, NPY_FLOAT32))) goto done;
    size_t ss = vlm_mlp_scratch_size(P, m, n_threads);
    vlm_err err = {{0}};
    vlm_status st;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, ss, &pool, &scratch, &err);
    if (st == VLM_OK) st = vlm_mlp_forward(P, pool, PyArray_DATA(out), PyArray_DATA(x), m, scratch, ss, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = Py_NewRef(out);
done:
    Py_XDECREF(x); Py_XDECREF(out);
    return res;
}

static PyMethodDef HFREModel_methods[] = {
    {"regions", (PyCFunction)(void (*)(void))HFREModel_regions, METH_VARARGS | METH_KEYWORDS,
     "regions(aux, vt, boxes_a, boxes_q, n_threads=1, workspace=None) -> float32 [N, R] region vectors "
     "(before mm_projector_aux)"},
    {"project", (PyCFunction)(void (*)(void))HFREModel_project, METH_VARARGS | METH_KEYWORDS,
     "project(which, x, n_threads=1, workspace=None) -> x through mm_projector (0) or mm_projector_aux (1)"},
    {NULL}};

static PyTypeObject HFREModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.HFREModel",
    .tp_basicsize = sizeof(HFREModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HFREModel(config: dict, tensors: dict) - VLM-FO1 region encoder and projector weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HFREModel_init,
    .tp_dealloc = (destructor)HFREModel_dealloc,
    .tp_methods = HFREModel_methods,
};

static int py_hfre_register(PyObject *mod) {
    if (PyType_Ready(&HFREModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "HFREModel", (PyObject *)&HFREModelType);
}
