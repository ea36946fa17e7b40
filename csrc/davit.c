/* davit.c — forward pass of DaViT, VLM-FO1's auxiliary vision encoder (see davit.h).
 *
 * Layout: channels-last token matrices [H*W][C] (raster order), the residual stream of stage s living
 * in the caller's output map out[s]. Per stage: ConvEmbed (im2col in row chunks + vlm_matmul, with its
 * LayerNorm before or after), then the block pairs. Depthwise convs are residual and run out of place
 * (x -> t -> x), so after every block half the stream is back in out[s].
 * Memory is bounded by working in row chunks: window attention one band of `window` image rows at a
 * time (LN, qkv, attention, proj added to the stream), the MLP in chunks of rows (LN, fc1, GELU, fc2
 * added), channel attention in two chunked passes (q/k -> the [d][d] group matrices over all tokens;
 * then v, A applied, proj added). Chunk sizes depend on the image size only, never on the thread
 * count, and every output element is computed by one thread in a fixed order, so results are the same
 * for any pool size. All scratch comes from one caller-provided block. */
#include "davit.h"
#include "arena.h"
#include "ops.h"
#include "cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


#define DV_CHUNK_FLOATS (1L << 22)   /* target size of the per-chunk MLP / im2col buffers (16 MB) */
#define DV_MAX_HEAD VLM_MAX_HEAD     /* head / group size limit (attention ops) */
#define DV_MAX_WINDOW VLM_MAX_HEAD   /* query rows per window-attention call (attention ops) */

/* ---------------------------------------------------------------- sizes */

static int conv_out(int n, int k, int s, int p) { return n + 2 * p < k ? 0 : (n + 2 * p - k) / s + 1; }

static long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Rows per chunk of the MLP / channel-attention passes and of the patch-embedding im2col. */
static long chunk_rows(const vlm_davit_config *c, int s, long N) {
    long wide = c->mlp_hidden[s] > 3 * c->dim[s] ? c->mlp_hidden[s] : 3 * c->dim[s];
    return clampl(DV_CHUNK_FLOATS / wide, 256, N);
}
static long conv_rows(const vlm_davit_config *c, int s, long N) {
    long K = (long)(s ? c->dim[s - 1] : c->in_chans) * c->kernel[s] * c->kernel[s];
    return clampl(DV_CHUNK_FLOATS / K, 64, N);
}

