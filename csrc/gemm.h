/* gemm.h — the one matrix-multiply entry point of the vlmfo1 core.
 *
 * Every linear layer of every network goes through vlm_matmul with a vlm_weight: a weight matrix in
 * the PyTorch Linear layout W[n][k] (row-major, k contiguous), stored as fp32 or bf16 exactly as it
 * lies in the (memory-mapped) checkpoint, or as int8 with one scale per output channel (quantized at load by
 * vlm_quantize_i8, and on VNNI CPUs packed by vlm_pack_i8 into the kernel's panels; the arithmetic is in
 * gemm_i8.c), or as 4-bit blocks (vlm_quantize_i4, same file), plus an
 * optional fp32 bias. New storage formats (AMX tile layouts) plug in here as new vlm_dtype values without touching
 * the models. */
#ifndef VLM_GEMM_H
#define VLM_GEMM_H

#include "common.h"
#include "pool.h"

typedef enum { VLM_F32 = 0, VLM_BF16 = 1, VLM_I8 = 2, VLM_I4 = 3 } vlm_dtype;

/* int8 weights: the largest k (every integer partial sum stays inside int32: 255 * 127 * k < 2^31). */
#define VLM_I8_MAX_K 65536

/* How activations meet bf16 weights: F32 keeps activations in fp32 (weights widened exactly);
 * BF16 rounds activations to bf16 (round-to-nearest-even) and accumulates in fp32, like a bf16
 * torch run. fp32 weights always compute in fp32. */
typedef enum { VLM_COMPUTE_F32 = 0, VLM_COMPUTE_BF16 = 1 } vlm_compute;

typedef struct {
    vlm_dtype dtype;
    int64_t n, k;        /* output features, input features */
    const void *data;    /* [n][k] elements of `dtype`, row stride k */
    const float *bias;   /* [n] or NULL */
    const float *scale;  /* VLM_I8 / VLM_I4: [n] per-output-channel scales, W[j][t] ~ scale[j] * q[j][t] */
    const float *wsum;   /* VLM_I8 / VLM_I4: [n] sum over t of q[j][t] (an exact integer held in a float) */
    const uint8_t *sub;  /* VLM_I4 only: [n][vlm_i4_sub_stride(k)] 4-bit block scales (see below) */
    int packed;          /* VLM_I8 only: 1 = data in panels (vlm_pack_i8, below), not [n][k]; -1 = a slice of a
                            packed weight that does not start on a panel (vlm_matmul refuses it) */
} vlm_weight;

/* VLM_I4, 4-bit blocks (k a multiple of 32): each row is k / 32 blocks of 32 weights. Block b holds 4-bit codes
 * c[t] in [0, 15] and a 4-bit block scale m_b in [0, 15]; its integer weights are q[t] = (c[t] - 8) * m_b, in
 * [-120, 105], so W[j][t] ~ scale[j] * q[j][t] as for int8 and the same exact integer kernels apply. Storage:
 * data [n][k / 2] bytes, block b at bytes 16b..16b+15, byte 16b + t = c[32b + t] | c[32b + 16 + t] << 4 (the
 * nibble order of llama.cpp's Q4_0); sub [n][vlm_i4_sub_stride(k)] bytes, m_b in the low nibble of byte b / 2 for
 * even b, the high nibble for odd b. 4.125 bits per weight plus two floats per row. */
#define VLM_I4_BLOCK 32
static inline int64_t vlm_i4_sub_stride(int64_t k) { return (k / VLM_I4_BLOCK + 1) / 2; }

/* Bytes of one row of w's data (any dtype). */
static inline size_t vlm_weight_row_bytes(const vlm_weight *w) {
    static const size_t esz[] = {4, 2, 1}; /* VLM_F32, VLM_BF16, VLM_I8 */
    return w->dtype == VLM_I4 ? (size_t)w->k / 2 : (size_t)w->k * esz[w->dtype];
}

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

/* Packed int8 weights (VLM_I8 with packed = 1, k a multiple of 4): panels of VLM_I8_PANEL output rows, panel p
 * holding rows 32p .. 32p + 31 as [k / 4][32] 32-bit groups (group t of row j = its bytes 4t .. 4t + 3; rows past
 * n zero), ceil(n / 32) * 32 * k bytes: the layout the VNNI kernel streams (gemm_i8.c), made once at load so that
 * no matmul packs its weight again. The other kernel levels unpack a panel at a time. A numpy array of shape
 * [ceil(n / 32)][k / 4][32][4] int8 holds it (n comes with the scale vector). */
#define VLM_I8_PANEL 32
static inline size_t vlm_pack_i8_bytes(int64_t n, int64_t k) {
    return (size_t)((n + VLM_I8_PANEL - 1) / VLM_I8_PANEL) * VLM_I8_PANEL * (size_t)k;
}
/* q [n][k] int8 -> dst (vlm_pack_i8_bytes(n, k) bytes) on pool (may be NULL). VLM_ERR_ARG for bad sizes. */
vlm_status vlm_pack_i8(vlm_pool *pool, const int8_t *q, int64_t n, int64_t k, int8_t *dst, vlm_err *err);

