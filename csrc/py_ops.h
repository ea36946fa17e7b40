/* py_ops.h — the ops of csrc/ops.h exposed one by one, for tests only (tests/test_ops.py; included by
 * module.c after its shared helpers; only module.c includes it).
 *
 *   _core.op(name, arrays, ints=(), floats=(), n_threads=1) -> None
 *
 * `arrays` are the op's buffers in the order of its C prototype (outputs first), each a C-contiguous,
 * writable NumPy array of the dtype the op table below gives ('f' float32, 'i' int32, 'd' float64); they
 * are passed as flat buffers and must hold at least the elements the op's sizes imply. `ints` are its
 * integer sizes (all in [0, 2^15], so no size product overflows) and `floats` its float parameters, in prototype order. The op runs on a pool
 * of n_threads with the GIL released; scratch is allocated here. _core.ops() lists the names. */

enum { OPS_MAX_ARRAYS = 6, OPS_MAX_INTS = 12, OPS_MAX_FLOATS = 3 };

typedef struct {
    void *a[OPS_MAX_ARRAYS];
    long iv[OPS_MAX_INTS];
    double fv[OPS_MAX_FLOATS];
    int nth;
    vlm_pool *pool;
    int sizing;                     /* 1: fill need[] and scratch only */
    size_t need[OPS_MAX_ARRAYS];    /* minimum elements of every array */
    size_t scratch;                 /* scratch floats */
    float *scr;
    vlm_err *err;
} op_call;

#define A_F(i) ((float *)c->a[i])
#define A_I(i) ((int32_t *)c->a[i])
#define A_D(i) ((double *)c->a[i])
#define NEED(...) do { size_t _n[] = {__VA_ARGS__}; memcpy(c->need, _n, sizeof _n); } while (0)
#define SIZING(...) do { if (c->sizing) { NEED(__VA_ARGS__); return VLM_OK; } } while (0)

static vlm_weight op_weight(const float *w, const float *bias, long n, long k) {
    return (vlm_weight){.dtype = VLM_F32, .n = n, .k = k, .data = w, .bias = bias};
}

