/* hfre.c — VLM-FO1's Hybrid Fine-grained Region Encoder and projectors (see hfre.h).
 *
 * Per call: (1) a RoIAlign plan (roi_align.c): for every box and every pooled map, one float weight per
 * map row and per map column (torchvision RoIAlign samples, aligned=False, adaptive grid, out-of-range
 * samples counted as zeros; the S x S bin mean and 1/count folded into the row weights; for aux levels
 * 1-3 the level-0 weights pushed through the transpose of PyTorch's bilinear upsampling); (2) pooling
 * with vlm_roi_pool; (3) SimpleFP levels (GEMMs, channel LayerNorm eps 1e-6, exact GELU, 2x2 max-pool,
 * conv.c), each pooled when computed; (4) region LayerNorms (eps 1e-5, double statistics) and the bbox
 * sine/cosine position embedding, in float32 without FMA contraction, as the reference computes it. */
#include "hfre.h"
#include "arena.h"
#include "cpu.h"
#include "ops.h"

#include <math.h>
#include <string.h>

#define MAX_GROUPS (VLM_HFRE_AUX_LEVELS + 4)   /* RoIAlign plan maps: aux levels + FPN levels */
_Static_assert(MAX_GROUPS <= VLM_ROI_MAX_MAPS && VLM_HFRE_AUX_LEVELS + VLM_HFRE_MAX_VT <= VLM_ROI_MAX_JOBS,
               "RoIAlign plan limits (ops.h)");
static const double fpn_stride[4] = {3.5, 7, 14, 28};

/* ---------------------------------------------------------------- sizes */

int vlm_hfre_aux_dim(const vlm_hfre *m) {
    if (!m->cfg.use_aux) return 0;
    int d = 0;
    for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) d += m->cfg.aux_c[l];
    return d;
}

int vlm_hfre_vt_dim(const vlm_hfre *m) {
    if (!m->cfg.use_vt) return 0;
    return m->cfg.simple_fpn ? 4 * m->cfg.fpn_c : m->cfg.n_vt * m->cfg.vt_c;
}

vlm_status vlm_hfre_validate(const vlm_hfre *m, vlm_err *err) {
    const vlm_hfre_config *c = &m->cfg;
    if (c->S < 1 || c->S > 1024) return vlm_fail(err, VLM_ERR_ARG, "hfre: roi output size %d out of range", c->S);
    if (!c->use_aux && !c->use_vt) return vlm_fail(err, VLM_ERR_ARG, "hfre: neither the aux nor the vt branch is on");
    if (c->use_aux)
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++)
            if (c->aux_c[l] <= 0) return vlm_fail(err, VLM_ERR_ARG, "hfre: aux level %d has %d channels", l, c->aux_c[l]);
    if (c->use_vt) {
        if (c->vt_c <= 0 || c->patch <= 0 || c->n_vt < 1 || c->n_vt > VLM_HFRE_MAX_VT)
            return vlm_fail(err, VLM_ERR_ARG, "hfre: bad vt configuration (channels %d, patch %d, maps %d)", c->vt_c,
                            c->patch, c->n_vt);
        if (c->simple_fpn) {
            int D = c->vt_c, F = c->fpn_c, D2 = D / 2, D4 = D / 4;
            if (F <= 0 || D % 4) return vlm_fail(err, VLM_ERR_ARG, "hfre: SimpleFP needs D %% 4 == 0 and F > 0");
            const vlm_fpn_stage *s = m->fpn;
            VLM_TRY(vlm_check_weight(&s[0].ct1, 4 * D2, D, 1, err, "hfre: simfp_1.0"));
            VLM_TRY(vlm_check_weight(&s[0].ct2, 4 * D4, D2, 1, err, "hfre: simfp_1.3"));
            if (!s[0].ln0.w || !s[0].ln0.b) return vlm_fail(err, VLM_ERR_KEY, "hfre: missing simfp_1.1 (LayerNorm)");
            VLM_TRY(vlm_check_weight(&s[1].ct1, 4 * D2, D, 1, err, "hfre: simfp_2.0"));
            const int cin[4] = {D4, D2, D, D};
            for (int l = 0; l < 4; l++) {
                VLM_TRY(vlm_check_weight(&s[l].c1, F, cin[l], 0, err, "hfre: simfp_%d 1x1 conv", l + 1));
                VLM_TRY(vlm_check_weight(&s[l].c3, 9 * (int64_t)F, F, 0, err, "hfre: simfp_%d 3x3 conv", l + 1));
                if (!s[l].ln1.w || !s[l].ln1.b || !s[l].ln3.w || !s[l].ln3.b)
                    return vlm_fail(err, VLM_ERR_KEY, "hfre: missing a conv LayerNorm of simfp_%d", l + 1);
            }
        }
    }
    int need = vlm_hfre_aux_dim(m) + vlm_hfre_vt_dim(m);
    if (c->R != need)
        return vlm_fail(err, VLM_ERR_SHAPE, "hfre: region width R = %d but the branches give %d (aux %d + vt %d)", c->R,
                        need, vlm_hfre_aux_dim(m), vlm_hfre_vt_dim(m));
    if (c->pe && c->R % 8)
        return vlm_fail(err, VLM_ERR_SHAPE, "hfre: the position embedding needs R %% 8 == 0 (R = %d)", c->R);
    if (c->pe < 0 || c->pe > 2 || (c->pe == 1 && !c->use_vt) || (c->pe == 2 && !c->use_aux))
        return vlm_fail(err, VLM_ERR_ARG, "hfre: bad position-embedding mode %d", c->pe);
    return VLM_OK;
}

