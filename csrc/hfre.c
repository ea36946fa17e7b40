/* hfre.c — VLM-FO1's Hybrid Fine-grained Region Encoder and projectors (see hfre.h).
 *
 * Per call: (1) a plan: for every box and every pooled map ("group"), one float weight per map row
 * and per map column (torchvision RoIAlign samples, aligned=False, adaptive grid, out-of-range
 * samples counted as zeros; the S x S bin mean and 1/count folded into the row weights; for aux
 * levels 1-3 the level-0 weights pushed through the transpose of PyTorch's bilinear upsampling);
 * (2) pooling: out[b][c] = sum_y wy[y] sum_x wx[x] map[y][x][c] over the box window, work items of
 * (map, box, 128 channels) handed out through an atomic counter, each computed by one thread in a
 * fixed order (results do not depend on the thread count); (3) SimpleFP levels (GEMMs through
 * vlm_matmul, channel LayerNorm eps 1e-6, exact GELU, 2x2 max-pool), each pooled when computed;
 * (4) region LayerNorms (eps 1e-5) and the bbox sine/cosine position embedding, in float32.
 * Sample coordinates and interpolation weights are computed with the reference's float32
 * expressions and without FMA contraction. */
#include "hfre.h"
#include "arena.h"

#include "ops.h"
#include "simd.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#define POOL_CH 128          /* channels per pooling work item */
#define MAX_GROUPS (VLM_HFRE_AUX_LEVELS + 4)
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

/* ---------------------------------------------------------------- plan */

typedef struct {
    int n_groups, N;
    int H[MAX_GROUPS], W[MAX_GROUPS];
    size_t off[MAX_GROUPS];   /* float offset of a group's [H] row + [W] column weights inside a box's block */
    size_t per_box;           /* floats per box */
    float *wts;               /* [N][per_box] */
    int *span;                /* [N][n_groups][4]: y_lo, y_hi, x_lo, x_hi (inclusive; y_lo > y_hi: empty) */
} hfre_plan;

/* Group layout: aux levels 0..3 (if use_aux), then the vt maps: 1 group (no SimpleFP) or 4 FPN levels. */
static void plan_layout(hfre_plan *p, const vlm_hfre *m, const int aux_hw[][2], int gh, int gw, int N) {
    int g = 0;
    if (m->cfg.use_aux)
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++, g++) { p->H[g] = aux_hw[l][0]; p->W[g] = aux_hw[l][1]; }
    if (m->cfg.use_vt) {
        if (m->cfg.simple_fpn) {
            const int hh[4] = {4 * gh, 2 * gh, gh, gh / 2}, ww[4] = {4 * gw, 2 * gw, gw, gw / 2};
            for (int l = 0; l < 4; l++, g++) { p->H[g] = hh[l]; p->W[g] = ww[l]; }
        } else {
            p->H[g] = gh; p->W[g] = gw; g++;
        }
    }
    p->n_groups = g;
    p->N = N;
    size_t o = 0;
    for (int i = 0; i < g; i++) { p->off[i] = o; o += (size_t)p->H[i] + p->W[i]; }
    p->per_box = o;
}

/* RoIAlign sample weights along one axis, accumulated into w[0 .. len): bilinear weights of the
 * S*grid sample positions start + p*bin + (i + .5)*bin/grid, exactly torchvision's float32 formulas. */
VLM_NO_CONTRACT static long axis_weights(double *w, int len, float a1, float a2, float scale, int S) {
    float st = a1 * scale, en = a2 * scale;
    float ext = en - st;
    if (ext < 1.0f) ext = 1.0f;
    float bin = ext / (float)S;
    float gf = ceilf(ext / (float)S);
    long grid = (long)gf;
    const float fl = (float)len;
    for (int p = 0; p < S; p++) {
        float base = st + (float)p * bin;
        for (long i = 0; i < grid; i++) {
            float y = base + (float)((float)i + .5f) * bin / gf;
            if (y < -1.0f || y > fl) continue;
            if (y <= 0) y = 0;
            int lo = (int)y, hi;
            if (lo >= len - 1) { hi = lo = len - 1; y = (float)lo; }
            else hi = lo + 1;
            float ly = y - (float)lo, hy = 1.0f - ly;
            w[lo] += hy;
            w[hi] += ly;
        }
    }
    return grid;
}

