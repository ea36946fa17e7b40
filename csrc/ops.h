/* ops.h — the element-wise, normalization, rotary and attention operations of the vlmfo1 core.
 *
 * Every op writes into caller-provided memory (ops never allocate), takes outputs first and sizes
 * last, and splits its work over a vlm_pool (which may be NULL for one thread). Each output element
 * is computed by one thread in a fixed order, so results do not depend on the thread count. */
#ifndef VLM_OPS_H
#define VLM_OPS_H

#include "common.h"
#include "pool.h"

/* y[t][:] = x[t][:] / sqrt(mean(x[t]^2) + eps) * w; x, y: [T][C] (may alias) */
void vlm_rmsnorm(vlm_pool *pool, float *y, const float *x, const float *w, float eps, int T, int C);

/* One row of LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b; x, y: [C] (may alias). 16 partial sums,
 * so every instruction set sums alike. */
void vlm_layernorm_row(float *y, const float *x, const float *w, const float *b, float eps, int C);

/* vlm_layernorm_row on every row of x, y: [T][C] (may alias) */
void vlm_layernorm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, long T, int C);

/* g[t][:] = silu(g[t][:]) * u[t][:]; g, u: [T][C] */
void vlm_silu_mul(vlm_pool *pool, float *g, const float *u, int T, int C);

/* cos/sin tables for T tokens: cs[t][j], sn[t][j] for j < D/2, angle = pos[axis(j)][t] * inv_freq[j],
 * axis(j) = 0 for j < sec[0], 1 for j < sec[0]+sec[1], else 2. pos: [3][T]. */
void vlm_rope_table(float *cs, float *sn, const int32_t *pos, const float *inv_freq, const int sec[3], int T, int D);

/* Rotate-half RoPE in place on x: [T][nh][D] (row stride ld floats) with the tables above. */
void vlm_rope_apply(vlm_pool *pool, float *x, int ld, const float *cs, const float *sn, int T, int nh, int D);

/* Causal grouped-query attention of T new queries against a KV cache.
 * q: [T][H][D] (row stride ldq); kc, vc: [KV][max_ctx][D] caches already holding positions
 * 0 .. n_past+T-1; query t sees keys 0 .. n_past+t. out: [T][H][D] (row stride ldo).
 * scratch: n_threads * vlm_attention_scratch_floats(...) floats. D <= 256. */
size_t vlm_attention_scratch_floats(int H, int KV, int D, int n_ctx);
void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch);

/* Non-causal attention inside segments [cu[s], cu[s+1]) of qkv: [N][3][H][D] (q, k, v blocks of each
 * token); out: [N][H][D]. D <= 256. scratch: n_threads * vlm_segment_attention_scratch_floats(max_seg, D)
 * floats, max_seg = the longest segment. */
size_t vlm_segment_attention_scratch_floats(int max_seg, int D);
void vlm_segment_attention(vlm_pool *pool, float *out, const float *qkv, const int *cu, int n_seg, int H, int D,
                           float scale, float *scratch, int max_seg);

#endif