vlm_status vlm_davit_stage_sizes(const vlm_davit *m, int H, int W, int hs[VLM_DAVIT_STAGES], int ws[VLM_DAVIT_STAGES],
                                 vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    int h = H, w = W;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        h = conv_out(h, c->kernel[s], c->stride[s], c->pad[s]);
        w = conv_out(w, c->kernel[s], c->stride[s], c->pad[s]);
        if (h <= 0 || w <= 0)
            return vlm_fail(err, VLM_ERR_ARG, "image %dx%d (HxW) is too small: stage %d would be empty", H, W, s);
        hs[s] = h;
        ws[s] = w;
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- validation */

static vlm_status check_half(const vlm_davit_half *h, int C, int I, const char *kind, int s, int j, vlm_err *err) {
    if (!h->dw1 || !h->dw1_b || !h->dw2 || !h->dw2_b || !h->ln1 || !h->ln1_b || !h->ln2 || !h->ln2_b)
        return vlm_fail(err, VLM_ERR_KEY, "davit stage %d block %d: missing %s conv or norm tensors", s, j, kind);
    VLM_TRY(vlm_check_weight(&h->qkv, 3 * C, C, 1, err, "davit stage %d block %d: %s qkv", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->proj, C, C, 1, err, "davit stage %d block %d: %s proj", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->fc1, I, C, 1, err, "davit stage %d block %d: %s fc1", s, j, kind));
    VLM_TRY(vlm_check_weight(&h->fc2, C, I, 1, err, "davit stage %d block %d: %s fc2", s, j, kind));
    return VLM_OK;
}

vlm_status vlm_davit_validate(const vlm_davit *m, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    if (c->in_chans <= 0 || c->window <= 0 || c->window > DV_MAX_WINDOW || !(c->eps >= 0.0f))
        return vlm_fail(err, VLM_ERR_ARG, "davit: invalid in_chans, window (1..%d) or eps", DV_MAX_WINDOW);
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        int C = c->dim[s], Cin = s ? c->dim[s - 1] : c->in_chans;
        if (C <= 0 || c->depth[s] < 0 || c->depth[s] > VLM_DAVIT_MAX_DEPTH || c->heads[s] <= 0 || c->groups[s] <= 0 ||
            c->mlp_hidden[s] <= 0 || c->kernel[s] <= 0 || c->stride[s] <= 0 || c->pad[s] < 0)
            return vlm_fail(err, VLM_ERR_ARG, "davit stage %d: invalid configuration", s);
        if (C % c->heads[s] || C / c->heads[s] > DV_MAX_HEAD || C % c->groups[s] || C / c->groups[s] > DV_MAX_HEAD)
            return vlm_fail(err, VLM_ERR_ARG, "davit stage %d: dim %d must split into heads/groups of <= %d channels", s, C,
                            DV_MAX_HEAD);
        if (s == 0 && c->prenorm[0])
            return vlm_fail(err, VLM_ERR_ARG, "davit: a LayerNorm before the first patch embedding is not supported "
                                              "(the reference never applies it to an image)");
        VLM_TRY(vlm_check_weight(&m->conv[s], C, Cin * c->kernel[s] * c->kernel[s], 1, err, "davit: convs.%d", s));
        if (!m->norm[s] || !m->norm_b[s]) return vlm_fail(err, VLM_ERR_KEY, "davit: missing convs.%d norm", s);
        if (c->depth[s] && !m->blocks[s]) return vlm_fail(err, VLM_ERR_KEY, "davit: missing blocks of stage %d", s);
        for (int j = 0; j < c->depth[s]; j++) {
            VLM_TRY(check_half(&m->blocks[s][j].spatial, C, c->mlp_hidden[s], "spatial", s, j, err));
            VLM_TRY(check_half(&m->blocks[s][j].channel, C, c->mlp_hidden[s], "channel", s, j, err));
        }
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- binding */

static vlm_status bind_half(vlm_davit_half *h, const vlm_tensor_table *t, int s, int j, const char *kind, int C, int I,
                            vlm_err *err) {
    const struct { const char *name; const float **w; int64_t n; } vec[] = {
        {"dw1", &h->dw1, 9 * (int64_t)C}, {"dw1_bias", &h->dw1_b, C}, {"dw2", &h->dw2, 9 * (int64_t)C},
        {"dw2_bias", &h->dw2_b, C}, {"ln1", &h->ln1, C}, {"ln1_bias", &h->ln1_b, C}, {"ln2", &h->ln2, C},
        {"ln2_bias", &h->ln2_b, C}};
    for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++)
        VLM_TRY(vlm_tensor_vec(t, vec[i].w, vec[i].n, err, "blocks.%d.%d.%s.%s", s, j, kind, vec[i].name));
    const struct { const char *name; vlm_weight *w; int64_t n; } lin[] = {
        {"qkv", &h->qkv, 3 * (int64_t)C}, {"proj", &h->proj, C}, {"fc1", &h->fc1, I}, {"fc2", &h->fc2, C}};
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
        VLM_TRY(vlm_tensor_weight(t, lin[i].w, lin[i].n, err, "blocks.%d.%d.%s.%s", s, j, kind, lin[i].name));
    return VLM_OK;
}

static vlm_status bind_all(vlm_davit *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        int C = c->dim[s], Cin = s ? c->dim[s - 1] : c->in_chans, nd = c->prenorm[s] ? Cin : C;
        VLM_TRY(vlm_tensor_weight(t, &m->conv[s], C, err, "conv%d", s));
        VLM_TRY(vlm_tensor_vec(t, &m->norm[s], nd, err, "norm%d", s));
        VLM_TRY(vlm_tensor_vec(t, &m->norm_b[s], nd, err, "norm%d_bias", s));
        for (int j = 0; j < c->depth[s]; j++) {
            VLM_TRY(bind_half(&m->blocks[s][j].spatial, t, s, j, "spatial", C, c->mlp_hidden[s], err));
            VLM_TRY(bind_half(&m->blocks[s][j].channel, t, s, j, "channel", C, c->mlp_hidden[s], err));
        }
    }
    return vlm_davit_validate(m, err);
}

