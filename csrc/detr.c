/* detr.c — the ops of UPN's deformable-DETR (see ops.h): multi-scale deformable attention sampling, GroupNorm
 * over a channels-last map, and the two sine position embeddings.
 *
 * MSDA, per (query, head), in two steps:
 *   taps: for every (level, point) in order, the sample's pixel coordinates and four bilinear corner weights,
 *         with torch's grid_sample float32 expressions: g = 2·loc - 1, x = fma(g + 1, W/2, -0.5) (PyTorch's
 *         vectorized CPU kernel rounds exactly so), corner weights s·e, s·w, n·e, n·w, each then multiplied
 *         by the sample's attention weight. A sample whose (x, y) is not inside (-1, W) x (-1, H) — NaN and
 *         ±inf included — touches no pixel: it is dropped (weights 0, rows the zero row) before any float is
 *         turned into an index. A corner outside the level points at a row of zeros, which is what torch's zero
 *         padding reads there. Both instruction sets compute the same taps (the same float operations, scalar or
 *         16 samples at a time).
 *   sums: out[d] = ((S_nw + S_ne) + S_sw) + S_se, S_k = Σ_taps (a·w_k) · v_k[d] over the taps in (level, point)
 *         order, fp32: four running sums, so the AVX-512 loop is not one chain of dependent FMAs. AVX-512
 *         (16 channels per vector, masked tails): FMAs; portable C: every product and sum rounded on its own (no
 *         contraction). The two differ by FMA rounding only.
 * The reference (ms_deform_attn_core_pytorch) forms each bilinear sample, multiplies it by a and sums in torch's
 * reduction order; ours groups the same products differently (a·w_k first, one sum per corner) in another fixed
 * order (tests/test_msda.py prints the errors). A bf16 value would change only the sums' loads (widen to fp32).
 * Queries are split over threads in contiguous ranges; each output row is computed by one thread, in a fixed
 * order, so results do not depend on the thread count. */
#include "ops.h"
#include "simd.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- MSDA: taps */

#define MSDA_MAX_TAPS (VLM_MSDA_MAX_LEVELS * VLM_MSDA_MAX_POINTS)   /* samples of one head */
#define MSDA_CHUNK 256                                              /* samples per AVX-512 taps batch */
#define MSDA_TAB (MSDA_CHUNK + 16)

/* One sample of one head: four corner rows (the zero row where the corner is outside) and their weights. */
typedef struct {
    const float *p[4];   /* nw, ne, sw, se */
    float w[4];          /* attention weight · bilinear weight */
} msda_tap;

static const float msda_zero[VLM_MAX_HEAD] __attribute__((aligned(64)));

typedef struct {
    float *out;
    const float *value, *loc, *aw;
    size_t ld_v;
    int L, M, D, P;
    long Lq;
    int H[VLM_MSDA_MAX_LEVELS], W[VLM_MSDA_MAX_LEVELS];
    float fH[VLM_MSDA_MAX_LEVELS], fW[VLM_MSDA_MAX_LEVELS];   /* sizes as floats */
    float hH[VLM_MSDA_MAX_LEVELS], hW[VLM_MSDA_MAX_LEVELS];   /* half sizes: grid_sample's scaling factor */
    long start[VLM_MSDA_MAX_LEVELS];
    /* AVX-512 taps: per sample k of a batch of whole heads (head k / (L·P), sample k % (L·P) = l·P + p of it),
     * its level's sizes, first token, head offset (floats) and image row stride (bytes) */
    float lhW[MSDA_TAB], lhH[MSDA_TAB], lfW[MSDA_TAB], lfH[MSDA_TAB];
    int32_t lW[MSDA_TAB], lH[MSDA_TAB], lstart[MSDA_TAB], lhoff[MSDA_TAB];
    int64_t lrow[MSDA_TAB];
} msda_ctx;

