/* attention.c — the attention ops (see ops.h): causal GQA over the KV cache (decoder), segment attention
 * (ViT window / full attention), DaViT's window attention and channel attention; and the blocked
 * ("flash") kernel under the first three.
 *
 * flash_rows computes softmax(q kᵀ · scale) v for R query rows against n keys, one block of
 * FA_KB keys at a time with an online softmax (running max and sum per row), so no score row longer
 * than FA_KB is ever stored and every key/value block is reused by all R rows while it sits in L1/L2.
 * Row r sees keys j < lim[r] (lim non-decreasing in r: causal masks; all equal: no mask).
 * Two implementations of the inner tiles: AVX-512 intrinsics (D a multiple of 16), and plain C for
 * every other CPU or head size. Softmax is fp32 with max subtraction, as in torch. */
#include "ops.h"
#include "simd.h"

#include <math.h>
#include <string.h>

#define FA_KB 64   /* keys per block */
#define FA_QB 64   /* query rows per work item (callers' choice; R may be anything) */

/* ---------------------------------------------------------------- generic tiles */

/* s[r][j] = Σ_d qs[r][d] · kt[d][j] for r < R, j < kb; kt row stride FA_KB */
static void s_tile_generic(float *s, const float *qs, int R, const float *kt, int ldkt, int kb, int D) {
    for (int r = 0; r < R; r++) {
        float *sr = s + (size_t)r * FA_KB;
        for (int j = 0; j < kb; j++) sr[j] = 0.f;
        for (int d = 0; d < D; d++) {
            float a = qs[(size_t)r * D + d];
            const float *k = kt + (size_t)d * ldkt;
            for (int j = 0; j < kb; j++) sr[j] += a * k[j];
        }
    }
}

