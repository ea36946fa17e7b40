/* upn.c — forward pass of UPN, the proposal network (see upn.h).
 *
 * Layout: token matrices [S][d] with the five levels concatenated (raster order inside a level), as the
 * reference flattens them. The encoder computes each layer's value projection over all tokens first, then
 * runs everything else (queries, sampling offsets, attention weights, MSDA, output projection, FFN) in
 * chunks of query rows, updating the stream in place: a chunk only reads its own rows and the value matrix.
 * The decoder's Q queries fit one chunk. Chunk sizes depend on the image size only, never on the thread
 * count, and every op computes each output element on one thread in a fixed order, so results are the same
 * for any pool size. All scratch comes from one caller-provided block. */
#include "upn.h"
#include "arena.h"
#include "cpu.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define UP_CHUNK_FLOATS (1L << 22)   /* target size of a chunk's widest buffer (the FFN hidden), 16 MB */

/* ---------------------------------------------------------------- sizes */

static long clampl(long v, long lo, long hi) { return v < lo ? lo : (v > hi ? hi : v); }

vlm_status vlm_upn_levels(const vlm_upn *m, int H, int W, int hs[VLM_UPN_LEVELS], int ws[VLM_UPN_LEVELS], long *S,
                          vlm_err *err) {
    int sh[VLM_SWIN_STAGES], sw[VLM_SWIN_STAGES];
    VLM_TRY(vlm_swin_stage_sizes(m->swin, H, W, sh, sw, err));
    long n = 0;
    for (int l = 0; l < VLM_UPN_LEVELS; l++) {
        hs[l] = l < VLM_SWIN_STAGES ? sh[l] : (sh[3] - 1) / 2 + 1;   /* 3x3, stride 2, padding 1 */
        ws[l] = l < VLM_SWIN_STAGES ? sw[l] : (sw[3] - 1) / 2 + 1;
        n += (long)hs[l] * ws[l];
    }
    *S = n;
    return VLM_OK;
}

/* query rows per chunk: at least all Q decoder queries */
static long chunk_rows(const vlm_upn_config *c, long S) {
    long r = clampl(UP_CHUNK_FLOATS / c->ffn, 256, S);
    return r < c->queries ? c->queries : r;
}

/* ---------------------------------------------------------------- binding */

static vlm_status bind_msda(const vlm_tensor_table *t, vlm_upn_msda *a, const vlm_upn_config *c, const char *p, int i,
                            vlm_err *err) {
    const int64_t hlp = (int64_t)c->heads * VLM_UPN_LEVELS * c->points;
    VLM_TRY(vlm_tensor_weight(t, &a->offsets, 2 * hlp, err, "%s.%d.offsets", p, i));
    VLM_TRY(vlm_tensor_weight(t, &a->weights, hlp, err, "%s.%d.weights", p, i));
    VLM_TRY(vlm_tensor_weight(t, &a->value, c->d_model, err, "%s.%d.value", p, i));
    VLM_TRY(vlm_tensor_weight(t, &a->out, c->d_model, err, "%s.%d.out", p, i));
    VLM_TRY(vlm_check_weight(&a->offsets, 2 * hlp, c->d_model, 1, err, "%s.%d.offsets", p, i));
    VLM_TRY(vlm_check_weight(&a->weights, hlp, c->d_model, 1, err, "%s.%d.weights", p, i));
    VLM_TRY(vlm_check_weight(&a->value, c->d_model, c->d_model, 1, err, "%s.%d.value", p, i));
    return vlm_check_weight(&a->out, c->d_model, c->d_model, 1, err, "%s.%d.out", p, i);
}

static vlm_status bind_ln(const vlm_tensor_table *t, const float **w, const float **b, int d, vlm_err *err,
                          const char *name) {
    VLM_TRY(vlm_tensor_vec(t, w, d, err, "%s", name));
    return vlm_tensor_vec(t, b, d, err, "%s_bias", name);
}

static vlm_status bind_linear(const vlm_tensor_table *t, vlm_weight *w, int64_t n, int64_t k, vlm_err *err,
                              const char *name) {
    VLM_TRY(vlm_tensor_weight(t, w, n, err, "%s", name));
    return vlm_check_weight(w, n, k, 1, err, "upn: %s", name);
}

