/* swin.h — the Swin Transformer backbone of UPN, VLM-FO1's proposal network (ChatRex's `swin_L_384_22k`:
 * embed 192, depths 2/2/18/2, heads 6/12/24/48, window 12, MLP ratio 4).
 *
 * Input: one image, pixel_values [3][H][W] float32 (channel-first, already normalized). Output: the four
 * stage maps, float32 channels-last [H_s][W_s][C_s] (C_s = embed·2^s), each after its output LayerNorm
 * norm{s}: what UPN's neck consumes. The forward pass, as the reference computes it:
 *   PatchEmbed: the image zero-padded right/bottom to multiples of 4, a 4x4 stride-4 conv, LayerNorm.
 *   Stage s: depth_s blocks, then (s < 3) PatchMerging for the next stage's input:
 *     Block j (shift = 0 for even j, window/2 for odd j):
 *       x += proj(WindowAttention(roll(pad(LN1(x)), -shift)))   (rolled back, cropped)
 *       x += fc2(GELU(fc1(LN2(x))))
 *     The map is zero-padded bottom/right to multiples of the window AFTER the LayerNorm, so the padded
 *     tokens take part as keys and values (their q/k/v are the qkv bias). The roll is over the padded map.
 *     WindowAttention: per head, softmax(q·scale·kᵀ + B + M)·v with the relative position bias
 *     B[i][j] = table[(yi - yj + ws - 1)(2ws - 1) + (xi - xj + ws - 1)][head] and, in shifted blocks, M = -100
 *     between tokens of different regions of the rolled padded map (regions: [0, Hp-ws), [Hp-ws, Hp-shift),
 *     [Hp-shift, Hp) along each axis), 0 inside one. The shift is applied even when the map is one window.
 *     PatchMerging: pad to even sizes, concatenate the 2x2 neighbours in the order (0,0) (1,0) (0,1) (1,1)
 *     (row, column), LayerNorm over 4C, a bias-free linear to 2C; the next map is ceil(H/2) x ceil(W/2).
 * GELU is exact (erf, PyTorch's vectorized formula); LayerNorm eps is per model (1e-5).
 *
 * Thread safety: a vlm_swin is read-only after bind and may be shared; one forward call per scratch block
 * at a time. */
#ifndef VLM_SWIN_H
#define VLM_SWIN_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "tensors.h"

#define VLM_SWIN_STAGES 4
#define VLM_SWIN_MAX_DEPTH 64

typedef struct {
    int in_chans;                       /* 3 */
    int patch;                          /* 4 */
    int embed;                          /* C_0; C_s = embed << s */
    int depth[VLM_SWIN_STAGES];
    int heads[VLM_SWIN_STAGES];
    int mlp_hidden[VLM_SWIN_STAGES];    /* fc1 width (4 C_s) */
    int window;                         /* 12 */
    float eps;                          /* LayerNorm eps, 1e-5 */
    vlm_compute compute;
} vlm_swin_config;

typedef struct {
    const float *ln1, *ln1_b;           /* [C] */
    vlm_weight qkv, proj;               /* [3C][C], [C][C], with bias */
    const float *rel;                   /* [(2ws-1)^2][heads] relative position bias table */
    const float *ln2, *ln2_b;           /* [C] */
    vlm_weight fc1, fc2;                /* [I][C], [C][I], with bias */
} vlm_swin_block;

typedef struct {
    vlm_swin_config cfg;
    vlm_weight patch;                   /* [C_0][in_chans·patch²] (the conv weight flattened), with bias */
    const float *patch_ln, *patch_ln_b; /* [C_0] */
    vlm_swin_block *blocks[VLM_SWIN_STAGES];
    const float *merge_ln[VLM_SWIN_STAGES - 1], *merge_ln_b[VLM_SWIN_STAGES - 1]; /* [4 C_s] */
    vlm_weight merge[VLM_SWIN_STAGES - 1]; /* [2 C_s][4 C_s], no bias */
    const float *out_ln[VLM_SWIN_STAGES], *out_ln_b[VLM_SWIN_STAGES];           /* [C_s] */
} vlm_swin;

/* Fills m's weights from t (m->cfg set by the caller) and validates them; allocates the blocks of all stages as
 * one table at m->blocks[0] (freed by vlm_swin_unbind, also on failure). Tensor names:
 *   patch [C_0][in·p·p] (+ patch_bias), patch_norm, patch_norm_bias,
 *   layers.{s}.blocks.{j}.{norm1, norm2 (each with _bias), qkv, proj, fc1, fc2 (each with _bias),
 *     rel (flat [(2ws-1)^2 · heads])},
 *   layers.{s}.merge_norm (+ _bias), layers.{s}.merge (no bias) for s < 3, norm{s} (+ _bias). */
vlm_status vlm_swin_bind(vlm_swin *m, const vlm_tensor_table *t, vlm_err *err);
void vlm_swin_unbind(vlm_swin *m);   /* NULL-safe */

/* Stage map sizes for an H x W image: hs[s], ws[s]. VLM_ERR_ARG if the image is empty or too large. */
vlm_status vlm_swin_stage_sizes(const vlm_swin *m, int H, int W, int hs[VLM_SWIN_STAGES], int ws[VLM_SWIN_STAGES],
                                vlm_err *err);

/* Bytes of scratch a forward pass on an H x W image needs with n_threads (0 if the size is invalid). */
size_t vlm_swin_scratch_size(const vlm_swin *m, int H, int W, int n_threads);

/* pixels: [in_chans][H][W]; out[s]: [hs][ws][C_s] float32 (caller-allocated). */
vlm_status vlm_swin_forward(const vlm_swin *m, vlm_pool *pool, const float *pixels, int H, int W,
                            float *out[VLM_SWIN_STAGES], void *scratch, size_t scratch_size, vlm_err *err);

#endif