/* PyTorch's bilinear source index (align_corners=False) of output index d: i0, i1, lambda0, lambda1. */
VLM_NO_CONTRACT static void up_index(int in, int out, int d, int *i0, int *i1, float *l0, float *l1) {
    float scale = (float)in / (float)out;
    float src = scale * ((float)d + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    int a = (int)src;
    *i0 = a;
    *i1 = a + (a < in - 1 ? 1 : 0);
    float l = src - (float)a;
    l = l < 0 ? 0 : (l > 1 ? 1 : l);
    *l1 = l;
    *l0 = 1.0f - l;
}

/* w_out[0..in) += U^T w_in: a weight vector over the `out` upsampled positions moved to the `in`
 * source positions. */
static void up_transpose(double *w_out, const double *w_in, int in, int out) {
    for (int d = 0; d < out; d++) {
        if (w_in[d] == 0) continue;
        int i0, i1;
        float l0, l1;
        up_index(in, out, d, &i0, &i1, &l0, &l1);
        w_out[i0] += w_in[d] * l0;
        w_out[i1] += w_in[d] * l1;
    }
}

/* double weights -> float weights times `mul`, and the inclusive range of non-zeros. */
static void finish_axis(float *dst, int *lo, int *hi, const double *w, int len, double mul) {
    *lo = len; *hi = -1;
    for (int i = 0; i < len; i++) {
        dst[i] = (float)(w[i] * mul);
        if (dst[i] != 0.0f) { if (i < *lo) *lo = i; *hi = i; }
    }
}

/* Builds every box's weights. dy, dx: double scratch of max H / W over groups (and H0/W0). */
static void plan_build(hfre_plan *p, const vlm_hfre *m, const float *boxes_a, const float *boxes_q, double *dy,
                       double *dx, double *ey, double *ex) {
    const vlm_hfre_config *c = &m->cfg;
    const int S = c->S;
    for (int b = 0; b < p->N; b++) {
        float *blk = p->wts + (size_t)b * p->per_box;
        int *sp = p->span + (size_t)b * p->n_groups * 4;
        int g = 0;
        if (c->use_aux) {
            const float *bx = boxes_a + 4 * (size_t)b;
            int H0 = p->H[0], W0 = p->W[0];
            memset(dy, 0, sizeof(double) * H0);
            memset(dx, 0, sizeof(double) * W0);
            long gy = axis_weights(dy, H0, bx[1], bx[3], 0.25f, S);
            long gx = axis_weights(dx, W0, bx[0], bx[2], 0.25f, S);
            double cnt = (double)gy * (double)gx;
            double mul = 1.0 / ((cnt > 1 ? cnt : 1) * S * S);
            for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++, g++) {
                int H = p->H[g], W = p->W[g];
                float *wy = blk + p->off[g], *wx = wy + H;
                if (l == 0) {
                    finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], dy, H, mul);
                    finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], dx, W, 1.0);
                } else {
                    memset(ey, 0, sizeof(double) * H);
                    memset(ex, 0, sizeof(double) * W);
                    up_transpose(ey, dy, H, H0);
                    up_transpose(ex, dx, W, W0);
                    finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], ey, H, mul);
                    finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], ex, W, 1.0);
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
                long gy = axis_weights(dy, H, bx[1], bx[3], scale, S);
                long gx = axis_weights(dx, W, bx[0], bx[2], scale, S);
                double cnt = (double)gy * (double)gx;
                double mul = 1.0 / ((cnt > 1 ? cnt : 1) * S * S);
                float *wy = blk + p->off[g], *wx = wy + H;
                finish_axis(wy, &sp[4 * g], &sp[4 * g + 1], dy, H, mul);
                finish_axis(wx, &sp[4 * g + 2], &sp[4 * g + 3], dx, W, 1.0);
            }
        }
    }
}