/* o[r][:] += Σ_j p[r][j] · v[j][:] */
static void pv_tile_generic(float *o, const float *p, int R, const float *v, int ldv, int kb, int D) {
    for (int r = 0; r < R; r++) {
        float *orow = o + (size_t)r * D;
        const float *pr = p + (size_t)r * FA_KB;
        for (int j = 0; j < kb; j++) {
            float a = pr[j];
            const float *vr = v + (size_t)j * ldv;
            for (int d = 0; d < D; d++) orow[d] += a * vr[d];
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 tiles */
#if VLM_X86
/* 4 rows x 64 keys per step: 16 accumulators, one kt row (4 vectors) loaded per d. */
static inline VLM_INLINE VLM_TGT_AVX512 void s_tile4_512(float *s, const float *qs, int nr, const float *kt,
                                                                       int ldkt, int D) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const float *k = kt + (size_t)d * ldkt;
        __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16), k2 = _mm512_loadu_ps(k + 32),
               k3 = _mm512_loadu_ps(k + 48);
        for (int r = 0; r < nr; r++) {
            __m512 a = _mm512_set1_ps(qs[(size_t)r * D + d]);
            acc[r][0] = _mm512_fmadd_ps(a, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(a, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(a, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + (size_t)r * FA_KB + 16 * c, acc[r][c]);
}

static VLM_TGT_AVX512 void s_tile_512(float *s, const float *qs, int R, const float *kt, int ldkt, int kb, int D) {
    (void)kb;  /* kt is padded to a multiple of FA_KB columns */
    int r = 0;
    for (; r + 4 <= R; r += 4) s_tile4_512(s + (size_t)r * FA_KB, qs + (size_t)r * D, 4, kt, ldkt, D);
    switch (R - r) {
    case 3: s_tile4_512(s + (size_t)r * FA_KB, qs + (size_t)r * D, 3, kt, ldkt, D); break;
    case 2: s_tile4_512(s + (size_t)r * FA_KB, qs + (size_t)r * D, 2, kt, ldkt, D); break;
    case 1: s_tile4_512(s + (size_t)r * FA_KB, qs + (size_t)r * D, 1, kt, ldkt, D); break;
    default: break;
    }
}

/* 4 rows x 64 output columns per step: 16 accumulators, one v row chunk (4 vectors) per key. */
static inline VLM_INLINE VLM_TGT_AVX512 void pv_tile4_512(float *o, const float *p, int nr, const float *v,
                                                                        int ldv, int kb, int D, int c0, int nc) {
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_loadu_ps(o + (size_t)r * D + c0 + 16 * c);
    for (int j = 0; j < kb; j++) {
        const float *vr = v + (size_t)j * ldv + c0;
        __m512 vv[4];
        for (int c = 0; c < nc; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
        for (int r = 0; r < nr; r++) {
            __m512 a = _mm512_set1_ps(p[(size_t)r * FA_KB + j]);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_fmadd_ps(a, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(o + (size_t)r * D + c0 + 16 * c, acc[r][c]);
}

static VLM_TGT_AVX512 void pv_tile_512(float *o, const float *p, int R, const float *v, int ldv, int kb, int D) {
    for (int c0 = 0; c0 < D; c0 += 64) {
        int nc = (D - c0) / 16 < 4 ? (D - c0) / 16 : 4;
        int r = 0;
        for (; r + 4 <= R; r += 4) {
            float *orow = o + (size_t)r * D;
            const float *pr = p + (size_t)r * FA_KB;
            switch (nc) {
            case 4: pv_tile4_512(orow, pr, 4, v, ldv, kb, D, c0, 4); break;
            case 3: pv_tile4_512(orow, pr, 4, v, ldv, kb, D, c0, 3); break;
            case 2: pv_tile4_512(orow, pr, 4, v, ldv, kb, D, c0, 2); break;
            default: pv_tile4_512(orow, pr, 4, v, ldv, kb, D, c0, 1); break;
            }
        }
        for (; r < R; r++)
            pv_tile4_512(o + (size_t)r * D, p + (size_t)r * FA_KB, 1, v, ldv, kb, D, c0, nc);
    }
}

/* One row of a score block: new running max, exp(s - max) in place (0 past `valid`), their sum. */
static VLM_TGT_AVX512 void soft_row_512(float *sr, int valid, int kb, float *m, float *sum_out) {
    __m512 vmx = _mm512_set1_ps(*m);
    for (int j = 0; j < valid; j += 16) {
        __mmask16 k = valid - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (valid - j)) - 1);
        vmx = _mm512_mask_max_ps(vmx, k, vmx, _mm512_maskz_loadu_ps(k, sr + j));
    }
    float mx = _mm512_reduce_max_ps(vmx);
    __m512 vm = _mm512_set1_ps(mx), acc = _mm512_setzero_ps();
    for (int j = 0; j < kb; j += 16) {
        int left = valid - j;
        __mmask16 k = left >= 16 ? (__mmask16)0xffff : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
        __m512 e = _mm512_maskz_mov_ps(k, vlm_exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm)));
        _mm512_storeu_ps(sr + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    *m = mx;
    *sum_out = _mm512_reduce_add_ps(acc);
}
#endif

static void soft_row_generic(float *sr, int valid, int kb, float *m, float *sum_out) {
    float mx = *m;
    for (int j = 0; j < valid; j++) mx = sr[j] > mx ? sr[j] : mx;
    float sum = 0.f;
    for (int j = 0; j < valid; j++) { float e = vlm_expf(sr[j] - mx); sr[j] = e; sum += e; }
    for (int j = valid; j < kb; j++) sr[j] = 0.f;
    *m = mx;
    *sum_out = sum;
}

/* ---------------------------------------------------------------- driver */

typedef void (*s_tile_fn)(float *, const float *, int, const float *, int, int, int);
typedef void (*pv_tile_fn)(float *, const float *, int, const float *, int, int, int);

static int use_512(int D) {
#if VLM_X86
    return vlm_cpu_has_avx512() && D % 16 == 0;
#else
    (void)D;
    return 0;
#endif
}

/* Workspace floats for R query rows of head size D. */
static size_t flash_workspace_floats(int R, int D) {
    /* s [R][KB] + qs [R][D] + o [R][D] + m [R] + l [R] (+ the bf16 path's probabilities pp [R][KB / 2]) */
    return vlm_align_up((size_t)R * FA_KB + 2 * (size_t)R * D + 2 * (size_t)R + (size_t)R * FA_KB / 2 + 64, 16);
}

/* Keys are passed transposed: kt[d][j] with row stride ldkt >= flash_kt_stride(n) (the padding columns are
 * read but never used). flash_transpose fills kt from K [n][D] (row stride ldk). */
static int flash_kt_stride(int n) { return (n + FA_KB - 1) / FA_KB * FA_KB; }

static void flash_transpose(float *kt, int ldkt, const float *K, int ldk, int n, int D) {
    for (int j0 = 0; j0 < n; j0 += 16) {  /* 16 keys at a time: row-contiguous reads, 16-wide writes */
        int nb = n - j0 < 16 ? n - j0 : 16;
        for (int d = 0; d < D; d++) {
            float *dst = kt + (size_t)d * ldkt + j0;
            for (int j = 0; j < nb; j++) dst[j] = K[(size_t)(j0 + j) * ldk + d];
        }
    }
    for (int d = 0; d < D; d++)
        for (int j = n; j < flash_kt_stride(n) && j < ldkt; j++) kt[(size_t)d * ldkt + j] = 0.f;
}

static void scale_rows(float *o, int R, int D, const float *corr) {
    for (int r = 0; r < R; r++)
        if (corr[r] != 1.0f)
            for (int d = 0; d < D; d++) o[(size_t)r * D + d] *= corr[r];
}

/* The first of R rows (lim non-decreasing) that sees any key of the block starting at j0 (R: none; causal rows that
 * see none of it are skipped). */
static int first_row_seeing(const int *lim, int R, int j0) {
    int r0 = 0;
    while (r0 < R && lim[r0] <= j0) r0++;
    return r0;
}

typedef void (*soft_row_fn)(float *, int, int, float *, float *);

/* One score row of a block through the online softmax: exp(s - max) in place (soft_row), the running max *m and
 * sum *l updated; returns the factor the row's output accumulated so far must be scaled by. */
static inline VLM_INLINE float online_softmax_row(soft_row_fn soft_row, float *sr, int valid, int kb, float *m,
                                                  float *l) {
    float m_old = *m, sum;
    soft_row(sr, valid, kb, m, &sum);
    /* m_old = -inf on the first block: corr = 0 (o and l are still 0) */
    const float corr = m_old == -INFINITY ? 0.f : vlm_expf(m_old - *m);
    *l = *l * corr + sum;
    return corr;
}

/* out[r] (row stride ldo) = o[r] / l[r] (0 where no key was seen). */
static void finish_rows(float *out, int ldo, const float *o, const float *l, int R, int D) {
    for (int r = 0; r < R; r++) {
        float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
        for (int d = 0; d < D; d++) out[(size_t)r * ldo + d] = o[(size_t)r * D + d] * inv;
    }
}

/* Optional additive terms of the scores (Swin): s[r][j] += bias[r·ldb + j], then += mask where lab_q[r] != lab_k[j]
 * (bias NULL: none; lab_q NULL: no mask). */
typedef struct { const float *bias; int ldb; const int32_t *lab_q, *lab_k; float mask; } flash_extra;

/* out[r] (row stride ldo) = softmax_j(q[r]·K[j] · scale [+ extra]) · V[j] over keys j < lim[r] (lim non-decreasing,
 * lim[r] >= 1); q rows stride ldq, V rows stride ldv, head size D. ws: flash_workspace_floats(R, D) floats. */
static void flash_rows_x(float *out, int ldo, const float *q, int ldq, int R, const float *kt, int ldkt,
                         const float *V, int ldv, const int *lim, int D, float scale, float *ws, const flash_extra *x) {
    s_tile_fn s_tile = s_tile_generic;
    pv_tile_fn pv_tile = pv_tile_generic;
    soft_row_fn soft_row = soft_row_generic;
#if VLM_X86
    if (use_512(D)) { s_tile = s_tile_512; pv_tile = pv_tile_512; soft_row = soft_row_512; }
#endif
    float *s = ws, *qs = s + (size_t)R * FA_KB, *o = qs + (size_t)R * D;
    float *m = o + (size_t)R * D, *l = m + R;
    float corr[FA_QB > 256 ? FA_QB : 256];
    int n = 0;
    for (int r = 0; r < R; r++) {
        n = lim[r] > n ? lim[r] : n;
        m[r] = -INFINITY;
        l[r] = 0.f;
        for (int d = 0; d < D; d++) {
            qs[(size_t)r * D + d] = q[(size_t)r * ldq + d] * scale;
            o[(size_t)r * D + d] = 0.f;
        }
    }
    for (int j0 = 0; j0 < n; j0 += FA_KB) {
        int kb = n - j0 < FA_KB ? n - j0 : FA_KB;
        int r0 = first_row_seeing(lim, R, j0);
        if (r0 == R) continue;
        s_tile(s + (size_t)r0 * FA_KB, qs + (size_t)r0 * D, R - r0, kt + j0, ldkt, kb, D);
        for (int r = r0; r < R; r++) {
            float *sr = s + (size_t)r * FA_KB;
            if (x && x->bias) {
                const float *b = x->bias + (size_t)r * x->ldb + j0;
                for (int j = 0; j < kb; j++) sr[j] += b[j];
            }
            if (x && x->lab_q) {
                const int32_t lq = x->lab_q[r], *lk = x->lab_k + j0;
                for (int j = 0; j < kb; j++) sr[j] += lk[j] != lq ? x->mask : 0.f;
            }
            int valid = lim[r] - j0 < kb ? lim[r] - j0 : kb;
            corr[r] = online_softmax_row(soft_row, sr, valid, kb, &m[r], &l[r]);
        }
        scale_rows(o + (size_t)r0 * D, R - r0, D, corr + r0);
        pv_tile(o + (size_t)r0 * D, s + (size_t)r0 * FA_KB, R - r0, V + (size_t)j0 * ldv, ldv, kb, D);
    }
    finish_rows(out, ldo, o, l, R, D);
}

static void flash_rows(float *out, int ldo, const float *q, int ldq, int R, const float *kt, int ldkt, const float *V,
                       int ldv, const int *lim, int D, float scale, float *ws) {
    flash_rows_x(out, ldo, q, ldq, R, kt, ldkt, V, ldv, lim, D, scale, ws, NULL);
}

/* ---------------------------------------------------------------- bf16 operands
 * With compute = bf16 (the engine's bf16 and int8 modes) the prefill's and the ViT's attention round q·scale, k, v
 * and the unnormalized probabilities to bf16 (round to nearest even) and sum the products in fp32 with vdpbf16ps,
 * as a bf16 torch run's attention multiplies bf16 tensors: twice the products per instruction of the fp32 tiles.
 * The softmax (its running max, sum and correction) and the output accumulators stay fp32. Layouts, as 32-bit
 * pairs of bf16: keys kt2[D / 2][ldkt] (pair p of key j: its d = 2p, 2p + 1), values vp[(n + 1) / 2][D] (pair jp at
 * column d: keys 2jp, 2jp + 1, the key past an odd n zero), queries [R][D / 2], probabilities pp[R][FA_KB / 2].
 * Needs AVX512-BF16 and D a multiple of 16; elsewhere the fp32 path runs. */

static int use_bf16(int bf16, int D) {
#if VLM_X86
    return bf16 && vlm_cpu_isa() >= VLM_ISA_AVX512BF16 && D % 16 == 0;
#else
    (void)bf16; (void)D;
    return 0;
#endif
}

#if VLM_X86
/* 32 fp32 values (n32 of them real, the rest 0) -> 16 bf16 pairs (first, second) */
static inline VLM_INLINE VLM_TGT_AVX512BF16 __m512i bf_pairs(const float *x, int n32, __m512 mul) {
    const __mmask16 m0 = n32 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n32) - 1);
    const __mmask16 m1 = n32 >= 32 ? (__mmask16)0xffff : n32 > 16 ? (__mmask16)((1u << (n32 - 16)) - 1) : 0;
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m1, x + 16), mul),
                                        _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, x), mul));
}

