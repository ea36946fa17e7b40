/* tensors.c — lookups in a name -> tensor table with the checks every bind function needs (see tensors.h). */
#include "tensors.h"

#include <stdarg.h>
#include <string.h>

const vlm_tensor *vlm_tensor_find(const vlm_tensor_table *t, const char *name) {
    for (int i = 0; i < t->n; i++)
        if (!strcmp(t->items[i].name, name)) return &t->items[i];
    return NULL;
}

/* *a = the array called name (VLM_ERR_KEY if absent, VLM_ERR_TYPE if the entry is not an array). */
static vlm_status lookup(const vlm_tensor_table *t, const char *name, const vlm_tensor **a, vlm_err *err) {
    *a = vlm_tensor_find(t, name);
    if (!*a) return vlm_fail(err, VLM_ERR_KEY, "missing tensor '%s'", name);
    if ((*a)->ndim < 0) return vlm_fail(err, VLM_ERR_TYPE, "%s: expected a numpy array", name);
    return VLM_OK;
}

/* 1-D contiguous fp32 of n values. */
static vlm_status vec(const vlm_tensor_table *t, const float **out, int64_t n, const char *name, vlm_err *err) {
    const vlm_tensor *a;
    VLM_TRY(lookup(t, name, &a, err));
    if (a->dtype != VLM_F32 || a->ndim != 1 || !a->contiguous)
        return vlm_fail(err, VLM_ERR_TYPE, "%s: expected a contiguous 1-D float32 array", name);
    if (a->shape[0] != n)
        return vlm_fail(err, VLM_ERR_SHAPE, "%s: expected %lld values, got %lld", name, (long long)n,
                        (long long)a->shape[0]);
    *out = a->data;
    return VLM_OK;
}

vlm_status vlm_tensor_vec(const vlm_tensor_table *t, const float **out, int64_t n, vlm_err *err, const char *fmt, ...) {
    char name[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return vec(t, out, n, name, err);
}

vlm_status vlm_tensor_weight(const vlm_tensor_table *t, vlm_weight *w, int64_t n_bias, vlm_err *err, const char *fmt,
                             ...) {
    char name[160], bias[176];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const vlm_tensor *a;
    VLM_TRY(lookup(t, name, &a, err));
    char aux[176];
    const vlm_tensor *sub = NULL;
    memset(w, 0, sizeof *w);
    if (a->dtype == VLM_I8 && a->ndim == 4) { /* packed int8 [ceil(n / 32)][k / 4][32][4] (gemm.h); n = len(scale) */
        if (!a->contiguous || a->shape[2] != VLM_I8_PANEL || a->shape[3] != 4 || a->shape[0] < 1 || a->shape[1] < 1)
            return vlm_fail(err, VLM_ERR_SHAPE, "%s: a packed int8 weight is a contiguous [panels][k / 4][%d][4] array",
                            name, VLM_I8_PANEL);
        snprintf(aux, sizeof aux, "%s_scale", name);
        const vlm_tensor *sc;
        VLM_TRY(lookup(t, aux, &sc, err));
        if (sc->ndim != 1 || sc->shape[0] < 1 || (sc->shape[0] + VLM_I8_PANEL - 1) / VLM_I8_PANEL != a->shape[0])
            return vlm_fail(err, VLM_ERR_SHAPE, "%s: %lld panels do not hold the %lld rows of %s", name,
                            (long long)a->shape[0], (long long)(sc->ndim == 1 ? sc->shape[0] : -1), aux);
        w->packed = 1;
        w->n = sc->shape[0];
        w->k = 4 * a->shape[1];
    } else {
        if (a->ndim != 2) return vlm_fail(err, VLM_ERR_SHAPE, "%s: expected a 2-D array, got %d-D", name, a->ndim);
        if (!a->contiguous) return vlm_fail(err, VLM_ERR_SHAPE, "%s: array must be C-contiguous", name);
        if (a->dtype == VLM_I4) { /* uint8: 4-bit codes, with their block scales as <name>_sub */
            snprintf(aux, sizeof aux, "%s_sub", name);
            sub = vlm_tensor_find(t, aux);
        }
        if (a->dtype != VLM_F32 && a->dtype != VLM_BF16 && a->dtype != VLM_I8 && !sub)
            return vlm_fail(err, VLM_ERR_TYPE,
                            "%s: dtype must be float32, uint16 (bf16 bits), int8, or uint8 (int4 codes with %s_sub)",
                            name, name);
        w->n = a->shape[0];
        w->k = a->dtype == VLM_I4 ? 2 * a->shape[1] : a->shape[1];
    }
    w->dtype = (vlm_dtype)a->dtype;
    w->data = a->data;
    if (w->dtype == VLM_I8 || w->dtype == VLM_I4) { /* per-channel scales and sums ride along as _scale, _wsum */
        if (w->k > VLM_I8_MAX_K)
            return vlm_fail(err, VLM_ERR_SHAPE, "%s: %s weight with k=%lld > %d", name,
                            w->dtype == VLM_I4 ? "int4" : "int8", (long long)w->k, VLM_I8_MAX_K);
        snprintf(aux, sizeof aux, "%s_scale", name);
        VLM_TRY(vec(t, &w->scale, w->n, aux, err));
        snprintf(aux, sizeof aux, "%s_wsum", name);
        VLM_TRY(vec(t, &w->wsum, w->n, aux, err));
    }
    if (w->dtype == VLM_I4) {
        snprintf(aux, sizeof aux, "%s_sub", name);
        if (sub->dtype != VLM_I4 || sub->ndim != 2 || !sub->contiguous)
            return vlm_fail(err, VLM_ERR_TYPE, "%s: expected a contiguous 2-D uint8 array", aux);
        if (w->k % VLM_I4_BLOCK || sub->shape[0] != w->n || sub->shape[1] != vlm_i4_sub_stride(w->k))
            return vlm_fail(err, VLM_ERR_SHAPE, "%s: shape [%lld, %lld] does not fit int4 codes of shape [%lld, %lld] "
                            "(k = %lld, a multiple of %d; expected [%lld, %lld])", aux, (long long)sub->shape[0],
                            (long long)sub->shape[1], (long long)w->n, (long long)a->shape[1], (long long)w->k,
                            VLM_I4_BLOCK, (long long)w->n, (long long)vlm_i4_sub_stride(w->k));
        w->sub = sub->data;
    }
    if (n_bias < 0) return VLM_OK;
    snprintf(bias, sizeof bias, "%s_bias", name);
    return vec(t, &w->bias, n_bias, bias, err);
}