/* The taps of query q, head m: returns how many samples touch the level (in (level, point) order). */
static int msda_taps(msda_tap *t, const msda_ctx *c, long q, int m) {
    const int L = c->L, P = c->P;
    const float *loc = c->loc + ((size_t)q * c->M + m) * (size_t)L * P * 2;
    const float *aw = c->aw + ((size_t)q * c->M + m) * (size_t)L * P;
    const size_t ld = c->ld_v;
    int n = 0;
    for (int l = 0; l < L; l++) {
        const int W = c->W[l], H = c->H[l];
        const float *base = c->value + (size_t)c->start[l] * ld + (size_t)m * c->D;
        for (int p = 0; p < P; p++, loc += 2) {
            /* 2·loc is exact, so g rounds once whether or not the compiler fuses it; x rounds once (fmaf) */
            float gx = 2.0f * loc[0] - 1.0f, gy = 2.0f * loc[1] - 1.0f;
            float x = fmaf(gx + 1.0f, c->hW[l], -0.5f), y = fmaf(gy + 1.0f, c->hH[l], -0.5f);
            if (!(x > -1.0f && x < c->fW[l] && y > -1.0f && y < c->fH[l])) continue;   /* NaN: false */
            float xf = floorf(x), yf = floorf(y);
            int x0 = (int)xf, y0 = (int)yf;   /* in [-1, W-1] x [-1, H-1] */
            float fx = x - xf, fy = y - yf, ex = 1.0f - fx, sy = 1.0f - fy, a = aw[l * P + p];
            msda_tap *tp = &t[n++];
            tp->w[0] = a * (sy * ex);
            tp->w[1] = a * (sy * fx);
            tp->w[2] = a * (fy * ex);
            tp->w[3] = a * (fy * fx);
            const int xin0 = x0 >= 0, xin1 = x0 + 1 < W, yin0 = y0 >= 0, yin1 = y0 + 1 < H;
            const float *r0 = yin0 ? base + (size_t)y0 * W * ld : NULL, *r1 = yin1 ? base + (size_t)(y0 + 1) * W * ld : NULL;
            tp->p[0] = yin0 && xin0 ? r0 + (size_t)x0 * ld : msda_zero;
            tp->p[1] = yin0 && xin1 ? r0 + (size_t)(x0 + 1) * ld : msda_zero;
            tp->p[2] = yin1 && xin0 ? r1 + (size_t)x0 * ld : msda_zero;
            tp->p[3] = yin1 && xin1 ? r1 + (size_t)(x0 + 1) * ld : msda_zero;
        }
    }
    return n;
}

/* ---------------------------------------------------------------- MSDA: portable sums */

VLM_NO_CONTRACT static void msda_sum_generic(float *restrict o, const msda_tap *t, int n, int D) {
    float acc[4][VLM_MAX_HEAD];
    for (int k = 0; k < 4; k++)
        for (int d = 0; d < D; d++) acc[k][d] = 0.0f;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) {
            const float *p = t[i].p[k], w = t[i].w[k];
            float *ak = acc[k];
            for (int d = 0; d < D; d++) ak[d] += p[d] * w;
        }
    for (int d = 0; d < D; d++) o[d] = ((acc[0][d] + acc[1][d]) + acc[2][d]) + acc[3][d];
}

static void msda_task_generic(void *pv, int ith, int nth) {
    const msda_ctx *c = pv;
    msda_tap taps[MSDA_MAX_TAPS];
    long lo, hi;
    vlm_split(c->Lq, 1, ith, nth, &lo, &hi);
    const size_t MD = (size_t)c->M * c->D;
    for (long q = lo; q < hi; q++)
        for (int m = 0; m < c->M; m++)
            msda_sum_generic(c->out + q * MD + (size_t)m * c->D, taps, msda_taps(taps, c, q, m), c->D);
}

/* ---------------------------------------------------------------- MSDA: AVX-512 */
#if VLM_X86
/* The taps of query q, heads m0 .. m0 + nh - 1 (nh·L·P <= MSDA_CHUNK samples, in order), in structure-of-arrays
 * form, 16 samples at a time: tp[k][i] the row of corner k of sample i (the zero row where outside), tw[k][i]
 * its weight (0 for every corner of a sample outside the level). The float operations of msda_taps. */
