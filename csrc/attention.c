/* attention.c — blocked ("flash") attention kernel shared by the decoder and the vision tower.
 *
 * vlm_flash_rows computes softmax(q kᵀ · scale) v for R query rows against n keys, one block of
 * FA_KB keys at a time with an online softmax (running max and sum per row), so no score row longer
 * than FA_KB is ever stored and every key/value block is reused by all R rows while it sits in L1/L2.
 * Row r sees keys j < lim[r] (lim non-decreasing in r: causal masks; all equal: no mask).
 * Two implementations of the inner tiles: AVX-512 intrinsics (D a multiple of 16), and plain C for
 * every other CPU or head size. Softmax is fp32 with max subtraction, as in torch. */
#include "attention.h"
#include "simd.h"

#include <math.h>
#include <string.h>


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

size_t vlm_flash_workspace_floats(int R, int D) {
    /* s [R][KB] + qs [R][D] + o [R][D] + m [R] + l [R] */
    return vlm_align_up((size_t)R * FA_KB + 2 * (size_t)R * D + 2 * (size_t)R + 64, 16);
}

int vlm_flash_kt_stride(int n) { return (n + FA_KB - 1) / FA_KB * FA_KB; }

void vlm_flash_transpose(float *kt, int ldkt, const float *K, int ldk, int n, int D) {
    for (int j0 = 0; j0 < n; j0 += 16) {  /* 16 keys at a time: row-contiguous reads, 16-wide writes */
        int nb = n - j0 < 16 ? n - j0 : 16;
        for (int d = 0; d < D; d++) {
            float *dst = kt + (size_t)d * ldkt + j0;
            for (int j = 0; j < nb; j++) dst[j] = K[(size_t)(j0 + j) * ldk + d];
        }
    }
    for (int d = 0; d < D; d++)
        for (int j = n; j < vlm_flash_kt_stride(n) && j < ldkt; j++) kt[(size_t)d * ldkt + j] = 0.f;
}

static void scale_rows(float *o, int R, int D, const float *corr) {
    for (int r = 0; r < R; r++)
        if (corr[r] != 1.0f)
            for (int d = 0; d < D; d++) o[(size_t)r * D + d] *= corr[r];
}

void vlm_flash_rows(float *out, int ldo, const float *q, int ldq, int R, const float *kt, int ldkt, const float *V,
                    int ldv, const int *lim, int D, float scale, float *ws) {
    s_tile_fn s_tile = s_tile_generic;
    pv_tile_fn pv_tile = pv_tile_generic;
    void (*soft_row)(float *, int, int, float *, float *) = soft_row_generic;
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
        int r0 = 0;  /* rows that see none of this block (causal) are skipped */
        while (r0 < R && lim[r0] <= j0) r0++;
        if (r0 == R) continue;
        s_tile(s + (size_t)r0 * FA_KB, qs + (size_t)r0 * D, R - r0, kt + j0, ldkt, kb, D);
        for (int r = r0; r < R; r++) {
            float *sr = s + (size_t)r * FA_KB;
            int valid = lim[r] - j0 < kb ? lim[r] - j0 : kb;
            float m_old = m[r], sum;
            soft_row(sr, valid, kb, &m[r], &sum);
            /* m_old = -inf on the first block: corr = 0 (o and l are still 0) */
            corr[r] = m_old == -INFINITY ? 0.f : vlm_expf(m_old - m[r]);
            l[r] = l[r] * corr[r] + sum;
        }
        scale_rows(o + (size_t)r0 * D, R - r0, D, corr + r0);
        pv_tile(o + (size_t)r0 * D, s + (size_t)r0 * FA_KB, R - r0, V + (size_t)j0 * ldv, ldv, kb, D);
    }
    for (int r = 0; r < R; r++) {
        float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
        for (int d = 0; d < D; d++) out[(size_t)r * ldo + d] = o[(size_t)r * D + d] * inv;
    }
}