vlm_status vlm_upn_bind(vlm_upn *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_upn_config *c = &m->cfg;
    char name[96];
    if (!m->swin || !m->swin->blocks[0]) return vlm_fail(err, VLM_ERR_ARG, "upn: the backbone is not bound");
    const int d = c->d_model, F = c->ffn;
    if (d != 256 || c->heads < 1 || d % c->heads || d / c->heads > VLM_MAX_HEAD || c->points < 1 ||
        c->points > VLM_MSDA_MAX_POINTS || c->enc_layers < 0 || c->enc_layers > VLM_UPN_MAX_LAYERS ||
        c->dec_layers < 1 || c->dec_layers > VLM_UPN_MAX_LAYERS || F < 1 || c->queries < 1 ||
        c->queries > (1 << 16) || c->groups < 1 || d % c->groups || !(c->eps >= 0.0f) || !(c->temperature > 0.0f))
        return vlm_fail(err, VLM_ERR_ARG, "upn: invalid configuration (d_model must be 256: the decoder's sine "
                                          "embedding has 4 x 128 features)");
    for (int l = 0; l < VLM_UPN_LEVELS; l++) {
        const int64_t C = (int64_t)m->swin->cfg.embed << (l < VLM_SWIN_STAGES ? l : VLM_SWIN_STAGES - 1);
        snprintf(name, sizeof name, "neck.%d", l);
        VLM_TRY(bind_linear(t, &m->proj[l], d, l < VLM_SWIN_STAGES ? C : C * 9, err, name));
        snprintf(name, sizeof name, "neck.%d.gn", l);
        VLM_TRY(bind_ln(t, &m->gn[l], &m->gn_b[l], d, err, name));
    }
    VLM_TRY(vlm_tensor_vec(t, &m->level_embed, (int64_t)VLM_UPN_LEVELS * d, err, "level_embed"));
    for (int i = 0; i < c->enc_layers; i++) {
        vlm_upn_enc_layer *L = &m->enc[i];
        VLM_TRY(bind_msda(t, &L->attn, c, "enc", i, err));
        snprintf(name, sizeof name, "enc.%d.ln1", i);
        VLM_TRY(bind_ln(t, &L->ln1, &L->ln1_b, d, err, name));
        snprintf(name, sizeof name, "enc.%d.ln2", i);
        VLM_TRY(bind_ln(t, &L->ln2, &L->ln2_b, d, err, name));
        snprintf(name, sizeof name, "enc.%d.lin1", i);
        VLM_TRY(bind_linear(t, &L->lin1, F, d, err, name));
        snprintf(name, sizeof name, "enc.%d.lin2", i);
        VLM_TRY(bind_linear(t, &L->lin2, d, F, err, name));
    }
    VLM_TRY(bind_linear(t, &m->enc_output, d, d, err, "enc_output"));
    VLM_TRY(bind_ln(t, &m->enc_norm, &m->enc_norm_b, d, err, "enc_norm"));
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof name, "enc_box.%d", i);
        VLM_TRY(bind_linear(t, &m->enc_box[i], i == 2 ? 4 : d, d, err, name));
        snprintf(name, sizeof name, "box.%d", i);
        VLM_TRY(bind_linear(t, &m->box[i], i == 2 ? 4 : d, d, err, name));
    }
    VLM_TRY(vlm_tensor_vec(t, &m->prompt[0], d, err, "prompt.fine"));
    VLM_TRY(vlm_tensor_vec(t, &m->prompt[1], d, err, "prompt.coarse"));
    VLM_TRY(vlm_tensor_vec(t, &m->tgt, (int64_t)c->queries * d, err, "tgt"));
    for (int i = 0; i < c->dec_layers; i++) {
        vlm_upn_dec_layer *L = &m->dec[i];
        VLM_TRY(bind_msda(t, &L->cross, c, "dec", i, err));
        snprintf(name, sizeof name, "dec.%d.in_proj", i);
        VLM_TRY(bind_linear(t, &L->in_proj, 3 * d, d, err, name));
        snprintf(name, sizeof name, "dec.%d.out_proj", i);
        VLM_TRY(bind_linear(t, &L->out_proj, d, d, err, name));
        const char *ln[3] = {"ln1", "ln2", "ln3"};
        const float **lw[3] = {&L->ln1, &L->ln2, &L->ln3}, **lb[3] = {&L->ln1_b, &L->ln2_b, &L->ln3_b};
        for (int k = 0; k < 3; k++) {
            snprintf(name, sizeof name, "dec.%d.%s", i, ln[k]);
            VLM_TRY(bind_ln(t, lw[k], lb[k], d, err, name));
        }
        snprintf(name, sizeof name, "dec.%d.lin1", i);
        VLM_TRY(bind_linear(t, &L->lin1, F, d, err, name));
        snprintf(name, sizeof name, "dec.%d.lin2", i);
        VLM_TRY(bind_linear(t, &L->lin2, d, F, err, name));
    }
    VLM_TRY(bind_linear(t, &m->ref_head[0], d, 2 * d, err, "ref_head.0"));
    VLM_TRY(bind_linear(t, &m->ref_head[1], d, d, err, "ref_head.1"));
    VLM_TRY(bind_ln(t, &m->dec_norm, &m->dec_norm_b, d, err, "dec_norm"));
    return VLM_OK;
}