vlm_status vlm_davit_bind(vlm_davit *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    vlm_davit_unbind(m);
    size_t total = 0;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        if (c->depth[s] < 0 || c->depth[s] > VLM_DAVIT_MAX_DEPTH)
            return vlm_fail(err, VLM_ERR_ARG, "davit stage %d: depth must be in [0, %d]", s, VLM_DAVIT_MAX_DEPTH);
        total += (size_t)c->depth[s];
    }
    vlm_davit_block *mem = calloc(total ? total : 1, sizeof *mem);
    if (!mem) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    for (int s = 0, off = 0; s < VLM_DAVIT_STAGES; off += c->depth[s], s++) m->blocks[s] = mem + off;
    vlm_status st = bind_all(m, t, err);
    if (st != VLM_OK) vlm_davit_unbind(m);
    return st;
}

void vlm_davit_unbind(vlm_davit *m) {
    if (!m) return;
    free(m->blocks[0]);
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) m->blocks[s] = NULL;
}

/* ---------------------------------------------------------------- scratch layout */

typedef struct {
    float *t;        /* [max N*C]  the stream after a depthwise conv; ConvEmbed pre-norm output */
    float *col;      /* [conv chunk][K] im2col rows */
    float *xn;       /* [chunk][C]  LayerNorm output */
    float *qkv;      /* [band][3C] / [chunk][2C] / [chunk][C] */
    float *att;      /* [chunk][C]  attention output before proj */
    float *h;        /* [chunk][hidden] MLP hidden */
    float *A, *At;   /* [G][d][d] channel-attention matrices, accumulated and transposed */
    float *thr;      /* n_threads x the largest per-thread scratch of the attention ops */
    void *mm; size_t mm_size;
} dv_scratch;

/* Lays the scratch block out (a sizing pass when base is NULL); returns its bytes. */
static size_t carve(dv_scratch *S, const vlm_davit *m, const int hs[], const int ws[], int nth, char *base) {
    const vlm_davit_config *c = &m->cfg;
    size_t t = 0, col = 0, xn = 0, qkv = 0, att = 0, h = 0, A = 0, per = 0, mm = 0;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        size_t C = c->dim[s], N = (size_t)hs[s] * ws[s], I = c->mlp_hidden[s];
        size_t band = (size_t)(c->window < hs[s] ? c->window : hs[s]) * ws[s];
        size_t ch = (size_t)chunk_rows(c, s, (long)N), cr = (size_t)conv_rows(c, s, (long)N);
        size_t rows = band > ch ? band : ch;
        size_t K = (size_t)m->conv[s].k, D = C / c->heads[s], d = C / c->groups[s];
#define UP(v, x) do { size_t _x = (x); if (_x > (v)) (v) = _x; } while (0)
        UP(t, N * C);
        UP(col, cr * K);
        UP(xn, rows * C);
        UP(qkv, band * 3 * C > ch * 2 * C ? band * 3 * C : ch * 2 * C);
        UP(att, rows * C);
        UP(h, ch * I);
        UP(A, C * d);
        UP(per, vlm_window_attention_scratch_floats(c->window, (int)D));
        UP(per, vlm_channel_attention_scratch_floats((int)d));
#undef UP
        mm = vlm_matmul_scratch_max(mm, (int64_t)cr, &m->conv[s], c->compute, nth);
        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_davit_half *hv[2] = {&m->blocks[s][j].spatial, &m->blocks[s][j].channel};
            for (int k = 0; k < 2; k++) {
                mm = vlm_matmul_scratch_max(mm, (int64_t)rows, &hv[k]->qkv, c->compute, nth);  /* bounds the q/k and v views */
                mm = vlm_matmul_scratch_max(mm, (int64_t)rows, &hv[k]->proj, c->compute, nth);
                mm = vlm_matmul_scratch_max(mm, (int64_t)ch, &hv[k]->fc1, c->compute, nth);
                mm = vlm_matmul_scratch_max(mm, (int64_t)ch, &hv[k]->fc2, c->compute, nth);
            }
        }
    }
    per = vlm_align_up(per, 16);
    vlm_arena a = {base, 0};
    VLM_ARENA_TAKE(&a, S->t, t);
    VLM_ARENA_TAKE(&a, S->col, col);
    VLM_ARENA_TAKE(&a, S->xn, xn);
    VLM_ARENA_TAKE(&a, S->qkv, qkv);
    VLM_ARENA_TAKE(&a, S->att, att);
    VLM_ARENA_TAKE(&a, S->h, h);
    VLM_ARENA_TAKE(&a, S->A, A);
    VLM_ARENA_TAKE(&a, S->At, A);
    VLM_ARENA_TAKE(&a, S->thr, (size_t)nth * per);
    S->mm = vlm_arena_take(&a, mm);
    S->mm_size = mm;
    return a.off;
}