static vlm_status op_gelu_erf(op_call *c) {
    SIZING(c->iv[0]);
    vlm_gelu_erf(c->pool, A_F(0), c->iv[0]);
    return VLM_OK;
}
static vlm_status op_gelu_erf_poly(op_call *c) {
    SIZING(c->iv[0]);
    vlm_gelu_erf_poly(c->pool, A_F(0), c->iv[0]);
    return VLM_OK;
}
static vlm_status op_silu_mul(op_call *c) {   /* g, u; T, C */
    long n = c->iv[0] * c->iv[1];
    SIZING(n, n);
    vlm_silu_mul(c->pool, A_F(0), A_F(1), c->iv[0], c->iv[1]);
    return VLM_OK;
}
static vlm_status op_rmsnorm(op_call *c) {   /* y, x, w; T, C; eps */
    long n = c->iv[0] * c->iv[1];
    SIZING(n, n, c->iv[1]);
    vlm_rmsnorm(c->pool, A_F(0), A_F(1), A_F(2), c->fv[0], c->iv[0], c->iv[1]);
    return VLM_OK;
}
static vlm_status op_layernorm(op_call *c) {   /* y, x, w, b; T, C; eps */
    long n = c->iv[0] * c->iv[1];
    SIZING(n, n, c->iv[1], c->iv[1]);
    vlm_layernorm(c->pool, A_F(0), A_F(1), A_F(2), A_F(3), c->fv[0], c->iv[0], c->iv[1]);
    return VLM_OK;
}
static vlm_status op_layernorm_grid(op_call *c) {   /* x, w, b; pitch, H, W, C; eps */
    long pitch = c->iv[0], H = c->iv[1], W = c->iv[2], C = c->iv[3];
    if (W > pitch) return vlm_fail(c->err, VLM_ERR_ARG, "layernorm_grid: W > pitch");
    SIZING(H * pitch * C, C, C);
    vlm_layernorm_grid(c->pool, A_F(0), A_F(1), A_F(2), c->fv[0], pitch, H, W, C);
    return VLM_OK;
}
static vlm_status op_layernorm_row_f64(op_call *c) {   /* y, x, w, b; C; eps */
    SIZING(c->iv[0], c->iv[0], c->iv[0], c->iv[0]);
    vlm_layernorm_row_f64(A_F(0), A_F(1), A_F(2), A_F(3), c->fv[0], c->iv[0]);
    return VLM_OK;
}
static vlm_status op_rope_table(op_call *c) {   /* cs, sn, pos, inv_freq; T, D, s0, s1, s2 */
    long T = c->iv[0], D = c->iv[1];
    SIZING(T * (D / 2), T * (D / 2), 3 * T, D / 2);
    int sec[3] = {c->iv[2], c->iv[3], c->iv[4]};
    vlm_rope_table(A_F(0), A_F(1), A_I(2), A_F(3), sec, T, D);
    return VLM_OK;
}
static vlm_status op_rope_apply(op_call *c) {   /* x, cs, sn; ld, T, nh, D */
    long ld = c->iv[0], T = c->iv[1], nh = c->iv[2], D = c->iv[3];
    if (ld < nh * D || D % 2) return vlm_fail(c->err, VLM_ERR_ARG, "rope_apply: ld < nh*D or odd D");
    SIZING(T ? (T - 1) * ld + nh * D : 0, T * (D / 2), T * (D / 2));
    vlm_rope_apply(c->pool, A_F(0), ld, A_F(1), A_F(2), T, nh, D);
    return VLM_OK;
}
static vlm_status op_dwconv3x3_residual(op_call *c) {   /* y, x, wt, b; H, W, C */
    long n = c->iv[0] * c->iv[1] * c->iv[2];
    SIZING(n, n, 9 * c->iv[2], c->iv[2]);
    vlm_dwconv3x3_residual(c->pool, A_F(0), A_F(1), A_F(2), A_F(3), c->iv[0], c->iv[1], c->iv[2]);
    return VLM_OK;
}
static vlm_status op_im2col(op_call *c) {   /* col, in; chan_last, Hi, Wi, Ci, k, st, pd, Wo, r0, nr */
    const long *Z = c->iv;
    if (Z[5] < 1) return vlm_fail(c->err, VLM_ERR_ARG, "im2col: stride < 1");
    SIZING(Z[9] * Z[3] * Z[4] * Z[4], Z[1] * Z[2] * Z[3]);
    vlm_im2col(c->pool, A_F(0), A_F(1), Z[0], Z[1], Z[2], Z[3], Z[4], Z[5], Z[6], Z[7], Z[8], Z[9]);
    return VLM_OK;
}
static vlm_status op_conv2d(op_call *c) {   /* out, in, w, bias; chan_last, Hi, Wi, Ci, k, st, pd, Ho, Wo, chunk, Co */
    const long *Z = c->iv, K = Z[3] * Z[4] * Z[4], chunk = Z[9] < 1 ? 1 : Z[9];
    if (Z[5] < 1) return vlm_fail(c->err, VLM_ERR_ARG, "conv2d: stride < 1");
    if (c->sizing) {
        NEED(Z[7] * Z[8] * Z[10], Z[1] * Z[2] * Z[3], Z[10] * K, Z[10]);
        c->scratch = chunk * K;
        return VLM_OK;
    }
    vlm_weight w = op_weight(A_F(2), A_F(3), Z[10], K);
    vlm_mm_ctx mm = {c->pool, VLM_COMPUTE_F32, NULL, 0, c->err};
    return vlm_conv2d(&mm, A_F(0), A_F(1), &w, c->scr, chunk, Z[0], Z[1], Z[2], Z[3], Z[4], Z[5], Z[6], Z[7], Z[8]);
}
static vlm_status op_conv3x3_padded(op_call *c) {   /* out, P, w; H, pitch, Ci, Co */
    long H = c->iv[0], pitch = c->iv[1], Ci = c->iv[2], Co = c->iv[3];
    if (H < 1 || pitch < 3) return vlm_fail(c->err, VLM_ERR_ARG, "conv3x3_padded: H < 1 or pitch < 3");
    SIZING((H * pitch - 2) * Co, (H + 2) * pitch * Ci, 9 * Co * Ci);
    vlm_weight w = op_weight(A_F(2), NULL, 9 * Co, Ci);
    vlm_mm_ctx mm = {c->pool, VLM_COMPUTE_F32, NULL, 0, c->err};
    return vlm_conv3x3_padded(&mm, A_F(0), A_F(1), &w, H, pitch, Co);
}
static vlm_status op_convt2x2_scatter(op_call *c) {   /* P, T; Hs, Ws, Co, sub */
    long Hs = c->iv[0], Ws = c->iv[1], Co = c->iv[2];
    if (c->iv[3] && (Hs % 2 || Ws % 2)) return vlm_fail(c->err, VLM_ERR_ARG, "convt2x2_scatter: sub needs even Hs, Ws");
    SIZING((2 * Hs + 2) * (2 * Ws + 2) * Co, Hs * Ws * 4 * Co);
    vlm_convt2x2_scatter(c->pool, A_F(0), A_F(1), Hs, Ws, Co, c->iv[3]);
    return VLM_OK;
}
static vlm_status op_zero_border(op_call *c) {   /* P; H, W, C */
    SIZING((c->iv[0] + 2) * (c->iv[1] + 2) * c->iv[2]);
    vlm_zero_border(A_F(0), c->iv[0], c->iv[1], c->iv[2]);
    return VLM_OK;
}
static vlm_status op_maxpool2x2(op_call *c) {   /* P, x; H, W, C */
    long H = c->iv[0], W = c->iv[1], C = c->iv[2];
    SIZING((H / 2 + 2) * (W / 2 + 2) * C, H * W * C);
    vlm_maxpool2x2(c->pool, A_F(0), A_F(1), H, W, C);
    return VLM_OK;
}
static vlm_status op_attention(op_call *c) {   /* out, q, kc, vc; ldo, ldq, max_ctx, n_past, T, H, KV, D, bf16; scale */
    const long *Z = c->iv;
    long ldo = Z[0], ldq = Z[1], mc = Z[2], np = Z[3], T = Z[4], H = Z[5], KV = Z[6], D = Z[7];
    if (T < 1 || KV < 1 || H % KV || D < 1 || D > VLM_MAX_HEAD || np + T > mc || ldo < H * D || ldq < H * D)
        return vlm_fail(c->err, VLM_ERR_ARG, "attention: bad sizes");
    if (c->sizing) {
        NEED((T - 1) * ldo + H * D, (T - 1) * ldq + H * D, KV * mc * D, KV * mc * D);
        c->scratch = (size_t)c->nth * vlm_attention_scratch_floats(H, KV, D, mc);
        return VLM_OK;
    }
    vlm_attention(c->pool, A_F(0), ldo, A_F(1), ldq, A_F(2), A_F(3), mc, np, T, H, KV, D, c->fv[0], c->scr, (int)Z[8]);
    return VLM_OK;
}
static vlm_status op_segment_attention(op_call *c) {   /* out, qkv, cu; N, n_seg, H, D, max_seg, bf16; scale */
    long N = c->iv[0], ns = c->iv[1], H = c->iv[2], D = c->iv[3], ms = c->iv[4];
    if (D < 1 || D > VLM_MAX_HEAD) return vlm_fail(c->err, VLM_ERR_ARG, "segment_attention: bad D");
    if (c->sizing) {
        NEED(N * H * D, N * 3 * H * D, ns + 1);
        c->scratch = (size_t)c->nth * vlm_segment_attention_scratch_floats(ms, D);
        return VLM_OK;
    }
    const int32_t *cu = A_I(2);
    for (long s = 0; s < ns; s++)
        if (cu[s] < 0 || cu[s + 1] <= cu[s] || cu[s + 1] > N || cu[s + 1] - cu[s] > ms)
            return vlm_fail(c->err, VLM_ERR_ARG, "segment_attention: bad segment %ld", s);
    vlm_segment_attention(c->pool, A_F(0), A_F(1), (const int *)cu, ns, H, D, c->fv[0], c->scr, ms, (int)c->iv[5]);
    return VLM_OK;
}
static vlm_status op_window_attention(op_call *c) {   /* att, qkv, bias; rows, W, C, heads, win; scale */
    long rows = c->iv[0], W = c->iv[1], C = c->iv[2], heads = c->iv[3], win = c->iv[4];
    if (heads < 1 || C % heads || C / heads > VLM_MAX_HEAD || win < 1 || win > VLM_MAX_HEAD || rows > win)
        return vlm_fail(c->err, VLM_ERR_ARG, "window_attention: bad sizes");
    if (c->sizing) {
        NEED(rows * W * C, rows * W * 3 * C, 3 * C);
        c->scratch = (size_t)c->nth * vlm_window_attention_scratch_floats(win, C / heads);
        return VLM_OK;
    }
    vlm_window_attention(c->pool, A_F(0), A_F(1), A_F(2), rows, W, C, heads, win, c->fv[0], c->scr);
    return VLM_OK;
}
static vlm_status op_channel_attention_scores(op_call *c) {   /* A, qk; nr, C, G; scale */
    long nr = c->iv[0], C = c->iv[1], G = c->iv[2];
    if (G < 1 || C % G || C / G > VLM_MAX_HEAD) return vlm_fail(c->err, VLM_ERR_ARG, "channel attention: bad groups");
    if (c->sizing) {
        NEED(C * (C / G), nr * 2 * C);
        c->scratch = (size_t)c->nth * vlm_channel_attention_scratch_floats(C / G);
        return VLM_OK;
    }
    vlm_channel_attention_scores(c->pool, A_F(0), A_F(1), c->fv[0], c->scr, nr, C, G);
    return VLM_OK;
}
static vlm_status op_channel_attention_softmax(op_call *c) {   /* At, A; G, d */
    long G = c->iv[0], d = c->iv[1];
    if (d < 1 || d > VLM_MAX_HEAD) return vlm_fail(c->err, VLM_ERR_ARG, "channel attention: bad d");
    SIZING(G * d * d, G * d * d);
    vlm_channel_attention_softmax(c->pool, A_F(0), A_F(1), G, d);
    return VLM_OK;
}
static vlm_status op_channel_attention_apply(op_call *c) {   /* att, v, At; nr, C, G */
    long nr = c->iv[0], C = c->iv[1], G = c->iv[2];
    if (G < 1 || C % G) return vlm_fail(c->err, VLM_ERR_ARG, "channel attention: bad groups");
    SIZING(nr * C, nr * C, C * (C / G));
    vlm_channel_attention_apply(c->pool, A_F(0), A_F(1), A_F(2), nr, C, G);
    return VLM_OK;
}
static vlm_status op_roi_axis_weights(op_call *c) {   /* w (f64, accumulated), grid (i32 [1]); len, S; a1, a2, scale */
    long len = c->iv[0], S = c->iv[1];
    if (len < 1 || S < 1) return vlm_fail(c->err, VLM_ERR_ARG, "roi_axis_weights: len, S >= 1");
    if (!(fabs(c->fv[0]) <= 1e7 && fabs(c->fv[1]) <= 1e7 && fabs(c->fv[2]) <= 1e3))
        return vlm_fail(c->err, VLM_ERR_ARG, "roi_axis_weights: coordinates out of range");
    SIZING(len, 1);
    A_I(1)[0] = (int32_t)vlm_roi_axis_weights(A_D(0), len, (float)c->fv[0], (float)c->fv[1], (float)c->fv[2], S);
    return VLM_OK;
}
static vlm_status op_upsample_weights_t(op_call *c) {   /* w_out (f64 [in]), w_in (f64 [out]); in, out */
    if (c->iv[0] < 1 || c->iv[1] < 1) return vlm_fail(c->err, VLM_ERR_ARG, "upsample_weights_t: sizes >= 1");
    SIZING(c->iv[0], c->iv[1]);
    vlm_upsample_weights_t(A_D(0), A_D(1), c->iv[0], c->iv[1]);
    return VLM_OK;
}
static vlm_status op_roi_pool(op_call *c) {   /* out, map, wts, span (i32); N, H, W, C, ld_out, out_off */
    long N = c->iv[0], H = c->iv[1], W = c->iv[2], C = c->iv[3], ld = c->iv[4], oo = c->iv[5];
    if (oo + C > ld) return vlm_fail(c->err, VLM_ERR_ARG, "roi_pool: out_off + C > ld_out");
    if (c->sizing) {
        NEED(N * ld, H * W * C, N * (H + W), N * 4);
        c->scratch = (size_t)c->nth * vlm_roi_pool_scratch_floats();
        return VLM_OK;
    }
    const int32_t *sp = A_I(3);
    for (long b = 0; b < N; b++)
        if (sp[4 * b] <= sp[4 * b + 1] && (sp[4 * b] < 0 || sp[4 * b + 1] >= H || sp[4 * b + 2] < 0 || sp[4 * b + 3] >= W))
            return vlm_fail(c->err, VLM_ERR_ARG, "roi_pool: span of box %ld outside the map", b);
    vlm_roi_plan p;
    int hh = (int)H, ww = (int)W;
    vlm_roi_plan_layout(&p, 1, &hh, &ww, N);
    p.wts = A_F(2);
    p.span = (int *)A_I(3);
    vlm_roi_job job = {A_F(1), (size_t)W * C, C, 0, oo};
    vlm_roi_pool(c->pool, A_F(0), ld, &job, 1, &p, c->scr);
    return VLM_OK;
}