/* ---------------------------------------------------------------- binding */

/* LayerNorm pair "<key>_w", "<key>_b" of n floats; an absent optional one stays off (w == NULL). */
static vlm_status bind_ln(vlm_hfre_ln *ln, const vlm_tensor_table *t, const char *key, int64_t n, int required,
                          vlm_err *err) {
    char kw[64];
    snprintf(kw, sizeof kw, "%s_w", key);
    ln->w = ln->b = NULL;
    if (!required && !vlm_tensor_find(t, kw)) return VLM_OK;
    VLM_TRY(vlm_tensor_vec(t, &ln->w, n, err, "%s_w", key));
    return vlm_tensor_vec(t, &ln->b, n, err, "%s_b", key);
}

vlm_status vlm_hfre_bind(vlm_hfre *m, const vlm_tensor_table *t, vlm_err *err) {
    const vlm_hfre_config *c = &m->cfg;
    memset(m->fpn, 0, sizeof m->fpn);
    if (c->use_vt && c->simple_fpn) {
        const int D = c->vt_c, F = c->fpn_c;
        vlm_fpn_stage *s = m->fpn;
        VLM_TRY(vlm_tensor_weight(t, &s[0].ct1, 2 * D, err, "fpn0.ct1"));
        VLM_TRY(vlm_tensor_weight(t, &s[0].ct2, D, err, "fpn0.ct2"));
        VLM_TRY(bind_ln(&s[0].ln0, t, "fpn0.ln0", D / 2, 1, err));
        VLM_TRY(vlm_tensor_weight(t, &s[1].ct1, 2 * D, err, "fpn1.ct1"));
        char key[32];
        for (int l = 0; l < 4; l++) {
            VLM_TRY(vlm_tensor_weight(t, &s[l].c1, -1, err, "fpn%d.c1", l));
            VLM_TRY(vlm_tensor_weight(t, &s[l].c3, -1, err, "fpn%d.c3", l));
            snprintf(key, sizeof key, "fpn%d.ln1", l);
            VLM_TRY(bind_ln(&s[l].ln1, t, key, F, 1, err));
            snprintf(key, sizeof key, "fpn%d.ln3", l);
            VLM_TRY(bind_ln(&s[l].ln3, t, key, F, 1, err));
        }
    }
    VLM_TRY(bind_ln(&m->aux_ln, t, "aux_ln", vlm_hfre_aux_dim(m), 0, err));
    VLM_TRY(bind_ln(&m->vt_ln, t, "vt_ln", vlm_hfre_vt_dim(m), 0, err));
    return vlm_hfre_validate(m, err);
}