/* ---------------------------------------------------------------- pooling */

typedef struct {
    const float *map;    /* [H][row pitch] pixels of C floats */
    size_t ld_row;       /* floats between rows */
    int C, group, out_off;
} pool_job;

typedef struct {
    const pool_job *jobs;
    int n_jobs;
    long start[MAX_GROUPS * VLM_HFRE_MAX_VT + 1];   /* first item of each job */
    const hfre_plan *plan;
    float *out;
    int R;
    float *tmp;          /* [nth][2*POOL_CH] */
    atomic_long next;
} pool_ctx;

/* acc[0..n) = sum_y wy[y] sum_x wx[x] map[y][x][0..n) over the spans (pixel stride C). */
VLM_CLONES static void pool_window(float *restrict acc, float *restrict row, const float *map, size_t ld_row, int C,
                                   int n, const float *wy, int y0, int y1, const float *wx, int x0, int x1) {
    for (int i = 0; i < n; i++) acc[i] = 0;
    for (int y = y0; y <= y1; y++) {
        float a = wy[y];
        if (a == 0.0f) continue;
        for (int i = 0; i < n; i++) row[i] = 0;
        const float *mr = map + (size_t)y * ld_row;
        for (int x = x0; x <= x1; x++) {
            float w = wx[x];
            if (w == 0.0f) continue;
            const float *px = mr + (size_t)x * C;
            for (int i = 0; i < n; i++) row[i] += w * px[i];
        }
        for (int i = 0; i < n; i++) acc[i] += a * row[i];
    }
}

static void pool_task(void *pv, int ith, int nth) {
    pool_ctx *c = pv;
    const hfre_plan *p = c->plan;
    float *acc = c->tmp + (size_t)ith * 2 * POOL_CH, *row = acc + POOL_CH;
    const long total = c->start[c->n_jobs];
    for (;;) {
        long it = atomic_fetch_add(&c->next, 1);
        if (it >= total) break;
        int j = 0;
        while (it >= c->start[j + 1]) j++;
        const pool_job *J = &c->jobs[j];
        long r = it - c->start[j];
        int nch = (J->C + POOL_CH - 1) / POOL_CH;
        int b = (int)(r / nch), ch = (int)(r % nch);
        int c0 = ch * POOL_CH, n = J->C - c0 < POOL_CH ? J->C - c0 : POOL_CH;
        int g = J->group;
        const int *sp = p->span + ((size_t)b * p->n_groups + g) * 4;
        const float *wy = p->wts + (size_t)b * p->per_box + p->off[g], *wx = wy + p->H[g];
        float *o = c->out + (size_t)b * c->R + J->out_off + c0;
        if (sp[0] > sp[1] || sp[2] > sp[3]) { memset(o, 0, sizeof(float) * n); continue; }
        pool_window(acc, row, J->map + c0, J->ld_row, J->C, n, wy, sp[0], sp[1], wx, sp[2], sp[3]);
        memcpy(o, acc, sizeof(float) * n);
    }
    (void)nth;
}

static void run_pool(vlm_pool *pool, const pool_job *jobs, int n_jobs, const hfre_plan *p, float *out, int R,
                     float *tmp) {
    pool_ctx c = {.jobs = jobs, .n_jobs = n_jobs, .plan = p, .out = out, .R = R, .tmp = tmp};
    c.start[0] = 0;
    for (int j = 0; j < n_jobs; j++) c.start[j + 1] = c.start[j] + (long)p->N * ((jobs[j].C + POOL_CH - 1) / POOL_CH);
    atomic_init(&c.next, 0);
    if (c.start[n_jobs] > 0) vlm_pool_run(pool, pool_task, &c);
}

/* ---------------------------------------------------------------- SimpleFP helpers */

/* Channel LayerNorm (eps) of rows of C floats, optionally followed by exact GELU; rows are the
 * pixels (i, j) of an H x W grid at x + (i*pitch + j)*C, in place. */
