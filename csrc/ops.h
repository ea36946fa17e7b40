/* ops.h — the operations of the vlmfo1 core, by family: activations (act.c), normalization (norm.c),
 * rotary embedding (rope.c), convolution helpers (conv.c), attention (attention.c), RoIAlign
 * (roi_align.c), the deformable-DETR ops of UPN (detr.c) and the composite steps several networks share
 * (block.c). GEMM is gemm.h. The networks (qwen2.c, qwen_vit.c, davit.c, hfre.c, swin.c, upn.c) are flat lists
 * of these calls.
 *
 * Rules every op keeps: outputs first, sizes last, a shape comment; the work is split over a vlm_pool
 * (which may be NULL for one thread); ops never allocate (scratch, where needed, comes from the caller,
 * sized by the op's *_scratch_floats function: n_threads times that many floats); every output element
 * is computed by one thread in a fixed order, so results do not depend on the thread count. */
#ifndef VLM_OPS_H
#define VLM_OPS_H

#include "common.h"
#include "gemm.h"
#include "pool.h"

#define VLM_MAX_HEAD 256   /* head / channel-group size limit of the attention ops */

/* ---------------------------------------------------------------- activations (act.c) */

/* x[i] = x[i]/2 · (1 + erf(x[i]/√2)), erf from libm: the exact GELU of torch's scalar reference
 * (nn.GELU(), F.gelu) as the Qwen2.5-VL merger and the HFRE SimpleFP / projectors compute it. x: [n] */
void vlm_gelu_erf(vlm_pool *pool, float *x, size_t n);

/* The same GELU with erf from Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7), the formula of PyTorch's
 * vectorized CPU GELU kernel, which is what DaViT's reference run uses. AVX-512 when vlm_cpu_isa() has it,
 * else plain C (the two differ in FMA rounding). x: [n] */
void vlm_gelu_erf_poly(vlm_pool *pool, float *x, size_t n);

/* x[i] = max(x[i], 0), NaN kept (torch's relu). x: [n] */
void vlm_relu(vlm_pool *pool, float *x, size_t n);

/* g = silu(g) · u; g, u: [T][C] */
void vlm_silu_mul(vlm_pool *pool, float *g, const float *u, int T, int C);

/* ---------------------------------------------------------------- normalization (norm.c) */

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) · w; x, y: [T][C] (may alias), w: [C] */
void vlm_rmsnorm(vlm_pool *pool, float *y, const float *x, const float *w, float eps, int T, int C);

/* One row of LayerNorm: y = (x - mean) / sqrt(var + eps) · w + b; x, y: [C] (may alias). 16 partial sums,
 * so every instruction set sums alike. */
void vlm_layernorm_row(float *y, const float *x, const float *w, const float *b, float eps, int C);

/* vlm_layernorm_row on every row; x, y: [T][C] (may alias) */
void vlm_layernorm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, long T, int C);

/* Channel LayerNorm in place on the pixels of an H x W grid inside a wider map: pixel (i, j) is the C floats
 * at x + (i·pitch + j)·C. x: [H][pitch][C], pitch >= W. */
void vlm_layernorm_grid(vlm_pool *pool, float *x, const float *w, const float *b, float eps, size_t pitch, long H,
                        long W, int C);

/* One row of LayerNorm with the mean and variance summed in double (the HFRE region norms); x, y: [C] (may alias) */
void vlm_layernorm_row_f64(float *y, const float *x, const float *w, const float *b, double eps, int C);

/* ---------------------------------------------------------------- rotary embedding (rope.c) */

/* cos/sin tables for T tokens: cs[t][j], sn[t][j] for j < D/2, angle = pos[axis(j)][t] · inv_freq[j],
 * axis(j) = 0 for j < sec[0], 1 for j < sec[0]+sec[1], else 2. pos: [3][T]. */
void vlm_rope_table(float *cs, float *sn, const int32_t *pos, const float *inv_freq, const int sec[3], int T, int D);

/* Rotate-half RoPE in place on x: [T][nh][D] (row stride ld floats) with the tables above. */
void vlm_rope_apply(vlm_pool *pool, float *x, int ld, const float *cs, const float *sn, int T, int nh, int D);

/* ---------------------------------------------------------------- convolution helpers (conv.c) */

/* y = x + b + depthwise 3x3 conv of x (zero padding, stride 1): the residual depthwise conv of DaViT.
 * x, y: [H][W][C] (distinct), wt: [9][C] (tap-major, tap = ky·3 + kx), b: [C] */