/* ---------------------------------------------------------------- plan */

/* Map layout of the RoIAlign plan: aux levels 0..3 (if use_aux), then the vt maps: 1 map (no SimpleFP) or
 * 4 FPN levels. */
static void plan_layout(vlm_roi_plan *p, const vlm_hfre *m, const int aux_hw[][2], int gh, int gw, int N) {
    int H[MAX_GROUPS], W[MAX_GROUPS], g = 0;
    if (m->cfg.use_aux)
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++, g++) { H[g] = aux_hw[l][0]; W[g] = aux_hw[l][1]; }
    if (m->cfg.use_vt) {
        if (m->cfg.simple_fpn) {
            const int hh[4] = {4 * gh, 2 * gh, gh, gh / 2}, ww[4] = {4 * gw, 2 * gw, gw, gw / 2};
            for (int l = 0; l < 4; l++, g++) { H[g] = hh[l]; W[g] = ww[l]; }
        } else {
            H[g] = gh; W[g] = gw; g++;
        }
    }
    vlm_roi_plan_layout(p, g, H, W, N);
}

/* Builds every box's weights. dy, dx: double scratch of max H / W over groups (and H0/W0). */
static void plan_build(vlm_roi_plan *p, const vlm_hfre *m, const float *boxes_a, const float *boxes_q, double *dy,
                       double *dx, double *ey, double *ex) {
    const vlm_hfre_config *c = &m->cfg;
    const int S = c->S;
    for (int b = 0; b < p->N; b++) {
        float *blk = p->wts + (size_t)b * p->per_box;
        int *sp = p->span + (size_t)b * p->n_maps * 4;
        int g = 0;
        if (c->use_aux) {
            const float *bx = boxes_a + 4 * (size_t)b;
            int H0 = p->H[0], W0 = p->W[0];
            memset(dy, 0, sizeof(double) * H0);
            memset(dx, 0, sizeof(double) * W0);
            long gy = vlm_roi_axis_weights(dy, H0, bx[1], bx[3], 0.25f, S);
            long gx = vlm_roi_axis_weights(dx, W0, bx[0], bx[2], 0.25f, S);
            double cnt = (double)gy * (double)gx;
            double mul = 1.0 / ((cnt > 1 ? cnt : 1) * S * S);
            for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++, g++) {
                int H = p->H[g], W = p->W[g];
                float *wy = blk + p->off[g], *wx = wy + H;
                if (l == 0) {
                    vlm_roi_finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], dy, H, mul);
                    vlm_roi_finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], dx, W, 1.0);
                } else {
                    memset(ey, 0, sizeof(double) * H);
                    memset(ex, 0, sizeof(double) * W);
                    vlm_upsample_weights_t(ey, dy, H, H0);
                    vlm_upsample_weights_t(ex, dx, W, W0);
                    vlm_roi_finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], ey, H, mul);
                    vlm_roi_finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], ex, W, 1.0);
                }
            }
        }
        if (c->use_vt) {
            const float *bx = boxes_q + 4 * (size_t)b;
            int nl = c->simple_fpn ? 4 : 1;
            for (int l = 0; l < nl; l++, g++) {
                int H = p->H[g], W = p->W[g];
                float scale = c->simple_fpn ? (float)(1.0 / fpn_stride[l]) : (float)(1.0 / (double)c->patch);
                memset(dy, 0, sizeof(double) * H);
                memset(dx, 0, sizeof(double) * W);
                long gy = vlm_roi_axis_weights(dy, H, bx[1], bx[3], scale, S);
                long gx = vlm_roi_axis_weights(dx, W, bx[0], bx[2], scale, S);
                double cnt = (double)gy * (double)gx;
                double mul = 1.0 / ((cnt > 1 ? cnt : 1) * S * S);
                float *wy = blk + p->off[g], *wx = wy + H;
                vlm_roi_finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], dy, H, mul);
                vlm_roi_finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], dx, W, 1.0);
            }
        }
    }
}