/* ---------------------------------------------------------------- scratch layout */

typedef struct { float v; int32_t i; } up_key;   /* a two-stage logit and its token */

typedef struct {
    float *feat[VLM_SWIN_STAGES];     /* backbone levels */
    void *swin; size_t swin_size;     /* the backbone's scratch (shares the block with nothing live) */
    float *src, *pos, *val;           /* [S][d] the stream / memory, position + level embeddings, values */
    float *q, *off, *aw, *loc, *att;  /* [chunk][d], [chunk][2HLP], [chunk][HLP], [chunk][2HLP], [chunk][d] */
    float *hid;                       /* [chunk][ffn] FFN hidden; [chunk][C_3·9] neck im2col */
    float *logit;                     /* [S] two-stage logits */
    up_key *order;                    /* [S] (logit, token) pairs, sorted */
    int32_t *sel;                     /* [Q] the selected tokens */
    float *tgt, *qpos, *sine, *qkv, *ref, *box; /* decoder: [Q][d], [Q][d], [Q][2d], [Q][3d], [Q][4], [Q][4] */
    float *thr;                       /* n_threads x the self-attention op's scratch */
    float *gn;                        /* the neck GroupNorm's scratch (level 0, the largest) */
    void *mm; size_t mm_size;
} up_scratch;

static size_t carve(up_scratch *S_, const vlm_upn *m, int H, int W, int nth, char *base) {
    const vlm_upn_config *c = &m->cfg;
    int hs[VLM_UPN_LEVELS], ws[VLM_UPN_LEVELS];
    long S;
    if (vlm_upn_levels(m, H, W, hs, ws, &S, NULL) != VLM_OK) return 0;
    const size_t d = (size_t)c->d_model, Q = (size_t)c->queries, hlp = (size_t)c->heads * VLM_UPN_LEVELS * c->points;
    const long ch = chunk_rows(c, S);
    const size_t C3 = (size_t)m->swin->cfg.embed << 3, n4 = (size_t)hs[4] * ws[4];
    size_t hid = (size_t)ch * c->ffn;
    if (n4 * C3 * 9 > hid) hid = n4 * C3 * 9;
    size_t mm = 0;
    for (int l = 0; l < VLM_UPN_LEVELS; l++)
        mm = vlm_matmul_scratch_max(mm, l < 4 ? (int64_t)hs[l] * ws[l] : (int64_t)n4, &m->proj[l], c->compute, nth);
    for (int i = 0; i < c->enc_layers; i++) {
        const vlm_upn_enc_layer *L = &m->enc[i];
        const vlm_weight *w[] = {&L->attn.offsets, &L->attn.weights, &L->attn.out, &L->lin1, &L->lin2};
        mm = vlm_matmul_scratch_max(mm, S, &L->attn.value, c->compute, nth);
        for (int k = 0; k < 5; k++) mm = vlm_matmul_scratch_max(mm, ch, w[k], c->compute, nth);
    }
    mm = vlm_matmul_scratch_max(mm, ch, &m->enc_output, c->compute, nth);
    for (int k = 0; k < 3; k++) {
        mm = vlm_matmul_scratch_max(mm, (int64_t)Q, &m->enc_box[k], c->compute, nth);
        mm = vlm_matmul_scratch_max(mm, (int64_t)Q, &m->box[k], c->compute, nth);
    }
    for (int i = 0; i < c->dec_layers; i++) {
        const vlm_upn_dec_layer *L = &m->dec[i];
        const vlm_weight *w[] = {&L->cross.offsets, &L->cross.weights, &L->cross.out, &L->in_proj, &L->out_proj,
                                 &L->lin1, &L->lin2};
        mm = vlm_matmul_scratch_max(mm, S, &L->cross.value, c->compute, nth);
        for (int k = 0; k < 7; k++) mm = vlm_matmul_scratch_max(mm, (int64_t)Q, w[k], c->compute, nth);
    }
    for (int k = 0; k < 2; k++) mm = vlm_matmul_scratch_max(mm, (int64_t)Q, &m->ref_head[k], c->compute, nth);
    const size_t per = vlm_align_up(vlm_segment_attention_scratch_floats((int)Q, (int)(d / c->heads)), 16);

    vlm_arena a = {base, 0};
    for (int l = 0; l < VLM_SWIN_STAGES; l++)
        VLM_ARENA_TAKE(&a, S_->feat[l], (size_t)hs[l] * ws[l] * ((size_t)m->swin->cfg.embed << l));
    S_->swin_size = vlm_swin_scratch_size(m->swin, H, W, nth);
    S_->swin = vlm_arena_take(&a, S_->swin_size);
    VLM_ARENA_TAKE(&a, S_->src, (size_t)S * d);
    VLM_ARENA_TAKE(&a, S_->pos, (size_t)S * d);
    VLM_ARENA_TAKE(&a, S_->val, (size_t)S * d);
    VLM_ARENA_TAKE(&a, S_->q, (size_t)ch * d);
    VLM_ARENA_TAKE(&a, S_->off, (size_t)ch * 2 * hlp);
    VLM_ARENA_TAKE(&a, S_->aw, (size_t)ch * hlp);
    VLM_ARENA_TAKE(&a, S_->loc, (size_t)ch * 2 * hlp);
    VLM_ARENA_TAKE(&a, S_->att, (size_t)ch * d);
    VLM_ARENA_TAKE(&a, S_->hid, hid);
    VLM_ARENA_TAKE(&a, S_->logit, (size_t)S);
    VLM_ARENA_TAKE(&a, S_->order, (size_t)S);
    VLM_ARENA_TAKE(&a, S_->sel, Q);
    VLM_ARENA_TAKE(&a, S_->tgt, Q * d);
    VLM_ARENA_TAKE(&a, S_->qpos, Q * d);
    VLM_ARENA_TAKE(&a, S_->sine, Q * 2 * d);
    VLM_ARENA_TAKE(&a, S_->qkv, Q * 3 * d);
    VLM_ARENA_TAKE(&a, S_->ref, Q * 4);
    VLM_ARENA_TAKE(&a, S_->box, Q * 4);
    VLM_ARENA_TAKE(&a, S_->thr, (size_t)nth * per);
    VLM_ARENA_TAKE(&a, S_->gn, vlm_group_norm_scratch_floats((long)hs[0] * ws[0], (int)d));
    S_->mm = vlm_arena_take(&a, mm);
    S_->mm_size = mm;
    return a.off;
}