/* kt2 from K [n][D] (row stride ldk): 16 keys x 16 pairs per in-register transpose; columns n .. ldkt zero. */
static VLM_TGT_AVX512BF16 void bf_keys(uint32_t *kt, int ldkt, const float *K, int ldk, int n, int D) {
    const int P = D / 2;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int j0 = 0; j0 < ldkt; j0 += 16) {
        const int nb = n - j0 < 0 ? 0 : n - j0 < 16 ? n - j0 : 16;
        for (int p0 = 0; p0 < P; p0 += 16) {
            const int np = P - p0 < 16 ? P - p0 : 16;
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < nb ? bf_pairs(K + (size_t)(j0 + i) * ldk + 2 * p0, 2 * np, one) : _mm512_setzero_si512();
            vlm_transpose16_epi32(r);
            for (int p = 0; p < np; p++) _mm512_storeu_si512((void *)(kt + (size_t)(p0 + p) * ldkt + j0), r[p]);
        }
    }
}

/* vp from V [n][D] (row stride ldv). */
static VLM_TGT_AVX512BF16 void bf_values(uint32_t *vp, const float *V, int ldv, int n, int D) {
    /* cvtne2ps_pbh(b, a) holds a0..a15 then b0..b15; interleave them into (a_d, b_d) pairs */
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int jp = 0; jp < (n + 1) / 2; jp++) {
        const float *a = V + (size_t)(2 * jp) * ldv, *b = a + ldv;
        const int has_b = 2 * jp + 1 < n;
        for (int d = 0; d < D; d += 16) {
            __m512 vb = has_b ? _mm512_loadu_ps(b + d) : _mm512_setzero_ps();
            __m512i h = (__m512i)_mm512_cvtne2ps_pbh(vb, _mm512_loadu_ps(a + d));
            _mm512_storeu_si512((void *)(vp + (size_t)jp * D + d), _mm512_permutexvar_epi16(idx, h));
        }
    }
}