static vlm_status op_relu(op_call *c) {
    SIZING(c->iv[0]);
    vlm_relu(c->pool, A_F(0), c->iv[0]);
    return VLM_OK;
}
static vlm_status op_swin_rel_bias(op_call *c) {   /* bias, table; ws, heads */
    long ws = c->iv[0], h = c->iv[1], N = ws * ws;
    if (ws < 1 || ws > 16 || h < 1) return vlm_fail(c->err, VLM_ERR_ARG, "swin_rel_bias: 1 <= ws <= 16, heads >= 1");
    SIZING(h * N * N, (2 * ws - 1) * (2 * ws - 1) * h);
    vlm_swin_rel_bias(A_F(0), A_F(1), ws, h);
    return VLM_OK;
}
static vlm_status op_swin_attention(op_call *c) {   /* att, qkv, bias, labels (i32); nwin, N, C, heads, masked; scale, mask */
    long nw = c->iv[0], N = c->iv[1], C = c->iv[2], H = c->iv[3];
    if (H < 1 || C % H || C / H > VLM_MAX_HEAD || N < 1) return vlm_fail(c->err, VLM_ERR_ARG, "swin_attention: bad sizes");
    if (c->sizing) {
        NEED(nw * N * C, nw * N * 3 * C, H * N * N, nw * N);
        c->scratch = (size_t)c->nth * vlm_swin_attention_scratch_floats((int)N, (int)(C / H));
        return VLM_OK;
    }
    vlm_swin_attention(c->pool, A_F(0), A_F(1), A_F(2), c->iv[4] ? A_I(3) : NULL, (float)c->fv[1], nw, N, C, H,
                       (float)c->fv[0], c->scr);
    return VLM_OK;
}
static vlm_status op_window_gather(op_call *c) {   /* out, x, w, b; H, W, C, ws, shift, wy, use_ln; eps */
    long H = c->iv[0], W = c->iv[1], C = c->iv[2], ws = c->iv[3], sh = c->iv[4], wy = c->iv[5];
    if (ws < 1 || sh < 0 || sh >= ws || wy < 0 || wy * ws >= H + ws - 1 || H < 1 || W < 1)
        return vlm_fail(c->err, VLM_ERR_ARG, "window_gather: bad sizes");
    long Wp = (W + ws - 1) / ws * ws;
    SIZING(ws * Wp * C, H * W * C, C, C);
    vlm_window_gather(c->pool, A_F(0), A_F(1), c->iv[6] ? A_F(2) : NULL, A_F(3), (float)c->fv[0], H, W, C, ws, sh, wy);
    return VLM_OK;
}
static vlm_status op_window_scatter_add(op_call *c) {   /* x, y; H, W, C, ws, shift, wy */
    long H = c->iv[0], W = c->iv[1], C = c->iv[2], ws = c->iv[3], sh = c->iv[4], wy = c->iv[5];
    if (ws < 1 || sh < 0 || sh >= ws || wy < 0 || wy * ws >= H + ws - 1 || H < 1 || W < 1)
        return vlm_fail(c->err, VLM_ERR_ARG, "window_scatter_add: bad sizes");
    long Wp = (W + ws - 1) / ws * ws;
    SIZING(H * W * C, ws * Wp * C);
    vlm_window_scatter_add(c->pool, A_F(0), A_F(1), H, W, C, ws, sh, wy);
    return VLM_OK;
}
static vlm_status op_patch_merge_gather(op_call *c) {   /* out, x; H, W, C, r0, nr */
    long H = c->iv[0], W = c->iv[1], C = c->iv[2], r0 = c->iv[3], nr = c->iv[4];
    if (H < 1 || W < 1 || r0 + nr > ((H + 1) / 2) * ((W + 1) / 2)) return vlm_fail(c->err, VLM_ERR_ARG, "patch_merge: bad sizes");
    SIZING(nr * 4 * C, H * W * C);
    vlm_patch_merge_gather(c->pool, A_F(0), A_F(1), H, W, C, r0, nr);
    return VLM_OK;
}

