/* gemm.h — the one matrix-multiply entry point of the vlmfo1 core.
 *
 * Every linear layer of every network goes through vlm_matmul with a vlm_weight: a weight matrix in
 * the PyTorch Linear layout W[n][k] (row-major, k contiguous), stored as fp32 or bf16 exactly as it
 * lies in the (memory-mapped) checkpoint, plus an optional fp32 bias. New storage formats (int8, AMX
 * tile layouts) plug in here as new vlm_dtype values without touching the models. */
#ifndef VLM_GEMM_H
#define VLM_GEMM_H

#include "common.h"
#include "pool.h"

typedef enum { VLM_F32 = 0, VLM_BF16 = 1 } vlm_dtype;

/* How activations meet bf16 weights: F32 keeps activations in fp32 (weights widened exactly);
 * BF16 rounds activations to bf16 (round-to-nearest-even) and accumulates in fp32, like a bf16
 * torch run. fp32 weights always compute in fp32. */
typedef enum { VLM_COMPUTE_F32 = 0, VLM_COMPUTE_BF16 = 1 } vlm_compute;

typedef struct {
    vlm_dtype dtype;
    int64_t n, k;        /* output features, input features */
    const void *data;    /* [n][k] elements of `dtype`, row stride k */
    const float *bias;   /* [n] or NULL */
} vlm_weight;

/* out[i][j] (row stride ldo) = sum_k x[i][k] * W[j][k] + bias[j], for i < m, j < n;
 * with accumulate != 0 the result is added to what out holds (a fused residual add).
 * x has row stride ldx (>= k). scratch must hold vlm_matmul_scratch_size(m, w, cmode, nth) bytes,
 * 64-byte aligned; the call never allocates. All work runs on the pool (fp32 weights: single-threaded
 * OpenBLAS sgemm calls on output tiles from every worker). The result is bitwise identical for every
 * pool size on a given CPU and kernel choice (see gemm.c). */
vlm_status vlm_matmul(vlm_pool *pool, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                      const vlm_weight *w, vlm_compute cmode, int accumulate,
                      void *scratch, size_t scratch_size, vlm_err *err);
size_t vlm_matmul_scratch_size(int64_t m, const vlm_weight *w, vlm_compute cmode, int n_threads);

/* The matmul context of a forward pass: its pool, compute mode and the scratch all its projections share.
 * vlm_mm(c, ...) = vlm_matmul with those, the one call every network makes. */
typedef struct {
    vlm_pool *pool;
    vlm_compute compute;
    void *scratch;
    size_t scratch_size;
    vlm_err *err;
} vlm_mm_ctx;

static inline vlm_status vlm_mm(const vlm_mm_ctx *c, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                                const vlm_weight *w, int accumulate) {
    return vlm_matmul(c->pool, out, ldo, x, ldx, m, w, c->compute, accumulate, c->scratch, c->scratch_size, c->err);
}

/* max(cur, vlm_matmul_scratch_size(m, w, cmode, n_threads)): scratch sizing over a network's projections. */
static inline size_t vlm_matmul_scratch_max(size_t cur, int64_t m, const vlm_weight *w, vlm_compute cmode,
                                            int n_threads) {
    size_t z = vlm_matmul_scratch_size(m, w, cmode, n_threads);
    return z > cur ? z : cur;
}

/* Weight-shape check of every network: w holds data of shape [n][k] (and a bias if need_bias). Fails with
 * VLM_ERR_KEY (missing data or bias) or VLM_ERR_SHAPE, the message starting with the printf-style name. */
vlm_status vlm_check_weight(const vlm_weight *w, int64_t n, int64_t k, int need_bias, vlm_err *err, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* The name of the kernel family in use ("avx512bf16", "avx512", "avx2", "generic": vlm_cpu_isa(), cpu.h),
 * for logs and benchmarks. */
const char *vlm_gemm_kernel_name(void);
/* Keep OpenBLAS single-threaded (vlm_matmul calls it again before every sgemm; the pool supplies
 * the parallelism). */
void vlm_blas_single_thread(void);
const char *vlm_blas_info(void);

#endif
