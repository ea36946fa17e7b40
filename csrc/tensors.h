/* tensors.h — a name -> tensor table: how weights reach the networks' bind functions.
 *
 * The binding layer (module.c) lists every array it was given once, as a vlm_tensor (name, dtype, shape,
 * data pointer); each network's vlm_<net>_bind looks up the names it needs (its own naming scheme lives in
 * its own C file) and fills its weight struct with pointers into the arrays. The table borrows names and
 * data: the caller keeps both alive for as long as the bound network is used (names only during bind).
 * Lookup failures name the tensor: VLM_ERR_KEY (missing), VLM_ERR_TYPE (not an array / wrong dtype),
 * VLM_ERR_SHAPE (wrong rank, size or layout). */
#ifndef VLM_TENSORS_H
#define VLM_TENSORS_H

#include "common.h"
#include "gemm.h"

#define VLM_TENSOR_MAX_DIMS 8

typedef struct {
    const char *name;
    int dtype;                           /* VLM_F32, VLM_BF16, VLM_I8, VLM_I4 (uint8), or -1: any other */
    int ndim;                            /* -1: the entry is not an array at all */
    int contiguous;                      /* row-major without gaps */
    int64_t shape[VLM_TENSOR_MAX_DIMS];  /* the first ndim used */
    const void *data;
} vlm_tensor;

typedef struct {
    const vlm_tensor *items;
    int n;
} vlm_tensor_table;

/* The entry called name, or NULL. */
const vlm_tensor *vlm_tensor_find(const vlm_tensor_table *t, const char *name);

/* w = the 2-D weight named by the printf-style fmt (fp32, bf16, int8 or int4, contiguous; int8 and int4 also need
 * their 1-D fp32 "<name>_scale" and "<name>_wsum", int4 (uint8 codes [n][k / 2]) its "<name>_sub" [n][k / 64 rounded
 * up] uint8 block scales); with n_bias >= 0 also its bias "<name>_bias", 1-D fp32 of n_bias values
 * (n_bias < 0: no bias, w->bias = NULL). */
vlm_status vlm_tensor_weight(const vlm_tensor_table *t, vlm_weight *w, int64_t n_bias, vlm_err *err, const char *fmt,
                             ...) __attribute__((format(printf, 5, 6)));

/* *out = the 1-D contiguous fp32 vector of n values named by fmt. */
vlm_status vlm_tensor_vec(const vlm_tensor_table *t, const float **out, int64_t n, vlm_err *err, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#endif
