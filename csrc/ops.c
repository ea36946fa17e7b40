/* ops.c — element-wise, normalization, rotary and attention ops (see ops.h).
 *
 * Plain C written so that gcc vectorizes it; VLM_CLONES compiles each hot function for AVX-512,
 * AVX2 and baseline x86-64 and picks one at load time. Reductions use 16 explicit partial sums, so
 * the summation order (and the result) is the same on every instruction set. */
#include "ops.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VLM_NO_CLONES)
#define VLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLM_CLONES
#endif

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

/* ---------------------------------------------------------------- SwiGLU */

typedef struct { float *g; const float *u; size_t n; } silu_ctx;

VLM_CLONES static void silu_range(float *g, const float *u, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) {
        float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

static void silu_task(void *p, int ith, int nth) {
    silu_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    silu_range(c->g, c->u, (size_t)lo, (size_t)hi);
}

void vlm_silu_mul(vlm_pool *pool, float *g, const float *u, int T, int C) {
    silu_ctx c = {g, u, (size_t)T * C};
    vlm_pool_run(pool, silu_task, &c);
}

/* ---------------------------------------------------------------- RoPE */

void vlm_rope_table(float *cs, float *sn, const int32_t *pos, const float *inv_freq, const int sec[3], int T, int D) {
    int half = D / 2;
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < half; j++) {
            int axis = j < sec[0] ? 0 : (j < sec[0] + sec[1] ? 1 : 2);
            float a = (float)pos[(size_t)axis * T + t] * inv_freq[j];
            cs[(size_t)t * half + j] = cosf(a);
            sn[(size_t)t * half + j] = sinf(a);
        }
    }
}

typedef struct { float *x; int ld; const float *cs, *sn; int T, nh, D; } rope_ctx;

VLM_CLONES static void rope_rows(float *x, int ld, const float *cs, const float *sn, int t0, int t1, int nh, int D) {
    int half = D / 2;
    for (int t = t0; t < t1; t++) {
        const float *c = cs + (size_t)t * half, *s = sn + (size_t)t * half;
        for (int h = 0; h < nh; h++) {
            float *v = x + (size_t)t * ld + (size_t)h * D;
            for (int j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j] + a * s[j];
            }
        }
    }
}

static void rope_task(void *p, int ith, int nth) {
    rope_ctx *c = p;
    long lo, hi;
    vlm_split(c->T, 1, ith, nth, &lo, &hi);
    rope_rows(c->x, c->ld, c->cs, c->sn, (int)lo, (int)hi, c->nh, c->D);
}

void vlm_rope_apply(vlm_pool *pool, float *x, int ld, const float *cs, const float *sn, int T, int nh, int D) {
    rope_ctx c = {x, ld, cs, sn, T, nh, D};
    if (T == 1) { rope_rows(x, ld, cs, sn, 0, 1, nh, D); return; }
    vlm_pool_run(pool, rope_task, &c);
}

/* ---------------------------------------------------------------- attention
 * Work item = (query token t, kv head g): the G = H/KV query heads of the group are scored together
 * against one pass over the group's keys, then softmax (fp32, max-subtracted) and a weighted sum of
 * the values. Per thread scratch: G * n_ctx scores. */

size_t vlm_attention_scratch_floats(int H, int KV, int n_ctx) {
    return vlm_align_up((size_t)(H / KV) * (size_t)n_ctx, 16);
}

typedef struct {
    float *out; int ldo; const float *q; int ldq; const float *kc, *vc;
    int max_ctx, n_past, T, H, KV, D; float scale; float *scratch; size_t scratch_per;
} attn_ctx;

VLM_CLONES static void attn_item(const attn_ctx *c, int t, int g, float *sc) {
    const int D = c->D, G = c->H / c->KV;
    const int n = c->n_past + t + 1;  /* keys visible to this query */
    const float *K = c->kc + (size_t)g * c->max_ctx * D;
    const float *V = c->vc + (size_t)g * c->max_ctx * D;
    for (int hh = 0; hh < G; hh++) {
        const float *qv = c->q + (size_t)t * c->ldq + (size_t)(g * G + hh) * D;
        float *s = sc + (size_t)hh * n;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *kv = K + (size_t)j * D;
            float acc[16] = {0};
            int i = 0;
            for (; i + 16 <= D; i += 16)
                for (int l = 0; l < 16; l++) acc[l] += qv[i + l] * kv[i + l];
            for (; i < D; i++) acc[i & 15] += qv[i] * kv[i];
            float d = 0.f;
            for (int l = 0; l < 16; l++) d += acc[l];
            d *= c->scale;
            s[j] = d;
            if (d > mx) mx = d;
        }
        float sum = 0.f;
        for (int j = 0; j < n; j++) { float e = expf(s[j] - mx); s[j] = e; sum += e; }
        float inv = 1.0f / sum;
        float *o = c->out + (size_t)t * c->ldo + (size_t)(g * G + hh) * D;
        for (int i = 0; i < D; i++) o[i] = 0.f;
        for (int j = 0; j < n; j++) {
            float p = s[j] * inv;
            const float *vv = V + (size_t)j * D;
            for (int i = 0; i < D; i++) o[i] += p * vv[i];
        }
    }
}

static void attn_task(void *p, int ith, int nth) {
    const attn_ctx *c = p;
    float *sc = c->scratch + (size_t)ith * c->scratch_per;
    long items = (long)c->T * c->KV, lo, hi;
    /* later queries see more keys: interleave items so threads get similar work */
    for (long it = ith; it < items; it += nth) {
        int t = (int)(it / c->KV), g = (int)(it % c->KV);
        attn_item(c, t, g, sc);
    }
    (void)lo; (void)hi;
}

void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch) {
    attn_ctx c = {out, ldo, q, ldq, kc, vc, max_ctx, n_past, T, H, KV, D, scale, scratch,
                  vlm_attention_scratch_floats(H, KV, max_ctx)};
    vlm_pool_run(pool, attn_task, &c);
}
