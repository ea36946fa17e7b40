/* py_fo1.h — Python bindings of the fused VLM-FO1 vision side, csrc/fo1.c (included by module.c after
 * py_davit.h and py_hfre.h, whose model types it takes; uses module.c's raise_status, check_threads,
 * lease_begin/lease_end). Only module.c includes it.
 *
 * FO1Model(vision: VisionModel, davit: DavitModel | None, hfre: HFREModel): the five networks as one
 * read-only vlm_fo1_model (the object keeps the three alive); shared by any number of threads.
 *   arena_bytes(gh, gw, aux_h, aux_w, n_boxes, n_threads=1) -> bytes a request of these sizes needs
 *     (what Workspace(n_threads, reserve=...) should reserve for the largest request expected)
 *   encode(state, vit_pixels, gh, gw, aux_pixels, boxes_a, boxes_q, out, image_row, region_rows, n_threads=1,
 *          work=None)
 *     -> (vit, davit, hfre) seconds; state: a Workspace (one thread at a time); out: writable float32
 *     [L, hidden], rows image_row .. + gh*gw/4 get the image tokens, rows region_rows[i] the regions; work: a
 *     dict that receives {stage: {"gemm": FLOPs, "attention": FLOPs}} (pool.h's counters). */
#include "fo1.h"

typedef struct {
    PyObject_HEAD
    vlm_fo1_model m;
    PyObject *parts[3];   /* VisionModel, DavitModel or None, HFREModel */
} FO1Model;