typedef struct {
    const char *name, *arrays;   /* dtype per array */
    int n_ints, n_floats;
    vlm_status (*fn)(op_call *);
} op_spec;

static const op_spec op_table[] = {
    {"gelu_erf", "f", 1, 0, op_gelu_erf},
    {"gelu_erf_poly", "f", 1, 0, op_gelu_erf_poly},
    {"silu_mul", "ff", 2, 0, op_silu_mul},
    {"rmsnorm", "fff", 2, 1, op_rmsnorm},
    {"layernorm", "ffff", 2, 1, op_layernorm},
    {"layernorm_grid", "fff", 4, 1, op_layernorm_grid},
    {"layernorm_row_f64", "ffff", 1, 1, op_layernorm_row_f64},
    {"rope_table", "ffif", 5, 0, op_rope_table},
    {"rope_apply", "fff", 4, 0, op_rope_apply},
    {"dwconv3x3_residual", "ffff", 3, 0, op_dwconv3x3_residual},
    {"im2col", "ff", 10, 0, op_im2col},
    {"conv2d", "ffff", 11, 0, op_conv2d},
    {"conv3x3_padded", "fff", 4, 0, op_conv3x3_padded},
    {"convt2x2_scatter", "ff", 4, 0, op_convt2x2_scatter},
    {"zero_border", "f", 3, 0, op_zero_border},
    {"maxpool2x2", "ff", 3, 0, op_maxpool2x2},
    {"attention", "ffff", 9, 1, op_attention},
    {"segment_attention", "ffi", 6, 1, op_segment_attention},
    {"window_attention", "fff", 5, 1, op_window_attention},
    {"channel_attention_scores", "ff", 3, 1, op_channel_attention_scores},
    {"channel_attention_softmax", "ff", 2, 0, op_channel_attention_softmax},
    {"channel_attention_apply", "fff", 3, 0, op_channel_attention_apply},
    {"roi_axis_weights", "di", 2, 3, op_roi_axis_weights},
    {"upsample_weights_t", "dd", 2, 0, op_upsample_weights_t},
    {"roi_pool", "fffi", 6, 0, op_roi_pool},
    {"relu", "f", 1, 0, op_relu},
    {"swin_rel_bias", "ff", 2, 0, op_swin_rel_bias},
    {"swin_attention", "fffi", 5, 2, op_swin_attention},
    {"window_gather", "ffff", 7, 1, op_window_gather},
    {"window_scatter_add", "ff", 6, 0, op_window_scatter_add},
    {"patch_merge_gather", "ff", 5, 0, op_patch_merge_gather},
};