/* s[r][0..64) = Σ_p qs[r][p] · kt[p][0..64) for nr <= 4 rows (P pairs) */
static inline VLM_INLINE VLM_TGT_AVX512BF16 void bs_tile4(float *s, const uint32_t *qs, int nr, const uint32_t *kt,
                                                          int ldkt, int P) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        const uint32_t *k = kt + (size_t)p * ldkt;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512((const void *)k),
                       k1 = (__m512bh)_mm512_loadu_si512((const void *)(k + 16)),
                       k2 = (__m512bh)_mm512_loadu_si512((const void *)(k + 32)),
                       k3 = (__m512bh)_mm512_loadu_si512((const void *)(k + 48));
        for (int r = 0; r < nr; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qs[(size_t)r * P + p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, k2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, k3);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + (size_t)r * FA_KB + 16 * c, acc[r][c]);
}

static VLM_TGT_AVX512BF16 void bs_tile(float *s, const uint32_t *qs, int R, const uint32_t *kt, int ldkt, int P) {
    int r = 0;
    for (; r + 4 <= R; r += 4) bs_tile4(s + (size_t)r * FA_KB, qs + (size_t)r * P, 4, kt, ldkt, P);
    switch (R - r) {
    case 3: bs_tile4(s + (size_t)r * FA_KB, qs + (size_t)r * P, 3, kt, ldkt, P); break;
    case 2: bs_tile4(s + (size_t)r * FA_KB, qs + (size_t)r * P, 2, kt, ldkt, P); break;
    case 1: bs_tile4(s + (size_t)r * FA_KB, qs + (size_t)r * P, 1, kt, ldkt, P); break;
    default: break;
    }
}