static void FO1Model_dealloc(FO1Model *self) {
    for (int i = 0; i < 3; i++) Py_XDECREF(self->parts[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int FO1Model_init(FO1Model *self, PyObject *args, PyObject *kw) {
    PyObject *vit, *davit, *hfre;
    static char *kwlist[] = {"vision", "davit", "hfre", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OO!", kwlist, &VisionModelType, &vit, &davit, &HFREModelType, &hfre))
        return -1;
    if (davit != Py_None && !PyObject_TypeCheck(davit, &DavitModelType)) {
        PyErr_SetString(PyExc_TypeError, "davit must be a DavitModel or None");
        return -1;
    }
    VisionModel *v = (VisionModel *)vit;
    HFREModel *h = (HFREModel *)hfre;
    DavitModel *d = davit == Py_None ? NULL : (DavitModel *)davit;
    if (!v->m.blocks || !h->m.cfg.S || (d && !d->m.blocks[0])) {
        PyErr_SetString(PyExc_ValueError, "a network is not initialised");
        return -1;
    }
    if (h->m.cfg.use_aux && !d) {
        PyErr_SetString(PyExc_ValueError, "the region encoder has an aux branch: the DaViT is required");
        return -1;
    }
    PyObject *parts[3] = {vit, davit, hfre};
    for (int i = 0; i < 3; i++) Py_XSETREF(self->parts[i], Py_NewRef(parts[i]));
    self->m = (vlm_fo1_model){&v->m, d ? &d->m : NULL, &h->m, h->has_proj[0] ? &h->proj[0] : NULL,
                              h->has_proj[1] ? &h->proj[1] : NULL};
    return 0;
}

static PyObject *FO1Model_arena_bytes(FO1Model *self, PyObject *args, PyObject *kw) {
    vlm_fo1_limits L;
    int n_threads = 1;
    static char *kwlist[] = {"gh", "gw", "aux_h", "aux_w", "n_boxes", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiii|i", kwlist, &L.gh, &L.gw, &L.aux_h, &L.aux_w, &L.n_boxes,
                                     &n_threads) || check_threads(n_threads))
        return NULL;
    if (!self->m.vit) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    return PyLong_FromSize_t(vlm_fo1_arena_size(&self->m, &L, n_threads));
}

/* float32 C-contiguous array of ndim dims (new reference), or NULL with ValueError naming `what`. */
static PyArrayObject *fo1_array(PyObject *o, int ndim, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(o, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    if (a && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D, got %d-D", what, ndim, PyArray_NDIM(a));
        Py_CLEAR(a);
    }
    return a;
}

static PyObject *FO1Model_encode(FO1Model *self, PyObject *args, PyObject *kw) {
    PyObject *ws_o, *px_o, *aux_o, *ba_o, *bq_o, *out_o, *rows_o, *work_o = Py_None;
    int gh, gw, n_threads = 1;
    long long image_row;
    static char *kwlist[] = {"state", "vit_pixels", "gh", "gw", "aux_pixels", "boxes_a", "boxes_q", "out", "image_row",
                             "region_rows", "n_threads", "work", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiiOOOOLO|iO", kwlist, &ws_o, &px_o, &gh, &gw, &aux_o, &ba_o, &bq_o,
                                     &out_o, &image_row, &rows_o, &n_threads, &work_o) || check_threads(n_threads))
        return NULL;
    if (work_o != Py_None && !PyDict_Check(work_o)) { PyErr_SetString(PyExc_TypeError, "work must be a dict or None"); return NULL; }
    const vlm_fo1_model *m = &self->m;
    if (!m->vit) { PyErr_SetString(PyExc_ValueError, "model is not initialised"); return NULL; }
    if (ws_o == Py_None) { PyErr_SetString(PyExc_TypeError, "state must be a Workspace"); return NULL; }
    PyArrayObject *px = NULL, *aux = NULL, *ba = NULL, *bq = NULL, *rows = NULL;
    PyObject *res = NULL;
    ws_lease wl;
    if (!PyArray_Check(out_o) || PyArray_TYPE((PyArrayObject *)out_o) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)out_o) != 2 || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)out_o) ||
        !PyArray_ISWRITEABLE((PyArrayObject *)out_o)) {
        PyErr_SetString(PyExc_ValueError, "out must be a writable C-contiguous float32 array [L, hidden]");
        return NULL;
    }
    PyArrayObject *out = (PyArrayObject *)out_o;
    const npy_intp L = PyArray_DIM(out, 0), hidden = PyArray_DIM(out, 1);
    if (gh <= 0 || gw <= 0 || gh % 2 || gw % 2 || (long)gh * gw > (1L << 22)) {
        PyErr_Format(PyExc_ValueError, "invalid patch grid %dx%d (both sides positive and even)", gh, gw);
        return NULL;
    }
    if (!(px = fo1_array(px_o, 2, "vit_pixels"))) goto done;
    if (PyArray_DIM(px, 0) != (npy_intp)gh * gw || PyArray_DIM(px, 1) != m->vit->cfg.in_dim) {
        PyErr_Format(PyExc_ValueError, "pixels must have shape [%d, %d] for a %dx%d grid", gh * gw, m->vit->cfg.in_dim,
                     gh, gw);
        goto done;
    }
    if (!(rows = (PyArrayObject *)PyArray_FROM_OTF(rows_o, NPY_INT64, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST)))
        goto done;
    if (PyArray_NDIM(rows) != 1) { PyErr_SetString(PyExc_ValueError, "region_rows must be 1-D"); goto done; }
    const npy_intp N = PyArray_DIM(rows, 0);
    if (N > (1 << 24)) { PyErr_SetString(PyExc_ValueError, "too many boxes"); goto done; }
    const int64_t *rp = PyArray_DATA(rows);
    if (image_row < 0 || image_row + (long long)gh * gw / 4 > L) {
        PyErr_Format(PyExc_ValueError, "image rows [%lld, %lld) do not fit in out's %zd rows", image_row,
                     image_row + (long long)gh * gw / 4, (Py_ssize_t)L);
        goto done;
    }
    for (npy_intp i = 0; i < N; i++)
        if (rp[i] < 0 || rp[i] >= L) {
            PyErr_Format(PyExc_ValueError, "region row %lld is outside out's %zd rows", (long long)rp[i], (Py_ssize_t)L);
            goto done;
        }
    vlm_fo1_input in = {.vit_pixels = PyArray_DATA(px), .gh = gh, .gw = gw, .n_boxes = (int)N};
    if (N > 0) {
        if (m->hfre->cfg.use_aux) {
            if (!(aux = fo1_array(aux_o, 3, "aux_pixels"))) goto done;
            if (PyArray_DIM(aux, 0) != m->davit->cfg.in_chans || PyArray_DIM(aux, 1) > 16384 || PyArray_DIM(aux, 2) > 16384) {
                PyErr_Format(PyExc_ValueError, "aux_pixels must have shape [%d, H, W] with 1 <= H, W <= 16384",
                             m->davit->cfg.in_chans);
                goto done;
            }
            in.aux_pixels = PyArray_DATA(aux);
            in.aux_h = (int)PyArray_DIM(aux, 1);
            in.aux_w = (int)PyArray_DIM(aux, 2);
        }
        PyObject *bo[2] = {ba_o, bq_o};
        PyArrayObject **ba_q[2] = {&ba, &bq};
        for (int k = 0; k < 2; k++) {
            if (bo[k] == Py_None) continue;
            if (!(*ba_q[k] = fo1_array(bo[k], 2, "boxes"))) goto done;
            if (PyArray_DIM(*ba_q[k], 0) != N || PyArray_DIM(*ba_q[k], 1) != 4) {
                PyErr_SetString(PyExc_ValueError, "boxes must have shape [N, 4] (N = len(region_rows))");
                goto done;
            }
        }
        in.boxes_a = ba ? PyArray_DATA(ba) : NULL;
        in.boxes_q = bq ? PyArray_DATA(bq) : NULL;
    }
    vlm_err err = {{0}};
    vlm_status st;
    vlm_fo1_stats stats;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = vlm_fo1_encode(m, wl.ws, &in, n_threads, PyArray_DATA(out), (int)hidden, image_row, rp, &stats, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    if (work_o != Py_None) {   /* {stage: {"gemm": FLOPs, "attention": FLOPs}} */
        static const char *stage[3] = {"vit", "davit", "hfre"};
        for (int i = 0; i < 3; i++) {
            PyObject *d = Py_BuildValue("{sKsK}", "gemm", (unsigned long long)stats.flops[i][VLM_FLOPS_GEMM],
                                        "attention", (unsigned long long)stats.flops[i][VLM_FLOPS_ATTN]);
            if (!d || PyDict_SetItemString(work_o, stage[i], d) < 0) { Py_XDECREF(d); goto done; }
            Py_DECREF(d);
        }
    }
    res = Py_BuildValue("(ddd)", stats.seconds[0], stats.seconds[1], stats.seconds[2]);
done:
    Py_XDECREF(px); Py_XDECREF(aux); Py_XDECREF(ba); Py_XDECREF(bq); Py_XDECREF(rows);
    return res;
}