/* ---------------------------------------------------------------- scratch */

typedef struct {
    vlm_roi_plan plan;
    double *dy, *dx, *ey, *ex;
    float *tmp, *dim_t;
    float *A, *B;
    void *mm;
    size_t mm_size, total;
} hfre_scratch;

static size_t fpn_mm_size(const vlm_hfre *m, int gh, int gw, int nth, size_t *bufA, size_t *bufB) {
    const vlm_hfre_config *c = &m->cfg;
    const size_t D = c->vt_c, F = c->fpn_c, n = (size_t)gh * gw;
    const size_t Hp[4] = {4 * (size_t)gh + 2, 2 * (size_t)gh + 2, (size_t)gh + 2, (size_t)gh / 2 + 2};
    const size_t Wp[4] = {4 * (size_t)gw + 2, 2 * (size_t)gw + 2, (size_t)gw + 2, (size_t)gw / 2 + 2};
    const size_t cin[4] = {D / 4, D / 2, D, D};
    /* level 1: T1 (A) [n][2D] -> T2 (B) [4n][D] -> P_in (A) -> P_mid (B) -> OUT (A);
     * levels 2-4: (T1 (A) ->) P_in (B) -> P_mid (A) -> OUT (B) */
    size_t a = n * 2 * D, b = 4 * n * D;
#define MAXTO(v, x) do { size_t _x = (x); if (_x > (v)) (v) = _x; } while (0)
    for (int l = 0; l < 4; l++) {
        size_t pin = Hp[l] * Wp[l] * cin[l], pmid = Hp[l] * Wp[l] * F, outp = (Hp[l] - 2) * Wp[l] * F;
        if (l == 0) { MAXTO(a, pin); MAXTO(b, pmid); MAXTO(a, outp); }
        else { MAXTO(b, pin); MAXTO(a, pmid); MAXTO(b, outp); }
    }
#undef MAXTO
    *bufA = a; *bufB = b;
    size_t mm = 0;
    const vlm_weight *ws[] = {&m->fpn[0].ct1, &m->fpn[0].ct2, &m->fpn[1].ct1};
    const int64_t ms[] = {(int64_t)n, 4 * (int64_t)n, (int64_t)n};
    for (int i = 0; i < 3; i++) mm = vlm_matmul_scratch_max(mm, ms[i], ws[i], c->compute, nth);
    for (int l = 0; l < 4; l++) {
        mm = vlm_matmul_scratch_max(mm, (int64_t)(Hp[l] * Wp[l]), &m->fpn[l].c1, c->compute, nth);
        vlm_weight tap = m->fpn[l].c3;
        tap.n = c->fpn_c;
        mm = vlm_matmul_scratch_max(mm, (int64_t)((Hp[l] - 2) * Wp[l]), &tap, c->compute, nth);
    }
    return mm;
}

/* Lays the scratch block out (a sizing pass when base is NULL); returns its bytes. */
static size_t carve(hfre_scratch *s, const vlm_hfre *m, const int aux_hw[][2], int gh, int gw, int N, int nth,
                    char *base) {
    vlm_arena a = {base, 0};
    plan_layout(&s->plan, m, aux_hw, gh, gw, N);
    int mh = 1, mw = 1;
    for (int g = 0; g < s->plan.n_maps; g++) {
        if (s->plan.H[g] > mh) mh = s->plan.H[g];
        if (s->plan.W[g] > mw) mw = s->plan.W[g];
    }
    VLM_ARENA_TAKE(&a, s->plan.wts, (size_t)N * s->plan.per_box);
    VLM_ARENA_TAKE(&a, s->plan.span, (size_t)N * s->plan.n_maps * 4);
    VLM_ARENA_TAKE(&a, s->dy, mh);
    VLM_ARENA_TAKE(&a, s->dx, mw);
    VLM_ARENA_TAKE(&a, s->ey, mh);
    VLM_ARENA_TAKE(&a, s->ex, mw);
    VLM_ARENA_TAKE(&a, s->tmp, (size_t)nth * vlm_roi_pool_scratch_floats());
    VLM_ARENA_TAKE(&a, s->dim_t, m->cfg.R / 4 + 1);
    size_t A = 0, B = 0, mm = 0;
    if (m->cfg.use_vt && m->cfg.simple_fpn) mm = fpn_mm_size(m, gh, gw, nth, &A, &B);
    VLM_ARENA_TAKE(&a, s->A, A);
    VLM_ARENA_TAKE(&a, s->B, B);
    s->mm = vlm_arena_take(&a, mm);
    s->mm_size = mm;
    s->total = a.off;
    return a.off;
}

