/* swin.c — forward pass of the Swin Transformer backbone of UPN (see swin.h).
 *
 * Layout: channels-last token matrices [H*W][C] (raster order); stage s's residual stream lives in the
 * caller's output map out[s], which gets its output LayerNorm in place once the next stage's input has been
 * merged out of it. Window attention runs one band (one row of windows of the rolled, padded map) at a time:
 * gather with LayerNorm into window order, qkv, attention, proj, scatter-add back. The MLP and the patch
 * merging run in chunks of rows. Chunk sizes depend on the image size only, never on the thread count, and
 * every output element is computed by one thread in a fixed order, so results are the same for any pool
 * size. All scratch comes from one caller-provided block. */
#include "swin.h"
#include "arena.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SW_CHUNK_FLOATS (1L << 22)   /* target size of the per-chunk MLP / merge / im2col buffers (16 MB) */
#define SW_MASK -100.0f              /* the reference's shifted-window mask value */

/* ---------------------------------------------------------------- sizes */

static long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }
static int dim(const vlm_swin_config *c, int s) { return c->embed << s; }
static int padded(int n, int ws) { return (n + ws - 1) / ws * ws; }

static long mlp_rows(const vlm_swin_config *c, int s, long N) {
    return clampl(SW_CHUNK_FLOATS / c->mlp_hidden[s], 256, N);
}
static long merge_rows(const vlm_swin_config *c, int s, long N) { return clampl(SW_CHUNK_FLOATS / (4L * dim(c, s)), 64, N); }
static long patch_rows(const vlm_swin_config *c, long N) {
    return clampl(SW_CHUNK_FLOATS / ((long)c->in_chans * c->patch * c->patch), 64, N);
}

vlm_status vlm_swin_stage_sizes(const vlm_swin *m, int H, int W, int hs[VLM_SWIN_STAGES], int ws[VLM_SWIN_STAGES],
                                vlm_err *err) {
    const vlm_swin_config *c = &m->cfg;
    if (H <= 0 || W <= 0 || H > (1 << 15) || W > (1 << 15))
        return vlm_fail(err, VLM_ERR_ARG, "swin: image %dx%d (HxW) must have sides in [1, 32768]", H, W);
    int h = (H + c->patch - 1) / c->patch, w = (W + c->patch - 1) / c->patch;
    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        hs[s] = h;
        ws[s] = w;
        h = (h + 1) / 2;
        w = (w + 1) / 2;
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- validation and binding */

static vlm_status validate(const vlm_swin *m, vlm_err *err) {
    const vlm_swin_config *c = &m->cfg;
    if (c->in_chans <= 0 || c->patch <= 0 || c->patch > 32 || c->embed <= 0 || c->embed > (1 << 16) ||
        c->window <= 0 || c->window > 16 || !(c->eps >= 0.0f))
        return vlm_fail(err, VLM_ERR_ARG, "swin: invalid in_chans, patch, embed, window (1..16) or eps");
    VLM_TRY(vlm_check_weight(&m->patch, c->embed, c->in_chans * c->patch * c->patch, 1, err, "swin: patch embedding"));
    if (!m->patch_ln || !m->patch_ln_b) return vlm_fail(err, VLM_ERR_KEY, "swin: missing patch_norm");
    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        const int C = dim(c, s), I = c->mlp_hidden[s];
        if (c->depth[s] < 0 || c->depth[s] > VLM_SWIN_MAX_DEPTH || c->heads[s] <= 0 || C % c->heads[s] ||
            C / c->heads[s] > VLM_MAX_HEAD || I <= 0)
            return vlm_fail(err, VLM_ERR_ARG, "swin stage %d: invalid depth, heads (dim %d in heads of <= %d) or MLP", s,
                            C, VLM_MAX_HEAD);
        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_swin_block *b = &m->blocks[s][j];
            if (!b->ln1 || !b->ln1_b || !b->ln2 || !b->ln2_b || !b->rel)
                return vlm_fail(err, VLM_ERR_KEY, "swin stage %d block %d: missing norm or bias table", s, j);
            VLM_TRY(vlm_check_weight(&b->qkv, 3 * C, C, 1, err, "swin stage %d block %d: qkv", s, j));
            VLM_TRY(vlm_check_weight(&b->proj, C, C, 1, err, "swin stage %d block %d: proj", s, j));
            VLM_TRY(vlm_check_weight(&b->fc1, I, C, 1, err, "swin stage %d block %d: fc1", s, j));
            VLM_TRY(vlm_check_weight(&b->fc2, C, I, 1, err, "swin stage %d block %d: fc2", s, j));
        }
        if (s < VLM_SWIN_STAGES - 1) {
            if (!m->merge_ln[s] || !m->merge_ln_b[s]) return vlm_fail(err, VLM_ERR_KEY, "swin: missing merge norm %d", s);
            VLM_TRY(vlm_check_weight(&m->merge[s], 2 * C, 4 * C, 0, err, "swin: merge %d", s));
        }
        if (!m->out_ln[s] || !m->out_ln_b[s]) return vlm_fail(err, VLM_ERR_KEY, "swin: missing norm%d", s);
    }
    return VLM_OK;
}