static PyMethodDef FO1Model_methods[] = {
    {"arena_bytes", (PyCFunction)(void (*)(void))FO1Model_arena_bytes, METH_VARARGS | METH_KEYWORDS,
     "arena_bytes(gh, gw, aux_h, aux_w, n_boxes, n_threads=1) -> bytes of state a request of these sizes uses"},
    {"encode", (PyCFunction)(void (*)(void))FO1Model_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(state, vit_pixels, gh, gw, aux_pixels, boxes_a, boxes_q, out, image_row, region_rows, n_threads=1, "
     "work=None) -> (vit, davit, hfre) seconds: image and region embeddings written into out's rows; work: a dict "
     "that receives {stage: {'gemm': FLOPs, 'attention': FLOPs}}"},
    {NULL}};

static PyTypeObject FO1ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vlmfo1._core.FO1Model",
    .tp_basicsize = sizeof(FO1Model),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FO1Model(vision, davit, hfre) - VLM-FO1's vision side (ViT, DaViT, HFRE, projectors) in one call",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FO1Model_init,
    .tp_dealloc = (destructor)FO1Model_dealloc,
    .tp_methods = FO1Model_methods,
};

static int py_fo1_register(PyObject *mod) {
    if (PyType_Ready(&FO1ModelType) < 0) return -1;
    return PyModule_AddObjectRef(mod, "FO1Model", (PyObject *)&FO1ModelType);
}
