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
    if (a->ndim != 2) return vlm_fail(err, VLM_ERR_SHAPE, "%s: expected a 2-D array, got %d-D", name, a->ndim);
    if (!a->contiguous) return vlm_fail(err, VLM_ERR_SHAPE, "%s: array must be C-contiguous", name);
    if (a->dtype != VLM_F32 && a->dtype != VLM_BF16 && a->dtype != VLM_I8)
        return vlm_fail(err, VLM_ERR_TYPE, "%s: dtype must be float32, uint16 (bf16 bits) or int8", name);
    w->dtype = (vlm_dtype)a->dtype;
    w->n = a->shape[0];
    w->k = a->shape[1];
    w->data = a->data;
    w->bias = w->scale = w->wsum = NULL;
    if (w->dtype == VLM_I8) { /* its per-channel scales and sums ride along as <name>_scale, <name>_wsum */
        char aux[176];
        if (w->k > VLM_I8_MAX_K)
            return vlm_fail(err, VLM_ERR_SHAPE, "%s: int8 weight with k=%lld > %d", name, (long long)w->k,
                            VLM_I8_MAX_K);
        snprintf(aux, sizeof aux, "%s_scale", name);
        VLM_TRY(vec(t, &w->scale, w->n, aux, err));
        snprintf(aux, sizeof aux, "%s_wsum", name);
        VLM_TRY(vec(t, &w->wsum, w->n, aux, err));
    }
    if (n_bias < 0) return VLM_OK;
    snprintf(bias, sizeof bias, "%s_bias", name);
    return vec(t, &w->bias, n_bias, bias, err);
}