static inline VLM_INLINE VLM_TGT_AVX512 void msda_taps_512(const float *(*tp)[MSDA_CHUNK], float (*tw)[MSDA_CHUNK],
                                                           const msda_ctx *c, long q, int m0, int nh) {
    const int LP = c->L * c->P, n = nh * LP;
    const float *loc = c->loc + ((size_t)q * c->M + m0) * (size_t)LP * 2;
    const float *aw = c->aw + ((size_t)q * c->M + m0) * (size_t)LP;
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1)), i1 = _mm512_set1_epi32(1), i0 = _mm512_setzero_si512();
    const __m512 one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f), mhalf = _mm512_set1_ps(-0.5f);
    const __m512i zp = _mm512_set1_epi64((long long)(uintptr_t)msda_zero);
    const __m512i ld = _mm512_set1_epi64((long long)c->ld_v), ldb = _mm512_slli_epi64(ld, 2);
    const __m512i base = _mm512_set1_epi64((long long)(uintptr_t)(c->value + (size_t)m0 * c->D));
    for (int j = 0, k = 0, hb = 0; j < n; j += 16) {   /* k = j % LP, hb = j / LP */
        const int n2 = 2 * (n - j);                    /* loc floats left */
        const __mmask16 lanes = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __mmask16 k0 = n2 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n2) - 1);
        const __mmask16 k1 = n2 >= 32 ? (__mmask16)0xffff : n2 <= 16 ? 0 : (__mmask16)((1u << (n2 - 16)) - 1);
        const __m512 v0 = _mm512_maskz_loadu_ps(k0, loc + 2 * j), v1 = _mm512_maskz_loadu_ps(k1, loc + 2 * j + 16);
        const __m512 lx = _mm512_permutex2var_ps(v0, ev, v1), ly = _mm512_permutex2var_ps(v0, od, v1);
        const __m512 gx = _mm512_sub_ps(_mm512_add_ps(lx, lx), one), gy = _mm512_sub_ps(_mm512_add_ps(ly, ly), one);
        const __m512 x = _mm512_fmadd_ps(_mm512_add_ps(gx, one), _mm512_loadu_ps(c->lhW + k), mhalf);
        const __m512 y = _mm512_fmadd_ps(_mm512_add_ps(gy, one), _mm512_loadu_ps(c->lhH + k), mhalf);
        __mmask16 ok = lanes & _mm512_cmp_ps_mask(x, mone, _CMP_GT_OQ) & _mm512_cmp_ps_mask(y, mone, _CMP_GT_OQ);
        ok &= _mm512_cmp_ps_mask(x, _mm512_loadu_ps(c->lfW + k), _CMP_LT_OQ);
        ok &= _mm512_cmp_ps_mask(y, _mm512_loadu_ps(c->lfH + k), _CMP_LT_OQ);
        const __m512 xf = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 yf = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 fx = _mm512_sub_ps(x, xf), fy = _mm512_sub_ps(y, yf);
        const __m512 ex = _mm512_sub_ps(one, fx), sy = _mm512_sub_ps(one, fy);
        const __m512 a = _mm512_maskz_loadu_ps(lanes, aw + j);
        _mm512_storeu_ps(tw[0] + j, _mm512_maskz_mul_ps(ok, a, _mm512_mul_ps(sy, ex)));
        _mm512_storeu_ps(tw[1] + j, _mm512_maskz_mul_ps(ok, a, _mm512_mul_ps(sy, fx)));
        _mm512_storeu_ps(tw[2] + j, _mm512_maskz_mul_ps(ok, a, _mm512_mul_ps(fy, ex)));
        _mm512_storeu_ps(tw[3] + j, _mm512_maskz_mul_ps(ok, a, _mm512_mul_ps(fy, fx)));
        /* integer corners, only where ok (elsewhere x, y may be NaN or huge; those lanes are masked) */
        const __m512i xi = _mm512_maskz_cvttps_epi32(ok, xf), yi = _mm512_maskz_cvttps_epi32(ok, yf);
        const __m512i Wv = _mm512_loadu_si512(c->lW + k);
        const __mmask16 x0 = _mm512_mask_cmpge_epi32_mask(ok, xi, i0), y0 = _mm512_mask_cmpge_epi32_mask(ok, yi, i0);
        const __mmask16 x1 = _mm512_mask_cmplt_epi32_mask(ok, _mm512_add_epi32(xi, i1), Wv);
        const __mmask16 y1 = _mm512_mask_cmplt_epi32_mask(ok, _mm512_add_epi32(yi, i1),
                                                          _mm512_loadu_si512(c->lH + k));
        /* token of corner (x0, y0) (may be outside the level: then masked) and head offset, in floats */
        const __m512i tok = _mm512_add_epi32(_mm512_loadu_si512(c->lstart + k),
                                             _mm512_add_epi32(_mm512_mullo_epi32(yi, Wv), xi));
        const __m512i hoff = _mm512_add_epi32(_mm512_loadu_si512(c->lhoff + k), _mm512_set1_epi32(hb * c->D));
        const __mmask16 in[4] = {y0 & x0, y0 & x1, y1 & x0, y1 & x1};
        for (int h = 0; h < 2; h++) {   /* lanes 8h .. 8h + 7 as 64-bit pointers */
            const __m512i t64 = _mm512_cvtepi32_epi64(h ? _mm512_extracti64x4_epi64(tok, 1) : _mm512_castsi512_si256(tok));
            const __m512i o64 = _mm512_cvtepi32_epi64(h ? _mm512_extracti64x4_epi64(hoff, 1) : _mm512_castsi512_si256(hoff));
            const __m512i p00 = _mm512_add_epi64(base, _mm512_slli_epi64(_mm512_add_epi64(_mm512_mullo_epi64(t64, ld), o64), 2));
            const __m512i p10 = _mm512_add_epi64(p00, _mm512_loadu_si512(c->lrow + k + 8 * h));
            const __m512i pc[4] = {p00, _mm512_add_epi64(p00, ldb), p10, _mm512_add_epi64(p10, ldb)};
            for (int cr = 0; cr < 4; cr++)
                _mm512_storeu_si512((void *)(tp[cr] + j + 8 * h),
                                    _mm512_mask_blend_epi64((__mmask8)(in[cr] >> (8 * h)), zp, pc[cr]));
        }
        k += 16;
        hb += k / LP;
        k %= LP;
    }
}