/* Rows [r0, r0 + rows) of w as a weight of their own (data, bias, scale, wsum and sub offset alike, any dtype; a
 * packed weight only from a multiple of VLM_I8_PANEL rows, else the slice is marked packed = -1); the caller keeps
 * the range inside w. */
static inline vlm_weight vlm_weight_rows(const vlm_weight *w, int64_t r0, int64_t rows) {
    vlm_weight v = *w;
    v.n = rows;
    if (w->packed) {
        if (r0 % VLM_I8_PANEL) v.packed = -1;
        v.data = (const char *)w->data + (size_t)(r0 / VLM_I8_PANEL) * VLM_I8_PANEL * (size_t)w->k;
    } else {
        v.data = (const char *)w->data + (size_t)r0 * vlm_weight_row_bytes(w);
    }
    if (w->bias) v.bias = w->bias + r0;
    if (w->scale) v.scale = w->scale + r0;
    if (w->wsum) v.wsum = w->wsum + r0;
    if (w->sub) v.sub = w->sub + (size_t)r0 * (size_t)vlm_i4_sub_stride(w->k);
    return v;
}

/* out[i] = x . w[i]^T + bias_i for nw <= VLM_MM_MULTI_MAX weights with the same k (the q/k/v and gate/up
 * projections of one input): each out[i] is bitwise what vlm_matmul(..., w[i], accumulate = 0) gives, and where the
 * packed bf16 path runs (gemm.c) x is converted and packed once and all columns share one pool run. scratch as for
 * the largest of vlm_matmul_scratch_size(m, w[i], ...). */
#define VLM_MM_MULTI_MAX 4
vlm_status vlm_matmul_multi(vlm_pool *pool, int nw, float *const *out, const int64_t *ldo, const float *x, int64_t ldx,
                            int64_t m, const vlm_weight *const *w, vlm_compute cmode, void *scratch,
                            size_t scratch_size, vlm_err *err);

/* int8 and int4 weights (VLM_I8, VLM_I4; gemm_i8.c): the activations are quantized per row into scratch (so
 * bf16 / f32 compute modes do not apply) and the dot products are exact integer sums, so the result is bitwise
 * identical on every CPU, kernel level and pool size (and an int4 weight gives exactly what the int8 weight of
 * its integer values q would). vlm_matmul dispatches here; vlm_matmul_scratch_size covers it. */
vlm_status vlm_matmul_i8(vlm_pool *pool, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                         const vlm_weight *w, int accumulate, void *scratch, size_t scratch_size, vlm_err *err);
size_t vlm_matmul_i8_scratch_size(int64_t m, const vlm_weight *w, int n_threads);
/* "avx512vnni", "avx2" or "generic": the int8 kernel family vlm_cpu_isa() (and its cap) selects. */
const char *vlm_matmul_i8_kernel_name(void);

/* Symmetric per-row int8 quantization of a [n][k] fp32 or bf16 matrix (the load-time step of int8 weights):
 * scale[j] = max_t |W[j][t]| / 127, q[j][t] = clamp(round-half-even(W[j][t] / scale[j]), -127, 127),
 * wsum[j] = sum_t q[j][t]; an all-zero row gets scale 0. Runs on pool (may be NULL: the calling thread).
 * VLM_ERR_ARG for a row holding NaN or inf (named), bad sizes or k > VLM_I8_MAX_K. */
vlm_status vlm_quantize_i8(vlm_pool *pool, const void *src, vlm_dtype dtype, int64_t n, int64_t k, int8_t *q,
                           float *scale, float *wsum, vlm_err *err);

/* 4-bit block quantization of a [n][k] fp32 or bf16 matrix (k a multiple of 32, k <= VLM_I8_MAX_K), into the
 * VLM_I4 layout above: per row scale[j] = max_t |W[j][t]| / 105 (so the largest block scale 15 covers it); per
 * block the scale m_b is chosen among ceil(amax_b / (7 scale[j])) and the two below it (at least 1), the one with
 * the smallest squared error sum_t (W - q scale)^2 (ties: the larger m_b), with codes
 * c = clamp(round-half-even(W / (scale[j] m_b)), -8, 7) + 8; an all-zero block (or row) gets m_b = 0, codes 8.
 * wsum[j] = sum_t q[j][t]. Runs on pool (may be NULL). VLM_ERR_ARG for NaN or inf (the row named) or bad sizes. */
vlm_status vlm_quantize_i4(vlm_pool *pool, const void *src, vlm_dtype dtype, int64_t n, int64_t k, uint8_t *data,
                           uint8_t *sub, float *scale, float *wsum, vlm_err *err);

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

static inline vlm_status vlm_mm_multi(const vlm_mm_ctx *c, int nw, float *const *out, const int64_t *ldo, const float *x,
                                      int64_t ldx, int64_t m, const vlm_weight *const *w) {
    return vlm_matmul_multi(c->pool, nw, out, ldo, x, ldx, m, w, c->compute, c->scratch, c->scratch_size, c->err);
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