static vlm_status bind_all(vlm_swin *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_swin_config *c = &m->cfg;
    const int L = 2 * c->window - 1;
    VLM_TRY(vlm_tensor_weight(t, &m->patch, c->embed, err, "patch"));
    VLM_TRY(vlm_tensor_vec(t, &m->patch_ln, c->embed, err, "patch_norm"));
    VLM_TRY(vlm_tensor_vec(t, &m->patch_ln_b, c->embed, err, "patch_norm_bias"));
    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        const int C = dim(c, s), I = c->mlp_hidden[s];
        for (int j = 0; j < c->depth[s]; j++) {
            vlm_swin_block *b = &m->blocks[s][j];
            const struct { const char *name; const float **w; int64_t n; } vec[] = {
                {"norm1", &b->ln1, C}, {"norm1_bias", &b->ln1_b, C}, {"norm2", &b->ln2, C},
                {"norm2_bias", &b->ln2_b, C}, {"rel", &b->rel, (int64_t)L * L * c->heads[s]}};
            for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++)
                VLM_TRY(vlm_tensor_vec(t, vec[i].w, vec[i].n, err, "layers.%d.blocks.%d.%s", s, j, vec[i].name));
            const struct { const char *name; vlm_weight *w; int64_t n; } lin[] = {
                {"qkv", &b->qkv, 3 * (int64_t)C}, {"proj", &b->proj, C}, {"fc1", &b->fc1, I}, {"fc2", &b->fc2, C}};
            for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
                VLM_TRY(vlm_tensor_weight(t, lin[i].w, lin[i].n, err, "layers.%d.blocks.%d.%s", s, j, lin[i].name));
        }
        if (s < VLM_SWIN_STAGES - 1) {
            VLM_TRY(vlm_tensor_vec(t, &m->merge_ln[s], 4 * C, err, "layers.%d.merge_norm", s));
            VLM_TRY(vlm_tensor_vec(t, &m->merge_ln_b[s], 4 * C, err, "layers.%d.merge_norm_bias", s));
            VLM_TRY(vlm_tensor_weight(t, &m->merge[s], -1, err, "layers.%d.merge", s));
        }
        VLM_TRY(vlm_tensor_vec(t, &m->out_ln[s], C, err, "norm%d", s));
        VLM_TRY(vlm_tensor_vec(t, &m->out_ln_b[s], C, err, "norm%d_bias", s));
    }
    return validate(m, err);
}