/* Channels [c0, c0 + 16·NV) of one head (the last vector masked by `tail`) over its taps s0 .. s0 + n - 1. */
static inline VLM_INLINE VLM_TGT_AVX512 void msda_block_512(float *o, const float *(*tp)[MSDA_CHUNK],
                                                            float (*tw)[MSDA_CHUNK], int s0, int n, int c0, int NV,
                                                            __mmask16 tail) {
    __m512 acc[4][4];   /* [corner][vector] */
    for (int k = 0; k < 4; k++)
        for (int v = 0; v < NV; v++) acc[k][v] = _mm512_setzero_ps();
    for (int i = s0; i < s0 + n; i++)
        for (int k = 0; k < 4; k++) {
            const __m512 w = _mm512_set1_ps(tw[k][i]);
            const float *p = tp[k][i] + c0;
            for (int v = 0; v < NV; v++) {
                const __m512 x = v < NV - 1 ? _mm512_loadu_ps(p + 16 * v) : _mm512_maskz_loadu_ps(tail, p + 16 * v);
                acc[k][v] = _mm512_fmadd_ps(x, w, acc[k][v]);
            }
        }
    for (int v = 0; v < NV; v++)
        _mm512_mask_storeu_ps(o + c0 + 16 * v, v == NV - 1 ? tail : (__mmask16)0xffff,
                              _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][v], acc[1][v]), acc[2][v]), acc[3][v]));
}

static VLM_TGT_AVX512 void msda_task_512(void *pv, int ith, int nth) {
    const msda_ctx *c = pv;
    const float *tp[4][MSDA_CHUNK];
    float tw[4][MSDA_CHUNK];
    long lo, hi;
    vlm_split(c->Lq, 1, ith, nth, &lo, &hi);
    const int D = c->D, M = c->M, LP = c->L * c->P, HC = MSDA_CHUNK / LP;   /* heads per batch (LP <= MSDA_CHUNK) */
    const size_t MD = (size_t)M * D;
    for (long q = lo; q < hi; q++)
        for (int m0 = 0; m0 < M; m0 += HC) {
            const int nh = M - m0 < HC ? M - m0 : HC;
            msda_taps_512(tp, tw, c, q, m0, nh);
            for (int h = 0; h < nh; h++) {
                float *o = c->out + q * MD + (size_t)(m0 + h) * D;
                for (int c0 = 0; c0 < D; c0 += 64) {
                    const int left = D - c0, nv = left >= 64 ? 4 : (left + 15) / 16, r = left % 16;
                    const __mmask16 tail = left >= 64 || r == 0 ? (__mmask16)0xffff : (__mmask16)((1u << r) - 1);
                    switch (nv) {
                    case 4: msda_block_512(o, tp, tw, h * LP, LP, c0, 4, tail); break;
                    case 3: msda_block_512(o, tp, tw, h * LP, LP, c0, 3, tail); break;
                    case 2: msda_block_512(o, tp, tw, h * LP, LP, c0, 2, tail); break;
                    default: msda_block_512(o, tp, tw, h * LP, LP, c0, 1, tail); break;
                    }
                }
            }
        }
}
#endif

