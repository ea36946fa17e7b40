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

/* ---------------------------------------------------------------- exp
 * expf for vectorized loops: x = n·ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n by
 * exponent bits. Max relative error ~2 ulp over the softmax range; plain C so gcc vectorizes it. */

static inline float vexpf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return p * u.f;
}

/* ---------------------------------------------------------------- attention core
 * R (<= ATT_R) query rows against keys given transposed, Kt[d][j] (row stride ldk), and values
 * V[j][d] (row stride ldv). Row r sees keys 0 .. nk[r]-1. Scores are formed 16 keys at a time with
 * the R rows sharing every key load, softmax is fp32 with max subtraction, then the weighted sum of
 * values. sc: R * ldsc floats of scratch (ldsc >= max nk, multiple of 16). */

#define ATT_R 8

VLM_CLONES static void attn_rows(float *out, int ldo, const float *q, int ldq, int R, const float *Kt, int ldk,
                                 const float *V, int ldv, const int *nk, int D, float scale, float *sc, int ldsc) {
    int nmax = 0;
    for (int r = 0; r < R; r++) nmax = nk[r] > nmax ? nk[r] : nmax;
    float qs[ATT_R][256];
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) qs[r][d] = q[(size_t)r * ldq + d] * scale;
    for (int r = R; r < ATT_R; r++)
        for (int d = 0; d < D; d++) qs[r][d] = 0.f;
    int j0 = 0;
    for (; j0 + 16 <= nmax; j0 += 16) {
        float acc[ATT_R][16] = {{0}};
        for (int d = 0; d < D; d++) {
            const float *kr = Kt + (size_t)d * ldk + j0;
            for (int r = 0; r < ATT_R; r++)
                for (int l = 0; l < 16; l++) acc[r][l] += qs[r][d] * kr[l];
        }
        for (int r = 0; r < R; r++)
            for (int l = 0; l < 16; l++) sc[(size_t)r * ldsc + j0 + l] = acc[r][l];
    }
    for (int j = j0; j < nmax; j++)
        for (int r = 0; r < R; r++) {
            float a = 0.f;
            for (int d = 0; d < D; d++) a += qs[r][d] * Kt[(size_t)d * ldk + j];
            sc[(size_t)r * ldsc + j] = a;
        }
    for (int r = 0; r < R; r++) {
        float *s = sc + (size_t)r * ldsc;
        int n = nk[r];
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        float sum = 0.f;
        for (int j = 0; j < n; j++) { float e = vexpf(s[j] - mx); s[j] = e; sum += e; }
        float inv = 1.0f / sum;
        for (int j = 0; j < n; j++) s[j] *= inv;
    }
    for (int r = 0; r < R; r++) {
        const float *s = sc + (size_t)r * ldsc;
        float o[256];
        for (int d = 0; d < D; d++) o[d] = 0.f;
        int n = nk[r], j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *v0 = V + (size_t)j * ldv, *v1 = v0 + ldv, *v2 = v1 + ldv, *v3 = v2 + ldv;
            float p0 = s[j], p1 = s[j + 1], p2 = s[j + 2], p3 = s[j + 3];
            for (int d = 0; d < D; d++) o[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
        }
        for (; j < n; j++) {
            const float *v0 = V + (size_t)j * ldv;
            for (int d = 0; d < D; d++) o[d] += s[j] * v0[d];
        }
        for (int d = 0; d < D; d++) out[(size_t)r * ldo + d] = o[d];
    }
}

/* Transpose n rows of D values (row stride ld) into Kt[d][j] (row stride ldk). */
static void transpose_keys(float *Kt, int ldk, const float *K, int ld, int n, int D) {
    for (int j = 0; j < n; j++)
        for (int d = 0; d < D; d++) Kt[(size_t)d * ldk + j] = K[(size_t)j * ld + d];
}

/* ---------------------------------------------------------------- causal attention over the KV cache
 * Work item = (kv head g, block of ATT_R query tokens) for prefill: the group's keys are transposed
 * once per item and all G query heads of the group reuse them. Decode (T small) uses the same core. */

static int kt_stride(int n) { return (n + 15) / 16 * 16; }

size_t vlm_attention_scratch_floats(int H, int KV, int n_ctx) {
    size_t ld = (size_t)kt_stride(n_ctx);
    (void)H; (void)KV;
    return vlm_align_up(256 * ld + ATT_R * ld, 16);
}

typedef struct {
    float *out; int ldo; const float *q; int ldq; const float *kc, *vc;
    int max_ctx, n_past, T, H, KV, D; float scale; float *scratch; size_t scratch_per;
} attn_ctx;