size_t vlm_upn_scratch_size(const vlm_upn *m, int H, int W, int n_threads) {
    up_scratch S;
    if (!m->swin) return 0;
    return carve(&S, m, H, W, n_threads < 1 ? 1 : n_threads, NULL);
}

/* ---------------------------------------------------------------- small pieces of the reference's arithmetic */

static float sigmoidf_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

/* inverse_sigmoid(x, eps=1e-3): log(clamp(x, eps) / clamp(1 - x, eps)) after clamping x to [0, 1] */
VLM_NO_CONTRACT static float inv_sigmoid(float x) {
    x = x < 0.f ? 0.f : (x > 1.f ? 1.f : x);
    float a = x < 1e-3f ? 1e-3f : x, b = 1.f - x;
    b = b < 1e-3f ? 1e-3f : b;
    return logf(a / b);
}

/* softmax over each run of n values in place (max subtracted, divided by the sum) */
static void softmax_runs(float *x, long runs, int n) {
    for (long r = 0; r < runs; r++) {
        float *v = x + (size_t)r * n, mx = v[0], sum = 0.f;
        for (int i = 1; i < n; i++) mx = v[i] > mx ? v[i] : mx;
        for (int i = 0; i < n; i++) { v[i] = expf(v[i] - mx); sum += v[i]; }
        for (int i = 0; i < n; i++) v[i] = v[i] / sum;
    }
}