typedef struct { float *x; size_t pitch; long H, W; int C; const float *w, *b; float eps; int gelu; } ln_ctx;

VLM_CLONES static void ln_row(float *v, int C, const float *w, const float *b, float eps, int gelu) {
    vlm_layernorm_row(v, v, w, b, eps, C);
    if (gelu)
        for (int i = 0; i < C; i++) v[i] = 0.5f * v[i] * (1.0f + erff(v[i] * 0.70710678118654752f));
}

static void ln_task(void *pv, int ith, int nth) {
    ln_ctx *c = pv;
    long lo, hi;
    vlm_split(c->H * c->W, 1, ith, nth, &lo, &hi);
    for (long t = lo; t < hi; t++) {
        long i = t / c->W, j = t % c->W;
        ln_row(c->x + ((size_t)i * c->pitch + j) * c->C, c->C, c->w, c->b, c->eps, c->gelu);
    }
}

static void ln_grid(vlm_pool *pool, float *x, size_t pitch, long H, long W, int C, const vlm_hfre_ln *ln, float eps,
                    int gelu) {
    ln_ctx c = {x, pitch, H, W, C, ln->w, ln->b, eps, gelu};
    vlm_pool_run(pool, ln_task, &c);
}

/* GEMM output of a k=s=2 transposed conv, rows r of 4*Co floats ordered (a, b, o), into a padded
 * map P[(Ho+2)][(Wo+2)][Co] (Ho = 2*Hs, Wo = 2*Ws). Source row r is the input pixel (yy, xx) of an
 * Hs x Ws grid; with `sub`, rows come from a previous transposed conv, r = ((i*Wi + j)*2 + a)*2 + b
 * for (yy, xx) = (2i + a, 2j + b) with Wi = Ws/2. */
typedef struct { float *P; const float *T; int Hs, Ws, Co, sub; } scat_ctx;

static void scat_task(void *pv, int ith, int nth) {
    scat_ctx *c = pv;
    long lo, hi;
    vlm_split((long)c->Hs * c->Ws, 1, ith, nth, &lo, &hi);
    const size_t pitch = (size_t)2 * c->Ws + 2;
    for (long r = lo; r < hi; r++) {
        long yy, xx;
        if (c->sub) {
            long pix = r / 4, a = (r / 2) % 2, bb = r % 2, Wi = c->Ws / 2;
            yy = 2 * (pix / Wi) + a; xx = 2 * (pix % Wi) + bb;
        } else {
            yy = r / c->Ws; xx = r % c->Ws;
        }
        const float *src = c->T + (size_t)r * 4 * c->Co;
        for (int a = 0; a < 2; a++)
            for (int b = 0; b < 2; b++)
                memcpy(c->P + ((size_t)(2 * yy + a + 1) * pitch + (2 * xx + b + 1)) * c->Co, src + (size_t)(2 * a + b) * c->Co,
                       sizeof(float) * c->Co);
    }
}

/* Zero the one-pixel border of a padded [(H+2)][(W+2)][C] map. */
static void zero_border(float *P, long H, long W, int C) {
    size_t pitch = (size_t)(W + 2) * C;
    memset(P, 0, sizeof(float) * pitch);
    memset(P + (size_t)(H + 1) * pitch, 0, sizeof(float) * pitch);
    for (long i = 1; i <= H; i++) {
        memset(P + i * pitch, 0, sizeof(float) * C);
        memset(P + i * pitch + (size_t)(W + 1) * C, 0, sizeof(float) * C);
    }
}

/* 2x2 max-pool (floor) of x[H][W][C] into the interior of a padded [(H/2+2)][(W/2+2)][C] map. */
typedef struct { float *P; const float *x; int H, W, C; } mp_ctx;

VLM_CLONES static void mp_pix(float *o, const float *a, const float *b, const float *c, const float *d, int C) {
    for (int i = 0; i < C; i++) {
        float m1 = a[i] > b[i] ? a[i] : b[i], m2 = c[i] > d[i] ? c[i] : d[i];
        o[i] = m1 > m2 ? m1 : m2;
    }
}

