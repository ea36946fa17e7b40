/* conv.c — convolution helpers (see ops.h): DaViT's residual depthwise 3x3 conv, im2col and the im2col
 * conv built on vlm_mm, the 3x3 conv of a zero-bordered map by 9 tap GEMMs, the scatter of a 2x2
 * stride-2 transposed conv's GEMM output, and the 2x2 max-pool (HFRE SimpleFP). Maps are channels-last. */
#include "ops.h"
#include "cpu.h"

#include <string.h>

/* ---------------------------------------------------------------- depthwise 3x3 conv, residual */

typedef struct { float *y; const float *x, *w, *b; int H, W, C; } dw_ctx;

/* y[h][w][:] = x[h][w][:] + b + sum over the 3x3 taps of x[h+dy][w+dx][:] * wt[tap][:] (zero padding) */
VLM_CLONES static void dw_rows(float *y, const float *x, const float *wt, const float *b, int H, int W, int C, int h0,
                               int h1) {
    for (int h = h0; h < h1; h++)
        for (int w = 0; w < W; w++) {
            float *yo = y + ((size_t)h * W + w) * C;
            for (int c = 0; c < C; c++) yo[c] = b[c];
            for (int dy = -1; dy <= 1; dy++) {
                int hh = h + dy;
                if (hh < 0 || hh >= H) continue;
                for (int dx = -1; dx <= 1; dx++) {
                    int ww = w + dx;
                    if (ww < 0 || ww >= W) continue;
                    const float *xs = x + ((size_t)hh * W + ww) * C, *wk = wt + (size_t)((dy + 1) * 3 + dx + 1) * C;
                    for (int c = 0; c < C; c++) yo[c] += xs[c] * wk[c];
                }
            }
            const float *xc = x + ((size_t)h * W + w) * C;
            for (int c = 0; c < C; c++) yo[c] += xc[c];
        }
}

static void dw_task(void *p, int ith, int nth) {
    dw_ctx *c = p;
    long lo, hi;
    vlm_split(c->H, 1, ith, nth, &lo, &hi);
    dw_rows(c->y, c->x, c->w, c->b, c->H, c->W, c->C, (int)lo, (int)hi);
}

void vlm_dwconv3x3_residual(vlm_pool *pool, float *y, const float *x, const float *wt, const float *b, int H, int W,
                            int C) {
    dw_ctx c = {y, x, wt, b, H, W, C};
    vlm_pool_run(pool, dw_task, &c);
}

/* ---------------------------------------------------------------- im2col and the im2col conv */

typedef struct {
    float *col; const float *in; int chan_last, Hi, Wi, Ci, k, st, pd, Wo; long r0, nr;
} col_ctx;

static void col_task(void *p, int ith, int nth) {
    const col_ctx *c = p;
    const int k = c->k, kk = k * k, K = c->Ci * kk;
    long lo, hi;
    vlm_split(c->nr, 1, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        long pix = c->r0 + r;
        int oy = (int)(pix / c->Wo), ox = (int)(pix % c->Wo);
        float *dst = c->col + (size_t)r * K;
        for (int ky = 0; ky < k; ky++) {
            int iy = oy * c->st - c->pd + ky;
            for (int kx = 0; kx < k; kx++) {
                int ix = ox * c->st - c->pd + kx, tap = ky * k + kx;
                int inside = iy >= 0 && iy < c->Hi && ix >= 0 && ix < c->Wi;
                if (!inside) {
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = 0.f;
                } else if (c->chan_last) {
                    const float *src = c->in + ((size_t)iy * c->Wi + ix) * c->Ci;
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = src[ci];
                } else {
                    const float *src = c->in + (size_t)iy * c->Wi + ix;
                    for (int ci = 0; ci < c->Ci; ci++) dst[ci * kk + tap] = src[(size_t)ci * c->Hi * c->Wi];
                }
            }
        }
    }
}

void vlm_im2col(vlm_pool *pool, float *col, const float *in, int chan_last, int Hi, int Wi, int Ci, int k, int st,
                int pd, int Wo, long r0, long nr) {
    col_ctx c = {col, in, chan_last, Hi, Wi, Ci, k, st, pd, Wo, r0, nr};
    vlm_pool_run(pool, col_task, &c);
}