/* o[r][c0 .. c0 + 16 nc) += Σ_jp pp[r][jp] · vp[jp][c0 ..] over npair key pairs, nr <= 4 rows */
static inline VLM_INLINE VLM_TGT_AVX512BF16 void bpv_tile4(float *o, const uint32_t *pp, int nr, const uint32_t *vp,
                                                           int npair, int D, int c0, int nc) {
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_loadu_ps(o + (size_t)r * D + c0 + 16 * c);
    for (int jp = 0; jp < npair; jp++) {
        const uint32_t *vr = vp + (size_t)jp * D + c0;
        __m512bh vv[4];
        for (int c = 0; c < nc; c++) vv[c] = (__m512bh)_mm512_loadu_si512((const void *)(vr + 16 * c));
        for (int r = 0; r < nr; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pp[(size_t)r * (FA_KB / 2) + jp]);
            for (int c = 0; c < nc; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, vv[c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(o + (size_t)r * D + c0 + 16 * c, acc[r][c]);
}

static VLM_TGT_AVX512BF16 void bpv_tile(float *o, const uint32_t *pp, int R, const uint32_t *vp, int npair, int D) {
    for (int c0 = 0; c0 < D; c0 += 64) {
        const int nc = (D - c0) / 16 < 4 ? (D - c0) / 16 : 4;
        int r = 0;
        for (; r + 4 <= R; r += 4) {
            float *orow = o + (size_t)r * D;
            const uint32_t *pr = pp + (size_t)r * (FA_KB / 2);
            switch (nc) {
            case 4: bpv_tile4(orow, pr, 4, vp, npair, D, c0, 4); break;
            case 3: bpv_tile4(orow, pr, 4, vp, npair, D, c0, 3); break;
            case 2: bpv_tile4(orow, pr, 4, vp, npair, D, c0, 2); break;
            default: bpv_tile4(orow, pr, 4, vp, npair, D, c0, 1); break;
            }
        }
        for (; r < R; r++) bpv_tile4(o + (size_t)r * D, pp + (size_t)r * (FA_KB / 2), 1, vp, npair, D, c0, nc);
    }
}

/* flash_rows on bf16 operands: kt2 / vp as bf_keys / bf_values made them (n keys, vp's rows from key 0). */
static VLM_TGT_AVX512BF16 void flash_rows_bf16(float *out, int ldo, const float *q, int ldq, int R, const uint32_t *kt,
                                               int ldkt, const uint32_t *vp, const int *lim, int D, float scale,
                                               float *ws) {
    const int P = D / 2;
    float *s = ws, *o = s + (size_t)R * FA_KB + (size_t)R * D;
    uint32_t *qs = (uint32_t *)(s + (size_t)R * FA_KB);
    float *m = o + (size_t)R * D, *l = m + R;
    uint32_t *pp = (uint32_t *)(l + R);
    float corr[FA_QB > 256 ? FA_QB : 256];
    const __m512 vscale = _mm512_set1_ps(scale);
    int n = 0;
    for (int r = 0; r < R; r++) {
        n = lim[r] > n ? lim[r] : n;
        m[r] = -INFINITY;
        l[r] = 0.f;
        for (int p0 = 0; p0 < P; p0 += 16) {
            const int np = P - p0 < 16 ? P - p0 : 16;
            _mm512_mask_storeu_epi32(qs + (size_t)r * P + p0, (__mmask16)((1u << np) - 1),
                                     bf_pairs(q + (size_t)r * ldq + 2 * p0, 2 * np, vscale));
        }
        memset(o + (size_t)r * D, 0, (size_t)D * sizeof(float));
    }
    for (int j0 = 0; j0 < n; j0 += FA_KB) {
        int kb = n - j0 < FA_KB ? n - j0 : FA_KB;
        int r0 = first_row_seeing(lim, R, j0);
        if (r0 == R) continue;
        bs_tile(s + (size_t)r0 * FA_KB, qs + (size_t)r0 * P, R - r0, kt + j0, ldkt, P);
        for (int r = r0; r < R; r++) {
            float *sr = s + (size_t)r * FA_KB;
            int valid = lim[r] - j0 < kb ? lim[r] - j0 : kb;
            /* exp past valid (to a multiple of 16) is 0 */
            corr[r] = online_softmax_row(soft_row_512, sr, valid, kb, &m[r], &l[r]);
            uint32_t *pr = pp + (size_t)r * (FA_KB / 2);
            const int npair = (kb + 1) / 2;
            for (int t = 0; 32 * t < 2 * npair; t++)
                _mm512_storeu_si512((void *)(pr + 16 * t), bf_pairs(sr + 32 * t, 32, _mm512_set1_ps(1.0f)));
        }
        scale_rows(o + (size_t)r0 * D, R - r0, D, corr + r0);
        bpv_tile(o + (size_t)r0 * D, pp + (size_t)r0 * (FA_KB / 2), R - r0, vp + (size_t)(j0 / 2) * D, (kb + 1) / 2, D);
    }
    finish_rows(out, ldo, o, l, R, D);
}
#endif

/* ---------------------------------------------------------------- causal attention over the KV cache
 * Prefill: work item = (query head, block of FA_QB tokens), interleaved over threads (later blocks
 * see more keys). Decode (T == 1): work item = kv head, its G query heads being the rows. */

size_t vlm_attention_scratch_floats(int H, int KV, int D, int max_ctx) {
    int G = H / KV;
    return flash_workspace_floats(G > FA_QB ? G : FA_QB, D) + (size_t)D * flash_kt_stride(max_ctx);
}

typedef struct {
    float *out; int ldo; const float *q; int ldq; const float *kc, *vc;
    int max_ctx, n_past, T, H, KV, D; float scale; float *scratch; size_t scratch_per; int bf16;
} attn_ctx;

/* Work items are kv-group major, so a thread transposes the keys of each group it meets once. */
static void attn_task(void *p, int ith, int nth) {
    const attn_ctx *c = p;
    const int G = c->H / c->KV, D = c->D, n_all = c->n_past + c->T, ldkt = flash_kt_stride(n_all);
    float *kt = c->scratch + (size_t)ith * c->scratch_per;
    float *ws = kt + (size_t)D * flash_kt_stride(c->max_ctx);
    int lim[FA_QB > 256 ? FA_QB : 256];
    int cur_g = -1;
    if (c->T == 1 && G <= 256) {  /* decode: the G query heads of a kv group are the rows */
        for (int g = ith; g < c->KV; g += nth) {
            for (int r = 0; r < G; r++) lim[r] = n_all;
            flash_transpose(kt, ldkt, c->kc + (size_t)g * c->max_ctx * D, D, n_all, D);
            flash_rows(c->out + (size_t)g * G * D, D, c->q + (size_t)g * G * D, D, G, kt, ldkt,
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
#if VLM_X86
            if (c->bf16) {   /* kt2 [D / 2][ldkt], then vp */
                bf_keys((uint32_t *)kt, ldkt, c->kc + (size_t)g * c->max_ctx * D, D, n_all, D);
                bf_values((uint32_t *)kt + (size_t)(D / 2) * ldkt, c->vc + (size_t)g * c->max_ctx * D, D, n_all, D);
            } else
#endif
                flash_transpose(kt, ldkt, c->kc + (size_t)g * c->max_ctx * D, D, n_all, D);
            cur_g = g;
        }
        for (int r = 0; r < R; r++) lim[r] = c->n_past + t0 + r + 1;
#if VLM_X86
        if (c->bf16) {
            flash_rows_bf16(c->out + (size_t)t0 * c->ldo + (size_t)h * D, c->ldo,
                            c->q + (size_t)t0 * c->ldq + (size_t)h * D, c->ldq, R, (const uint32_t *)kt, ldkt,
                            (const uint32_t *)kt + (size_t)(D / 2) * ldkt, lim, D, c->scale, ws);
            continue;
        }
#endif
        flash_rows(c->out + (size_t)t0 * c->ldo + (size_t)h * D, c->ldo, c->q + (size_t)t0 * c->ldq + (size_t)h * D,
                       c->ldq, R, kt, ldkt, c->vc + (size_t)g * c->max_ctx * D, D, lim, D, c->scale, ws);
    }
}

void vlm_attention(vlm_pool *pool, float *out, int ldo, const float *q, int ldq, const float *kc, const float *vc,
                   int max_ctx, int n_past, int T, int H, int KV, int D, float scale, float *scratch, int bf16) {
    attn_ctx c = {out, ldo, q, ldq, kc, vc, max_ctx, n_past, T, H, KV, D, scale, scratch,
                  vlm_attention_scratch_floats(H, KV, D, max_ctx), T > 1 && use_bf16(bf16, D)};
    const uint64_t pairs = (uint64_t)T * (uint64_t)n_past + (uint64_t)T * (uint64_t)(T + 1) / 2;   /* causal */
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 4 * (uint64_t)H * (uint64_t)D * pairs);
    vlm_pool_run(pool, attn_task, &c);
}

/* ---------------------------------------------------------------- segment (window) attention
 * Non-causal attention inside segments [cu[s], cu[s+1]) of a packed qkv matrix [N][3][H][D]: the
 * vision transformer's window and full attention, without any N x N mask.
 * Work item = (segment, head, block of FA_QB queries), enumerated in a fixed order; a thread
 * transposes the keys of each (segment, head) it meets once. */

typedef struct {
    float *out; const float *qkv; const int *cu; int n_seg, H, D, max_seg; float scale; float *scratch; size_t per;
    int bf16;
} seg_ctx;

static void seg_task(void *p, int ith, int nth) {
    const seg_ctx *c = p;
    const int H = c->H, D = c->D, ld = 3 * H * D;
    float *kt = c->scratch + (size_t)ith * c->per;
    float *ws = kt + (size_t)D * flash_kt_stride(c->max_seg);
    int lim[FA_QB];
    long it = 0;
    for (int sgi = 0; sgi < c->n_seg; sgi++) {
        int s0 = c->cu[sgi], n = c->cu[sgi + 1] - s0, nb = (n + FA_QB - 1) / FA_QB, ldkt = flash_kt_stride(n);
        const float *base = c->qkv + (size_t)s0 * ld;
        for (int h = 0; h < H; h++) {
            int have = 0;
            for (int b = 0; b < nb; b++, it++) {
                if (it % nth != ith) continue;
                int t0 = b * FA_QB, R = n - t0 < FA_QB ? n - t0 : FA_QB;
                for (int r = 0; r < R; r++) lim[r] = n;
#if VLM_X86
                if (c->bf16) {
                    uint32_t *kt2 = (uint32_t *)kt, *vp = kt2 + (size_t)(D / 2) * ldkt;
                    if (!have) {
                        bf_keys(kt2, ldkt, base + (size_t)(H + h) * D, ld, n, D);
                        bf_values(vp, base + (size_t)(2 * H + h) * D, ld, n, D);
                        have = 1;
                    }
                    flash_rows_bf16(c->out + (size_t)(s0 + t0) * H * D + (size_t)h * D, H * D,
                                    base + (size_t)t0 * ld + (size_t)h * D, ld, R, kt2, ldkt, vp, lim, D, c->scale, ws);
                    continue;
                }
#endif
                if (!have) { flash_transpose(kt, ldkt, base + (size_t)(H + h) * D, ld, n, D); have = 1; }
                flash_rows(c->out + (size_t)(s0 + t0) * H * D + (size_t)h * D, H * D,
                               base + (size_t)t0 * ld + (size_t)h * D, ld, R, kt, ldkt,
                               base + (size_t)(2 * H + h) * D, ld, lim, D, c->scale, ws);
            }
        }
    }
}

size_t vlm_segment_attention_scratch_floats(int max_seg, int D) {
    return flash_workspace_floats(FA_QB, D) + (size_t)D * flash_kt_stride(max_seg);
}

void vlm_segment_attention(vlm_pool *pool, float *out, const float *qkv, const int *cu, int n_seg, int H, int D,
                           float scale, float *scratch, int max_seg, int bf16) {
    seg_ctx c = {out, qkv, cu, n_seg, H, D, max_seg, scale, scratch, vlm_segment_attention_scratch_floats(max_seg, D),
                 use_bf16(bf16, D)};
    uint64_t pairs = 0;
    for (int s = 0; s < n_seg; s++) pairs += (uint64_t)(cu[s + 1] - cu[s]) * (uint64_t)(cu[s + 1] - cu[s]);
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 4 * (uint64_t)H * (uint64_t)D * pairs);
    vlm_pool_run(pool, seg_task, &c);
}

/* ---------------------------------------------------------------- DaViT window attention (one band of rows)
 * Work item = (window column, head). Keys/values: the win x win window in raster order, positions outside
 * the image being the zero-padded tokens, whose k and v are the qkv bias. Queries: the real tokens only
 * (padded queries are cropped by the reference), one flash_rows call per image row of the window. */

size_t vlm_window_attention_scratch_floats(int win, int D) {
    int n = win * win;
    return vlm_align_up((size_t)D * flash_kt_stride(n) + (size_t)n * D + flash_workspace_floats(win, D) + 64, 16);
}

typedef struct {
    float *att; const float *qkv, *bias;
    int rows, W, C, heads, win; float scale; float *scratch; size_t per;
} win_ctx;

static void win_task(void *p, int ith, int nth) {
    const win_ctx *c = p;
    const int C = c->C, D = C / c->heads, win = c->win, n = win * win, ld = 3 * C, ldkt = flash_kt_stride(n);
    const int nwc = (c->W + win - 1) / win;
    float *kt = c->scratch + (size_t)ith * c->per, *V = kt + (size_t)D * ldkt, *ws = V + (size_t)n * D;
    int lim[VLM_MAX_HEAD];
    for (int r = 0; r < win; r++) lim[r] = n;
    for (long it = ith; it < (long)nwc * c->heads; it += nth) {
        int wc = (int)(it / c->heads), h = (int)(it % c->heads), x0 = wc * win;
        const float *kb = c->bias + C + h * D, *vb = c->bias + 2 * C + h * D;
        for (int j = 0; j < n; j++) {
            int ly = j / win, lx = j % win;
            const float *k = kb, *v = vb;
            if (ly < c->rows && x0 + lx < c->W) {
                const float *row = c->qkv + ((size_t)ly * c->W + x0 + lx) * ld;
                k = row + C + h * D;
                v = row + 2 * C + h * D;
            }
            for (int d = 0; d < D; d++) kt[(size_t)d * ldkt + j] = k[d];
            memcpy(V + (size_t)j * D, v, (size_t)D * sizeof(float));
        }
        for (int d = 0; d < D; d++)
            for (int j = n; j < ldkt; j++) kt[(size_t)d * ldkt + j] = 0.f;
        int R = c->W - x0 < win ? c->W - x0 : win;
        for (int ly = 0; ly < c->rows; ly++) {
            size_t t0 = (size_t)ly * c->W + x0;
            flash_rows(c->att + t0 * C + (size_t)h * D, C, c->qkv + t0 * ld + (size_t)h * D, ld, R, kt, ldkt, V, D, lim,
                       D, c->scale, ws);
        }
    }
}

void vlm_window_attention(vlm_pool *pool, float *att, const float *qkv, const float *bias, int rows, int W, int C,
                          int heads, int win, float scale, float *scratch) {
    win_ctx c = {att, qkv, bias, rows, W, C, heads, win, scale, scratch,
                 vlm_window_attention_scratch_floats(win, C / heads)};
    /* every real query against the win x win keys of its window (padded keys included, as computed) */
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 4 * (uint64_t)C * (uint64_t)rows * (uint64_t)W * (uint64_t)win * (uint64_t)win);
    vlm_pool_run(pool, win_task, &c);
}

/* ---------------------------------------------------------------- DaViT channel attention
 * scores: work item = group (each thread accumulates its groups over all tokens, in blocks of 256 tokens
 * summed into a private d x d block first); apply: rows split over threads. */

size_t vlm_channel_attention_scratch_floats(int d) { return vlm_align_up((size_t)d * d + 64, 16); }

typedef struct {
    float *A; const float *qk; long nr; int C, d, G; float scale; float *scratch; size_t per;
} chA_ctx;

VLM_CLONES static void chA_group(float *A, float *Ap, const float *qk, long nr, int C, int d, int g, float scale) {
    for (long n0 = 0; n0 < nr; n0 += 256) {
        long n1 = n0 + 256 < nr ? n0 + 256 : nr;
        memset(Ap, 0, (size_t)d * d * sizeof(float));
        for (long n = n0; n < n1; n++) {
            const float *q = qk + (size_t)n * 2 * C + (size_t)g * d, *k = q + C;
            for (int i = 0; i < d; i++) {
                float a = q[i] * scale;
                float *row = Ap + (size_t)i * d;
                for (int j = 0; j < d; j++) row[j] += a * k[j];
            }
        }
        for (int i = 0; i < d * d; i++) A[i] += Ap[i];
    }
}

static void chA_task(void *p, int ith, int nth) {
    const chA_ctx *c = p;
    float *Ap = c->scratch + (size_t)ith * c->per;
    for (int g = ith; g < c->G; g += nth)
        chA_group(c->A + (size_t)g * c->d * c->d, Ap, c->qk, c->nr, c->C, c->d, g, c->scale);
}

void vlm_channel_attention_scores(vlm_pool *pool, float *A, const float *qk, float scale, float *scratch, long nr, int C,
                                  int G) {
    chA_ctx c = {A, qk, nr, C, C / G, G, scale, scratch, vlm_channel_attention_scratch_floats(C / G)};
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 2 * (uint64_t)nr * (uint64_t)C * (uint64_t)(C / G));   /* G blocks q^T k */
    vlm_pool_run(pool, chA_task, &c);
}