static PyObject *py_op(PyObject *mod, PyObject *args, PyObject *kw) {
    const char *name;
    PyObject *arr_o, *ints_o = NULL, *floats_o = NULL;
    int n_threads = 1;
    static char *kwlist[] = {"name", "arrays", "ints", "floats", "n_threads", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO|OOi", kwlist, &name, &arr_o, &ints_o, &floats_o, &n_threads))
        return NULL;
    const op_spec *op = NULL;
    for (size_t i = 0; i < sizeof op_table / sizeof *op_table; i++)
        if (!strcmp(op_table[i].name, name)) op = &op_table[i];
    if (!op) return PyErr_Format(PyExc_ValueError, "unknown op '%s'", name);
    if (n_threads < 1 || n_threads > 256) { PyErr_SetString(PyExc_ValueError, "n_threads must be in [1, 256]"); return NULL; }
    op_call c = {.nth = n_threads};
    vlm_err err = {{0}};
    c.err = &err;
    PyObject *res = NULL, *seq[3] = {NULL, NULL, NULL};
    const int n_arr = (int)strlen(op->arrays);
    PyObject *objs[3] = {arr_o, ints_o, floats_o};
    const int want[3] = {n_arr, op->n_ints, op->n_floats};
    for (int s = 0; s < 3; s++) {
        if (!objs[s]) { if (want[s]) { PyErr_Format(PyExc_ValueError, "%s: missing arguments", name); goto done; } continue; }
        if (!(seq[s] = PySequence_Fast(objs[s], "arrays, ints and floats must be sequences"))) goto done;
        if (PySequence_Fast_GET_SIZE(seq[s]) != want[s]) {
            PyErr_Format(PyExc_ValueError, "%s takes %d arrays, %d ints and %d floats", name, n_arr, op->n_ints,
                         op->n_floats);
            goto done;
        }
    }
    for (int i = 0; i < op->n_ints; i++) {
        c.iv[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq[1], i));
        if (c.iv[i] == -1 && PyErr_Occurred()) goto done;
        if (c.iv[i] < 0 || c.iv[i] > (1L << 15)) { PyErr_Format(PyExc_ValueError, "%s: int %d out of [0, 2^15]", name, i); goto done; }
    }
    for (int i = 0; i < op->n_floats; i++) {
        c.fv[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq[2], i));
        if (PyErr_Occurred()) goto done;
    }
    c.sizing = 1;
    vlm_status st = op->fn(&c);
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    for (int i = 0; i < n_arr; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq[0], i);
        int type = op->arrays[i] == 'f' ? NPY_FLOAT32 : op->arrays[i] == 'i' ? NPY_INT32 : NPY_FLOAT64;
        PyArrayObject *a = (PyArrayObject *)o;
        if (!PyArray_Check(o) || PyArray_TYPE(a) != type || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a)) {
            PyErr_Format(PyExc_TypeError, "%s: array %d must be a writable C-contiguous %s array", name, i,
                         type == NPY_FLOAT32 ? "float32" : type == NPY_INT32 ? "int32" : "float64");
            goto done;
        }
        if ((size_t)PyArray_SIZE(a) < c.need[i]) {
            PyErr_Format(PyExc_ValueError, "%s: array %d has %zd elements, needs %zu", name, i, (Py_ssize_t)PyArray_SIZE(a),
                         c.need[i]);
            goto done;
        }
        c.a[i] = PyArray_DATA(a);
    }
    c.sizing = 0;
    Py_BEGIN_ALLOW_THREADS
    c.scr = c.scratch ? aligned_alloc(VLM_ALIGN, vlm_align_up(c.scratch * sizeof(float), VLM_ALIGN)) : NULL;
    c.pool = vlm_pool_create(n_threads);
    if ((c.scratch && !c.scr) || !c.pool) st = vlm_fail(&err, VLM_ERR_NOMEM, "cannot allocate op scratch or threads");
    else st = op->fn(&c);
    vlm_pool_free(c.pool);
    free(c.scr);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = Py_NewRef(Py_None);