size_t vlm_davit_scratch_size(const vlm_davit *m, int H, int W, int n_threads) {
    int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
    if (vlm_davit_stage_sizes(m, H, W, hs, ws, NULL) != VLM_OK) return 0;
    dv_scratch S;
    return carve(&S, m, hs, ws, n_threads < 1 ? 1 : n_threads, NULL);
}

/* ---------------------------------------------------------------- the forward pass */

typedef struct {
    const vlm_davit *m;
    vlm_pool *pool;
    dv_scratch S;
    vlm_mm_ctx mm;
} dv_run;

/* x += proj(WindowAttention(LN(x))), one band of `window` image rows at a time. */
static vlm_status window_attention(dv_run *r, int s, float *x, const vlm_davit_half *B, int H, int W) {
    const vlm_davit_config *c = &r->m->cfg;
    const int C = c->dim[s], win = c->window;
    const float scale = 1.0f / sqrtf((float)(C / c->heads[s]));
    for (int y0 = 0; y0 < H; y0 += win) {
        int rows = H - y0 < win ? H - y0 : win;
        long nb = (long)rows * W;
        float *xb = x + (size_t)y0 * W * C;
        vlm_layernorm(r->pool, r->S.xn, xb, B->ln1, B->ln1_b, c->eps, nb, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 3 * C, r->S.xn, C, nb, &B->qkv, 0));
        vlm_window_attention(r->pool, r->S.att, r->S.qkv, B->qkv.bias, rows, W, C, c->heads[s], win, scale, r->S.thr);
        VLM_TRY(vlm_mm(&r->mm, xb, C, r->S.att, C, nb, &B->proj, 1));
    }
    return VLM_OK;
}

/* x += proj(ChannelAttention(LN(x))): pass 1 accumulates the group matrices from q and k over all
 * tokens; pass 2 computes v, applies the softmaxed matrices and adds the projection. */
static vlm_status channel_attention(dv_run *r, int s, float *x, const vlm_davit_half *B, long N) {
    const vlm_davit_config *c = &r->m->cfg;
    const int C = c->dim[s], G = c->groups[s], d = C / G;
    const long step = chunk_rows(c, s, N);
    const float scale = (float)(1.0 / sqrt((double)N));  /* q * N^-0.5, N = tokens */
    /* views of the qkv weight: q and k rows, v rows */
    vlm_weight wqk = vlm_weight_rows(&B->qkv, 0, 2 * C), wv = vlm_weight_rows(&B->qkv, 2 * C, C);
    memset(r->S.A, 0, (size_t)C * d * sizeof(float));
    for (long t0 = 0; t0 < N; t0 += step) {
        long nr = N - t0 < step ? N - t0 : step;
        vlm_layernorm(r->pool, r->S.xn, x + (size_t)t0 * C, B->ln1, B->ln1_b, c->eps, nr, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 2 * C, r->S.xn, C, nr, &wqk, 0));
        vlm_channel_attention_scores(r->pool, r->S.A, r->S.qkv, scale, r->S.thr, nr, C, G);
    }
    vlm_channel_attention_softmax(r->pool, r->S.At, r->S.A, G, d);
    for (long t0 = 0; t0 < N; t0 += step) {
        long nr = N - t0 < step ? N - t0 : step;
        float *xb = x + (size_t)t0 * C;
        vlm_layernorm(r->pool, r->S.xn, xb, B->ln1, B->ln1_b, c->eps, nr, C);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, C, r->S.xn, C, nr, &wv, 0));
        vlm_channel_attention_apply(r->pool, r->S.att, r->S.qkv, r->S.At, nr, C, G);
        VLM_TRY(vlm_mm(&r->mm, xb, C, r->S.att, C, nr, &B->proj, 1));
    }
    return VLM_OK;
}

