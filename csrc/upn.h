/* upn.h — UPN, the Universal Proposal Network of ChatRex that proposes VLM-FO1's boxes: a Swin backbone
 * (swin.h), a 4+1 level neck, a deformable-DETR encoder, two-stage query selection and a deformable decoder,
 * with a learned prompt embedding as the only "class".
 *
 * Input: one image, pixel_values [3][H][W] float32 (resized and normalized by the caller); batch 1 without
 * padding, so every padding mask of the reference is all-false and every valid ratio 1. Output: for each of
 * the Q queries a logit (score = sigmoid) and a box (cx, cy, w, h) normalized to the image. The pass:
 *   neck: level l < 4 = GroupNorm(conv1x1(swin level l)); level 4 = GroupNorm(conv3x3 stride 2 pad 1 (swin
 *     level 3)); every level gets the sine position embedding (normalized, temperature T) + level_embed[l].
 *   encoder (x E): src = LN1(src + out(MSDA(q = src + pos, 2-d reference = the token's centre, value(src))));
 *     src = LN2(src + lin2(relu(lin1(src)))).
 *   two-stage: proposals per token (cx, cy) = ((x+.5)/W_l, (y+.5)/H_l), w = h = 0.05·2^l, kept if every
 *     coordinate is in (0.01, 0.99) (else the memory row is zeroed and the box is +inf), in logit space;
 *     om = LN(enc_output(memory)); logit = om · prompt; the top Q logits select the queries, whose reference
 *     boxes are enc_bbox_mlp(om) + proposal (logit space); the query contents are the learned tgt_embed.
 *   decoder (x D), reference r = sigmoid(box): qpos = ref_head(sine4(r)); t = LN2(t + MHA(t + qpos, t + qpos, t));
 *     t = LN1(t + out(MSDA(q = t + qpos, 4-d reference r, value(memory)))); t = LN3(t + lin2(relu(lin1(t))));
 *     r = sigmoid(bbox_mlp(t) + inverse_sigmoid(r)) (shared bbox MLP).
 *   output: h = LN_dec(t of the last layer); logit = h · prompt; box = sigmoid(bbox_mlp(h) + inverse_sigmoid(r))
 *     with r the last layer's input reference.
 * MSDA sampling: 2-d references loc = ref + offset / (W_l, H_l); 4-d loc = ref_xy + offset / P · ref_wh · 0.5.
 *
 * Thread safety: a vlm_upn is read-only after bind and may be shared; one forward call per scratch block. */
#ifndef VLM_UPN_H
#define VLM_UPN_H

#include "common.h"
#include "gemm.h"
#include "pool.h"
#include "swin.h"
#include "tensors.h"

#define VLM_UPN_LEVELS 5       /* 4 backbone levels + 1 extra */
#define VLM_UPN_MAX_LAYERS 16

typedef struct {
    int d_model;       /* 256 (the decoder's sine embedding of 4 x 128 features needs 2 x d_model = 512) */
    int heads;         /* 8 */
    int points;        /* 4 */
    int enc_layers, dec_layers;
    int ffn;           /* 2048 */
    int queries;       /* 900 */
    int groups;        /* GroupNorm groups of the neck, 32 */
    float temperature; /* of the neck's sine position embedding, 20 */
    float eps;         /* LayerNorm and GroupNorm eps, 1e-5 */
    vlm_compute compute; /* how activations meet bf16 weights (gemm.h) */
} vlm_upn_config;

typedef struct {
    vlm_weight offsets, weights, value, out;   /* [H·L·P·2][d], [H·L·P][d], [d][d], [d][d], with bias */
} vlm_upn_msda;

typedef struct {
    vlm_upn_msda attn;
    const float *ln1, *ln1_b, *ln2, *ln2_b;
    vlm_weight lin1, lin2;
} vlm_upn_enc_layer;

typedef struct {
    vlm_upn_msda cross;
    vlm_weight in_proj, out_proj;              /* self-attention [3d][d], [d][d], with bias */
    const float *ln1, *ln1_b, *ln2, *ln2_b, *ln3, *ln3_b;
    vlm_weight lin1, lin2;
} vlm_upn_dec_layer;