done:
    for (int s = 0; s < 3; s++) Py_XDECREF(seq[s]);
    return res;
}

static PyObject *py_ops(PyObject *mod, PyObject *unused) {
    const size_t n = sizeof op_table / sizeof *op_table;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *v = Py_BuildValue("(sii)", op_table[i].arrays, op_table[i].n_ints, op_table[i].n_floats);
        if (!v || PyDict_SetItemString(d, op_table[i].name, v) < 0) { Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(v);
    }
    return d;
}

/* ---------------------------------------------------------------- deformable-DETR ops, arrays in and out
 *
 *   _core.msda(value, loc, aw, shapes, n_threads=1, out=None, workspace=None) -> out [Lq, M·D]
 *   _core.group_norm(x, w, b, groups, eps=1e-5, n_threads=1, out=None, workspace=None) -> y [HW, C] (out may be x)
 *   _core.sine_pos_embed_hw(H, W, num_pos_feats=128, temperature_h=20, temperature_w=20, n_threads=1,
 *                           workspace=None) -> [H·W, 2F]
 *   _core.sine_embed_boxes(boxes, num_pos_feats=128, temperature=10000, n_threads=1, workspace=None) -> [N, 4F]
 *
 * The ops of detr.c (see ops.h) on whole arrays, for tests and benchmarks at real sizes (the ints of _core.op
 * stop at 2^15). Inputs are converted to float32 (safe casts only); value may have rows further apart than
 * M·D floats (value[:, :M] of a wider array: the op's ld_v). The op runs on n_threads, GIL released, on the pool of
 * `workspace` (a _core.Workspace, kept between calls) or on one started for the call. */

/* `o` as an aligned array of `type` with `ndim` dimensions (C-contiguous unless `strided`), or NULL with an exception. */
static PyArrayObject *detr_array(PyObject *o, const char *name, int type, int ndim, int strided) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(o, type, strided ? NPY_ARRAY_ALIGNED : NPY_ARRAY_IN_ARRAY);
    if (a && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D array, got %d-D", name, ndim, PyArray_NDIM(a));
        Py_CLEAR(a);
    }
    return a;
}

/* The output array: `out_o` when not None (a writable C-contiguous float32 array of shape d, reused: benchmarks time
 * no page faults; it may be an input when the op allows that), else a new one; NULL with an exception. */
static PyArrayObject *detr_out(PyObject *out_o, const npy_intp d[2], const char *shape) {
    if (out_o == Py_None) return (PyArrayObject *)PyArray_SimpleNew(2, (npy_intp *)d, NPY_FLOAT32);
    PyArrayObject *o = (PyArrayObject *)out_o;
    if (!PyArray_Check(out_o) || PyArray_TYPE(o) != NPY_FLOAT32 || PyArray_NDIM(o) != 2 || PyArray_DIM(o, 0) != d[0] ||
        PyArray_DIM(o, 1) != d[1] || !PyArray_IS_C_CONTIGUOUS(o) || !PyArray_ISWRITEABLE(o)) {
        PyErr_Format(PyExc_ValueError, "out must be a writable C-contiguous float32 array of shape %s", shape);
        return NULL;
    }
    return (PyArrayObject *)Py_NewRef(out_o);
}