static float dot(const float *a, const float *b, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---------------------------------------------------------------- the forward pass */

typedef struct {
    const vlm_upn *m;
    vlm_pool *pool;
    up_scratch S;
    vlm_mm_ctx mm;
    int hs[VLM_UPN_LEVELS], ws[VLM_UPN_LEVELS];
    long start[VLM_UPN_LEVELS], n_tok;
} up_run;

/* out = MLP(x): n layers, ReLU between, hidden in h. x: [rows][k], out: [rows][w[n-1].n] */
static vlm_status mlp(up_run *r, float *out, const float *x, long rows, const vlm_weight *w, int n, float *h) {
    const float *in = x;
    for (int i = 0; i < n; i++) {
        float *o = i == n - 1 ? out : h + (size_t)(i % 2) * rows * w[i].n;
        VLM_TRY(vlm_mm(&r->mm, o, w[i].n, in, w[i].k, rows, &w[i], 0));
        if (i < n - 1) vlm_relu(r->pool, o, (size_t)rows * w[i].n);
        in = o;
    }
    return VLM_OK;
}

/* Sampling locations of rows [t0, t0 + nr) from their offsets: 2-d references (the encoder: the token's centre
 * in its level) or 4-d (the decoder: ref [nr][4], sigmoid space). */
VLM_NO_CONTRACT static void locations(up_run *r, float *loc, const float *off, long t0, long nr, const float *ref4) {
    const vlm_upn_config *c = &r->m->cfg;
    const int M = c->heads, P = c->points, L = VLM_UPN_LEVELS;
    for (long i = 0; i < nr; i++) {
        float rx = 0.f, ry = 0.f, rw = 0.f, rh = 0.f;
        if (ref4) {
            rx = ref4[i * 4], ry = ref4[i * 4 + 1], rw = ref4[i * 4 + 2], rh = ref4[i * 4 + 3];
        } else {
            long t = t0 + i;
            int l = 0;
            while (l + 1 < L && t >= r->start[l + 1]) l++;
            long p = t - r->start[l];
            rx = ((float)(p % r->ws[l]) + 0.5f) / (float)r->ws[l];
            ry = ((float)(p / r->ws[l]) + 0.5f) / (float)r->hs[l];
        }
        for (int m = 0; m < M; m++)
            for (int l = 0; l < L; l++)
                for (int p = 0; p < P; p++) {
                    size_t k = ((((size_t)i * M + m) * L + l) * P + p) * 2;
                    if (ref4) {
                        loc[k] = rx + off[k] / (float)P * rw * 0.5f;
                        loc[k + 1] = ry + off[k + 1] / (float)P * rh * 0.5f;
                    } else {
                        loc[k] = rx + off[k] / (float)r->ws[l];
                        loc[k + 1] = ry + off[k + 1] / (float)r->hs[l];
                    }
                }
    }
}

/* att = out_proj(MSDA(q, value)) for nr query rows q: [nr][d] (the queries, position included). */
static vlm_status msda(up_run *r, float *att, const float *q, long t0, long nr, const vlm_upn_msda *A,
                       const float *ref4) {
    const vlm_upn_config *c = &r->m->cfg;
    const int d = c->d_model, M = c->heads, P = c->points, hlp = M * VLM_UPN_LEVELS * P;
    VLM_TRY(vlm_mm(&r->mm, r->S.off, 2 * hlp, q, d, nr, &A->offsets, 0));
    VLM_TRY(vlm_mm(&r->mm, r->S.aw, hlp, q, d, nr, &A->weights, 0));
    softmax_runs(r->S.aw, nr * M, VLM_UPN_LEVELS * P);
    locations(r, r->S.loc, r->S.off, t0, nr, ref4);
    VLM_TRY(vlm_msda(r->pool, r->S.att, r->S.val, (size_t)d, r->S.loc, r->S.aw, r->hs, r->ws, r->start, r->n_tok,
                     VLM_UPN_LEVELS, M, d / M, P, nr, r->mm.err));
    return vlm_mm(&r->mm, att, d, r->S.att, d, nr, &A->out, 0);
}

/* x = LN(x + y) on rows: the post-norm residual of every DETR layer */
static void add_norm(up_run *r, float *x, const float *y, long rows, const float *w, const float *b) {
    const int d = r->m->cfg.d_model;
    for (size_t i = 0; i < (size_t)rows * d; i++) x[i] += y[i];
    vlm_layernorm(r->pool, x, x, w, b, r->m->cfg.eps, rows, d);
}

/* x = LN(x + lin2(relu(lin1(x)))) on rows */
static vlm_status ffn(up_run *r, float *x, long rows, const vlm_weight *l1, const vlm_weight *l2, const float *w,
                      const float *b) {
    const int d = r->m->cfg.d_model;
    VLM_TRY(vlm_mm(&r->mm, r->S.hid, l1->n, x, d, rows, l1, 0));
    vlm_relu(r->pool, r->S.hid, (size_t)rows * l1->n);
    VLM_TRY(vlm_mm(&r->mm, r->S.att, d, r->S.hid, l1->n, rows, l2, 0));
    add_norm(r, x, r->S.att, rows, w, b);
    return VLM_OK;
}

static vlm_status neck(up_run *r) {
    const vlm_upn *m = r->m;
    const vlm_upn_config *c = &m->cfg;
    const int d = c->d_model;
    for (int l = 0; l < VLM_UPN_LEVELS; l++) {
        float *dst = r->S.src + (size_t)r->start[l] * d;
        const long n = (long)r->hs[l] * r->ws[l];
        if (l < VLM_SWIN_STAGES) {
            VLM_TRY(vlm_mm(&r->mm, dst, d, r->S.feat[l], m->proj[l].k, n, &m->proj[l], 0));
        } else {
            const int C3 = m->swin->cfg.embed << 3;
            VLM_TRY(vlm_conv2d(&r->mm, dst, r->S.feat[3], &m->proj[l], r->S.hid, n, 1, r->hs[3], r->ws[3], C3, 3, 2, 1,
                               r->hs[l], r->ws[l]));
        }
        vlm_group_norm(r->pool, dst, dst, m->gn[l], m->gn_b[l], c->eps, r->S.gn, n, d, c->groups);
        float *pos = r->S.pos + (size_t)r->start[l] * d;
        vlm_sine_pos_embed_hw(r->pool, pos, c->temperature, c->temperature, r->hs[l], r->ws[l], d / 2);
        const float *le = m->level_embed + (size_t)l * d;
        for (long i = 0; i < n; i++)
            for (int k = 0; k < d; k++) pos[(size_t)i * d + k] += le[k];
    }
    return VLM_OK;
}

static vlm_status encoder(up_run *r) {
    const vlm_upn_config *c = &r->m->cfg;
    const int d = c->d_model;
    const long S = r->n_tok, ch = chunk_rows(c, S);
    for (int i = 0; i < c->enc_layers; i++) {
        const vlm_upn_enc_layer *L = &r->m->enc[i];
        VLM_TRY(vlm_mm(&r->mm, r->S.val, d, r->S.src, d, S, &L->attn.value, 0));
        for (long t0 = 0; t0 < S; t0 += ch) {
            const long nr = S - t0 < ch ? S - t0 : ch;
            float *x = r->S.src + (size_t)t0 * d;
            const float *p = r->S.pos + (size_t)t0 * d;
            for (size_t k = 0; k < (size_t)nr * d; k++) r->S.q[k] = x[k] + p[k];
            VLM_TRY(msda(r, r->S.q, r->S.q, t0, nr, &L->attn, NULL));
            add_norm(r, x, r->S.q, nr, L->ln1, L->ln1_b);
            VLM_TRY(ffn(r, x, nr, &L->lin1, &L->lin2, L->ln2, L->ln2_b));
        }
    }
    return VLM_OK;
}

/* The proposal box of token t (cx, cy, w, h) and whether every coordinate is in (0.01, 0.99). */
static int proposal(const up_run *r, long t, float box[4]) {
    int l = 0;
    while (l + 1 < VLM_UPN_LEVELS && t >= r->start[l + 1]) l++;
    long p = t - r->start[l];
    box[0] = ((float)(p % r->ws[l]) + 0.5f) / (float)r->ws[l];
    box[1] = ((float)(p / r->ws[l]) + 0.5f) / (float)r->hs[l];
    box[2] = box[3] = 0.05f * (float)(1 << l);
    int ok = 1;
    for (int k = 0; k < 4; k++) ok &= box[k] > 0.01f && box[k] < 0.99f;
    return ok;
}

/* descending value, ties by the lower index, NaN last: a total order, so the selection is the same on every
 * machine and qsort always sees a consistent comparison */
static int by_logit(const void *pa, const void *pb) {
    const up_key *a = pa, *b = pb;
    int na = a->v != a->v, nb = b->v != b->v;
    if (na != nb) return na - nb;
    if (!na && a->v != b->v) return a->v > b->v ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

/* Two-stage selection: logits of every token, the top Q, their reference boxes (logit space) in S.box. */
static vlm_status two_stage(up_run *r, int prompt, float *logit_tap, int32_t *topk_tap, float *ref0_tap,
                            const int32_t *select) {
    const vlm_upn *m = r->m;
    const vlm_upn_config *c = &m->cfg;
    const int d = c->d_model, Q = c->queries;
    const long S = r->n_tok, ch = chunk_rows(c, S);
    const float *pr = m->prompt[prompt];
    /* om = LN(enc_output(memory with invalid proposals zeroed)) -> S.val; logit = om · prompt */
    for (long t0 = 0; t0 < S; t0 += ch) {
        const long nr = S - t0 < ch ? S - t0 : ch;
        for (long i = 0; i < nr; i++) {
            float box[4];
            float *q = r->S.q + (size_t)i * d;
            if (proposal(r, t0 + i, box)) memcpy(q, r->S.src + (size_t)(t0 + i) * d, (size_t)d * sizeof(float));
            else memset(q, 0, (size_t)d * sizeof(float));
        }
        float *om = r->S.val + (size_t)t0 * d;
        VLM_TRY(vlm_mm(&r->mm, om, d, r->S.q, d, nr, &m->enc_output, 0));
        vlm_layernorm(r->pool, om, om, m->enc_norm, m->enc_norm_b, c->eps, nr, d);
        for (long i = 0; i < nr; i++) r->S.logit[t0 + i] = dot(om + (size_t)i * d, pr, d);
    }
    if (logit_tap) memcpy(logit_tap, r->S.logit, (size_t)S * sizeof(float));
    /* top Q by logit, descending, ties by the lower index */
    up_key *key = r->S.order;
    for (long t = 0; t < S; t++) key[t] = (up_key){r->S.logit[t], (int32_t)t};
    qsort(key, (size_t)S, sizeof *key, by_logit);
    int32_t *ord = r->S.sel;
    for (int k = 0; k < Q; k++) ord[k] = key[k].i;
    if (topk_tap) memcpy(topk_tap, ord, (size_t)Q * sizeof(int32_t));   /* the network's own selection */
    if (select) {
        for (int k = 0; k < Q; k++)
            if (select[k] < 0 || select[k] >= S)
                return vlm_fail(r->mm.err, VLM_ERR_ARG, "upn: select[%d] = %d is not a token index in [0, %ld)", k,
                                select[k], S);
        memcpy(ord, select, (size_t)Q * sizeof(int32_t));
    }
    /* reference boxes: enc_box(om[sel]) + proposal (logit space; +inf for invalid proposals) */
    for (int k = 0; k < Q; k++)
        memcpy(r->S.tgt + (size_t)k * d, r->S.val + (size_t)ord[k] * d, (size_t)d * sizeof(float));
    VLM_TRY(mlp(r, r->S.box, r->S.tgt, Q, m->enc_box, 3, r->S.hid));
    for (int k = 0; k < Q; k++) {
        float box[4];
        int ok = proposal(r, ord[k], box);
        for (int j = 0; j < 4; j++) {
            float pl = ok ? logf(box[j] / (1.f - box[j])) : INFINITY;
            r->S.box[k * 4 + j] += pl;
        }
    }
    if (ref0_tap) memcpy(ref0_tap, r->S.box, (size_t)Q * 4 * sizeof(float));
    return VLM_OK;
}

/* The decoder: D layers on the Q queries; writes the final logits and boxes. */
static vlm_status decoder(up_run *r, const float *prompt, float *logits, float *boxes, const vlm_upn_taps *taps) {
    const vlm_upn *m = r->m;
    const vlm_upn_config *c = &m->cfg;
    const int d = c->d_model, Q = c->queries, Dh = d / c->heads;
    const int cu[2] = {0, Q};
    float *tgt = r->S.tgt, *ref = r->S.ref, *q = r->S.q;
    memcpy(tgt, m->tgt, (size_t)Q * d * sizeof(float));
    for (int k = 0; k < Q * 4; k++) ref[k] = sigmoidf_ref(r->S.box[k]);
    for (int i = 0; i < c->dec_layers; i++) {
        const vlm_upn_dec_layer *L = &m->dec[i];
        const int last = i == c->dec_layers - 1;
        if (taps && taps->refs) memcpy(taps->refs + (size_t)i * Q * 4, ref, (size_t)Q * 4 * sizeof(float));
        /* query position: ref_head(sine(ref)) */
        vlm_sine_embed_boxes(r->pool, r->S.sine, ref, 10000.0f, Q, d / 2);
        VLM_TRY(mlp(r, r->S.qpos, r->S.sine, Q, m->ref_head, 2, r->S.hid));
        /* self-attention: q = k = t + qpos, v = t */
        for (size_t k = 0; k < (size_t)Q * d; k++) q[k] = tgt[k] + r->S.qpos[k];
        vlm_weight wqk = vlm_weight_rows(&L->in_proj, 0, 2 * d), wv = vlm_weight_rows(&L->in_proj, 2 * d, d);
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv, 3 * d, q, d, Q, &wqk, 0));
        VLM_TRY(vlm_mm(&r->mm, r->S.qkv + 2 * d, 3 * d, tgt, d, Q, &wv, 0));
        vlm_segment_attention(r->pool, r->S.att, r->S.qkv, cu, 1, c->heads, Dh, 1.0f / sqrtf((float)Dh), r->S.thr, Q, 0);
        VLM_TRY(vlm_mm(&r->mm, q, d, r->S.att, d, Q, &L->out_proj, 0));
        add_norm(r, tgt, q, Q, L->ln2, L->ln2_b);
        /* cross-attention to the memory */
        VLM_TRY(vlm_mm(&r->mm, r->S.val, d, r->S.src, d, r->n_tok, &L->cross.value, 0));
        for (size_t k = 0; k < (size_t)Q * d; k++) q[k] = tgt[k] + r->S.qpos[k];
        VLM_TRY(msda(r, q, q, 0, Q, &L->cross, ref));
        add_norm(r, tgt, q, Q, L->ln1, L->ln1_b);
        VLM_TRY(ffn(r, tgt, Q, &L->lin1, &L->lin2, L->ln3, L->ln3_b));
        /* the normed output (what the heads read) */
        vlm_layernorm(r->pool, q, tgt, m->dec_norm, m->dec_norm_b, c->eps, Q, d);
        if (taps && taps->hs) memcpy(taps->hs + (size_t)i * Q * d, q, (size_t)Q * d * sizeof(float));
        /* box refinement: the decoder iterates on the raw output, the heads read the normed one */
        VLM_TRY(mlp(r, r->S.box, last ? q : tgt, Q, m->box, 3, r->S.hid));
        for (int k = 0; k < Q * 4; k++) r->S.box[k] = sigmoidf_ref(r->S.box[k] + inv_sigmoid(ref[k]));
        if (last) {
            for (int k = 0; k < Q; k++) logits[k] = dot(q + (size_t)k * d, prompt, d);
            memcpy(boxes, r->S.box, (size_t)Q * 4 * sizeof(float));
            /* the decoder's own last update (from the raw output) for the reference tap */
            if (taps && taps->refs) {
                VLM_TRY(mlp(r, r->S.box, tgt, Q, m->box, 3, r->S.hid));
                for (int k = 0; k < Q * 4; k++) r->S.box[k] = sigmoidf_ref(r->S.box[k] + inv_sigmoid(ref[k]));
                memcpy(taps->refs + (size_t)(i + 1) * Q * 4, r->S.box, (size_t)Q * 4 * sizeof(float));
            }
        } else {
            memcpy(ref, r->S.box, (size_t)Q * 4 * sizeof(float));
        }
    }
    return VLM_OK;
}