vlm_status vlm_msda(vlm_pool *pool, float *out, const float *value, size_t ld_v, const float *loc, const float *aw,
                    const int *H, const int *W, const long *start, long S, int L, int M, int D, int P, long Lq,
                    vlm_err *err) {
    if (L < 1 || L > VLM_MSDA_MAX_LEVELS || P < 1 || P > VLM_MSDA_MAX_POINTS)
        return vlm_fail(err, VLM_ERR_ARG, "msda: need 1 <= levels <= %d and 1 <= points <= %d (got %d, %d)",
                        VLM_MSDA_MAX_LEVELS, VLM_MSDA_MAX_POINTS, L, P);
    if (M < 1 || M > VLM_MSDA_MAX_HEADS || D < 1 || D > VLM_MAX_HEAD)
        return vlm_fail(err, VLM_ERR_ARG, "msda: need 1 <= heads <= %d and 1 <= channels per head <= %d (got %d, %d)",
                        VLM_MSDA_MAX_HEADS, VLM_MAX_HEAD, M, D);
    if (Lq < 0 || S < 0) return vlm_fail(err, VLM_ERR_ARG, "msda: negative query or token count");
    if (ld_v < (size_t)M * D) return vlm_fail(err, VLM_ERR_ARG, "msda: value row stride %zu < heads·channels %d", ld_v, M * D);
    if (S > INT32_MAX) return vlm_fail(err, VLM_ERR_ARG, "msda: %ld tokens (at most 2^31 - 1)", S);
    msda_ctx c = {.out = out, .value = value, .loc = loc, .aw = aw, .ld_v = ld_v, .L = L, .M = M, .D = D, .P = P, .Lq = Lq};
    long tok = 0;
    for (int l = 0; l < L; l++) {
        if (H[l] < 1 || W[l] < 1 || H[l] > VLM_MSDA_MAX_SIDE || W[l] > VLM_MSDA_MAX_SIDE)
            return vlm_fail(err, VLM_ERR_ARG, "msda: level %d is %d x %d (sides must be in [1, %d])", l, H[l], W[l],
                            VLM_MSDA_MAX_SIDE);
        if (start[l] != tok)
            return vlm_fail(err, VLM_ERR_ARG, "msda: level %d starts at token %ld, expected %ld (levels are contiguous)",
                            l, start[l], tok);
        tok += (long)H[l] * W[l];
        c.H[l] = H[l];
        c.W[l] = W[l];
        c.fH[l] = (float)H[l];
        c.fW[l] = (float)W[l];
        c.hH[l] = (float)H[l] * 0.5f;
        c.hW[l] = (float)W[l] * 0.5f;
        c.start[l] = start[l];
    }
    if (tok != S) return vlm_fail(err, VLM_ERR_ARG, "msda: the levels hold %ld tokens, value has %ld", tok, S);
    for (int k = 0; k < MSDA_TAB; k++) {   /* AVX-512 taps tables */
        const int LP = L * P, l = (k % LP) / P;
        c.lhW[k] = c.hW[l];
        c.lhH[k] = c.hH[l];
        c.lfW[k] = c.fW[l];
        c.lfH[k] = c.fH[l];
        c.lW[k] = W[l];
        c.lH[k] = H[l];
        c.lstart[k] = (int32_t)start[l];
        c.lhoff[k] = k / LP * D;
        c.lrow[k] = (int64_t)W[l] * (int64_t)ld_v * (int64_t)sizeof(float);
    }
    if (Lq == 0) return VLM_OK;
    vlm_task_fn fn = msda_task_generic;
#if VLM_X86
    if (vlm_cpu_has_avx512()) fn = msda_task_512;
#endif
    vlm_pool_run(pool, fn, &c);
    return VLM_OK;
}

/* ---------------------------------------------------------------- GroupNorm */

/* The statistics are summed per channel over fixed blocks of GN_PB pixels (blocks split over threads, so every
 * thread streams whole pixel rows), then over the blocks and the group's channels in order on the calling thread:
 * the same sums for any thread count. */
#define GN_PB 256

static long gn_blocks(long HW) { return (HW + GN_PB - 1) / GN_PB; }

