/* ops.c — element-wise, normalization, rotary and attention ops (see ops.h).
 *
 * Plain C written so that gcc vectorizes it; VLM_CLONES compiles each hot function for AVX-512,
 * AVX2 and baseline x86-64 and picks one at load time. Reductions use 16 explicit partial sums, so
 * the summation order (and the result) is the same on every instruction set. */
#include "ops.h"
#include "attention.h"

#include "simd.h"

#include <math.h>
#include <string.h>


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

typedef struct { float *y; const float *x, *w, *b; float eps; long T; int C; } ln_ctx;

static void ln_task(void *p, int ith, int nth) {
    ln_ctx *c = p;
    long lo, hi;
    vlm_split(c->T, 1, ith, nth, &lo, &hi);
    for (long t = lo; t < hi; t++)
        vlm_layernorm_row(c->y + (size_t)t * c->C, c->x + (size_t)t * c->C, c->w, c->b, c->eps, c->C);
}

void vlm_layernorm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, long T, int C) {
    ln_ctx c = {y, x, w, b, eps, T, C};
    vlm_pool_run(pool, ln_task, &c);
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

/* ---------------------------------------------------------------- causal attention over the KV cache
 * Prefill: work item = (query head, block of FA_QB tokens), interleaved over threads (later blocks
 * see more keys). Decode (T == 1): work item = kv head, its G query heads being the rows. */

size_t vlm_attention_scratch_floats(int H, int KV, int D, int n_ctx) {
    int G = H / KV;
    return vlm_flash_workspace_floats(G > FA_QB ? G : FA_QB, D) + (size_t)D * vlm_flash_kt_stride(n_ctx);
}

typedef struct {
    float *out; int ldo; const float *q; int ldq; const float *kc, *vc;
    int max_ctx, n_past, T, H, KV, D; float scale; float *scratch; size_t scratch_per;
} attn_ctx;

/* Work items are kv-group major, so a thread transposes the keys of each group it meets once. */
static void attn_task(void *p, int ith, int nth) {
    const attn_ctx *c = p;
    const int G = c->H / c->KV, D = c->D, n_all = c->n_past + c->T, ldkt = vlm_flash_kt_stride(n_all);
    float *kt = c->scratch + (size_t)ith * c->scratch_per;
    float *ws = kt + (size_t)D * vlm_flash_kt_stride(c->max_ctx);
    int lim[FA_QB > 256 ? FA_QB : 256];
    int cur_g = -1;
    if (c->T == 1 && G <= 256) {  /* decode: the G query heads of a kv group are the rows */
        for (int g = ith; g < c->KV; g += nth) {
            for (int r = 0; r < G; r++) lim[r] = n_all;
            vlm_flash_transpose(kt, ldkt, c->kc + (size_t)g * c->max_ctx * D, D, n_all, D);
            vlm_flash_rows(c->out + (size_t)g * G * D, D, c->q + (size_t)g * G * D, D, G, kt, ldkt,
                           c->vc + (size_t)g * c->max_ctx * D, D, lim, D, c->scale, ws);
        }
        return;
    }
    const int nblk = (c->T + FA_QB - 1) / FA_QB;
    const long items = (long)c->H * nblk;
    for (long it = ith; it < items; it += nth) {
        int g = (int)(it / ((long)G * nblk)), rem = (int)(it % ((long)G * nblk));
        int b = rem / G, h = g * G + rem % G;
        int t0 = b * FA_QB, R = c->T - t0 < FA_QB ? c->T - t0 : FA_QB;
        if (g != cur_g) {
            vlm_flash_transpose(kt, ldkt, c->kc + (size_t)g * c->max_ctx * D, D, n_all, D);
            cur_g = g;
        }
        for (int r = 0; r < R; r++) lim[r] = c->n_past + t0 + r + 1;
        vlm_flash_rows(c->out + (size_t)t0 * c->ldo + (size_t)h * D, c->ldo, c->q + (size_t)t0 * c->ldq + (size_t)h * D,
                       c->ldq, R, kt, ldkt, c->vc + (size_t)g * c->max_ctx * D, D, lim, D, c->scale, ws);
    }
}

void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch) {
    attn_ctx c = {out, ldo, q, ldq, kc, vc, max_ctx, n_past, T, H, KV, D, scale, scratch,
                  vlm_attention_scratch_floats(H, KV, D, max_ctx)};
    vlm_pool_run(pool, attn_task, &c);
}

/* ---------------------------------------------------------------- segment (window) attention
 * Non-causal attention inside segments [cu[s], cu[s+1]) of a packed qkv matrix [N][3][H][D]: the
 * vision transformer's window and full attention, without any N x N mask.
 * Work item = (segment, head, block of FA_QB queries), enumerated in a fixed order; a thread
 * transposes the keys of each (segment, head) it meets once. */

typedef struct {
    float *out; const float *qkv; const int *cu; int n_seg, H, D, max_seg; float scale; float *scratch; size_t per;
} seg_ctx;

static void seg_task(void *p, int ith, int nth) {
    const seg_ctx *c = p;
    const int H = c->H, D = c->D, ld = 3 * H * D;
    float *kt = c->scratch + (size_t)ith * c->per;
    float *ws = kt + (size_t)D * vlm_flash_kt_stride(c->max_seg);
    int lim[FA_QB];
    long it = 0;
    for (int sgi = 0; sgi < c->n_seg; sgi++) {
        int s0 = c->cu[sgi], n = c->cu[sgi + 1] - s0, nb = (n + FA_QB - 1) / FA_QB, ldkt = vlm_flash_kt_stride(n);
        const float *base = c->qkv + (size_t)s0 * ld;
        for (int h = 0; h < H; h++) {
            int have = 0;
            for (int b = 0; b < nb; b++, it++) {
                if (it % nth != ith) continue;
                if (!have) { vlm_flash_transpose(kt, ldkt, base + (size_t)(H + h) * D, ld, n, D); have = 1; }
                int t0 = b * FA_QB, R = n - t0 < FA_QB ? n - t0 : FA_QB;
                for (int r = 0; r < R; r++) lim[r] = n;
                vlm_flash_rows(c->out + (size_t)(s0 + t0) * H * D + (size_t)h * D, H * D,
                               base + (size_t)t0 * ld + (size_t)h * D, ld, R, kt, ldkt,
                               base + (size_t)(2 * H + h) * D, ld, lim, D, c->scale, ws);
            }
        }
    }
}

size_t vlm_segment_attention_scratch_floats(int max_seg, int D) {
    return vlm_flash_workspace_floats(FA_QB, D) + (size_t)D * vlm_flash_kt_stride(max_seg);
}

void vlm_segment_attention(vlm_pool *pool, float *out, const float *qkv, const int *cu, int n_seg, int H, int D,
                           float scale, float *scratch, int max_seg) {
    seg_ctx c = {out, qkv, cu, n_seg, H, D, max_seg, scale, scratch, vlm_segment_attention_scratch_floats(max_seg, D)};
    vlm_pool_run(pool, seg_task, &c);
}