vlm_status vlm_upn_forward(const vlm_upn *m, vlm_pool *pool, const float *pixels, int H, int W, int prompt,
                           float *logits, float *boxes, const vlm_upn_taps *taps, double *seconds, void *scratch,
                           size_t scratch_size, vlm_err *err) {
    const vlm_upn_config *c = &m->cfg;
    if (!pixels || !logits || !boxes) return vlm_fail(err, VLM_ERR_ARG, "upn: NULL pixels or outputs");
    if (!m->swin || !m->swin->blocks[0] || !m->tgt) return vlm_fail(err, VLM_ERR_STATE, "upn: the model is not bound");
    if (prompt != 0 && prompt != 1) return vlm_fail(err, VLM_ERR_ARG, "upn: prompt must be 0 (fine) or 1 (coarse)");
    up_run run = {.m = m, .pool = pool}, *r = &run;
    VLM_TRY(vlm_upn_levels(m, H, W, r->hs, r->ws, &r->n_tok, err));
    if (r->n_tok < c->queries)
        return vlm_fail(err, VLM_ERR_ARG, "upn: image %dx%d gives %ld tokens, fewer than the %d queries", H, W, r->n_tok,
                        c->queries);
    for (int l = 0, s = 0; l < VLM_UPN_LEVELS; s += r->hs[l] * r->ws[l], l++) r->start[l] = s;
    const int nth = vlm_pool_size(pool);
    size_t need = carve(&r->S, m, H, W, nth, NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "upn scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&r->S, m, H, W, nth, scratch);
    r->mm = (vlm_mm_ctx){pool, c->compute, r->S.mm, r->S.mm_size, err};
    const int d = c->d_model;
    const size_t Sd = (size_t)r->n_tok * d * sizeof(float);

    double t[VLM_UPN_STAGES + 1];
    t[0] = vlm_seconds();
    VLM_TRY(vlm_swin_forward(m->swin, pool, pixels, H, W, r->S.feat, r->S.swin, r->S.swin_size, err));
    if (taps)
        for (int l = 0; l < VLM_SWIN_STAGES; l++)
            if (taps->backbone[l])
                memcpy(taps->backbone[l], r->S.feat[l],
                       (size_t)r->hs[l] * r->ws[l] * ((size_t)m->swin->cfg.embed << l) * sizeof(float));
    t[1] = vlm_seconds();
    VLM_TRY(neck(r));
    if (taps && taps->srcs) memcpy(taps->srcs, r->S.src, Sd);
    if (taps && taps->pos) memcpy(taps->pos, r->S.pos, Sd);
    t[2] = vlm_seconds();
    VLM_TRY(encoder(r));
    if (taps && taps->memory) memcpy(taps->memory, r->S.src, Sd);
    t[3] = vlm_seconds();
    VLM_TRY(two_stage(r, prompt, taps ? taps->enc_logits : NULL, taps ? taps->topk : NULL, taps ? taps->ref0 : NULL,
                      taps ? taps->select : NULL));
    t[4] = vlm_seconds();
    VLM_TRY(decoder(r, m->prompt[prompt], logits, boxes, taps));
    t[5] = vlm_seconds();
    if (seconds)
        for (int i = 0; i < VLM_UPN_STAGES; i++) seconds[i] = t[i + 1] - t[i];
    return VLM_OK;
}