static void mp_task(void *pv, int ith, int nth) {
    mp_ctx *c = pv;
    int Ho = c->H / 2, Wo = c->W / 2;
    long lo, hi;
    vlm_split((long)Ho * Wo, 1, ith, nth, &lo, &hi);
    size_t C = c->C, pitch = (size_t)(Wo + 2);
    for (long t = lo; t < hi; t++) {
        long i = t / Wo, j = t % Wo;
        const float *r0 = c->x + ((size_t)(2 * i) * c->W + 2 * j) * C, *r1 = r0 + (size_t)c->W * C;
        mp_pix(c->P + ((size_t)(i + 1) * pitch + j + 1) * C, r0, r0 + C, r1, r1 + C, c->C);
    }
}

/* ---------------------------------------------------------------- scratch */

typedef struct {
    hfre_plan plan;
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
    for (int g = 0; g < s->plan.n_groups; g++) {
        if (s->plan.H[g] > mh) mh = s->plan.H[g];
        if (s->plan.W[g] > mw) mw = s->plan.W[g];
    }
    VLM_ARENA_TAKE(&a, s->plan.wts, (size_t)N * s->plan.per_box);
    VLM_ARENA_TAKE(&a, s->plan.span, (size_t)N * s->plan.n_groups * 4);
    VLM_ARENA_TAKE(&a, s->dy, mh);
    VLM_ARENA_TAKE(&a, s->dx, mw);
    VLM_ARENA_TAKE(&a, s->ey, mh);
    VLM_ARENA_TAKE(&a, s->ex, mw);
    VLM_ARENA_TAKE(&a, s->tmp, (size_t)nth * 2 * POOL_CH);
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
    if (l == 0) {
        H = 4L * gh; W = 4L * gw; cin = D4;
        VLM_TRY(vlm_mm(&mm, s->A, 4 * D2, x, D, n, &st->ct1, 0));                       /* [n][(a,b,o)] */
        ln_grid(pool, s->A, 1, 4 * n, 1, D2, &st->ln0, 1e-6f, 1);    /* LN + GELU per (pixel, a, b) */
        VLM_TRY(vlm_mm(&mm, s->B, 4 * D4, s->A, D2, 4 * n, &st->ct2, 0));               /* [(pix,a,b)][(a2,b2,o)] */
        Pin = s->A; Pmid = s->B; Out = s->A;
        scat_ctx sc = {Pin, s->B, 2 * gh, 2 * gw, D4, 1};
        /* P_in (A) is written from T2 (B): different buffers */
        vlm_pool_run(pool, scat_task, &sc);
        zero_border(Pin, H, W, cin);
    } else if (l == 1) {
        H = 2L * gh; W = 2L * gw; cin = D2;
        VLM_TRY(vlm_mm(&mm, s->A, 4 * D2, x, D, n, &st->ct1, 0));
        Pin = s->B; Pmid = s->A; Out = s->B;
        scat_ctx sc = {Pin, s->A, gh, gw, D2, 0};
        vlm_pool_run(pool, scat_task, &sc);
        zero_border(Pin, H, W, cin);
    } else if (l == 2) {
        H = gh; W = gw; cin = D;
        Pin = s->B; Pmid = s->A; Out = s->B;
        for (long i = 0; i < H; i++)
            memcpy(Pin + ((size_t)(i + 1) * (W + 2) + 1) * cin, x + (size_t)i * W * cin, sizeof(float) * W * cin);
        zero_border(Pin, H, W, cin);
    } else {
        H = gh / 2; W = gw / 2; cin = D;
        Pin = s->B; Pmid = s->A; Out = s->B;
        mp_ctx mc = {Pin, x, gh, gw, D};
        vlm_pool_run(pool, mp_task, &mc);
        zero_border(Pin, H, W, cin);
    }
    const size_t pitch = (size_t)W + 2;
    /* 1x1 conv over the whole padded grid: the zero border stays zero (no bias); LN on the interior */
    VLM_TRY(vlm_mm(&mm, Pmid, F, Pin, cin, (int64_t)((H + 2) * pitch), &st->c1, 0));
    ln_grid(pool, Pmid + (pitch + 1) * F, pitch, H, W, F, &st->ln1, 1e-6f, 0);
    /* 3x3 conv, padding 1: Out[p] = sum_{ky,kx} Pmid[p + ky*pitch + kx] . W_tap, p over H rows of the
     * padded pitch (the last two columns of each row are junk and never read) */
    const int64_t rows = (int64_t)H * pitch - 2;
    const size_t esz = st->c3.dtype == VLM_BF16 ? 2 : 4;
    for (int t = 0; t < 9; t++) {
        vlm_weight tap = st->c3;
        tap.n = F;
        tap.data = (const char *)st->c3.data + (size_t)t * F * F * esz;
        VLM_TRY(vlm_mm(&mm, Out, F, Pmid + ((size_t)(t / 3) * pitch + t % 3) * F, F, rows, &tap, t > 0));
    }
    ln_grid(pool, Out, pitch, H, W, F, &st->ln3, 1e-6f, 0);
    *res = Out;
    *ld_row = pitch * F;
    return VLM_OK;
}