void vlm_dwconv3x3_residual(vlm_pool *pool, float *y, const float *x, const float *wt, const float *b, int H, int W,
                            int C);

/* im2col of output pixels r0 .. r0+nr-1 (p = oy·Wo + ox) of a k x k conv, stride st, padding pd:
 * col[r][(ci·k + ky)·k + kx] = in(ci, oy·st - pd + ky, ox·st - pd + kx), 0 outside (PyTorch's flattened
 * weight order). in: [Ci][Hi][Wi], or [Hi][Wi][Ci] with chan_last; col: [nr][Ci·k·k]. */
void vlm_im2col(vlm_pool *pool, float *col, const float *in, int chan_last, int Hi, int Wi, int Ci, int k, int st,
                int pd, int Wo, long r0, long nr);

/* out = conv(in) + bias through vlm_im2col + vlm_mm, `chunk` output pixels at a time. w: [Co][Ci·k·k] (with bias),
 * out: [Ho·Wo][Co], col: [chunk][Ci·k·k] scratch; `in` as in vlm_im2col. */
vlm_status vlm_conv2d(const vlm_mm_ctx *mm, float *out, const float *in, const vlm_weight *w, float *col, long chunk,
                      int chan_last, int Hi, int Wi, int Ci, int k, int st, int pd, int Ho, int Wo);

/* 3x3 conv, padding 1, no bias, of a zero-bordered map P: [(H+2)][pitch][Ci] (pitch = W+2) by 9 tap GEMMs
 * (w: [9·Co][Ci], tap-major): out[p] = sum_tap P[p + ty·pitch + tx] · W_tap for p < H·pitch - 2; out rows
 * have the padded pitch (the last two of every row are junk). out: [H·pitch][Co] */
vlm_status vlm_conv3x3_padded(const vlm_mm_ctx *mm, float *out, const float *P, const vlm_weight *w, long H,
                              size_t pitch, int Co);

/* Scatter of a k = s = 2 transposed conv's GEMM output, rows of 4·Co floats ordered (a, b, o), into the
 * interior of a padded map P: [(2Hs+2)][(2Ws+2)][Co]. Row r is input pixel (yy, xx) of an Hs x Ws grid; with
 * `sub` the rows come from a previous such conv, r = ((i·Wi + j)·2 + a)·2 + b for (yy, xx) = (2i+a, 2j+b),
 * Wi = Ws/2. T: [Hs·Ws][4·Co] */
void vlm_convt2x2_scatter(vlm_pool *pool, float *P, const float *T, int Hs, int Ws, int Co, int sub);

/* Zero the one-pixel border of a padded map P: [(H+2)][(W+2)][C]. */
void vlm_zero_border(float *P, long H, long W, int C);

/* 2x2 max-pool (floor) of x: [H][W][C] into the interior of a padded map P: [(H/2+2)][(W/2+2)][C]. */
void vlm_maxpool2x2(vlm_pool *pool, float *P, const float *x, int H, int W, int C);

/* Swin's PatchMerging gather for output pixels r0 .. r0+nr-1 (p = oy·Wo + ox, Wo = ceil(W/2)) of a map
 * x: [H][W][C]: out[r] = x[2oy][2ox] | x[2oy+1][2ox] | x[2oy][2ox+1] | x[2oy+1][2ox+1], zeros outside the map.
 * out: [nr][4C] */
void vlm_patch_merge_gather(vlm_pool *pool, float *out, const float *x, int H, int W, int C, long r0, long nr);

/* ---------------------------------------------------------------- attention (attention.c) */

/* Causal grouped-query attention of T new queries against a KV cache. bf16 != 0 (compute = bf16): with T > 1 on
 * AVX512-BF16 CPUs (D a multiple of 16) q, k, v and the probabilities are rounded to bf16 and multiplied by
 * vdpbf16ps, as a bf16 torch run does (attention.c); otherwise, and for one query (decode), fp32.
 * q: [T][H][D] (row stride ldq); kc, vc: [KV][max_ctx][D] caches already holding positions
 * 0 .. n_past+T-1; query t sees keys 0 .. n_past+t. out: [T][H][D] (row stride ldo). D <= VLM_MAX_HEAD.
 * scratch: n_threads · vlm_attention_scratch_floats(...) floats. */
size_t vlm_attention_scratch_floats(int H, int KV, int D, int max_ctx);
void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch, int bf16);