vlm_status vlm_swin_bind(vlm_swin *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_swin_config *c = &m->cfg;
    vlm_swin_unbind(m);
    size_t total = 0;
    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        if (c->depth[s] < 0 || c->depth[s] > VLM_SWIN_MAX_DEPTH)
            return vlm_fail(err, VLM_ERR_ARG, "swin stage %d: depth must be in [0, %d]", s, VLM_SWIN_MAX_DEPTH);
        if (c->heads[s] <= 0 || c->heads[s] > 1024 || c->window <= 0 || c->window > 16)
            return vlm_fail(err, VLM_ERR_ARG, "swin stage %d: heads must be in [1, 1024] and window in [1, 16]", s);
        total += (size_t)c->depth[s];
    }
    vlm_swin_block *mem = calloc(total ? total : 1, sizeof *mem);
    if (!mem) return vlm_fail(err, VLM_ERR_NOMEM, "out of memory");
    for (int s = 0, off = 0; s < VLM_SWIN_STAGES; off += c->depth[s], s++) m->blocks[s] = mem + off;
    vlm_status st = bind_all(m, t, err);
    if (st != VLM_OK) vlm_swin_unbind(m);
    return st;
}

void vlm_swin_unbind(vlm_swin *m) {
    if (!m) return;
    free(m->blocks[0]);
    for (int s = 0; s < VLM_SWIN_STAGES; s++) m->blocks[s] = NULL;
}

/* ---------------------------------------------------------------- scratch layout */

typedef struct {
    float *xw;       /* [band][C]  gathered LN(x) in window order; then the proj output */
    float *qkv;      /* [band][3C] */
    float *att;      /* [band][C]  attention output before proj */
    float *xn;       /* [chunk][C] LN2 output / [merge chunk][4C] merged neighbours / [patch chunk][K] im2col */
    float *h;        /* [chunk][hidden] MLP hidden */
    float *bias;     /* [heads][N][N] the dense relative position bias of one block */
    int32_t *lab;    /* [band] mask region labels */
    float *thr;      /* n_threads x the attention op's scratch */
    void *mm; size_t mm_size;
} sw_scratch;

static size_t carve(sw_scratch *S, const vlm_swin *m, const int hs[], const int ws[], int nth, char *base) {
    const vlm_swin_config *c = &m->cfg;
    const int win = c->window, N = win * win;
    size_t band = 0, xn = 0, qkv3 = 0, h = 0, bias = 0, per = 0, mm = 0;
#define UP(v, x) do { size_t _x = (x); if (_x > (v)) (v) = _x; } while (0)
    long P = (long)hs[0] * ws[0], pr = patch_rows(c, P);
    UP(xn, (size_t)pr * m->patch.k);
    mm = vlm_matmul_scratch_max(mm, pr, &m->patch, c->compute, nth);
    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        const size_t C = (size_t)dim(c, s), Ns = (size_t)hs[s] * ws[s];
        const size_t bt = (size_t)win * padded(ws[s], win);
        const long ch = mlp_rows(c, s, (long)Ns);
        UP(band, bt * C);
        UP(qkv3, bt * 3 * C);
        UP(xn, (size_t)ch * C);
        UP(h, (size_t)ch * c->mlp_hidden[s]);
        UP(bias, (size_t)c->heads[s] * N * N);
        UP(per, vlm_swin_attention_scratch_floats(N, (int)(C / c->heads[s])));
        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_swin_block *b = &m->blocks[s][j];
            mm = vlm_matmul_scratch_max(mm, (int64_t)bt, &b->qkv, c->compute, nth);
            mm = vlm_matmul_scratch_max(mm, (int64_t)bt, &b->proj, c->compute, nth);
            mm = vlm_matmul_scratch_max(mm, ch, &b->fc1, c->compute, nth);
            mm = vlm_matmul_scratch_max(mm, ch, &b->fc2, c->compute, nth);
        }
        if (s < VLM_SWIN_STAGES - 1) {
            long No = (long)hs[s + 1] * ws[s + 1], mr = merge_rows(c, s, No);
            UP(xn, (size_t)mr * 4 * C);
            mm = vlm_matmul_scratch_max(mm, mr, &m->merge[s], c->compute, nth);
        }
    }
    size_t lab = (size_t)win * padded(ws[0], win);   /* the widest band */
    for (int s = 1; s < VLM_SWIN_STAGES; s++) UP(lab, (size_t)win * padded(ws[s], win));