vlm_status vlm_conv2d(const vlm_mm_ctx *mm, float *out, const float *in, const vlm_weight *w, float *col, long chunk,
                      int chan_last, int Hi, int Wi, int Ci, int k, int st, int pd, int Ho, int Wo) {
    const long N = (long)Ho * Wo;
    for (long r0 = 0; r0 < N; r0 += chunk) {
        long nr = N - r0 < chunk ? N - r0 : chunk;
        vlm_im2col(mm->pool, col, in, chan_last, Hi, Wi, Ci, k, st, pd, Wo, r0, nr);
        VLM_TRY(vlm_mm(mm, out + (size_t)r0 * w->n, w->n, col, w->k, nr, w, 0));
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- 3x3 conv of a padded map, 9 tap GEMMs */

vlm_status vlm_conv3x3_padded(const vlm_mm_ctx *mm, float *out, const float *P, const vlm_weight *w, long H,
                              size_t pitch, int Co) {
    const int64_t rows = (int64_t)H * (int64_t)pitch - 2;
    const size_t Ci = (size_t)w->k;
    for (int t = 0; t < 9; t++) {   /* tap t = ty·3 + tx reads P shifted by ty rows and tx pixels */
        vlm_weight tap = vlm_weight_rows(w, (int64_t)t * Co, Co);
        tap.bias = t == 0 ? w->bias : NULL;   /* a bias is added once */
        VLM_TRY(vlm_mm(mm, out, Co, P + ((size_t)(t / 3) * pitch + t % 3) * Ci, (int64_t)Ci, rows, &tap, t > 0));
    }
    return VLM_OK;
}

/* ---------------------------------------------------------------- transposed-conv scatter */

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

void vlm_convt2x2_scatter(vlm_pool *pool, float *P, const float *T, int Hs, int Ws, int Co, int sub) {
    scat_ctx c = {P, T, Hs, Ws, Co, sub};
    vlm_pool_run(pool, scat_task, &c);
}

void vlm_zero_border(float *P, long H, long W, int C) {
    size_t pitch = (size_t)(W + 2) * C;
    memset(P, 0, sizeof(float) * pitch);
    memset(P + (size_t)(H + 1) * pitch, 0, sizeof(float) * pitch);
    for (long i = 1; i <= H; i++) {
        memset(P + i * pitch, 0, sizeof(float) * C);
        memset(P + i * pitch + (size_t)(W + 1) * C, 0, sizeof(float) * C);
    }
}

/* ---------------------------------------------------------------- 2x2 max-pool */

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

void vlm_maxpool2x2(vlm_pool *pool, float *P, const float *x, int H, int W, int C) {
    mp_ctx c = {P, x, H, W, C};
    vlm_pool_run(pool, mp_task, &c);
}

/* ---------------------------------------------------------------- Swin patch merging (2x2 space-to-depth) */

typedef struct { float *out; const float *x; int H, W, C; long r0, nr; } pm_ctx;

static void pm_task(void *p, int ith, int nth) {
    const pm_ctx *c = p;
    const int Wo = (c->W + 1) / 2, C = c->C;
    static const int dy[4] = {0, 1, 0, 1}, dx[4] = {0, 0, 1, 1};
    long lo, hi;
    vlm_split(c->nr, 1, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        long pix = c->r0 + r;
        int oy = (int)(pix / Wo), ox = (int)(pix % Wo);
        for (int q = 0; q < 4; q++) {
            int y = 2 * oy + dy[q], x = 2 * ox + dx[q];
            float *o = c->out + (size_t)r * 4 * C + (size_t)q * C;
            if (y < c->H && x < c->W) memcpy(o, c->x + ((size_t)y * c->W + x) * C, (size_t)C * sizeof(float));
            else memset(o, 0, (size_t)C * sizeof(float));
        }
    }
}

void vlm_patch_merge_gather(vlm_pool *pool, float *out, const float *x, int H, int W, int C, long r0, long nr) {
    pm_ctx c = {out, x, H, W, C, r0, nr};
    vlm_pool_run(pool, pm_task, &c);
}