size_t vlm_hfre_scratch_size(const vlm_hfre *m, const int aux_hw[VLM_HFRE_AUX_LEVELS][2], int gh, int gw, int N,
                             int n_threads) {
    hfre_scratch s;
    return carve(&s, m, aux_hw, gh, gw, N < 0 ? 0 : N, n_threads < 1 ? 1 : n_threads, NULL);
}

/* ---------------------------------------------------------------- SimpleFP level */

/* Computes FPN level l from the ViT map x [gh][gw][D]; returns the map (pitch W+2 pixels, F channels)
 * in *res with its size. */
static vlm_status fpn_level(const vlm_hfre *m, vlm_pool *pool, hfre_scratch *s, int l, const float *x, int gh, int gw,
                            const float **res, size_t *ld_row, vlm_err *err) {
    const vlm_hfre_config *c = &m->cfg;
    const vlm_fpn_stage *st = &m->fpn[l];
    const int D = c->vt_c, F = c->fpn_c, D2 = D / 2, D4 = D / 4;
    const long n = (long)gh * gw;
    const vlm_mm_ctx mm = {pool, c->compute, s->mm, s->mm_size, err};
    long H, W;
    int cin;
    float *Pin, *Pmid, *Out;
    if (l == 0) {         /* 2x2 transposed conv, LN + GELU, 2x2 transposed conv: 4x the ViT grid */
        H = 4L * gh; W = 4L * gw; cin = D4;
        Pin = s->A; Pmid = s->B; Out = s->A;
        VLM_TRY(vlm_mm(&mm, s->A, 4 * D2, x, D, n, &st->ct1, 0));                  /* [n][(a,b,o)] */
        vlm_layernorm(pool, s->A, s->A, st->ln0.w, st->ln0.b, 1e-6f, 4 * n, D2);   /* per (pixel, a, b) */
        vlm_gelu_erf(pool, s->A, (size_t)4 * n * D2);
        VLM_TRY(vlm_mm(&mm, s->B, 4 * D4, s->A, D2, 4 * n, &st->ct2, 0));          /* [(pix,a,b)][(a2,b2,o)] */
        vlm_convt2x2_scatter(pool, Pin, s->B, 2 * gh, 2 * gw, D4, 1);              /* P_in (A) from T2 (B) */
    } else if (l == 1) {  /* 2x2 transposed conv: 2x the ViT grid */
        H = 2L * gh; W = 2L * gw; cin = D2;
        Pin = s->B; Pmid = s->A; Out = s->B;
        VLM_TRY(vlm_mm(&mm, s->A, 4 * D2, x, D, n, &st->ct1, 0));
        vlm_convt2x2_scatter(pool, Pin, s->A, gh, gw, D2, 0);
    } else if (l == 2) {  /* the ViT grid itself */
        H = gh; W = gw; cin = D;
        Pin = s->B; Pmid = s->A; Out = s->B;
        for (long i = 0; i < H; i++)
            memcpy(Pin + ((size_t)(i + 1) * (W + 2) + 1) * cin, x + (size_t)i * W * cin, sizeof(float) * W * cin);
    } else {              /* 2x2 max-pool: half the ViT grid */
        H = gh / 2; W = gw / 2; cin = D;
        Pin = s->B; Pmid = s->A; Out = s->B;
        vlm_maxpool2x2(pool, Pin, x, gh, gw, D);
    }
    vlm_zero_border(Pin, H, W, cin);
    const size_t pitch = (size_t)W + 2;
    /* 1x1 conv over the whole padded grid: the zero border stays zero (no bias); LN on the interior */
    VLM_TRY(vlm_mm(&mm, Pmid, F, Pin, cin, (int64_t)((H + 2) * pitch), &st->c1, 0));
    vlm_layernorm_grid(pool, Pmid + (pitch + 1) * F, st->ln1.w, st->ln1.b, 1e-6f, pitch, H, W, F);
    /* 3x3 conv, padding 1, over H rows of the padded pitch; then LN */
    VLM_TRY(vlm_conv3x3_padded(&mm, Out, Pmid, &st->c3, H, pitch, F));
    vlm_layernorm_grid(pool, Out, st->ln3.w, st->ln3.b, 1e-6f, pitch, H, W, F);
    *res = Out;
    *ld_row = pitch * F;
    return VLM_OK;
}