#undef UP
    per = vlm_align_up(per, 16);
    vlm_arena a = {base, 0};
    VLM_ARENA_TAKE(&a, S->xw, band);
    VLM_ARENA_TAKE(&a, S->qkv, qkv3);
    VLM_ARENA_TAKE(&a, S->att, band);
    VLM_ARENA_TAKE(&a, S->xn, xn);
    VLM_ARENA_TAKE(&a, S->h, h);
    VLM_ARENA_TAKE(&a, S->bias, bias);
    VLM_ARENA_TAKE(&a, S->lab, lab);
    VLM_ARENA_TAKE(&a, S->thr, (size_t)nth * per);
    S->mm = vlm_arena_take(&a, mm);
    S->mm_size = mm;
    return a.off;
}

size_t vlm_swin_scratch_size(const vlm_swin *m, int H, int W, int n_threads) {
    int hs[VLM_SWIN_STAGES], ws[VLM_SWIN_STAGES];
    if (vlm_swin_stage_sizes(m, H, W, hs, ws, NULL) != VLM_OK) return 0;
    sw_scratch S;
    return carve(&S, m, hs, ws, n_threads < 1 ? 1 : n_threads, NULL);
}

/* ---------------------------------------------------------------- the forward pass */

typedef struct {
    const vlm_swin *m;
    vlm_pool *pool;
    sw_scratch S;
    vlm_mm_ctx mm;
} sw_run;

/* Region label (0..8) of rolled padded position (i, j) for the shifted-window mask. */
static int region(int i, int j, int Hp, int Wp, int win, int shift) {
    int a = i < Hp - win ? 0 : (i < Hp - shift ? 1 : 2), b = j < Wp - win ? 0 : (j < Wp - shift ? 1 : 2);
    return a * 3 + b;
}

/* x += proj(WindowAttention(roll(pad(LN1(x))))) rolled back, one band of windows at a time. */
static vlm_status window_attention(sw_run *r, int s, float *x, const vlm_swin_block *B, int H, int W, int shift) {
    const vlm_swin_config *c = &r->m->cfg;
    const int C = dim(c, s), win = c->window, N = win * win, Hp = padded(H, win), Wp = padded(W, win);
    const int nwin = Wp / win;
    const long bt = (long)win * Wp;
    const float scale = 1.0f / sqrtf((float)(C / c->heads[s]));
    vlm_swin_rel_bias(r->S.bias, B->rel, win, c->heads[s]);
    for (int wy = 0; wy < Hp / win; wy++) {
        if (shift)
            for (int w = 0; w < nwin; w++)
                for (int t = 0; t < N; t++)
                    r->S.lab[w * N + t] = region(wy * win + t / win, w * win + t % win, Hp, Wp, win, shift);
        vlm_window_gather(r->pool, r->S.xw, x, B->ln1, B->ln1_b, c->eps, H, W, C, win, shift, wy);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 3 * C, r->S.xw, C, bt, &B->qkv, 0));
        vlm_swin_attention(r->pool, r->S.att, r->S.qkv, r->S.bias, shift ? r->S.lab : NULL, SW_MASK, nwin, N, C,
                           c->heads[s], scale, r->S.thr);
        VLM_TRY(vlm_mm(&r->mm, r->S.xw, C, r->S.att, C, bt, &B->proj, 0));
        vlm_window_scatter_add(r->pool, x, r->S.xw, H, W, C, win, shift, wy);
    }
    return VLM_OK;
}

/* x += fc2(GELU(fc1(LN2(x)))), in chunks of rows. */
static vlm_status mlp(sw_run *r, int s, float *x, const vlm_swin_block *B, long N) {
    const vlm_swin_config *c = &r->m->cfg;
    return vlm_ln_mlp_residual(&r->mm, x, N, dim(c, s), B->ln2, B->ln2_b, c->eps, &B->fc1, &B->fc2, mlp_rows(c, s, N),
                               r->S.xn, r->S.h);
}