static PyObject *py_msda(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *v_o, *l_o, *a_o, *s_o, *out_o = Py_None, *ws_o = Py_None;
    int n_threads = 1;
    static char *kwlist[] = {"value", "loc", "aw", "shapes", "n_threads", "out", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|iOO:msda", kwlist, &v_o, &l_o, &a_o, &s_o, &n_threads, &out_o,
                                     &ws_o))
        return NULL;
    if (check_threads(n_threads)) return NULL;
    PyArrayObject *val = NULL, *loc = NULL, *aw = NULL, *shp = NULL, *out = NULL;
    PyObject *res = NULL;
    if (!(val = detr_array(v_o, "value", NPY_FLOAT32, 3, 1)) || !(loc = detr_array(l_o, "loc", NPY_FLOAT32, 5, 0)) ||
        !(aw = detr_array(a_o, "aw", NPY_FLOAT32, 4, 0)) || !(shp = detr_array(s_o, "shapes", NPY_INT64, 2, 0)))
        goto done;
    const npy_intp S = PyArray_DIM(val, 0), M = PyArray_DIM(val, 1), D = PyArray_DIM(val, 2);
    const npy_intp *ld = PyArray_DIMS(loc), *ad = PyArray_DIMS(aw);
    const npy_intp Lq = ld[0], L = PyArray_DIM(shp, 0), P = ld[3];
    if (PyArray_DIM(shp, 1) != 2 || L < 1 || L > VLM_MSDA_MAX_LEVELS) {
        PyErr_Format(PyExc_ValueError, "shapes: expected [L, 2] (H, W) rows, 1 <= L <= %d", VLM_MSDA_MAX_LEVELS);
        goto done;
    }
    if (ld[1] != M || ld[2] != L || ld[4] != 2 || ad[0] != Lq || ad[1] != M || ad[2] != L || ad[3] != P) {
        PyErr_Format(PyExc_ValueError, "msda: value [S, M, D] = [%zd, %zd, %zd] with %zd levels needs loc [Lq, %zd, %zd, "
                     "P, 2] and aw [Lq, %zd, %zd, P]", (Py_ssize_t)S, (Py_ssize_t)M, (Py_ssize_t)D, (Py_ssize_t)L,
                     (Py_ssize_t)M, (Py_ssize_t)L, (Py_ssize_t)M, (Py_ssize_t)L);
        goto done;
    }
    if (M > VLM_MSDA_MAX_HEADS || D > VLM_MAX_HEAD || P > VLM_MSDA_MAX_POINTS) {
        PyErr_Format(PyExc_ValueError, "msda: at most %d heads, %d channels per head and %d points", VLM_MSDA_MAX_HEADS,
                     VLM_MAX_HEAD, VLM_MSDA_MAX_POINTS);
        goto done;
    }
    /* value rows may be further apart than M·D floats; anything else is copied to a contiguous array */
    const npy_intp *vs = PyArray_STRIDES(val);
    if (S > 0 && M * D > 0 && (vs[2] != 4 || vs[1] != 4 * D || vs[0] % 4 || vs[0] < 4 * M * D)) {
        PyArrayObject *c = (PyArrayObject *)PyArray_NewCopy(val, NPY_CORDER);
        if (!c) goto done;
        Py_SETREF(val, c);
    }
    const size_t ld_v = S > 0 && M * D > 0 ? (size_t)PyArray_STRIDE(val, 0) / 4 : (size_t)(M * D);
    int H[VLM_MSDA_MAX_LEVELS], W[VLM_MSDA_MAX_LEVELS];
    long start[VLM_MSDA_MAX_LEVELS], tok = 0;
    const int64_t *sv = PyArray_DATA(shp);
    for (int l = 0; l < L; l++) {
        if (sv[2 * l] < 1 || sv[2 * l + 1] < 1 || sv[2 * l] > VLM_MSDA_MAX_SIDE || sv[2 * l + 1] > VLM_MSDA_MAX_SIDE) {
            PyErr_Format(PyExc_ValueError, "shapes: level %d is %lld x %lld (sides must be in [1, %d])", l,
                         (long long)sv[2 * l], (long long)sv[2 * l + 1], VLM_MSDA_MAX_SIDE);
            goto done;
        }
        H[l] = (int)sv[2 * l];
        W[l] = (int)sv[2 * l + 1];
        start[l] = tok;
        tok += (long)H[l] * W[l];
    }
    const npy_intp od[2] = {Lq, M * D};
    if (!(out = detr_out(out_o, od, "[Lq, M*D]"))) goto done;
    vlm_err err = {{0}};
    vlm_status st;
    ws_lease wl;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, 0, &pool, &scratch, &err);
    if (st == VLM_OK)
        st = vlm_msda(pool, PyArray_DATA(out), PyArray_DATA(val), ld_v, PyArray_DATA(loc), PyArray_DATA(aw), H, W, start,
                      (long)S, (int)L, (int)M, (int)D, (int)P, (long)Lq, &err);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(val);
    Py_XDECREF(loc);
    Py_XDECREF(aw);
    Py_XDECREF(shp);
    Py_XDECREF(out);
    return res;
}

static PyObject *py_group_norm(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *x_o, *w_o, *b_o, *out_o = Py_None, *ws_o = Py_None;
    int groups, n_threads = 1;
    double eps = 1e-5;
    static char *kwlist[] = {"x", "w", "b", "groups", "eps", "n_threads", "out", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOi|diOO:group_norm", kwlist, &x_o, &w_o, &b_o, &groups, &eps,
                                     &n_threads, &out_o, &ws_o))
        return NULL;
    if (check_threads(n_threads)) return NULL;
    PyArrayObject *x = NULL, *w = NULL, *b = NULL, *y = NULL;
    PyObject *res = NULL;
    if (!(x = detr_array(x_o, "x", NPY_FLOAT32, 2, 0)) || !(w = detr_array(w_o, "w", NPY_FLOAT32, 1, 0)) ||
        !(b = detr_array(b_o, "b", NPY_FLOAT32, 1, 0)))
        goto done;
    const npy_intp HW = PyArray_DIM(x, 0), C = PyArray_DIM(x, 1);
    if (groups < 1 || C < 1 || C > INT_MAX || C % groups) {
        PyErr_Format(PyExc_ValueError, "group_norm: %zd channels do not split into %d groups", (Py_ssize_t)C, groups);
        goto done;
    }
    if (PyArray_DIM(w, 0) != C || PyArray_DIM(b, 0) != C) {
        PyErr_Format(PyExc_ValueError, "group_norm: w and b need %zd values", (Py_ssize_t)C);
        goto done;
    }
    if (!(eps >= 0 && eps < 1e30)) { PyErr_SetString(PyExc_ValueError, "group_norm: eps must be finite and >= 0"); goto done; }
    if (!(y = detr_out(out_o, PyArray_DIMS(x), "[HW, C] (x itself: in place)"))) goto done;
    vlm_err err = {{0}};
    vlm_status st;
    ws_lease wl;
    if (lease_begin(&wl, ws_o)) goto done;
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, sizeof(float) * vlm_group_norm_scratch_floats((long)HW, (int)C), &pool,
                           &scratch, &err);
    if (st == VLM_OK)
        vlm_group_norm(pool, PyArray_DATA(y), PyArray_DATA(x), PyArray_DATA(w), PyArray_DATA(b), (float)eps, scratch,
                       (long)HW, (int)C, groups);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { raise_status(st, &err); goto done; }
    res = (PyObject *)y;
    y = NULL;
done:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return res;
}

/* Checks num_pos_feats and a temperature shared by the two sine embeddings. */
static int sine_args(int F, double t1, double t2) {
    if (F < 2 || F % 2 || F > VLM_SINE_MAX_FEATS) {
        PyErr_Format(PyExc_ValueError, "num_pos_feats must be even and in [2, %d]", VLM_SINE_MAX_FEATS);
        return -1;
    }
    if (!(t1 > 0 && t1 < 1e30 && t2 > 0 && t2 < 1e30)) {
        PyErr_SetString(PyExc_ValueError, "temperatures must be finite and > 0");
        return -1;
    }
    return 0;
}

static PyObject *py_sine_pos_embed_hw(PyObject *mod, PyObject *args, PyObject *kw) {
    long H, W;
    int F = 128, n_threads = 1;
    double th = 20, tw = 20;
    PyObject *ws_o = Py_None;
    static char *kwlist[] = {"H", "W", "num_pos_feats", "temperature_h", "temperature_w", "n_threads", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ll|iddiO:sine_pos_embed_hw", kwlist, &H, &W, &F, &th, &tw, &n_threads,
                                     &ws_o))
        return NULL;
    if (check_threads(n_threads) || sine_args(F, th, tw)) return NULL;
    if (H < 1 || W < 1 || H > VLM_MSDA_MAX_SIDE || W > VLM_MSDA_MAX_SIDE)
        return PyErr_Format(PyExc_ValueError, "sine_pos_embed_hw: H and W must be in [1, %d]", VLM_MSDA_MAX_SIDE);
    npy_intp d[2] = {(npy_intp)H * W, 2 * F};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, d, NPY_FLOAT32);
    if (!out) return NULL;
    vlm_err err = {{0}};
    vlm_status st;
    ws_lease wl;
    if (lease_begin(&wl, ws_o)) { Py_DECREF(out); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, 0, &pool, &scratch, &err);
    if (st == VLM_OK) vlm_sine_pos_embed_hw(pool, PyArray_DATA(out), (float)th, (float)tw, (int)H, (int)W, F);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    if (st != VLM_OK) { Py_DECREF(out); return raise_status(st, &err); }
    return (PyObject *)out;
}

static PyObject *py_sine_embed_boxes(PyObject *mod, PyObject *args, PyObject *kw) {
    PyObject *b_o, *ws_o = Py_None;
    int F = 128, n_threads = 1;
    double T = 10000;
    static char *kwlist[] = {"boxes", "num_pos_feats", "temperature", "n_threads", "workspace", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|idiO:sine_embed_boxes", kwlist, &b_o, &F, &T, &n_threads, &ws_o))
        return NULL;
    if (check_threads(n_threads) || sine_args(F, T, T)) return NULL;
    PyArrayObject *box = detr_array(b_o, "boxes", NPY_FLOAT32, 2, 0);
    if (!box) return NULL;
    if (PyArray_DIM(box, 1) != 4) {
        Py_DECREF(box);
        return PyErr_Format(PyExc_ValueError, "boxes: expected [N, 4] (cx, cy, w, h)");
    }
    npy_intp d[2] = {PyArray_DIM(box, 0), 4 * F};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, d, NPY_FLOAT32);
    if (!out) { Py_DECREF(box); return NULL; }
    vlm_err err = {{0}};
    vlm_status st;
    ws_lease wl;
    if (lease_begin(&wl, ws_o)) { Py_DECREF(out); Py_DECREF(box); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    vlm_pool *pool;
    void *scratch;
    st = vlm_workspace_get(wl.ws, n_threads, 0, &pool, &scratch, &err);
    if (st == VLM_OK) vlm_sine_embed_boxes(pool, PyArray_DATA(out), PyArray_DATA(box), (float)T, (long)d[0], F);
    lease_end(&wl);
    Py_END_ALLOW_THREADS
    Py_DECREF(box);
    if (st != VLM_OK) { Py_DECREF(out); return raise_status(st, &err); }
    return (PyObject *)out;
}

#define PY_DETR_METHODS                                                                                                \
    {"msda", (PyCFunction)(void (*)(void))py_msda, METH_VARARGS | METH_KEYWORDS,                                       \
     "msda(value [S, M, D], loc [Lq, M, L, P, 2], aw [Lq, M, L, P], shapes [L, 2], n_threads=1, out=None, "            \
     "workspace=None) -> [Lq, M*D]: multi-scale deformable attention sampling (see csrc/ops.h)"},                      \
    {"group_norm", (PyCFunction)(void (*)(void))py_group_norm, METH_VARARGS | METH_KEYWORDS,                           \
     "group_norm(x [HW, C], w [C], b [C], groups, eps=1e-5, n_threads=1, out=None, workspace=None) -> GroupNorm "    \
     "of a channels-last map (out=x: in place)"},                                                                                             \
    {"sine_pos_embed_hw", (PyCFunction)(void (*)(void))py_sine_pos_embed_hw, METH_VARARGS | METH_KEYWORDS,             \
     "sine_pos_embed_hw(H, W, num_pos_feats=128, temperature_h=20, temperature_w=20, n_threads=1, "                    \
     "workspace=None) -> [H*W, 2F]"},                                                                                  \
    {"sine_embed_boxes", (PyCFunction)(void (*)(void))py_sine_embed_boxes, METH_VARARGS | METH_KEYWORDS,               \
     "sine_embed_boxes(boxes [N, 4], num_pos_feats=128, temperature=10000, n_threads=1, workspace=None) -> "           \
     "[N, 4F] (y, x, w, h)"},
