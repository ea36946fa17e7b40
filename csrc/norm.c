/* norm.c — normalization ops (see ops.h): RMSNorm, LayerNorm (rows, a strided grid of pixels, and the
 * double-accumulated row LayerNorm of the HFRE region vectors).
 *
 * Plain C written so that gcc vectorizes it; VLM_CLONES compiles each hot function for AVX-512, AVX2 and
 * baseline x86-64 and picks one at load time. Float reductions use 16 explicit partial sums, so the
 * summation order (and the result) is the same on every instruction set. */
#include "ops.h"
#include "cpu.h"

#include <math.h>

/* ---------------------------------------------------------------- RMSNorm */

typedef struct { float *y; const float *x, *w; float eps; int T, C; } rms_ctx;

VLM_CLONES static void rms_rows(float *y, const float *x, const float *w, float eps, int t0, int t1, int C) {
    for (int t = t0; t < t1; t++) {
        const float *xr = x + (size_t)t * C;
        float *yr = y + (size_t)t * C;
        float acc[16] = {0};
        int i = 0;
        for (; i + 16 <= C; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += xr[i + j] * xr[i + j];
        for (; i < C; i++) acc[i & 15] += xr[i] * xr[i];
        float ss = 0.f;
        for (int j = 0; j < 16; j++) ss += acc[j];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (i = 0; i < C; i++) yr[i] = w[i] * (xr[i] * r);
    }
}

static void rms_task(void *p, int ith, int nth) {
    rms_ctx *c = p;
    long lo, hi;
    vlm_split(c->T, 1, ith, nth, &lo, &hi);
    rms_rows(c->y, c->x, c->w, c->eps, (int)lo, (int)hi, c->C);
}

void vlm_rmsnorm(vlm_pool *pool, float *y, const float *x, const float *w, float eps, int T, int C) {
    rms_ctx c = {y, x, w, eps, T, C};
    if (T == 1) { rms_rows(y, x, w, eps, 0, 1, C); return; }
    vlm_pool_run(pool, rms_task, &c);
}

/* ---------------------------------------------------------------- LayerNorm */

VLM_CLONES void vlm_layernorm_row(float *y, const float *x, const float *w, const float *b, float eps, int C) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= C; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[i + j];
    for (; i < C; i++) acc[i & 15] += x[i];
    float sum = 0.f;
    for (int j = 0; j < 16; j++) sum += acc[j];
    float mean = sum / (float)C;
    float acc2[16] = {0};
    for (i = 0; i + 16 <= C; i += 16)
        for (int j = 0; j < 16; j++) { float d = x[i + j] - mean; acc2[j] += d * d; }
    for (; i < C; i++) { float d = x[i] - mean; acc2[i & 15] += d * d; }
    float ss = 0.f;
    for (int j = 0; j < 16; j++) ss += acc2[j];
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    for (i = 0; i < C; i++) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

/* Pixel t = i·W + j of an H x W grid is the row at x + (i·pitch + j)·C (a plain [T][C] matrix: H = 1, W = T). */
typedef struct { float *y; const float *x, *w, *b; float eps; size_t pitch; long H, W; int C; } ln_ctx;

static void ln_task(void *p, int ith, int nth) {
    ln_ctx *c = p;
    long lo, hi;
    vlm_split(c->H * c->W, 1, ith, nth, &lo, &hi);
    for (long t = lo; t < hi; t++) {
        size_t o = ((size_t)(t / c->W) * c->pitch + (size_t)(t % c->W)) * c->C;
        vlm_layernorm_row(c->y + o, c->x + o, c->w, c->b, c->eps, c->C);
    }
}

void vlm_layernorm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, long T, int C) {
    ln_ctx c = {y, x, w, b, eps, (size_t)T, 1, T, C};
    vlm_pool_run(pool, ln_task, &c);
}

void vlm_layernorm_grid(vlm_pool *pool, float *x, const float *w, const float *b, float eps, size_t pitch, long H,
                        long W, int C) {
    ln_ctx c = {x, x, w, b, eps, pitch, H, W, C};
    vlm_pool_run(pool, ln_task, &c);
}

/* Mean and variance summed in double, the normalization in float: the HFRE region LayerNorms. */
void vlm_layernorm_row_f64(float *y, const float *x, const float *w, const float *b, double eps, int C) {
    double s = 0, q = 0;
    for (int i = 0; i < C; i++) s += x[i];
    double mu = s / C;
    for (int i = 0; i < C; i++) { double d = x[i] - mu; q += d * d; }
    float r = (float)(1.0 / sqrt(q / C + eps));
    float muf = (float)mu;
    for (int i = 0; i < C; i++) y[i] = (x[i] - muf) * r * w[i] + b[i];
}