/* next = merge(LN(2x2 neighbours of x)): [ceil(H/2)·ceil(W/2)][2C], in chunks of output pixels. */
static vlm_status patch_merge(sw_run *r, int s, float *next, const float *x, int H, int W) {
    const vlm_swin_config *c = &r->m->cfg;
    const int C = dim(c, s);
    const long No = (long)((H + 1) / 2) * ((W + 1) / 2), step = merge_rows(c, s, No);
    for (long r0 = 0; r0 < No; r0 += step) {
        long nr = No - r0 < step ? No - r0 : step;
        vlm_patch_merge_gather(r->pool, r->S.xn, x, H, W, C, r0, nr);
        vlm_layernorm(r->pool, r->S.xn, r->S.xn, r->m->merge_ln[s], r->m->merge_ln_b[s], c->eps, nr, 4 * C);
        VLM_TRY(vlm_mm(&r->mm, next + (size_t)r0 * 2 * C, 2 * C, r->S.xn, 4 * C, nr, &r->m->merge[s], 0));
    }
    return VLM_OK;
}

vlm_status vlm_swin_forward(const vlm_swin *m, vlm_pool *pool, const float *pixels, int H, int W,
                            float *out[VLM_SWIN_STAGES], void *scratch, size_t scratch_size, vlm_err *err) {
    const vlm_swin_config *c = &m->cfg;
    int hs[VLM_SWIN_STAGES], ws[VLM_SWIN_STAGES];
    if (!pixels || !out) return vlm_fail(err, VLM_ERR_ARG, "swin: NULL pixels or outputs");
    if (!m->blocks[0]) return vlm_fail(err, VLM_ERR_STATE, "swin: the model is not bound");
    VLM_TRY(vlm_swin_stage_sizes(m, H, W, hs, ws, err));
    for (int s = 0; s < VLM_SWIN_STAGES; s++)
        if (!out[s]) return vlm_fail(err, VLM_ERR_ARG, "swin: NULL output of stage %d", s);
    sw_run run = {.m = m, .pool = pool}, *r = &run;
    size_t need = carve(&r->S, m, hs, ws, vlm_pool_size(pool), NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "swin scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&r->S, m, hs, ws, vlm_pool_size(pool), scratch);
    r->mm = (vlm_mm_ctx){pool, c->compute, r->S.mm, r->S.mm_size, err};

    /* PatchEmbed: 4x4 stride-4 conv (im2col reads zeros past the image: the reference's right/bottom padding),
     * then LayerNorm */
    const long P = (long)hs[0] * ws[0];
    VLM_TRY(vlm_conv2d(&r->mm, out[0], pixels, &m->patch, r->S.xn, patch_rows(c, P), 0, H, W, c->in_chans, c->patch,
                       c->patch, 0, hs[0], ws[0]));
    vlm_layernorm(pool, out[0], out[0], m->patch_ln, m->patch_ln_b, c->eps, P, c->embed);

    for (int s = 0; s < VLM_SWIN_STAGES; s++) {
        const int C = dim(c, s), Hs = hs[s], Ws = ws[s];
        const long Ns = (long)Hs * Ws;
        float *x = out[s];
        for (int j = 0; j < c->depth[s]; j++) {
            const vlm_swin_block *B = &m->blocks[s][j];
            VLM_TRY(window_attention(r, s, x, B, Hs, Ws, j % 2 ? c->window / 2 : 0));
            VLM_TRY(mlp(r, s, x, B, Ns));
        }
        if (s < VLM_SWIN_STAGES - 1) VLM_TRY(patch_merge(r, s, out[s + 1], x, Hs, Ws));
        vlm_layernorm(pool, x, x, m->out_ln[s], m->out_ln_b[s], c->eps, Ns, C);
    }
    return VLM_OK;
}
