/* py_gemm.h — matmul, matmul_multi, quantize_i8 / quantize_i4 and the peak probes (csrc/gemm.h, gemm_i8.c,
 * peak.c) as module functions, for the Python layer's quantization and for tests and benchmarks (included by
 * module.c after its shared helpers: raise_status, to_weight, to_f32_vec, check_threads, lease_begin/lease_end).
 * PY_GEMM_METHODS is their entry in the module's method table. */


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
    if (w.packed) {   /* pack_i8 output: its rows are the scale vector's */
        if (!PyArray_Check(sc_o) || PyArray_NDIM((PyArrayObject *)sc_o) != 1) {
            PyErr_SetString(PyExc_TypeError, "a packed int8 w needs scale= and wsum= (1-D float32, see quantize_i8)");
            return NULL;
        }
        npy_intp n = PyArray_DIM((PyArrayObject *)sc_o, 0);
        if (n < 1 || (n + VLM_I8_PANEL - 1) / VLM_I8_PANEL != w.n / VLM_I8_PANEL) {
            PyErr_Format(PyExc_ValueError, "w: %lld packed panels do not hold the %lld rows of scale",
                         (long long)(w.n / VLM_I8_PANEL), (long long)n);
            return NULL;
        }
        w.n = n;
    }
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

/* pack_i8(q, n_threads=1) -> the packed form of an int8 weight q [n][k] (k a multiple of 4): int8
 * [ceil(n / 32)][k / 4][32][4] (gemm.h), which matmul and the networks take in place of q, with the same scale and
 * wsum. */
static PyObject *py_pack_i8(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *q_o;
    int n_threads = 1;
    static char *kwlist[] = {"q", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|i", kwlist, &q_o, &n_threads)) return NULL;
    if (check_threads(n_threads)) return NULL;
    if (!PyArray_Check(q_o) || PyArray_TYPE((PyArrayObject *)q_o) != NPY_INT8 ||
        PyArray_NDIM((PyArrayObject *)q_o) != 2 || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)q_o)) {
        PyErr_SetString(PyExc_TypeError, "q: expected a C-contiguous 2-D int8 array (quantize_i8's q)");
        return NULL;
    }
    PyArrayObject *q = (PyArrayObject *)q_o;
    const npy_intp n = PyArray_DIM(q, 0), k = PyArray_DIM(q, 1);
    if (n < 1 || k < 1 || k % 4 || k > VLM_I8_MAX_K) {
        PyErr_Format(PyExc_ValueError, "q: shape [%lld, %lld]: k must be a multiple of 4 in [4, %d] and n >= 1",
                     (long long)n, (long long)k, VLM_I8_MAX_K);
        return NULL;
    }
    npy_intp d[4] = {(n + VLM_I8_PANEL - 1) / VLM_I8_PANEL, k / 4, VLM_I8_PANEL, 4};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(4, d, NPY_INT8);
    if (!out) return NULL;
    vlm_err err = {{0}};
    vlm_status st;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool = n_threads > 1 ? vlm_pool_create(n_threads) : NULL;
    st = n_threads > 1 && !pool ? vlm_fail(&err, VLM_ERR_NOMEM, "pack_i8: cannot start %d threads", n_threads) : VLM_OK;
    if (st == VLM_OK) st = vlm_pack_i8(pool, PyArray_DATA(q), n, k, PyArray_DATA(out), &err);
    vlm_pool_free(pool);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { Py_DECREF(out); return raise_status(st, &err); }
    return (PyObject *)out;
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

#define PY_GEMM_METHODS                                                                                               \
    {"matmul_multi", (PyCFunction)(void (*)(void))py_matmul_multi, METH_VARARGS | METH_KEYWORDS,                       \
     "matmul_multi(x, ws, biases=None, compute='f32', n_threads=1) -> list of x @ w.T + b (float32 / bf16 weights "    \
     "with the same k, one fused call)"},                                                                              \
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,                                   \
     "matmul(x, w, bias=None, compute='f32', n_threads=1, out=None, accumulate=False, workspace=None, scale=None, "    \
     "wsum=None, sub=None) -> x @ w.T + bias (int8 w: with its scale and wsum from quantize_i8; uint8 w: int4 "        \
     "codes with scale, wsum and sub from quantize_i4)"},                                                              \
    {"quantize_i8", (PyCFunction)(void (*)(void))py_quantize_i8, METH_VARARGS | METH_KEYWORDS,                         \
     "quantize_i8(w, n_threads=1) -> (q int8, scale float32, wsum float32): per-output-channel int8 weights"},         \
    {"quantize_i4", (PyCFunction)(void (*)(void))py_quantize_i4, METH_VARARGS | METH_KEYWORDS,                         \
     "quantize_i4(w, n_threads=1) -> (codes uint8 [n][k/2], sub uint8 [n][ceil(k/64)], scale float32, wsum float32): " \
     "4-bit blocks of 32 (csrc/gemm.h)"},                                                                              \
    {"pack_i8", (PyCFunction)(void (*)(void))py_pack_i8, METH_VARARGS | METH_KEYWORDS,                                 \
     "pack_i8(q, n_threads=1) -> q's packed form, int8 [ceil(n/32)][k/4][32][4]: the layout the int8 VNNI kernel "   \
     "streams, taken by matmul and the networks in place of q (same scale and wsum)"},                                 \
    {"fma_peak", py_fma_peak, METH_O, "fma_peak(n_threads) -> measured fp32 FMA peak in GFLOP/s"},                     \
    {"peak", (PyCFunction)(void (*)(void))py_peak, METH_VARARGS | METH_KEYWORDS,                                       \
     "peak(family, n_threads) -> measured peak of an instruction family on n_threads threads: 'fma32' (fp32 FMA, "     \
     "GFLOP/s), 'bf16dp' (AVX512-BF16 vdpbf16ps, GFLOP/s), 'vnni' (AVX512-VNNI vpdpbusd, GOP/s), 'bandwidth' "         \
     "(streaming read of 1 GiB, GB/s); 0.0 for a family this CPU lacks"},                                              \
    {"gemm_info", py_gemm_info, METH_NOARGS, "gemm_info() -> dict(kernel=..., blas=...)"},