typedef struct { float *At; const float *A; int G, d; } chS_ctx;

static void chS_task(void *p, int ith, int nth) {
    const chS_ctx *c = p;
    const int d = c->d;
    long lo, hi;
    vlm_split((long)c->G * d, 1, ith, nth, &lo, &hi);
    for (long row = lo; row < hi; row++) {
        int g = (int)(row / d), i = (int)(row % d);
        const float *a = c->A + (size_t)row * d;
        float mx = a[0], sum = 0.f;
        for (int j = 1; j < d; j++) mx = a[j] > mx ? a[j] : mx;
        float e[VLM_MAX_HEAD];
        for (int j = 0; j < d; j++) { e[j] = expf(a[j] - mx); sum += e[j]; }
        float inv = 1.0f / sum;
        for (int j = 0; j < d; j++) c->At[((size_t)g * d + j) * d + i] = e[j] * inv;
    }
}

void vlm_channel_attention_softmax(vlm_pool *pool, float *At, const float *A, int G, int d) {
    chS_ctx c = {At, A, G, d};
    vlm_pool_run(pool, chS_task, &c);
}

typedef struct { float *att; const float *v, *At; long nr; int C, d, G; } chV_ctx;

VLM_CLONES static void chV_rows(float *att, const float *v, const float *At, long n0, long n1, int C, int d, int G) {
    for (long n = n0; n < n1; n++)
        for (int g = 0; g < G; g++) {
            const float *vr = v + (size_t)n * C + (size_t)g * d, *Ag = At + (size_t)g * d * d;
            float *o = att + (size_t)n * C + (size_t)g * d;
            for (int i = 0; i < d; i++) o[i] = 0.f;
            for (int j = 0; j < d; j++) {
                float a = vr[j];
                const float *r = Ag + (size_t)j * d;
                for (int i = 0; i < d; i++) o[i] += a * r[i];
            }
        }
}