size_t vlm_group_norm_scratch_floats(long HW, int C) {
    return 2 * ((size_t)gn_blocks(HW > 0 ? HW : 0) * (size_t)C + 2 * (size_t)C);   /* doubles */
}

typedef struct {
    float *y;
    const float *x, *b;
    double *part;           /* [blocks][C] per-block channel sums */
    const double *mu, *a;   /* [C]: the channel's group mean; rstd · w */
    long HW;
    int C, pass;            /* pass 0: Σ x; 1: Σ (x - mu)²; 2: y */
} gn_ctx;

/* s[c] = Σ_p x[p][c] (mu NULL) or Σ_p (x[p][c] - mu[c])² over pixels p0 .. p1-1 in order, in double. */
VLM_CLONES static void gn_sums(double *restrict s, const float *x, const double *mu, long p0, long p1, int C) {
    for (int c = 0; c < C; c++) s[c] = 0.0;
    for (long p = p0; p < p1; p++) {
        const float *xr = x + (size_t)p * C;
        if (mu)
            for (int c = 0; c < C; c++) { double d = (double)xr[c] - mu[c]; s[c] += d * d; }
        else
            for (int c = 0; c < C; c++) s[c] += (double)xr[c];
    }
}

/* y[p][c] = (x[p][c] - mu[c]) · a[c] + b[c] in double, rounded once; pixels p0 .. p1-1. */
VLM_CLONES static void gn_apply(float *y, const float *x, const double *mu, const double *a, const float *b, long p0,
                                long p1, int C) {
    for (long p = p0; p < p1; p++) {
        const float *xr = x + (size_t)p * C;
        float *yr = y + (size_t)p * C;
        for (int c = 0; c < C; c++) yr[c] = (float)(((double)xr[c] - mu[c]) * a[c] + (double)b[c]);
    }
}

static void gn_task(void *pv, int ith, int nth) {
    const gn_ctx *c = pv;
    long lo, hi;
    if (c->pass == 2) {
        vlm_split(c->HW, 16, ith, nth, &lo, &hi);
        if (lo < hi) gn_apply(c->y, c->x, c->mu, c->a, c->b, lo, hi, c->C);
        return;
    }
    vlm_split(gn_blocks(c->HW), 1, ith, nth, &lo, &hi);
    for (long blk = lo; blk < hi; blk++) {
        const long p1 = (blk + 1) * GN_PB < c->HW ? (blk + 1) * GN_PB : c->HW;
        gn_sums(c->part + (size_t)blk * c->C, c->x, c->pass ? c->mu : NULL, blk * GN_PB, p1, c->C);
    }
}

/* Σ over channels c0 .. c0 + n - 1 (in order) of Σ over the blocks (in order) of part[blk][c]. */
static double gn_total(const double *part, long nb, int C, int c0, int n) {
    double t = 0.0;
    for (int c = c0; c < c0 + n; c++)
        for (long blk = 0; blk < nb; blk++) t += part[(size_t)blk * C + c];
    return t;
}

void vlm_group_norm(vlm_pool *pool, float *y, const float *x, const float *w, const float *b, float eps, float *scratch,
                    long HW, int C, int G) {
    if (HW < 1 || G < 1 || C < G || C % G) return;
    const long nb = gn_blocks(HW);
    const int Cg = C / G;
    double *part = (double *)scratch, *mu = part + (size_t)nb * C, *a = mu + C;
    gn_ctx c = {.y = y, .x = x, .b = b, .part = part, .mu = mu, .a = a, .HW = HW, .C = C, .pass = 0};
    const double cnt = (double)HW * Cg;
    vlm_pool_run(pool, gn_task, &c);
    for (int g = 0; g < G; g++) {
        const double m = gn_total(part, nb, C, g * Cg, Cg) / cnt;
        for (int k = 0; k < Cg; k++) mu[g * Cg + k] = m;
    }
    c.pass = 1;
    vlm_pool_run(pool, gn_task, &c);
    for (int g = 0; g < G; g++) {
        const double rstd = 1.0 / sqrt(gn_total(part, nb, C, g * Cg, Cg) / cnt + (double)eps);
        for (int k = 0; k < Cg; k++) a[g * Cg + k] = rstd * (double)w[g * Cg + k];
    }
    c.pass = 2;
    vlm_pool_run(pool, gn_task, &c);
}

/* ---------------------------------------------------------------- sine position embeddings */

#define SINE_2PI 6.28318530717958647692f   /* 2π as the references' float32 scale */