/* Non-causal attention inside segments [cu[s], cu[s+1]) of qkv: [N][3][H][D] (q, k, v blocks of each
 * token); out: [N][H][D]. D <= VLM_MAX_HEAD. scratch: n_threads · vlm_segment_attention_scratch_floats(max_seg, D)
 * floats, max_seg = the longest segment. bf16: as for vlm_attention. */
size_t vlm_segment_attention_scratch_floats(int max_seg, int D);
void vlm_segment_attention(vlm_pool *pool, float *out, const float *qkv, const int *cu, int n_seg, int H, int D,
                           float scale, float *scratch, int max_seg, int bf16);

/* DaViT window attention over one band of `rows` (<= win) image rows of width W: windows of win x win
 * tokens (raster order inside), heads of D = C/heads. Keys/values outside the image are the zero-padded
 * tokens, whose k and v are the qkv bias; queries are the real tokens only. qkv: [rows·W][3C] (q | k | v),
 * bias: [3C], att: [rows·W][C]. win <= VLM_MAX_HEAD, D <= VLM_MAX_HEAD.
 * scratch: n_threads · vlm_window_attention_scratch_floats(win, D) floats. */
size_t vlm_window_attention_scratch_floats(int win, int D);
void vlm_window_attention(vlm_pool *pool, float *att, const float *qkv, const float *bias, int rows, int W, int C,
                          int heads, int win, float scale, float *scratch);

/* DaViT channel attention, in three ops so the tokens can come in chunks:
 * scores: A[g][i][j] += Σ_n (q[n][g·d + i] · scale) · k[n][g·d + j] over nr tokens, in blocks of 256 tokens;
 *   qk: [nr][2C] (q | k), A: [G][d][d], d = C/G <= VLM_MAX_HEAD.
 *   scratch: n_threads · vlm_channel_attention_scratch_floats(d) floats.
 * softmax: At[g][j][i] = softmax_j(A[g][i][:]) (transposed). A, At: [G][d][d]
 * apply: att[n][g·d + i] = Σ_j At[g][j][i] · v[n][g·d + j]; v, att: [nr][C] */
size_t vlm_channel_attention_scratch_floats(int d);
void vlm_channel_attention_scores(vlm_pool *pool, float *A, const float *qk, float scale, float *scratch, long nr, int C,
                                  int G);
void vlm_channel_attention_softmax(vlm_pool *pool, float *At, const float *A, int G, int d);
void vlm_channel_attention_apply(vlm_pool *pool, float *att, const float *v, const float *At, long nr, int C, int G);

/* Swin window attention over nwin windows of N tokens: qkv: [nwin][N][3C] (q | k | v of each token), heads of
 * D = C/heads; per window and head softmax(q·scale·kᵀ + bias[h] (+ mask where labels differ))·v.
 * bias: [heads][N][N] (vlm_swin_rel_bias); labels: [nwin][N] region labels of the shifted-window mask, or NULL
 * (no mask); mask: the value added between different labels (-100 in Swin). att: [nwin][N][C].
 * scratch: n_threads · vlm_swin_attention_scratch_floats(N, D) floats. */
size_t vlm_swin_attention_scratch_floats(int N, int D);
void vlm_swin_attention(vlm_pool *pool, float *att, const float *qkv, const float *bias, const int32_t *labels,
                        float mask, int nwin, int N, int C, int heads, float scale, float *scratch);

/* Dense relative position bias of a ws x ws window: bias[h][i][j] = table[(yi - yj + ws - 1)(2ws - 1) +
 * (xi - xj + ws - 1)][h], tokens in raster order. table: [(2ws-1)^2][heads], bias: [heads][ws²][ws²] */
void vlm_swin_rel_bias(float *bias, const float *table, int ws, int heads);

/* Swin's shifted-window partition of band wy (window row) of a map x: [H][W][C], zero-padded bottom/right to
 * Hp x Wp (multiples of ws), then rolled by -shift over the padded map: out[w][a·ws + b] = LN(x[i][j]) with
 * i = (wy·ws + a + shift) mod Hp, j = (w·ws + b + shift) mod Wp, or zeros where i >= H or j >= W (w, b: NULL:
 * a plain copy). out: [Wp/ws][ws²][C]. vlm_window_scatter_add is its inverse on the real tokens:
 * x[i][j] += y[w][a·ws + b]. */
void vlm_window_gather(vlm_pool *pool, float *out, const float *x, const float *w, const float *b, float eps, int H,
                       int W, int C, int ws, int shift, int wy);