/* ---------------------------------------------------------------- position embedding */

/* out[R] += [E(cy) | E(cx) | E(w) | E(h)], d = R/4, E(v)[k] = sin / cos (v*2pi / 10000^(2*(k/2)/d)),
 * with the reference's float32 steps (normalize, w = x2 - x1, cx = x1 + w/2). */
VLM_NO_CONTRACT static void add_pe(float *o, int R, const float *bx, float Wn, float Hn, const float *dim_t) {
    float x1 = bx[0] / Wn, y1 = bx[1] / Hn, x2 = bx[2] / Wn, y2 = bx[3] / Hn;
    float w = x2 - x1, h = y2 - y1;
    float cx = x1 + w / 2, cy = y1 + h / 2;
    const float v[4] = {cy, cx, w, h};
    const int d = R / 4;
    for (int q = 0; q < 4; q++) {
        float e = v[q] * 6.2831855f;
        for (int k = 0; k < d; k++) {
            float a = e / dim_t[k];
            o[q * d + k] += (k & 1) ? cosf(a) : sinf(a);
        }
    }
}

/* ---------------------------------------------------------------- forward */

vlm_status vlm_hfre_forward(const vlm_hfre *m, vlm_pool *pool, const float *const aux[VLM_HFRE_AUX_LEVELS],
                            const int aux_hw[VLM_HFRE_AUX_LEVELS][2], const float *const vt[], int gh, int gw,
                            const float *boxes_a, const float *boxes_q, int N, float *out, void *scratch,
                            size_t scratch_size, vlm_err *err) {
    const vlm_hfre_config *c = &m->cfg;
    if (N < 0) return vlm_fail(err, VLM_ERR_ARG, "hfre: negative box count");
    if (N == 0) return VLM_OK;
    if (c->use_aux) {
        if (!boxes_a) return vlm_fail(err, VLM_ERR_ARG, "hfre: aux boxes missing");
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
            if (!aux[l] || aux_hw[l][0] <= 0 || aux_hw[l][1] <= 0)
                return vlm_fail(err, VLM_ERR_SHAPE, "hfre: aux level %d is missing or empty", l);
            if (aux_hw[l][0] > aux_hw[0][0] || aux_hw[l][1] > aux_hw[0][1])
                return vlm_fail(err, VLM_ERR_SHAPE, "hfre: aux level %d (%dx%d) is larger than level 0 (%dx%d)", l,
                                aux_hw[l][0], aux_hw[l][1], aux_hw[0][0], aux_hw[0][1]);
        }
    }
    if (c->use_vt) {
        if (!boxes_q || !vt) return vlm_fail(err, VLM_ERR_ARG, "hfre: vt maps or boxes missing");
        if (gh <= 0 || gw <= 0 || (c->simple_fpn && (gh < 2 || gw < 2)))
            return vlm_fail(err, VLM_ERR_SHAPE, "hfre: bad ViT grid %dx%d", gh, gw);
        for (int k = 0; k < c->n_vt; k++)
            if (!vt[k] && (!c->simple_fpn || k == c->n_vt - 1)) return vlm_fail(err, VLM_ERR_ARG, "hfre: vt map %d missing", k);
    }
    for (int b = 0; b < N; b++)
        for (int k = 0; k < 4; k++) {
            float va = boxes_a && c->use_aux ? boxes_a[4 * b + k] : 0, vq = boxes_q && c->use_vt ? boxes_q[4 * b + k] : 0;
            if (!(fabsf(va) <= VLM_HFRE_MAX_COORD) || !(fabsf(vq) <= VLM_HFRE_MAX_COORD))
                return vlm_fail(err, VLM_ERR_ARG, "hfre: box %d has a non-finite coordinate or one beyond +-1e7", b);
        }
    const int nth = vlm_pool_size(pool);
    hfre_scratch s;
    size_t need = carve(&s, m, aux_hw, gh, gw, N, nth, NULL);
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "hfre: scratch too small: %zu < %zu bytes", scratch_size, need);
    carve(&s, m, aux_hw, gh, gw, N, nth, scratch);
    plan_build(&s.plan, m, boxes_a, boxes_q, s.dy, s.dx, s.ey, s.ex);

    const int Da = vlm_hfre_aux_dim(m), Dv = vlm_hfre_vt_dim(m);
    vlm_roi_job jobs[VLM_HFRE_AUX_LEVELS + VLM_HFRE_MAX_VT];
    int nj = 0, off = 0;
    if (c->use_aux) {
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
            jobs[nj++] = (vlm_roi_job){aux[l], (size_t)aux_hw[l][1] * c->aux_c[l], c->aux_c[l], l, off};
            off += c->aux_c[l];
        }
    }
    const int g_vt = c->use_aux ? VLM_HFRE_AUX_LEVELS : 0;
    if (c->use_vt && !c->simple_fpn) {
        for (int k = 0; k < c->n_vt; k++) {
            jobs[nj++] = (vlm_roi_job){vt[k], (size_t)gw * c->vt_c, c->vt_c, g_vt, off};
            off += c->vt_c;
        }
    }
    vlm_roi_pool(pool, out, c->R, jobs, nj, &s.plan, s.tmp);
    if (c->use_vt && c->simple_fpn) {
        const float *x = vt[c->n_vt - 1];
        for (int l = 0; l < 4; l++) {
            const float *map;
            size_t ld;
            VLM_TRY(fpn_level(m, pool, &s, l, x, gh, gw, &map, &ld, err));
            vlm_roi_job j = {map, ld, c->fpn_c, g_vt + l, Da + l * c->fpn_c};
            vlm_roi_pool(pool, out, c->R, &j, 1, &s.plan, s.tmp);
        }
    }
    /* region LayerNorms, then the position embedding */
    for (int b = 0; b < N; b++) {
        float *o = out + (size_t)b * c->R;
        if (c->use_aux && m->aux_ln.w) vlm_layernorm_row_f64(o, o, m->aux_ln.w, m->aux_ln.b, 1e-5, Da);
        if (c->use_vt && c->use_aux && m->vt_ln.w) vlm_layernorm_row_f64(o + Da, o + Da, m->vt_ln.w, m->vt_ln.b, 1e-5, Dv);
    }
    if (c->pe) {
        float Wn, Hn;
        const float *bx;
        if (c->pe == 1) {   /* the reference: max map width / (1/patch) in double, used as a float32 divisor */
            Wn = (float)((double)gw / (1.0 / (double)c->patch));
            Hn = (float)((double)gh / (1.0 / (double)c->patch));
            bx = boxes_q;
        } else {
            Wn = (float)((double)aux_hw[0][1] / 0.25);
            Hn = (float)((double)aux_hw[0][0] / 0.25);
            bx = boxes_a;
        }
        const int d = c->R / 4;
        for (int k = 0; k < d; k++) s.dim_t[k] = powf(10000.0f, (float)(2 * (k / 2)) / (float)d);
        for (int b = 0; b < N; b++) add_pe(out + (size_t)b * c->R, c->R, bx + 4 * (size_t)b, Wn, Hn, s.dim_t);
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- projectors */

vlm_status vlm_mlp_bind(vlm_mlp *p, const vlm_tensor_table *t, vlm_err *err) {
    if (p->n_layers < 1 || p->n_layers > VLM_MLP_MAX_LAYERS || !p->name)
        return vlm_fail(err, VLM_ERR_ARG, "projector: %d layers (1..%d supported)", p->n_layers, VLM_MLP_MAX_LAYERS);
    for (int i = 0; i < p->n_layers; i++) {
        VLM_TRY(vlm_tensor_weight(t, &p->layers[i], -1, err, "%s.%d", p->name, i));   /* bias: one per output row */
        VLM_TRY(vlm_tensor_vec(t, &p->layers[i].bias, p->layers[i].n, err, "%s.%d_bias", p->name, i));
    }
    return vlm_mlp_validate(p, err);
}

vlm_status vlm_mlp_validate(const vlm_mlp *p, vlm_err *err) {
    if (p->n_layers < 1 || p->n_layers > VLM_MLP_MAX_LAYERS)
        return vlm_fail(err, VLM_ERR_ARG, "projector: %d layers (1..%d supported)", p->n_layers, VLM_MLP_MAX_LAYERS);
    for (int i = 0; i < p->n_layers; i++) {
        const vlm_weight *w = &p->layers[i];
        VLM_TRY(vlm_check_weight(w, w->n, i > 0 ? p->layers[i - 1].n : w->k, 1, err, "projector: layer %d", i));
    }
    return VLM_OK;
}

/* Lays the projector scratch out (a sizing pass when base is NULL): two ping-pong activation buffers
 * (none for one layer) and the matmul scratch; returns its bytes. */
static size_t mlp_carve(const vlm_mlp *p, int64_t m, int n_threads, char *base, float *bufs[2], vlm_mm_ctx *mm) {
    size_t mx = 0, z = 0;
    for (int i = 0; i < p->n_layers; i++) {
        if ((size_t)p->layers[i].n > mx) mx = (size_t)p->layers[i].n;
        z = vlm_matmul_scratch_max(z, m, &p->layers[i], p->compute, n_threads);
    }
    vlm_arena a = {base, 0};
    size_t buf = p->n_layers > 1 ? (size_t)m * mx : 0;
    VLM_ARENA_TAKE(&a, bufs[0], buf);
    VLM_ARENA_TAKE(&a, bufs[1], buf);
    mm->scratch = vlm_arena_take(&a, z);
    mm->scratch_size = z;
    return a.off;
}

size_t vlm_mlp_scratch_size(const vlm_mlp *p, int64_t m, int n_threads) {
    float *bufs[2];
    vlm_mm_ctx mm;
    return mlp_carve(p, m, n_threads, NULL, bufs, &mm);
}

vlm_status vlm_mlp_forward(const vlm_mlp *p, vlm_pool *pool, float *out, const float *x, int64_t m, void *scratch,
                           size_t scratch_size, vlm_err *err) {
    VLM_TRY(vlm_mlp_validate(p, err));
    if (m <= 0) return VLM_OK;
    size_t need = vlm_mlp_scratch_size(p, m, vlm_pool_size(pool));
    if (need && (!scratch || scratch_size < need))
        return vlm_fail(err, VLM_ERR_ARG, "projector: scratch too small: %zu < %zu bytes", scratch_size, need);
    float *bufs[2];
    vlm_mm_ctx mm = {pool, p->compute, NULL, 0, err};
    mlp_carve(p, m, vlm_pool_size(pool), scratch, bufs, &mm);
    const float *in = x;
    for (int i = 0; i < p->n_layers; i++) {
        const vlm_weight *w = &p->layers[i];
        float *dst = i == p->n_layers - 1 ? out : bufs[i & 1];
        VLM_TRY(vlm_mm(&mm, dst, w->n, in, w->k, m, w, 0));
        if (i < p->n_layers - 1) {
            vlm_gelu_erf(pool, dst, (size_t)m * w->n);
        }
        in = dst;
    }
    return VLM_OK;
}