static void attn_task(void *p, int ith, int nth) {
    const attn_ctx *c = p;
    float *kt = c->scratch + (size_t)ith * c->scratch_per;
    const int G = c->H / c->KV, D = c->D;
    const int n_all = c->n_past + c->T, ldk = kt_stride(n_all);
    float *sc = kt + (size_t)256 * ldk;
    const int nblk = (c->T + ATT_R - 1) / ATT_R;
    /* items: (g, hh, block) with blocks interleaved over threads (later blocks see more keys) */
    const long items = (long)c->KV * G * nblk;
    int cur_g = -1, cur_n = 0;
    for (long it = ith; it < items; it += nth) {
        int g = (int)(it / ((long)G * nblk));
        int rem = (int)(it % ((long)G * nblk));
        int hh = rem / nblk, b = rem % nblk;
        int t0 = b * ATT_R, R = c->T - t0 < ATT_R ? c->T - t0 : ATT_R;
        int need = c->n_past + t0 + R;
        const float *K = c->kc + (size_t)g * c->max_ctx * D, *V = c->vc + (size_t)g * c->max_ctx * D;
        if (g != cur_g || need > cur_n) {  /* (re)transpose the keys this item needs */
            int from = g == cur_g ? cur_n : 0;
            int upto = n_all;
            transpose_keys(kt + from, ldk, K + (size_t)from * D, D, upto - from, D);
            cur_g = g; cur_n = upto;
        }
        int nk[ATT_R];
        for (int r = 0; r < R; r++) nk[r] = c->n_past + t0 + r + 1;
        int h = g * G + hh;
        attn_rows(c->out + (size_t)t0 * c->ldo + (size_t)h * D, c->ldo, c->q + (size_t)t0 * c->ldq + (size_t)h * D,
                  c->ldq, R, kt, ldk, V, D, nk, D, c->scale, sc, ldk);
    }
}

void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch) {
    attn_ctx c = {out, ldo, q, ldq, kc, vc, max_ctx, n_past, T, H, KV, D, scale, scratch,
                  vlm_attention_scratch_floats(H, KV, max_ctx)};
    vlm_pool_run(pool, attn_task, &c);
}

/* ---------------------------------------------------------------- segment (window) attention
 * Non-causal attention inside segments [cu[s], cu[s+1]) of a packed qkv matrix [N][3][H][D]: the
 * vision transformer's window and full attention, without any N x N mask. */

typedef struct {
    float *out; const float *qkv; const int *cu; int n_seg, H, D; float scale; float *scratch; size_t per; int ldk;
} seg_ctx;

static void seg_task(void *p, int ith, int nth) {
    const seg_ctx *c = p;
    const int H = c->H, D = c->D, ld = 3 * H * D;
    float *kt = c->scratch + (size_t)ith * c->per;
    float *sc = kt + (size_t)D * c->ldk;
    long items = 0;
    /* items: (segment, head, block of ATT_R queries), enumerated in a fixed order */
    for (int sgi = 0; sgi < c->n_seg; sgi++) items += (long)H * ((c->cu[sgi + 1] - c->cu[sgi] + ATT_R - 1) / ATT_R);
    long it = 0;
    int cur_seg = -1, cur_h = -1;
    for (int sgi = 0; sgi < c->n_seg; sgi++) {
        int s0 = c->cu[sgi], n = c->cu[sgi + 1] - s0, nb = (n + ATT_R - 1) / ATT_R;
        for (int h = 0; h < H; h++)
            for (int b = 0; b < nb; b++, it++) {
                if (it % nth != ith) continue;
                const float *base = c->qkv + (size_t)s0 * ld;
                if (sgi != cur_seg || h != cur_h) {
                    transpose_keys(kt, c->ldk, base + (size_t)(H + h) * D, ld, n, D);
                    cur_seg = sgi; cur_h = h;
                }
                int t0 = b * ATT_R, R = n - t0 < ATT_R ? n - t0 : ATT_R;
                int nk[ATT_R];
                for (int r = 0; r < R; r++) nk[r] = n;
                attn_rows(c->out + (size_t)(s0 + t0) * H * D + (size_t)h * D, H * D,
                          base + (size_t)t0 * ld + (size_t)h * D, ld, R, kt, c->ldk,
                          base + (size_t)(2 * H + h) * D, ld, nk, D, c->scale, sc, c->ldk);
            }
    }
    (void)items;
}

size_t vlm_segment_attention_scratch_floats(int max_seg, int D) {
    size_t ld = (size_t)kt_stride(max_seg);
    return vlm_align_up((size_t)D * ld + ATT_R * ld, 16);
}

void vlm_segment_attention(vlm_pool *pool, float *out, const float *qkv, const int *cu, int n_seg, int H, int D,
                           float scale, float *scratch, int max_seg) {
    seg_ctx c = {out, qkv, cu, n_seg, H, D, scale, scratch, vlm_segment_attention_scratch_floats(max_seg, D),
                 kt_stride(max_seg)};
    vlm_pool_run(pool, seg_task, &c);
}
