/* qwen_vit.h — the Qwen2.5-VL vision transformer (the primary vision tower of VLM-FO1).
 *
 * Input: pixel_values [N][in_dim] in 2x2 merge-block order (as the Qwen2.5-VL image processor makes
 * them, in_dim = 3*2*14*14) for a (gh, gw) patch grid. Output: the merged image tokens
 * [N/4][out_hidden] in raster order of the merged grid, and optionally the hidden states after the
 * full-attention blocks in raster patch order [n_full][gh*gw][hidden] (FO1's region features).
 * Window attention runs per window (block-diagonal), full attention over all patches; no mask. */
#ifndef VLM_QWEN_VIT_H
#define VLM_QWEN_VIT_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "tensors.h"

#define VLM_VIT_MAX_DEPTH 256

typedef struct {
    int depth, hidden, n_heads, inter, out_hidden, in_dim;
    int patch, merge, window;                 /* patch px, spatial merge, window px */
    unsigned char fullatt[VLM_VIT_MAX_DEPTH]; /* 1 for full-attention blocks */
    float eps;
    vlm_compute compute;
} vlm_vit_config;

typedef struct {
    const float *ln1, *ln2;                  /* [hidden] RMSNorm weights */
    vlm_weight qkv, proj, gate, up, down;    /* all with bias */
} vlm_vit_block;

typedef struct {
    vlm_vit_config cfg;
    vlm_weight patch_embed;                  /* [hidden][in_dim], no bias */
    vlm_vit_block *blocks;                   /* [depth] */
    const float *merger_ln;                  /* [hidden] */
    vlm_weight merger1, merger2;             /* [4h][4h] and [out][4h], with bias */
    const float *inv_freq;                   /* [head_dim/2] = the 2-D rotary frequencies, h half then w half */
} vlm_vit;

/* Fills m's weights from t (m->cfg set by the caller) and validates them; allocates m->blocks (freed by
 * vlm_vit_unbind, also on failure). Tensor names: patch_embed [hidden][in_dim], merger_ln, merger1(_bias),
 * merger2(_bias), inv_freq, blocks.{l}.{ln1, ln2, qkv, proj, gate, up, down} (the linears with _bias). */
vlm_status vlm_vit_bind(vlm_vit *m, const vlm_tensor_table *t, vlm_err *err);
void vlm_vit_unbind(vlm_vit *m);   /* NULL-safe; frees the block table */
vlm_status vlm_vit_validate(const vlm_vit *m, vlm_err *err);
int vlm_vit_n_full(const vlm_vit *m);
size_t vlm_vit_scratch_size(const vlm_vit *m, int gh, int gw, int n_threads);
vlm_status vlm_vit_forward(const vlm_vit *m, vlm_pool *pool, const float *pixels, int gh, int gw, float *out,
                           float *feats, void *scratch, size_t scratch_size, vlm_err *err);

#endif
