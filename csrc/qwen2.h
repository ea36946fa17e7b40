/* qwen2.h — the Qwen2 / Qwen2.5 language decoder (the LLM of Qwen2.5-VL and VLM-FO1).
 *
 * vlm_qwen2 holds read-only weights (pointers into memory-mapped checkpoint tensors owned by the
 * caller) and may be shared by any number of threads. vlm_qwen2_state is one request: KV cache,
 * scratch arena, thread pool; one thread at a time. Prefill and decode are the same call: T new
 * tokens (ids or ready-made embeddings) are appended at the end of the cache, processed in chunks so
 * that scratch memory is bounded by the chunk size and attention never forms a T x T matrix. */
#ifndef VLM_QWEN2_H
#define VLM_QWEN2_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "tensors.h"

typedef struct {
    int hidden, n_layers, n_heads, n_kv_heads, head_dim, inter, vocab;
    float eps;
    int mrope[3];          /* M-RoPE sections in rotary pairs (t, h, w); sum = head_dim/2 */
    vlm_compute compute;   /* how activations meet bf16 weights */
} vlm_qwen2_config;

typedef struct {
    vlm_weight wq, wk, wv, wo;      /* q,k,v with bias; o without */
    vlm_weight wg, wu, wd;          /* SwiGLU MLP */
    const float *ln1, *ln2;         /* [hidden] RMSNorm weights (input, post-attention) */
} vlm_qwen2_layer;

typedef struct {
    vlm_qwen2_config cfg;
    const void *embed;              /* [vocab][hidden] of embed_dtype */
    vlm_dtype embed_dtype;
    vlm_weight lm_head;             /* [vocab][hidden]; may alias embed (tied) */
    const float *norm;              /* [hidden] final RMSNorm */
    const float *inv_freq;          /* [head_dim/2] rotary frequencies (already bf16-rounded in reference mode) */
    vlm_qwen2_layer *layers;        /* [n_layers], owned by the caller */
} vlm_qwen2;

typedef struct vlm_qwen2_state vlm_qwen2_state;

/* Fills m's weights from t (m->cfg set by the caller) and validates them; allocates m->layers (freed by
 * vlm_qwen2_unbind, also on failure). Tensor names: embed [vocab][hidden], lm_head (optional: tied to
 * embed), norm, inv_freq [head_dim/2], layers.{l}.{q, k, v (each with _bias), o, gate, up, down, ln1, ln2}. */
vlm_status vlm_qwen2_bind(vlm_qwen2 *m, const vlm_tensor_table *t, vlm_err *err);
void vlm_qwen2_unbind(vlm_qwen2 *m);   /* NULL-safe; frees the layer table */

/* Checks that every pointer and size of m is consistent. */
vlm_status vlm_qwen2_validate(const vlm_qwen2 *m, vlm_err *err);

/* A request state for contexts of up to max_ctx tokens, processing at most chunk tokens per pass. */
vlm_status vlm_qwen2_state_create(const vlm_qwen2 *m, int max_ctx, int chunk, int n_threads,
                                  vlm_qwen2_state **out, vlm_err *err);
void vlm_qwen2_state_free(vlm_qwen2_state *s);  /* NULL-safe */
int vlm_qwen2_state_len(const vlm_qwen2_state *s);
int vlm_qwen2_state_max(const vlm_qwen2_state *s);
vlm_status vlm_qwen2_state_truncate(vlm_qwen2_state *s, int n, vlm_err *err);
size_t vlm_qwen2_state_bytes(const vlm_qwen2_state *s);
/* The work counters (pool.h) of every forward run on s so far. */
void vlm_qwen2_state_flops(const vlm_qwen2_state *s, uint64_t out[VLM_FLOPS_KINDS]);

/* Append T tokens. Exactly one of ids ([T]) / embeds ([T][hidden]) is non-NULL. pos is [3][T]
 * (M-RoPE t, h, w positions; text tokens have all three equal). logits: NULL, or [vocab] for the last
 * token (logits_all == 0), or [T][vocab] (logits_all != 0). Returns VLM_ERR_ARG for bad ids and
 * VLM_ERR_STATE when the context would overflow (the state is unchanged then). */
vlm_status vlm_qwen2_forward(const vlm_qwen2 *m, vlm_qwen2_state *s, const int32_t *ids, const float *embeds,
                             const int32_t *pos, int T, float *logits, int logits_all, vlm_err *err);

/* Prefix snapshots (prefix caching): the cached K and V rows of positions [0, n) of every layer, as
 * [n_layers][2 (k, v)][n_kv_heads][n][head_dim] floats. save copies them out of s (n <= its length); load
 * writes them into s and sets its length to n (n <= its max_context), so that a state continues exactly as
 * the one saved would have. Neither touches the weights; s is used by one thread at a time as always. */
size_t vlm_qwen2_kv_floats(const vlm_qwen2 *m, int n);
vlm_status vlm_qwen2_state_save(const vlm_qwen2 *m, const vlm_qwen2_state *s, int n, float *out, vlm_err *err);
vlm_status vlm_qwen2_state_load(const vlm_qwen2 *m, vlm_qwen2_state *s, const float *kv, int n, vlm_err *err);

/* out[T][hidden] = embedding rows of ids (for splicing image/region embeddings in Python). */
vlm_status vlm_qwen2_embed(const vlm_qwen2 *m, const int32_t *ids, int T, float *out, vlm_err *err);

#endif