void vlm_window_scatter_add(vlm_pool *pool, float *x, const float *y, int H, int W, int C, int ws, int shift, int wy);

/* ---------------------------------------------------------------- RoIAlign (roi_align.c) */

#define VLM_ROI_MAX_MAPS 8    /* maps (pyramid levels) a plan covers */
#define VLM_ROI_MAX_JOBS 16   /* jobs of one vlm_roi_pool call */
#define VLM_ROI_CH 128        /* channels per pooling work item */

/* Separable RoIAlign as weight vectors: for box b and map g, one float weight per map row (wy[H_g]) and per
 * map column (wx[W_g]), so that the pooled vector is Σ_y wy[y] Σ_x wx[x] map[y][x][:], plus the inclusive
 * range of non-zero weights. Filled by the caller from the vlm_roi_* helpers below. */
typedef struct {
    int n_maps, N;
    int H[VLM_ROI_MAX_MAPS], W[VLM_ROI_MAX_MAPS];
    size_t off[VLM_ROI_MAX_MAPS];   /* float offset of map g's wy [H] + wx [W] inside a box's block */
    size_t per_box;                 /* floats per box */
    float *wts;                     /* [N][per_box] */
    int *span;                      /* [N][n_maps][4]: y_lo, y_hi, x_lo, x_hi (inclusive; lo > hi: empty) */
} vlm_roi_plan;

/* Sets n_maps, N, the map sizes, off and per_box (not wts / span). H, W: [n_maps] */
void vlm_roi_plan_layout(vlm_roi_plan *p, int n_maps, const int *H, const int *W, int N);

/* RoIAlign sample weights along one axis of length len, accumulated into w: [len]: the bilinear weights of
 * the S·grid samples of the box side [a1, a2]·scale (torchvision, aligned=False, adaptive grid =
 * ceil(extent / S), samples beyond [-1, len] dropped), with the reference's float32 expressions (no FMA
 * contraction). Returns the grid. */
long vlm_roi_axis_weights(double *w, int len, float a1, float a2, float scale, int S);

/* w_out: [in] += Uᵀ w_in: a weight vector over the `out` positions of PyTorch's bilinear upsampling
 * (align_corners=False) from `in` positions, moved back to the source positions. w_in: [out] */
void vlm_upsample_weights_t(double *w_out, const double *w_in, int in, int out);

/* dst: [len] = (float)(w · mul), and the inclusive range [*lo, *hi] of its non-zeros (lo > hi: none). */
void vlm_roi_finish_axis(float *dst, int *lo, int *hi, const double *w, int len, double mul);

/* One pooling job: a map [H][·][C] (rows ld_row floats apart, pixels C apart), its plan map index, and the
 * column of the output where its C channels go. */
typedef struct {
    const float *map;
    size_t ld_row;
    int C, map_index, out_off;
} vlm_roi_job;

/* out[b][out_off + c] = Σ_y wy[y] Σ_x wx[x] map[y][x][c] for every box b and job (fixed summation order:
 * rows, then columns). out: [N][ld_out]. Work items of (job, box, VLM_ROI_CH channels) are handed out by an
 * atomic counter. scratch: n_threads · vlm_roi_pool_scratch_floats() floats. */
size_t vlm_roi_pool_scratch_floats(void);
void vlm_roi_pool(vlm_pool *pool, float *out, int ld_out, const vlm_roi_job *jobs, int n_jobs, const vlm_roi_plan *plan,
                  float *scratch);

/* ---------------------------------------------------------------- deformable DETR (detr.c) */

#define VLM_MSDA_MAX_LEVELS 16      /* feature levels of one vlm_msda call */
#define VLM_MSDA_MAX_POINTS 16      /* sampling points per level */
#define VLM_MSDA_MAX_HEADS 1024
#define VLM_MSDA_MAX_SIDE (1 << 20) /* level height / width limit (exact as floats) */
#define VLM_SINE_MAX_FEATS 1024     /* num_pos_feats limit of the sine embeddings */