/* x += fc2(GELU(fc1(LN(x)))), in chunks of rows. */
static vlm_status mlp(dv_run *r, int s, float *x, const vlm_davit_half *B, long N) {
    const vlm_davit_config *c = &r->m->cfg;
    return vlm_ln_mlp_residual(&r->mm, x, N, c->dim[s], B->ln2, B->ln2_b, c->eps, &B->fc1, &B->fc2,
                               chunk_rows(c, s, N), r->S.xn, r->S.h);
}

vlm_status vlm_davit_forward(const vlm_davit *m, vlm_pool *pool, const float *pixels, int H, int W,
                             float *out[VLM_DAVIT_STAGES], void *scratch, size_t scratch_size, vlm_err *err) {
    const vlm_davit_config *c = &m->cfg;
    int hs[VLM_DAVIT_STAGES], ws[VLM_DAVIT_STAGES];
    if (!pixels || !out) return vlm_fail(err, VLM_ERR_ARG, "davit: NULL pixels or outputs");
    VLM_TRY(vlm_davit_stage_sizes(m, H, W, hs, ws, err));
    dv_run run = {.m = m, .pool = pool}, *r = &run;
    size_t need = carve(&r->S, m, hs, ws, vlm_pool_size(pool), NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "davit scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&r->S, m, hs, ws, vlm_pool_size(pool), scratch);
    r->mm = (vlm_mm_ctx){pool, c->compute, r->S.mm, r->S.mm_size, err};

    const float *in = pixels;  /* stage input: the image [Ci][H][W], then the previous map [H][W][C] */
    int Hi = H, Wi = W, Ci = c->in_chans, chan_last = 0;
    for (int s = 0; s < VLM_DAVIT_STAGES; s++) {
        const int C = c->dim[s], Ho = hs[s], Wo = ws[s];
        const long N = (long)Ho * Wo;
        float *x = out[s];
        float *t = r->S.t;
        if (!x) return vlm_fail(err, VLM_ERR_ARG, "davit: NULL output of stage %d", s);

        /* ConvEmbed: [LN ->] conv [-> LN], im2col in chunks of output pixels */
        const long crows = conv_rows(c, s, N);
        const int k = c->kernel[s], st = c->stride[s], pd = c->pad[s];
        if (c->prenorm[s]) {
            vlm_layernorm(pool, t, in, m->norm[s], m->norm_b[s], c->eps, (long)Hi * Wi, Ci);
            VLM_TRY(vlm_conv2d(&r->mm, x, t, &m->conv[s], r->S.col, crows, chan_last, Hi, Wi, Ci, k, st, pd, Ho, Wo));
        } else {
            VLM_TRY(vlm_conv2d(&r->mm, x, in, &m->conv[s], r->S.col, crows, chan_last, Hi, Wi, Ci, k, st, pd, Ho, Wo));
            vlm_layernorm(pool, x, x, m->norm[s], m->norm_b[s], c->eps, N, C);
        }

        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_davit_half *sp = &m->blocks[s][j].spatial, *ch = &m->blocks[s][j].channel;
            /* spatial block */
            vlm_dwconv3x3_residual(pool, t, x, sp->dw1, sp->dw1_b, Ho, Wo, C);
            VLM_TRY(window_attention(r, s, t, sp, Ho, Wo));
            vlm_dwconv3x3_residual(pool, x, t, sp->dw2, sp->dw2_b, Ho, Wo, C);
            VLM_TRY(mlp(r, s, x, sp, N));
            /* channel block */
            vlm_dwconv3x3_residual(pool, t, x, ch->dw1, ch->dw1_b, Ho, Wo, C);
            VLM_TRY(channel_attention(r, s, t, ch, N));
            vlm_dwconv3x3_residual(pool, x, t, ch->dw2, ch->dw2_b, Ho, Wo, C);
            VLM_TRY(mlp(r, s, x, ch, N));
        }
        in = x;
        Hi = Ho;
        Wi = Wo;
        Ci = C;
        chan_last = 1;
    }
    return VLM_OK;
}