typedef struct {
    const vlm_swin *swin;                      /* the bound backbone (borrowed) */
    vlm_upn_config cfg;
    vlm_weight proj[VLM_UPN_LEVELS];           /* neck convs: [d][C_l] (1x1), [d][C_3·9] (3x3), with bias */
    const float *gn[VLM_UPN_LEVELS], *gn_b[VLM_UPN_LEVELS];
    const float *level_embed;                  /* [5][d] */
    vlm_upn_enc_layer enc[VLM_UPN_MAX_LAYERS];
    vlm_weight enc_output;                     /* [d][d] with bias */
    const float *enc_norm, *enc_norm_b;
    vlm_weight enc_box[3];                     /* the two-stage box MLP d -> d -> d -> 4 */
    const float *prompt[2];                    /* fine_grained, coarse_grained [d] */
    const float *tgt;                          /* [Q][d] */
    vlm_upn_dec_layer dec[VLM_UPN_MAX_LAYERS];
    vlm_weight ref_head[2];                    /* 2d -> d -> d */
    const float *dec_norm, *dec_norm_b;
    vlm_weight box[3];                         /* the shared decoder box MLP d -> d -> d -> 4 */
} vlm_upn;

/* Binds everything but the backbone (m->cfg and m->swin set by the caller; the backbone's last level must have
 * C_3 channels as the neck expects). Names: neck.{l} (+ _bias), neck.{l}.gn (+ _bias); level_embed [5·d]; enc.{i}.{offsets, weights, value,
 * out, lin1, lin2} (+ _bias), enc.{i}.{ln1, ln2} (+ _bias); enc_output (+ _bias), enc_norm (+ _bias);
 * enc_box.{0,1,2} (+ _bias); prompt.fine, prompt.coarse [d]; tgt [Q·d]; dec.{i}.{offsets, weights, value, out,
 * in_proj, out_proj, lin1, lin2} (+ _bias), dec.{i}.{ln1, ln2, ln3} (+ _bias); ref_head.{0,1} (+ _bias);
 * dec_norm (+ _bias); box.{0,1,2} (+ _bias). Nothing is allocated. */
vlm_status vlm_upn_bind(vlm_upn *m, const vlm_tensor_table *t, vlm_err *err);

/* Level sizes of the encoder for an H x W image (hs, ws: [5]) and the total token count. */
vlm_status vlm_upn_levels(const vlm_upn *m, int H, int W, int hs[VLM_UPN_LEVELS], int ws[VLM_UPN_LEVELS], long *S,
                          vlm_err *err);

/* Optional copies of intermediate tensors for parity tests (any pointer may be NULL):
 * backbone[l]: [H_l][W_l][C_l] swin levels; srcs: [S][d] the neck output (levels concatenated); pos: [S][d] the
 * position + level embeddings; memory: [S][d] the encoder output; enc_logits: [S] the two-stage logits;
 * topk: [Q] the top-Q token indices (descending logit, ties by lower index; before any `select`); ref0: [Q][4] the selected boxes
 * in logit space; hs: [D][Q][d] every decoder layer's output after the decoder norm; refs: [D + 1][Q][4] the
 * reference boxes (sigmoid space) before each layer and after the last.
 * select (an input): NULL, or [Q] token indices (each in [0, S)) that replace the top-Q selection, so a parity test
 * can run the decoder on a reference's query order where near-equal logits make the order ambiguous. */
typedef struct {
    float *backbone[VLM_SWIN_STAGES];
    float *srcs, *pos, *memory, *enc_logits, *ref0, *hs, *refs;
    int32_t *topk;
    const int32_t *select;
} vlm_upn_taps;

size_t vlm_upn_scratch_size(const vlm_upn *m, int H, int W, int n_threads);

#define VLM_UPN_STAGES 5   /* timed stages: backbone, neck, encoder, two-stage selection, decoder */

/* pixels: [3][H][W]; prompt: 0 fine-grained, 1 coarse-grained; logits: [Q]; boxes: [Q][4] (cx, cy, w, h);
 * seconds: NULL or [VLM_UPN_STAGES] wall time per stage. */
vlm_status vlm_upn_forward(const vlm_upn *m, vlm_pool *pool, const float *pixels, int H, int W, int prompt,
                           float *logits, float *boxes, const vlm_upn_taps *taps, double *seconds, void *scratch,
                           size_t scratch_size, vlm_err *err);

#endif
