/* py_swin.h — Python binding of the Swin backbone of UPN, csrc/swin.c (included by module.c, after its shared
 * helpers: raise_status, get_item, get_int, get_int_list, bind_from_dict, check_threads, backbone_forward).
 * Only module.c includes it.
 *
 * SwinModel(config: dict, tensors: dict): read-only weights borrowed from NumPy arrays (the object keeps the dict
 * alive; vlm_swin_bind in swin.c names the tensors). config keys: in_chans, patch, embed, window, eps, compute
 * (0 f32 / 1 bf16) and the 4-entry lists depths, heads, mlp_hidden.
 * forward(pixels [in_chans, H, W] float32, n_threads=1, workspace=None) -> tuple of 4 float32 arrays
 * [H_s, W_s, C_s]; with a Workspace its pool and scratch are reused. */
#include "swin.h"

_Static_assert(VLM_SWIN_STAGES == 4, "backbone_forward returns four maps");

typedef struct {
    PyObject_HEAD
    vlm_swin m;            /* m.blocks[0] == NULL: not (successfully) initialised */
    PyObject *tensors;
} SwinModel;

static void SwinModel_dealloc(SwinModel *self) {
    vlm_swin_unbind(&self->m);
    Py_XDECREF(self->tensors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int SwinModel_init(SwinModel *self, PyObject *args, PyObject *kw) {
    PyObject *cfg, *t;
    static char *kwlist[] = {"config", "tensors", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &t)) return -1;
    vlm_swin *m = &self->m;
    vlm_swin_config *c = &m->cfg;
    int compute = 0;
    vlm_swin_unbind(m);
    memset(m, 0, sizeof *m);
    if (get_int(cfg, "in_chans", &c->in_chans) || get_int(cfg, "patch", &c->patch) || get_int(cfg, "embed", &c->embed) ||
        get_int(cfg, "window", &c->window) || get_int(cfg, "compute", &compute) ||
        get_int_list(cfg, "swin", "depths", c->depth, VLM_SWIN_STAGES) ||
        get_int_list(cfg, "swin", "heads", c->heads, VLM_SWIN_STAGES) ||
        get_int_list(cfg, "swin", "mlp_hidden", c->mlp_hidden, VLM_SWIN_STAGES))
        return -1;
    c->compute = compute ? VLM_COMPUTE_BF16 : VLM_COMPUTE_F32;
    PyObject *eps = get_item(cfg, "eps");
    if (!eps) return -1;
    c->eps = (float)PyFloat_AsDouble(eps);
    if (PyErr_Occurred()) return -1;
    Py_XSETREF(self->tensors, Py_NewRef(t));
    return bind_from_dict(t, (bind_fn)vlm_swin_bind, m);
}

/* the net-typed entry points, as backbone_call wants them */
static vlm_status swin_sizes_any(const void *m, int H, int W, int hs[4], int ws[4], vlm_err *err) {
    return vlm_swin_stage_sizes(m, H, W, hs, ws, err);
}
static size_t swin_scratch_any(const void *m, int H, int W, int n_threads) { return vlm_swin_scratch_size(m, H, W, n_threads); }
static vlm_status swin_forward_any(const void *m, vlm_pool *pool, const float *px, int H, int W, float *out[4],
                                  void *scratch, size_t size, vlm_err *err) {
    return vlm_swin_forward(m, pool, px, H, W, out, scratch, size, err);
}

static PyObject *SwinModel_forward(SwinModel *self, PyObject *args, PyObject *kw) {
    if (!self->m.blocks[0]) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    backbone_call b = {&self->m, self->m.cfg.in_chans, {self->m.cfg.embed, self->m.cfg.embed << 1, self->m.cfg.embed << 2, self->m.cfg.embed << 3}, swin_sizes_any, swin_scratch_any,
                       swin_forward_any};
    return backbone_forward(&b, args, kw);
}

static PyObject *SwinModel_scratch_bytes(SwinModel *self, PyObject *args, PyObject *kw) {
    int H, W, n_threads = 1;
    static char *kwlist[] = {"height", "width", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|i", kwlist, &H, &W, &n_threads)) return NULL;
    if (!self->m.blocks[0]) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    return PyLong_FromSize_t(vlm_swin_scratch_size(&self->m, H, W, n_threads));
}

static PyMethodDef SwinModel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))SwinModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(pixels [C, H, W] float32, n_threads=1, workspace=None) -> 4 stage maps, float32 [H_s, W_s, C_s] each"},
    {"scratch_bytes", (PyCFunction)(void (*)(void))SwinModel_scratch_bytes, METH_VARARGS | METH_KEYWORDS,
     "scratch_bytes(height, width, n_threads=1) -> bytes of scratch a forward pass allocates"},
    {NULL}};

static PyTypeObject SwinModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.SwinModel",
    .tp_basicsize = sizeof(SwinModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SwinModel(config: dict, tensors: dict) - Swin backbone (UPN proposal network) weights",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SwinModel_init,
    .tp_dealloc = (destructor)SwinModel_dealloc,
    .tp_methods = SwinModel_methods,
};

static int py_swin_register(PyObject *mod) {
    if (PyType_Ready(&SwinModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "SwinModel", (PyObject *)&SwinModelType);
}