/* Multi-scale deformable attention sampling: Deformable-DETR's ms_deform_attn_core_pytorch at batch 1,
 *   out[q][m·D + d] = Σ_l Σ_p aw[q][m][l][p] · bilinear_l(m, d, loc[q][m][l][p]),
 * bilinear_l = F.grid_sample(level l as [M][D][H_l][W_l], 2·loc - 1, bilinear, zeros padding,
 * align_corners=False): pixel x = loc_x·W_l - 0.5 (y alike; torch's float32 expressions), corners outside the
 * level read 0. A location outside the level, NaN or infinite contributes nothing (torch gives NaN for
 * non-finite ones); no float becomes an index unchecked. Summed in fp32 as ((S_nw + S_ne) + S_sw) + S_se,
 * S_corner = Σ over l, then p of (aw · corner weight) · value: AVX-512 with FMAs, else portable C with every
 * product and sum rounded alone (the two differ by FMA rounding only). Queries split over threads.
 * value: [S][ld_v] (head m's D channels at m·D of each token row; level l occupies tokens start[l] ..
 * start[l] + H[l]·W[l], row-major (y, x)); loc: [Lq][M][L][P][2] (x, y, normalized to [0, 1]);
 * aw: [Lq][M][L][P]; H, W, start: [L]; out: [Lq][M·D].
 * Checks the sizes (levels contiguous from token 0 holding S <= 2^31 - 1 tokens, 1 <= L <= VLM_MSDA_MAX_LEVELS,
 * 1 <= P <= VLM_MSDA_MAX_POINTS, 1 <= M <= VLM_MSDA_MAX_HEADS, 1 <= D <= VLM_MAX_HEAD, sides in
 * [1, VLM_MSDA_MAX_SIDE], ld_v >= M·D): VLM_ERR_ARG and a message in err (may be NULL) otherwise. */
vlm_status vlm_msda(vlm_pool *pool, float *out, const float *value, size_t ld_v, const float *loc, const float *aw,
                    const int *H, const int *W, const long *start, long S, int L, int M, int D, int P, long Lq,
                    vlm_err *err);

/* GroupNorm (torch.nn.GroupNorm(G, C) on the NCHW transpose) of a channels-last map: group g holds channels
 * [g·C/G, (g+1)·C/G); y = (x - mean_g) / sqrt(var_g + eps) · w[c] + b[c], mean and biased variance over the
 * HW·C/G values of the group, in double: per channel over fixed blocks of pixels, then over the blocks and the
 * group's channels in order (the same sums for any thread count); the variance about the mean (two passes);
 * y evaluated in double and rounded once. Threads split the pixels. x, y: [HW][C] (may alias), w, b: [C];
 * C % G == 0 (else nothing is done). scratch: vlm_group_norm_scratch_floats(HW, C) floats (in all, not per
 * thread), 8-byte aligned. */
size_t vlm_group_norm_scratch_floats(long HW, int C);
void vlm_group_norm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, float *scratch,
                    long HW, int C, int G);

/* DETR's PositionEmbeddingSineHW for an unmasked H x W map (normalize=True, scale 2π, eps 1e-6), in torch's
 * float32 steps: ey = (i+1) / (H + 1e-6) · 2π, ex = (j+1) / (W + 1e-6) · 2π, dim_t[k] = T^(2·floor(k/2)/F)
 * (pow rounded once), channel k < F: sin(ey / dim_t_h[k]) for even k, cos for odd k; channel F + k the same
 * of ex with dim_t_w. sinf / cosf from libm. out: [H·W][2F] (pixel i·W + j); F even, <= VLM_SINE_MAX_FEATS. */
void vlm_sine_pos_embed_hw(vlm_pool *pool, float *out, float temp_h, float temp_w, int H, int W, int F);

/* DINO's gen_sineembed_for_position of 4-d boxes (cx, cy, w, h): e = coord · 2π (float32), channel k of a
 * coordinate's block: sin(e / dim_t[k]) for even k, cos for odd k, dim_t[k] = T^(2·floor(k/2)/F); blocks in
 * the order y, x, w, h. box: [N][4]; out: [N][4F]; F even, <= VLM_SINE_MAX_FEATS. */
void vlm_sine_embed_boxes(vlm_pool *pool, float *out, const float *box, float temperature, long N, int F);

/* ---------------------------------------------------------------- shared blocks (block.c) */

/* x += fc2(GELU(fc1(LN(x)))) over N rows of C, `step` rows at a time (DaViT's and Swin's pre-norm MLP; GELU is
 * vlm_gelu_erf_poly, PyTorch's vectorized formula). Scratch: xn [step][C], h [step][fc1->n]. */
vlm_status vlm_ln_mlp_residual(const vlm_mm_ctx *mm, float *x, long N, int C, const float *ln_w, const float *ln_b,
                               float eps, const vlm_weight *fc1, const vlm_weight *fc2, long step, float *xn,
                               float *h);

#endif