static void chV_task(void *p, int ith, int nth) {
    const chV_ctx *c = p;
    long lo, hi;
    vlm_split(c->nr, 1, ith, nth, &lo, &hi);
    chV_rows(c->att, c->v, c->At, lo, hi, c->C, c->d, c->G);
}

void vlm_channel_attention_apply(vlm_pool *pool, float *att, const float *v, const float *At, long nr, int C, int G) {
    chV_ctx c = {att, v, At, nr, C, C / G, G};
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 2 * (uint64_t)nr * (uint64_t)C * (uint64_t)(C / G));
    vlm_pool_run(pool, chV_task, &c);
}

/* ---------------------------------------------------------------- Swin window attention
 * Work item = (window, head), window-major, interleaved over threads: the keys are transposed once, then the
 * blocked kernel runs the window's queries in blocks of FA_QB rows with the dense relative-position bias and the
 * shifted-window mask added to every score block (-100 where the region labels differ, as the reference adds it:
 * after the bias, not -inf). */

size_t vlm_swin_attention_scratch_floats(int N, int D) {
    return vlm_align_up((size_t)D * flash_kt_stride(N) + flash_workspace_floats(FA_QB, D) + 64, 16);
}

typedef struct {
    float *att; const float *qkv, *bias; const int32_t *labels;
    int nwin, N, C, heads; float scale, mask; float *scratch; size_t per;
} swin_ctx;