/* dt[k] = T^(2·floor(k/2) / F) for k < F: the exponent in float32 as torch forms it, the power rounded once. */
static void sine_dim_t(float *dt, float T, int F) {
    for (int k = 0; k < F; k++) {
        float e = (float)(2 * (k / 2)) / (float)F;
        dt[k] = (float)pow((double)T, (double)e);
    }
}

/* o[k] = sin(e / dt[k]) for even k, cos(e / dt[k]) for odd k; k < F. */
static void sine_row(float *o, float e, const float *dt, int F) {
    for (int k = 0; k < F; k += 2) {
        o[k] = sinf(e / dt[k]);
        o[k + 1] = cosf(e / dt[k + 1]);
    }
}

typedef struct { float *out; float th, tw; int H, W, F; } sine_hw_ctx;

/* Normalized cumulative position of 1-based index i of n: i / (n + 1e-6) · 2π, in float32 steps. */
static float sine_norm_pos(int i, int n) { return ((float)i / ((float)n + 1e-6f)) * SINE_2PI; }

/* Run 1: the pixels of row 0. */
static void sine_hw_row0(void *pv, int ith, int nth) {
    const sine_hw_ctx *c = pv;
    float dth[VLM_SINE_MAX_FEATS], dtw[VLM_SINE_MAX_FEATS];
    sine_dim_t(dth, c->th, c->F);
    sine_dim_t(dtw, c->tw, c->F);
    long lo, hi;
    vlm_split(c->W, 1, ith, nth, &lo, &hi);
    const int F = c->F;
    for (long j = lo; j < hi; j++) {
        float *o = c->out + (size_t)j * 2 * F;
        sine_row(o, sine_norm_pos(1, c->H), dth, F);
        sine_row(o + F, sine_norm_pos((int)j + 1, c->W), dtw, F);
    }
}

/* Run 2: rows 1 .. H-1: the y half computed once per row, the x half copied from row 0. */
static void sine_hw_rows(void *pv, int ith, int nth) {
    const sine_hw_ctx *c = pv;
    float dth[VLM_SINE_MAX_FEATS];
    sine_dim_t(dth, c->th, c->F);
    long lo, hi;
    vlm_split(c->H - 1, 1, ith, nth, &lo, &hi);
    const int F = c->F;
    const size_t px = (size_t)2 * F;
    for (long i = lo + 1; i < hi + 1; i++) {
        float *row = c->out + (size_t)i * c->W * px;
        sine_row(row, sine_norm_pos((int)i + 1, c->H), dth, F);
        for (int j = 0; j < c->W; j++) {
            if (j) memcpy(row + j * px, row, sizeof(float) * F);
            memcpy(row + j * px + F, c->out + j * px + F, sizeof(float) * F);
        }
    }
}

void vlm_sine_pos_embed_hw(vlm_pool *pool, float *out, float temp_h, float temp_w, int H, int W, int F) {
    if (H < 1 || W < 1 || F < 2 || F % 2 || F > VLM_SINE_MAX_FEATS) return;
    sine_hw_ctx c = {out, temp_h, temp_w, H, W, F};
    vlm_pool_run(pool, sine_hw_row0, &c);
    if (H > 1) vlm_pool_run(pool, sine_hw_rows, &c);
}

typedef struct { float *out; const float *box; float T; long N; int F; } sine_box_ctx;

static void sine_box_task(void *pv, int ith, int nth) {
    const sine_box_ctx *c = pv;
    float dt[VLM_SINE_MAX_FEATS];
    sine_dim_t(dt, c->T, c->F);
    long lo, hi;
    vlm_split(c->N, 1, ith, nth, &lo, &hi);
    static const int coord[4] = {1, 0, 2, 3};   /* blocks: y, x, w, h */
    const int F = c->F;
    for (long i = lo; i < hi; i++)
        for (int k = 0; k < 4; k++)
            sine_row(c->out + (size_t)i * 4 * F + (size_t)k * F, c->box[4 * i + coord[k]] * SINE_2PI, dt, F);
}

void vlm_sine_embed_boxes(vlm_pool *pool, float *out, const float *box, float temperature, long N, int F) {
    if (N < 1 || F < 2 || F % 2 || F > VLM_SINE_MAX_FEATS) return;
    sine_box_ctx c = {out, box, temperature, N, F};
    vlm_pool_run(pool, sine_box_task, &c);
}
