/* davit.h — DaViT (Dual-Attention Vision Transformer), the auxiliary vision encoder of VLM-FO1
 * (Florence-2's "davit-large": dims 256/512/1024/2048, depths 1/1/9/1, window 12).
 *
 * Input: one image, pixel_values [3][H][W] float32 (channel-first, already normalized). Output: the
 * four stage maps, each float32 channels-last [H_s][W_s][C_s], after the stage's blocks (no final
 * norm), which is what FO1's region encoder consumes. Every stage is
 *   ConvEmbed (conv as im2col + matmul; LayerNorm after the conv for stage 0, before it for the others)
 *   depth_s x [SpatialBlock, ChannelBlock]
 * SpatialBlock: x += dw3x3(x); x += WindowAttn(LN(x)); x += dw3x3(x); x += MLP(LN(x)).
 * ChannelBlock: the same with channel (group) attention instead of window attention.
 * Window attention: 12x12 windows over the map zero-padded bottom/right AFTER the LayerNorm; padded
 * tokens take part as keys/values (their q/k/v are the qkv bias), with no mask; q is scaled by
 * head_dim^-1/2 before q.k. Channel attention: per group of d = C/G channels, A = softmax((q N^-1/2)^T k)
 * ([d][d], N = H*W tokens) and out = v A^T. GELU is exact (erf); LayerNorm eps is per model.
 *
 * Thread safety: a vlm_davit is read-only after setup and may be shared; one forward call per scratch
 * block at a time. */
#ifndef VLM_DAVIT_H
#define VLM_DAVIT_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "tensors.h"

#define VLM_DAVIT_STAGES 4
#define VLM_DAVIT_MAX_DEPTH 64

typedef struct {
    int in_chans;                          /* 3 */
    int dim[VLM_DAVIT_STAGES];             /* C_s */
    int depth[VLM_DAVIT_STAGES];           /* (spatial, channel) block pairs per stage */
    int heads[VLM_DAVIT_STAGES];           /* spatial attention heads */
    int groups[VLM_DAVIT_STAGES];          /* channel attention groups */
    int mlp_hidden[VLM_DAVIT_STAGES];      /* fc1 width (mlp_ratio * C_s) */
    int kernel[VLM_DAVIT_STAGES], stride[VLM_DAVIT_STAGES], pad[VLM_DAVIT_STAGES];
    int prenorm[VLM_DAVIT_STAGES];         /* 1: ConvEmbed LayerNorm on the input channels (stages >= 1) */
    int window;                            /* 12 */
    float eps;                             /* LayerNorm eps, 1e-5 */
    vlm_compute compute;
} vlm_davit_config;

/* One half of a block pair (spatial or channel): the two depthwise convs, two LayerNorms, the
 * attention linears and the MLP. Depthwise weights are given tap-major, dw[9][C] (= PyTorch's
 * [C][1][3][3] transposed), for channels-last loops. */
typedef struct {
    const float *dw1, *dw1_b;              /* [9][C], [C] */
    const float *ln1, *ln1_b;              /* [C] */
    vlm_weight qkv, proj;                  /* [3C][C], [C][C], with bias */
    const float *dw2, *dw2_b;              /* [9][C], [C] */
    const float *ln2, *ln2_b;              /* [C] */
    vlm_weight fc1, fc2;                   /* [4C][C], [C][4C], with bias */
} vlm_davit_half;

typedef struct {
    vlm_davit_half spatial, channel;
} vlm_davit_block;

typedef struct {
    vlm_davit_config cfg;
    vlm_weight conv[VLM_DAVIT_STAGES];     /* [C_s][C_in * k * k] (PyTorch conv weight flattened), with bias */
    const float *norm[VLM_DAVIT_STAGES], *norm_b[VLM_DAVIT_STAGES]; /* [C_in] if prenorm else [C_s] */
    vlm_davit_block *blocks[VLM_DAVIT_STAGES]; /* [depth_s] each */
} vlm_davit;

/* Fills m's weights from t (m->cfg set by the caller) and validates them; allocates the blocks of all stages
 * as one table at m->blocks[0] (freed by vlm_davit_unbind, also on failure). Tensor names:
 *   conv{s} [C_s][C_in*k*k] (+ conv{s}_bias), norm{s}, norm{s}_bias,
 *   blocks.{s}.{j}.{spatial|channel}.{dw1, dw2 (flat [9*C], tap-major), ln1, ln2, qkv, proj, fc1, fc2}
 *   each with a `_bias`. */
vlm_status vlm_davit_bind(vlm_davit *m, const vlm_tensor_table *t, vlm_err *err);
void vlm_davit_unbind(vlm_davit *m);   /* NULL-safe */

/* Check sizes and that every tensor is present; VLM_ERR_KEY / VLM_ERR_SHAPE / VLM_ERR_ARG otherwise. */
vlm_status vlm_davit_validate(const vlm_davit *m, vlm_err *err);

/* Stage map sizes for an H x W image: hs[s], ws[s]. Returns VLM_ERR_ARG if a stage would be empty. */
vlm_status vlm_davit_stage_sizes(const vlm_davit *m, int H, int W, int hs[VLM_DAVIT_STAGES],
                                 int ws[VLM_DAVIT_STAGES], vlm_err *err);

/* Bytes of scratch a forward pass on an H x W image needs (0 if the size is invalid). */
size_t vlm_davit_scratch_size(const vlm_davit *m, int H, int W, int n_threads);

/* pixels: [in_chans][H][W]; out[s]: [hs][ws][C_s] float32 (caller-allocated). */
vlm_status vlm_davit_forward(const vlm_davit *m, vlm_pool *pool, const float *pixels, int H, int W,
                             float *out[VLM_DAVIT_STAGES], void *scratch, size_t scratch_size, vlm_err *err);

#endif