static void swin_task(void *p, int ith, int nth) {
    const swin_ctx *c = p;
    const int C = c->C, D = C / c->heads, N = c->N, ld = 3 * C, ldkt = flash_kt_stride(N);
    float *kt = c->scratch + (size_t)ith * c->per, *ws = kt + (size_t)D * ldkt;
    int lim[FA_QB];
    for (int r = 0; r < FA_QB; r++) lim[r] = N;
    for (long it = ith; it < (long)c->nwin * c->heads; it += nth) {
        const int w = (int)(it / c->heads), h = (int)(it % c->heads);
        const float *qkv = c->qkv + (size_t)w * N * ld;
        const int32_t *lab = c->labels ? c->labels + (size_t)w * N : NULL;
        flash_transpose(kt, ldkt, qkv + C + (size_t)h * D, ld, N, D);
        for (int i0 = 0; i0 < N; i0 += FA_QB) {
            const int R = N - i0 < FA_QB ? N - i0 : FA_QB;
            flash_extra x = {c->bias + ((size_t)h * N + i0) * N, N, lab ? lab + i0 : NULL, lab, c->mask};
            flash_rows_x(c->att + ((size_t)w * N + i0) * C + (size_t)h * D, C, qkv + (size_t)i0 * ld + (size_t)h * D,
                         ld, R, kt, ldkt, qkv + 2 * C + (size_t)h * D, ld, lim, D, c->scale, ws, &x);
        }
    }
}

void vlm_swin_attention(vlm_pool *pool, float *att, const float *qkv, const float *bias, const int32_t *labels,
                        float mask, int nwin, int N, int C, int heads, float scale, float *scratch) {
    swin_ctx c = {att, qkv, bias, labels, nwin, N, C, heads, scale, mask, scratch,
                  vlm_swin_attention_scratch_floats(N, C / heads)};
    vlm_pool_count(pool, VLM_FLOPS_ATTN, 4 * (uint64_t)C * (uint64_t)nwin * (uint64_t)N * (uint64_t)N);
    vlm_pool_run(pool, swin_task, &c);
}

void vlm_swin_rel_bias(float *bias, const float *table, int ws, int heads) {
    const int N = ws * ws, L = 2 * ws - 1;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) {
                int idx = (i / ws - j / ws + ws - 1) * L + (i % ws - j % ws + ws - 1);
                bias[((size_t)h * N + i) * N + j] = table[(size_t)idx * heads + h];
            }
}

/* ---------------------------------------------------------------- shifted-window partition of one band */

typedef struct {
    float *x; const float *src; const float *w, *b; float eps; int H, W, C, ws, shift, wy, scatter;
} wg_ctx;

static void wg_task(void *p, int ith, int nth) {
    const wg_ctx *c = p;
    const int ws = c->ws, Hp = (c->H + ws - 1) / ws * ws, Wp = (c->W + ws - 1) / ws * ws, C = c->C;
    const long n = (long)ws * Wp;   /* tokens of the band, window-major */
    long lo, hi;
    vlm_split(n, 1, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        int w = (int)(r / (ws * ws)), t = (int)(r % (ws * ws)), a = t / ws, bb = t % ws;
        int i = (c->wy * ws + a + c->shift) % Hp, j = (w * ws + bb + c->shift) % Wp;
        int real = i < c->H && j < c->W;
        if (c->scatter) {
            if (!real) continue;
            float *xo = c->x + ((size_t)i * c->W + j) * C;
            const float *y = c->src + (size_t)r * C;
            for (int k = 0; k < C; k++) xo[k] += y[k];
        } else {
            float *o = c->x + (size_t)r * C;
            if (!real) memset(o, 0, (size_t)C * sizeof(float));
            else if (c->w) vlm_layernorm_row(o, c->src + ((size_t)i * c->W + j) * C, c->w, c->b, c->eps, C);
            else memcpy(o, c->src + ((size_t)i * c->W + j) * C, (size_t)C * sizeof(float));
        }
    }
}

void vlm_window_gather(vlm_pool *pool, float *out, const float *x, const float *w, const float *b, float eps, int H,
                       int W, int C, int ws, int shift, int wy) {
    wg_ctx c = {out, x, w, b, eps, H, W, C, ws, shift, wy, 0};
    vlm_pool_run(pool, wg_task, &c);
}

void vlm_window_scatter_add(vlm_pool *pool, float *x, const float *y, int H, int W, int C, int ws, int shift, int wy) {
    wg_ctx c = {x, y, NULL, NULL, 0.f, H, W, C, ws, shift, wy, 1};
    vlm_pool_run(pool, wg_task, &c);
}
