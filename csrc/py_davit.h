/* py_davit.h — Python bindings of the DaViT core (included by module.c, after its shared helpers:
 * raise_status, get_item, get_int, get_int_list, bind_from_dict, check_threads, backbone_forward).
 * Only module.c includes it.
 *
 * DavitModel(config: dict, tensors: dict): read-only weights borrowed from NumPy arrays (the object keeps
 * the dict alive; vlm_davit_bind in davit.c names the tensors). config keys: in_chans, window, eps,
 * compute (0 f32 / 1 bf16) and the 4-entry lists dims, depths, heads, groups, mlp_hidden, kernel, stride,
 * pad, prenorm.
 * forward(pixels [in_chans, H, W] float32, n_threads=1, workspace=None) -> tuple of 4 float32 arrays
 * [H_s, W_s, C_s]; with a Workspace its pool and scratch are reused. */
#include "davit.h"

_Static_assert(VLM_DAVIT_STAGES == 4, "backbone_forward returns four maps");

typedef struct {
    PyObject_HEAD
    vlm_davit m;           /* m.blocks[0] == NULL: not (successfully) initialised */
    PyObject *tensors;
} DavitModel;

static void DavitModel_dealloc(DavitModel *self) {
    vlm_davit_unbind(&self->m);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int DavitModel_init(DavitModel *self, PyObject *args, PyObject *kw) {
    PyObject *cfg, *t;
    static char *kwlist[] = {"config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &t)) return -1;
    vlm_davit *m = &self->m;
    vlm_davit_config *c = &m->cfg;
    int compute = 0;
    vlm_davit_unbind(m);
    memset(m, 0, sizeof *m);
    static const char *lists[] = {"dims", "depths", "heads", "groups", "mlp_hidden", "kernel", "stride", "pad",
                                  "prenorm"};
    int *dst[] = {c->dim, c->depth, c->heads, c->groups, c->mlp_hidden, c->kernel, c->stride, c->pad, c->prenorm};
    if (get_int(cfg, "in_chans", &c->in_chans) || get_int(cfg, "window", &c->window) ||
        get_int(cfg, "compute", &compute))
        return -1;
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++)
        if (get_int_list(cfg, "davit", lists[i], dst[i], VLM_DAVIT_STAGES)) return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    PyObject *eps = get_item(cfg, "eps");
    if (!eps) return -1;
    c->eps = (float)PyFloat_AsDouble(eps);
    if (PyErr_Occurred()) return -1;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        if (c->depth[s] < 0 || c->depth[s] > VLM_DAVIT_MAX_DEPTH || c->dim[s] <= 0 || c->mlp_hidden[s] <= 0) {
            PyErr_Format(PyExc_ValueError, "davit stage %d: depth must be in [0, %d] and dims positive", s,
                         VLM_DAVIT_MAX_DEPTH);
            return -1;
        }
    }
    Py_XSETREF(self->tensors, Py_NewRef(t));
    return bind_from_dict(t, (bind_fn)vlm_davit_bind, m);
}

/* the net-typed entry points, as backbone_call wants them */
static vlm_status davit_sizes_any(const void *m, int H, int W, int hs[4], int ws[4], vlm_err *err) {
    return vlm_davit_stage_sizes(m, H, W, hs, ws, err);
}
static size_t davit_scratch_any(const void *m, int H, int W, int n_threads) { return vlm_davit_scratch_size(m, H, W, n_threads); }
static vlm_status davit_forward_any(const void *m, vlm_pool *pool, const float *px, int H, int W, float *out[4],
                                  void *scratch, size_t size, vlm_err *err) {
    return vlm_davit_forward(m, pool, px, H, W, out, scratch, size, err);
}

static PyObject *DavitModel_forward(DavitModel *self, PyObject *args, PyObject *kw) {
    if (!self->m.blocks[0]) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    backbone_call b = {&self->m, self->m.cfg.in_chans, {self->m.cfg.dim[0], self->m.cfg.dim[1], self->m.cfg.dim[2], self->m.cfg.dim[3]}, davit_sizes_any, davit_scratch_any,
                       davit_forward_any};
    return backbone_forward(&b, args, kw);
}

static PyObject *DavitModel_scratch_bytes(DavitModel *self, PyObject *args, PyObject *kw) {
    int H, W, n_threads = 1;
    static char *kwlist[] = {"height", "width", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|i", kwlist, &H, &W, &n_threads)) return NULL;
    if (!self->m.blocks[0]) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    return PyLong_FromSize_t(vlm_davit_scratch_size(&self->m, H, W, n_threads));
}

static PyMethodDef DavitModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))DavitModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(pixels [C, H, W] float32, n_threads=1, workspace=None) -> 4 stage maps, float32 [H_s, W_s, C_s] each"},
    {"scratch_bytes", (PyCFunction)(void (*)(void))DavitModel_scratch_bytes, METH_VARARGS | METH_KEYWORDS,
     "scratch_bytes(height, width, n_threads=1) -> bytes of scratch a forward pass allocates"},
    {NULL}};

static PyTypeObject DavitModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.DavitModel",
    .tp_basicsize = sizeof(DavitModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DavitModel(config: dict, tensors: dict) - DaViT (FO1 auxiliary encoder) weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DavitModel_init,
    .tp_dealloc = (destructor)DavitModel_dealloc,
    .tp_methods = DavitModel_methods,
};

static int py_davit_register(PyObject *mod) {
    if (PyType_Ready(&DavitModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "DavitModel", (PyObject *)&DavitModelType);
}