/* ---------------------------------------------------------------- region LN and PE */

static void region_ln(float *v, int C, const vlm_hfre_ln *ln) {
    double s = 0, q = 0;
    for (int i = 0; i < C; i++) s += v[i];
    double mu = s / C;
    for (int i = 0; i < C; i++) { double d = v[i] - mu; q += d * d; }
    float r = (float)(1.0 / sqrt(q / C + 1e-5));
    float muf = (float)mu;
    for (int i = 0; i < C; i++) v[i] = (v[i] - muf) * r * ln->w[i] + ln->b[i];
}

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
    pool_job jobs[VLM_HFRE_AUX_LEVELS + VLM_HFRE_MAX_VT];
    int nj = 0, off = 0;
    if (c->use_aux) {
        for (int l = 0; l < VLM_HFRE_AUX_LEVELS; l++) {
            jobs[nj++] = (pool_job){aux[l], (size_t)aux_hw[l][1] * c->aux_c[l], c->aux_c[l], l, off};
            off += c->aux_c[l];
        }
    }
    const int g_vt = c->use_aux ? VLM_HFRE_AUX_LEVELS : 0;
    if (c->use_vt && !c->simple_fpn) {
        for (int k = 0; k < c->n_vt; k++) {
            jobs[nj++] = (pool_job){vt[k], (size_t)gw * c->vt_c, c->vt_c, g_vt, off};
            off += c->vt_c;
        }
    }
    run_pool(pool, jobs, nj, &s.plan, out, c->R, s.tmp);
    if (c->use_vt && c->simple_fpn) {
        const float *x = vt[c->n_vt - 1];
        for (int l = 0; l < 4; l++) {
            const float *map;
            size_t ld;
            VLM_TRY(fpn_level(m, pool, &s, l, x, gh, gw, &map, &ld, err));
            pool_job j = {map, ld, c->fpn_c, g_vt + l, Da + l * c->fpn_c};
            run_pool(pool, &j, 1, &s.plan, out, c->R, s.tmp);
        }
    }
    /* region LayerNorms, then the position embedding */
    for (int b = 0; b < N; b++) {
        float *o = out + (size_t)b * c->R;
        if (c->use_aux && m->aux_ln.w) region_ln(o, Da, &m->aux_ln);
        if (c->use_vt && c->use_aux && m->vt_ln.w) region_ln(o + Da, Dv, &m->vt_ln);
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

typedef struct { float *x; size_t n; } gelu_ctx;

VLM_CLONES static void gelu_range(float *x, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

static void gelu_task(void *pv, int ith, int nth) {
    gelu_ctx *c = pv;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    gelu_range(c->x, (size_t)lo, (size_t)hi);
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
            gelu_ctx g = {dst, (size_t)m * w->n};
            vlm_pool_run(pool, gelu_task, &g);
        }
        in = dst;
    }
    return VLM_OK;
}
