/* gemm_i8.c — integer weights for vlm_matmul: int8 (W8A8) and 4-bit blocks (W4A8), and their load-time
 * quantizers vlm_quantize_i8 / vlm_quantize_i4 (see gemm.h).
 *
 * Weights are symmetric int8 with one scale per output channel; activations are quantized per row (per
 * token) on the fly into scratch; the dot products are exact integer sums:
 *   weights, row j:      s_w[j] = amax_j / 127, q[j][t] = clamp(rne(W[j][t] / s_w[j]), -127, 127),
 *                        wsum[j] = sum_t q[j][t]  (kept as an exact float; an all-zero row: s_w = 0, q = 0)
 *   activations, row i:  s_x[i] = amax_i / 127, u[i][t] = clamp(rne(x[i][t] / s_x[i]), -127, 127) + 128 (u8)
 *   out[i][j] = (float)(sum_t u[i][t] q[j][t] - 128 wsum[j]) * (s_x[i] * s_w[j])  (+ bias[j])  (+ out[i][j])
 * The u8 offset is what vpdpbusd (u8 x s8) needs; 128 wsum[j] takes it back out. A row of x holding NaN or
 * inf gives a row of NaN, as the float paths would.
 *
 * Kernels: AVX512-VNNI vpdpbusd (64 multiply-adds per instruction), AVX2 (also AVX-512 CPUs without VNNI:
 * bytes widened to 16 bits, vpmaddwd), generic C. Every level computes the same exact integer sums and the
 * same float32 epilogue, so the result is bitwise identical on every level, CPU and thread count (the
 * tests check it against NumPy bit for bit). k is never split (int32 sums stay exact for k <= VLM_I8_MAX_K);
 * threads split n; tiles of 4 rows of x by 6 rows of W (3 on AVX2), W panels sized for L2 when m > 4. With int8
 * or 4-bit weights, more than QP_MIN_M rows, k <= QP_MAX_K and VNNI, the packed path below runs instead (prefill,
 * vision towers), and with int8 weights packed at load (vlm_pack_i8) it runs for every m: the same integer sums in
 * another order, so the same bits.
 *
 * 4-bit blocks (VLM_I4, layout in gemm.h): a block's integer weights are (code - 8) * m_b, in [-120, 105], so they
 * are int8 values and every sum above stays exact (255 * 120 * k < 2^31 for k <= VLM_I8_MAX_K): an int4 weight
 * gives bit for bit what the int8 weight of its integer values gives. Two ways to the same sums:
 *   m <= 4 on VNNI (decode: memory bound, 4.125 bits per weight streamed): 64 bytes of codes (4 blocks) per
 *     load; low and high nibbles become int8 weights in registers through vpshufb with one 16-entry table per
 *     block (the table of m_b: (c - 8) * m_b), then vpdpbusd. x is quantized in the matching order: per group
 *     of 4 blocks, the first 16 values of each block, then the last 16 of each.
 *   otherwise: each thread unpacks a panel of W rows to int8 in its own scratch and runs the int8 kernels on it
 *     (prefill: the unpacking is paid once per panel for all rows of x). */
#include "gemm.h"

#include <math.h>
#include <string.h>

#include "cpu.h"
#include "gemm_pack.h"
#if VLM_X86
#include <immintrin.h>
#endif

#define PANEL_BYTES (256 * 1024)
#define PAR_QUANT_MIN (1L << 15) /* quantize x on the pool from this many elements */

/* ------------------------------------------------------------------------------------------------ */
/* Row quantizer: amax, scale, rounded values                                                       */

/* |v| as an ordered integer: NaN > inf > every finite value, so one integer max finds both. */
static inline uint32_t abs_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b & 0x7fffffffu;
}

/* The scale of a row whose largest |value| has bits `ab`: NaN for a non-finite row, 0 for a zero row. */
static inline float row_scale(uint32_t ab) {
    if (ab >= 0x7f800000u) return NAN;
    float amax;
    memcpy(&amax, &ab, 4);
    return amax / 127.0f;
}

static inline int32_t quant1(float v, float s) {
    long r = lrintf(v / s); /* round half to even (the default rounding mode) */
    return (int32_t)(r > 127 ? 127 : r < -127 ? -127 : r);
}

/* One row of k values (fp32, or bf16 bits) -> int8 (offset 0) or u8 (offset 128); returns the scale. With
 * sum != NULL also the sum of the int8 values. */
static float quant_row_generic(const void *src, int bf16, long k, uint8_t *dst, int offset, int32_t *sum) {
    const float *f = (const float *)src;
    const uint16_t *h = (const uint16_t *)src;
    uint32_t ab = 0;
    for (long t = 0; t < k; t++) {
        uint32_t a = abs_bits(bf16 ? vlm_bf16_to_f32(h[t]) : f[t]);
        ab = a > ab ? a : ab;
    }
    float s = row_scale(ab);
    int32_t acc = 0;
    if (ab == 0 || ab >= 0x7f800000u) {
        memset(dst, offset, (size_t)k);
    } else {
        for (long t = 0; t < k; t++) {
            int32_t q = quant1(bf16 ? vlm_bf16_to_f32(h[t]) : f[t], s);
            acc += q;
            dst[t] = (uint8_t)(q + offset);
        }
    }
    if (sum) *sum = acc;
    return s;
}

#if VLM_X86
static inline VLM_INLINE VLM_TGT_AVX512 __m512 load16(const void *src, int bf16, long t, __mmask16 mk) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + t)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)src + t);
}

static VLM_TGT_AVX512 float quant_row_512(const void *src, int bf16, long k, uint8_t *dst, int offset, int32_t *sum) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512i mx = _mm512_setzero_si512();
    for (long t = 0; t < k; t += 16) {
        __mmask16 mk = k - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - t)) - 1);
        mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_castps_si512(load16(src, bf16, t, mk)), absmask));
    }
    uint32_t ab = (uint32_t)_mm512_reduce_max_epu32(mx);
    float s = row_scale(ab);
    if (ab == 0 || ab >= 0x7f800000u) {
        memset(dst, offset, (size_t)k);
        if (sum) *sum = 0;
        return s;
    }
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(offset);
    __m512i acc = _mm512_setzero_si512();
    for (long t = 0; t < k; t += 16) {
        __mmask16 mk = k - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - t)) - 1);
        __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(load16(src, bf16, t, mk), sv)); /* RNE (MXCSR default) */
        q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        acc = _mm512_add_epi32(acc, q); /* masked-off lanes are 0 / s = 0 */
        _mm512_mask_cvtepi32_storeu_epi8(dst + t, mk, _mm512_add_epi32(q, off));
    }
    if (sum) *sum = _mm512_reduce_add_epi32(acc);
    return s;
}
#endif

static float quant_row(int level, const void *src, int bf16, long k, uint8_t *dst, int offset, int32_t *sum) {
#if VLM_X86
    if (level >= VLM_ISA_AVX512) return quant_row_512(src, bf16, k, dst, offset, sum);
#endif
    (void)level;
    return quant_row_generic(src, bf16, k, dst, offset, sum);
}

/* *bad = the smallest r + 1 any worker reports (0: none yet): the first row that held NaN or inf. */
static void note_bad_row(int *bad, long r) {
    int cur = __atomic_load_n(bad, __ATOMIC_RELAXED);
    while ((cur == 0 || r + 1 < cur) &&
           !__atomic_compare_exchange_n(bad, &cur, (int)(r + 1), 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* 4-bit block quantizer                                                                            */

/* I4_TAB[m][c] = (c - 8) * m: the integer weight of code c in a block of scale m (the vpshufb tables). */
#define I4_ROW(m) {-8 * (m), -7 * (m), -6 * (m), -5 * (m), -4 * (m), -3 * (m), -2 * (m), -(m), 0, (m), 2 * (m), \
                   3 * (m), 4 * (m), 5 * (m), 6 * (m), 7 * (m)}
static const int8_t I4_TAB[16][16] __attribute__((aligned(64))) = {
    I4_ROW(0), I4_ROW(1), I4_ROW(2),  I4_ROW(3),  I4_ROW(4),  I4_ROW(5),  I4_ROW(6),  I4_ROW(7),
    I4_ROW(8), I4_ROW(9), I4_ROW(10), I4_ROW(11), I4_ROW(12), I4_ROW(13), I4_ROW(14), I4_ROW(15)};
#undef I4_ROW

static inline int i4_sub(const uint8_t *sub, long b) { return (sub[b >> 1] >> (4 * (b & 1))) & 15; }

/* One row: codes and block scales (sub zeroed first), *scale, *wsum; -1 if the row holds NaN or inf. A candidate's
 * squared error is summed in 8 interleaved partial sums added in a fixed tree (no contraction). */
static VLM_NO_CONTRACT int quant_row_i4(const void *src, int bf16, long k, uint8_t *data, uint8_t *sub, float *scale,
                                        float *wsum) {
    const float *f = (const float *)src;
    const uint16_t *h = (const uint16_t *)src;
    uint32_t ab = 0;
    for (long t = 0; t < k; t++) {
        uint32_t a = abs_bits(bf16 ? vlm_bf16_to_f32(h[t]) : f[t]);
        ab = a > ab ? a : ab;
    }
    if (ab >= 0x7f800000u) return -1;
    float amax;
    memcpy(&amax, &ab, 4);
    const float d = amax / 105.0f; /* 7 * 15: the largest block scale reaches the largest |value| */
    memset(sub, 0, (size_t)(k > 0 ? vlm_i4_sub_stride(k) : 0));
    *scale = d;
    *wsum = 0.0f;
    if (d == 0.0f) { /* an all-zero row (or one below 105 times the smallest subnormal): all weights 0 */
        memset(data, 0x88, (size_t)(k > 0 ? k / 2 : 0));
        return 0;
    }
    int64_t ws = 0;
    for (long b = 0; b < k / VLM_I4_BLOCK; b++) {
        float v[VLM_I4_BLOCK], a = 0.0f;
        for (int t = 0; t < VLM_I4_BLOCK; t++) {
            long i = b * VLM_I4_BLOCK + t;
            v[t] = bf16 ? vlm_bf16_to_f32(h[i]) : f[i];
            a = fabsf(v[t]) > a ? fabsf(v[t]) : a;
        }
        int best_m = 0;
        int8_t best_q[VLM_I4_BLOCK] = {0};
        if (a > 0.0f) {
            int m0 = (int)ceilf(a / (7.0f * d));
            m0 = m0 < 1 ? 1 : m0 > 15 ? 15 : m0;
            double best = INFINITY;
            for (int m = m0; m >= 1 && m >= m0 - 2; m--) {
                const float s = d * (float)m;
                float r[VLM_I4_BLOCK];
                int8_t q[VLM_I4_BLOCK];
                for (int t = 0; t < VLM_I4_BLOCK; t++) {
                    float y = v[t] / s;
                    y = y < -8.5f ? -8.5f : y > 7.5f ? 7.5f : y;   /* the clamp below gives the same as on y itself */
                    y = (y + 12582912.0f) - 12582912.0f;            /* round half to even: 1.5 * 2^23 */
                    r[t] = y < -8.0f ? -8.0f : y > 7.0f ? 7.0f : y;
                }
                double e8[8] = {0};
                for (int t0 = 0; t0 < VLM_I4_BLOCK; t0 += 8)
                    for (int l = 0; l < 8; l++) {
                        double diff = (double)v[t0 + l] - (double)r[t0 + l] * (double)s;
                        e8[l] += diff * diff;
                    }
                const double e = ((e8[0] + e8[1]) + (e8[2] + e8[3])) + ((e8[4] + e8[5]) + (e8[6] + e8[7]));
                for (int t = 0; t < VLM_I4_BLOCK; t++) q[t] = (int8_t)r[t];
                if (e < best) {
                    best = e;
                    best_m = m;
                    memcpy(best_q, q, sizeof q);
                }
            }
        }
        for (int t = 0; t < 16; t++)
            data[16 * b + t] = (uint8_t)((best_q[t] + 8) | ((best_q[t + 16] + 8) << 4));
        sub[b >> 1] = (uint8_t)(sub[b >> 1] | best_m << (4 * (b & 1)));
        for (int t = 0; t < VLM_I4_BLOCK; t++) ws += (int64_t)best_m * best_q[t];
    }
    *wsum = (float)ws; /* |ws| <= 120 k < 2^24: exact */
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Both weight quantizers: rows shared out over the pool                                            */

typedef struct {
    int level, bf16, bits;
    const void *src;
    long n, k;
    void *q;        /* bits 8: int8 [n][k]; bits 4: codes [n][k / 2] */
    uint8_t *sub;   /* bits 4: [n][vlm_i4_sub_stride(k)] */
    float *scale, *wsum;
    int bad;        /* atomic: a row held NaN or inf (its first index + 1, the smallest one seen) */
} wq_ctx;

static void wq_task(void *p, int ith, int nth) {
    wq_ctx *c = (wq_ctx *)p;
    long r0, r1;
    vlm_split(c->n, 1, ith, nth, &r0, &r1);
    const size_t esz = c->bf16 ? 2 : 4;
    for (long r = r0; r < r1; r++) {
        const void *src = (const char *)c->src + (size_t)r * (size_t)c->k * esz;
        int bad;
        if (c->bits == 8) {
            int32_t sum;
            float s = quant_row(c->level, src, c->bf16, c->k, (uint8_t *)c->q + (size_t)r * (size_t)c->k, 0, &sum);
            c->scale[r] = s;
            c->wsum[r] = (float)sum;
            bad = isnan(s);
        } else {
            bad = quant_row_i4(src, c->bf16, c->k, (uint8_t *)c->q + (size_t)r * (size_t)(c->k / 2),
                               c->sub + (size_t)r * (size_t)vlm_i4_sub_stride(c->k), &c->scale[r], &c->wsum[r]);
        }
        if (bad) note_bad_row(&c->bad, r);
    }
}

static vlm_status quantize_rows(vlm_pool *pool, wq_ctx *c, vlm_dtype dtype, const char *what, vlm_err *err) {
    if (dtype != VLM_F32 && dtype != VLM_BF16)
        return vlm_fail(err, VLM_ERR_ARG, "%s: source dtype must be float32 or bf16", what);
    if (c->n <= 0 || c->k <= 0 || c->k > VLM_I8_MAX_K || c->n > INT32_MAX - 1)
        return vlm_fail(err, VLM_ERR_ARG, "%s: bad sizes n=%lld k=%lld (k <= %d)", what, (long long)c->n,
                        (long long)c->k, VLM_I8_MAX_K);
    if (c->bits == 4 && c->k % VLM_I4_BLOCK)
        return vlm_fail(err, VLM_ERR_ARG, "%s: k (columns) must be a multiple of %d, got %lld", what, VLM_I4_BLOCK,
                        (long long)c->k);
    if (!c->src || !c->q || !c->scale || !c->wsum || (c->bits == 4 && !c->sub))
        return vlm_fail(err, VLM_ERR_ARG, "%s: NULL pointer", what);
    c->level = vlm_cpu_isa();
    c->bf16 = dtype == VLM_BF16;
    c->bad = 0;
    if (pool && c->n * c->k >= (c->bits == 8 ? PAR_QUANT_MIN : PAR_QUANT_MIN / 8)) vlm_pool_run(pool, wq_task, c);
    else wq_task(c, 0, 1);
    if (c->bad) return vlm_fail(err, VLM_ERR_ARG, "%s: row %d holds NaN or inf", what, c->bad - 1);
    return VLM_OK;
}

vlm_status vlm_quantize_i8(vlm_pool *pool, const void *src, vlm_dtype dtype, int64_t n, int64_t k, int8_t *q,
                           float *scale, float *wsum, vlm_err *err) {
    wq_ctx c = {.bits = 8, .src = src, .n = (long)n, .k = (long)k, .q = q, .scale = scale, .wsum = wsum};
    return quantize_rows(pool, &c, dtype, "quantize_i8", err);
}

vlm_status vlm_quantize_i4(vlm_pool *pool, const void *src, vlm_dtype dtype, int64_t n, int64_t k, uint8_t *data,
                           uint8_t *sub, float *scale, float *wsum, vlm_err *err) {
    wq_ctx c = {.bits = 4, .src = src, .n = (long)n, .k = (long)k, .q = data, .sub = sub, .scale = scale, .wsum = wsum};
    return quantize_rows(pool, &c, dtype, "quantize_i4", err);
}

/* ------------------------------------------------------------------------------------------------ */
/* Packed weights (gemm.h): made once at load                                                       */

typedef struct { const int8_t *q; long n, k; int8_t *dst; } pk_ctx;

static void pk_task(void *p, int ith, int nth) {
    const pk_ctx *c = (const pk_ctx *)p;
    const long panels = (c->n + VLM_I8_PANEL - 1) / VLM_I8_PANEL, nq = c->k / 4;
    long p0, p1;
    vlm_split(panels, 1, ith, nth, &p0, &p1);
    for (long pn = p0; pn < p1; pn++) {
        uint32_t *d = (uint32_t *)(c->dst + (size_t)pn * VLM_I8_PANEL * (size_t)c->k);
        for (int l = 0; l < VLM_I8_PANEL; l++) {
            const long j = pn * VLM_I8_PANEL + l;
            if (j >= c->n) {
                for (long t = 0; t < nq; t++) d[t * VLM_I8_PANEL + l] = 0;
                continue;
            }
            const int8_t *row = c->q + (size_t)j * (size_t)c->k;
            for (long t = 0; t < nq; t++) memcpy(&d[t * VLM_I8_PANEL + l], row + 4 * t, 4);
        }
    }
}

vlm_status vlm_pack_i8(vlm_pool *pool, const int8_t *q, int64_t n, int64_t k, int8_t *dst, vlm_err *err) {
    if (n <= 0 || k <= 0 || k % 4 || k > VLM_I8_MAX_K)
        return vlm_fail(err, VLM_ERR_ARG, "pack_i8: bad sizes n=%lld k=%lld (k a multiple of 4, <= %d)", (long long)n,
                        (long long)k, VLM_I8_MAX_K);
    if (!q || !dst) return vlm_fail(err, VLM_ERR_ARG, "pack_i8: NULL pointer");
    pk_ctx c = {q, (long)n, (long)k, dst};
    if (pool) vlm_pool_run(pool, pk_task, &c);
    else pk_task(&c, 0, 1);
    return VLM_OK;
}

/* Rows [j0, j0 + nc) of a packed weight (the panel starting at row j0, a multiple of 32) -> int8 rows [nc][k]. */
static void unpack_panel_i8(const int8_t *wp, long k, long j0, int nc, int8_t *dst) {
    const uint32_t *pn = (const uint32_t *)(wp + (size_t)(j0 / VLM_I8_PANEL) * VLM_I8_PANEL * (size_t)k);
    for (int l = 0; l < nc; l++)
        for (long t = 0; t < k / 4; t++) memcpy(dst + (size_t)l * (size_t)k + 4 * t, &pn[t * VLM_I8_PANEL + l], 4);
}

/* ------------------------------------------------------------------------------------------------ */
/* Matmul context and the epilogue                                                                  */

typedef struct {
    int kern; /* 2: VNNI, 1: AVX2, 0: generic */
    int level;
    const float *x;
    long ldx;
    const uint8_t *xq; /* [m][ldq] u8, zero padded */
    long ldq;
    float *sx; /* [m] */
    const int8_t *w;
    const float *scale, *wsum, *bias;
    long m, n, k, nb;
    float *out;
    long ldo;
    int accumulate;
    /* VLM_I4 */
    int i4, direct;         /* 4-bit weight; direct: the in-register VNNI kernel (x in its group order) */
    const uint8_t *w4, *sub4;
    long ldw4, ldsub;
    char *unp;              /* per-thread int8 panels (the unpacking paths), unp_stride bytes each */
    size_t unp_stride;
    int packed;             /* w is a packed weight (gemm.h): the qp path reads its panels, others unpack them */
} q8_ctx;

static VLM_NO_CONTRACT void store_q8(const q8_ctx *c, long i0, int mr, long j0, int nr, int32_t s[4][8]) {
    for (int i = 0; i < mr; i++) {
        const float sx = c->sx[i0 + i];
        float *o = c->out + (i0 + i) * c->ldo + j0;
        for (int j = 0; j < nr; j++) {
            int32_t a = s[i][j] - 128 * (int32_t)c->wsum[j0 + j];
            float v = (float)a * (sx * c->scale[j0 + j]);
            if (c->bias) v += c->bias[j0 + j];
            if (c->accumulate) v = o[j] + v;
            o[j] = v;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Kernels: s[i][j] = sum_t x[i][t] w[j][t] over the whole k                                        */

static void tile_generic(int mr, int nr, const uint8_t *x, long ldx, const int8_t *w, long ldw, long k,
                         int32_t s[4][8]) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const uint8_t *a = x + i * ldx;
            const int8_t *b = w + j * ldw;
            int32_t acc = 0;
            for (long t = 0; t < k; t++) acc += (int32_t)a[t] * (int32_t)b[t];
            s[i][j] = acc;
        }
}

#if VLM_X86
static inline VLM_INLINE VLM_TGT_AVX2 int32_t hsum_epi32_256(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
    return _mm_cvtsi128_si32(a);
}

/* MR x NR (NR <= 3) with 16 k per step: bytes widened to 16 bits, vpmaddwd pairs into 32 bits (exact:
 * 2 * 255 * 127 fits). x is zero padded to a multiple of 64, so its loads never need a mask. */
static inline VLM_INLINE VLM_TGT_AVX2 void tile_avx2(const int MR, const int NR, const uint8_t *x, long ldx,
                                                     const int8_t *w, long ldw, long k, int32_t s[4][8],
                                                     const int8_t *pf) {
    (void)pf;
    __m256i acc[4][3];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();
    long t = 0;
    for (; t + 16 <= k; t += 16) {
        __m256i wv[3];
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * ldw + t)));
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
            __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x + i * ldx + t)));
#pragma GCC unroll 3
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
        }
    }
    if (t < k) {
        __m256i wv[3];
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) {
            int8_t b[16] = {0};
            memcpy(b, w + j * ldw + t, (size_t)(k - t));
            wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b));
        }
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
            __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x + i * ldx + t)));
#pragma GCC unroll 3
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) s[i][j] = hsum_epi32_256(acc[i][j]);
}

/* [sum(a), sum(b), sum(c), sum(d)] of four vectors of 16 int32 lanes (exact: any order gives the same sums). */
static inline VLM_INLINE VLM_TGT_AVX512VNNI __m128i hsum4_512i(__m512i a, __m512i b, __m512i c, __m512i d) {
#define H256(v) _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))
    __m256i a8 = H256(a), b8 = H256(b), c8 = H256(c), d8 = H256(d);
#undef H256
    __m256i ab = _mm256_hadd_epi32(a8, b8), cd = _mm256_hadd_epi32(c8, d8); /* per 128-bit lane: a a b b | ... */
    __m256i abcd = _mm256_hadd_epi32(ab, cd);                              /* a b c d | a b c d */
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* acc += dot4(u8 a, s8 b) per 32-bit lane. Inline asm: GCC 12 copies and spills the accumulators around the
 * _mm512_dpbusd_epi32 builtin in this loop (measured: 29 stack moves per 24 vpdpbusd, 0.35 instr/cycle). */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* MR x NR (NR <= 6) with 64 k per step: vpdpbusd (u8 x s8, four products into each 32-bit lane). One loop, the W
 * loads masked (all ones but at the end of k: they never read past a row); x is zero padded to a multiple of 64. */
static inline VLM_INLINE VLM_TGT_AVX512VNNI void tile_vnni(const int MR, const int NR, const uint8_t *x, long ldx,
                                                           const int8_t *w, long ldw, long k, int32_t s[4][8],
                                                           const int8_t *pf) {
    __m512i acc[4][6];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    for (long t = 0; t < k; t += 64) {
        const __mmask64 mk = t + 64 <= k ? ~(__mmask64)0 : (__mmask64)((1ULL << (k - t)) - 1);
        __m512i xv[4];
        if (pf) /* decode: rows two tiles ahead into L2, a line each per line streamed here (see panel_i4) */
#pragma GCC unroll 6
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(pf + j * ldw + t), _MM_HINT_T1);
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_si512((const void *)(x + i * ldx + t));
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) {
            const __m512i wv = _mm512_maskz_loadu_epi8(mk, w + j * ldw + t);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) DPBUSD(acc[i][j], xv[i], wv);
        }
    }
    const __m512i z = _mm512_setzero_si512();
    if (MR == 1) { /* one row of x (decode): four columns per horizontal sum */
#pragma GCC unroll 2
        for (int j = 0; j < NR; j += 4) {
            int32_t r4[4];
            _mm_storeu_si128((__m128i *)r4, hsum4_512i(acc[0][j], j + 1 < NR ? acc[0][(j + 1) % NR] : z,
                                                       j + 2 < NR ? acc[0][(j + 2) % NR] : z,
                                                       j + 3 < NR ? acc[0][(j + 3) % NR] : z));
            for (int c = 0; c < 4 && j + c < NR; c++) s[0][j + c] = r4[c];
        }
        return;
    }
#pragma GCC unroll 6
    for (int j = 0; j < NR; j++) {
        int32_t r4[4];
        _mm_storeu_si128((__m128i *)r4, hsum4_512i(acc[0][j], MR > 1 ? acc[1 % MR][j] : z, MR > 2 ? acc[2 % MR][j] : z,
                                                   MR > 3 ? acc[3 % MR][j] : z));
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) s[i][j] = r4[i];
    }
}

/* A panel: mr (<= 4) rows of x against W rows [j0, j0 + jl). */
#define Q8_PANEL(TILE, NRMAIN)                                                                                 \
    const uint8_t *x = c->xq + i0 * c->ldq;                                                                    \
    int32_t s[4][8];                                                                                           \
    long j = 0;                                                                                                \
    for (; j + NRMAIN <= jl; j += NRMAIN) {                                                                    \
        const int8_t *w = c->w + (j0 + j) * c->k;                                                              \
        const int8_t *pf = c->m <= 4 && j + 3 * NRMAIN <= jl ? w + 2 * NRMAIN * c->k : NULL;                   \
        switch (mr) {                                                                                          \
        case 4: TILE(4, NRMAIN, x, c->ldq, w, c->k, c->k, s, pf); break;                                       \
        case 3: TILE(3, NRMAIN, x, c->ldq, w, c->k, c->k, s, pf); break;                                       \
        case 2: TILE(2, NRMAIN, x, c->ldq, w, c->k, c->k, s, pf); break;                                       \
        default: TILE(1, NRMAIN, x, c->ldq, w, c->k, c->k, s, pf); break;                                      \
        }                                                                                                      \
        store_q8(c, i0, mr, j0 + j, NRMAIN, s);                                                                \
    }                                                                                                          \
    for (; j < jl; j++) {                                                                                      \
        switch (mr) {                                                                                          \
        case 4: TILE(4, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s, NULL); break;                     \
        case 3: TILE(3, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s, NULL); break;                     \
        case 2: TILE(2, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s, NULL); break;                     \
        default: TILE(1, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s, NULL); break;                    \
        }                                                                                                      \
        store_q8(c, i0, mr, j0 + j, 1, s);                                                                     \
    }

static VLM_TGT_AVX2 void panel_avx2(const q8_ctx *c, long i0, int mr, long j0, long jl) { Q8_PANEL(tile_avx2, 3) }
static VLM_TGT_AVX512VNNI void panel_vnni(const q8_ctx *c, long i0, int mr, long j0, long jl) {
    Q8_PANEL(tile_vnni, 6)
}

/* The vpshufb table register of up to 4 blocks: 128-bit lane L holds I4_TAB[m of block b + L] (lanes >= g: 0). */
static inline VLM_INLINE VLM_TGT_AVX512VNNI __m512i i4_tables(const uint8_t *sub, long b, int g) {
    __m512i tab = _mm512_castsi128_si512(_mm_load_si128((const __m128i *)I4_TAB[i4_sub(sub, b)]));
    if (g == 4) {
        uint16_t sb;
        memcpy(&sb, sub + (b >> 1), 2); /* b is a multiple of 4: blocks b..b+3 are the nibbles of two bytes */
        tab = _mm512_inserti32x4(tab, _mm_load_si128((const __m128i *)I4_TAB[(sb >> 4) & 15]), 1);
        tab = _mm512_inserti32x4(tab, _mm_load_si128((const __m128i *)I4_TAB[(sb >> 8) & 15]), 2);
        return _mm512_inserti32x4(tab, _mm_load_si128((const __m128i *)I4_TAB[sb >> 12]), 3);
    }
    tab = _mm512_maskz_mov_epi64(0x03, tab);
    if (g > 1) tab = _mm512_inserti32x4(tab, _mm_load_si128((const __m128i *)I4_TAB[i4_sub(sub, b + 1)]), 1);
    if (g > 2) tab = _mm512_inserti32x4(tab, _mm_load_si128((const __m128i *)I4_TAB[i4_sub(sub, b + 2)]), 2);
    return tab;
}

/* MR x NR (NR <= 4) tile of x (u8, group order) against 4-bit W rows, 4 blocks (128 k) per step; a last group of
 * g < 4 blocks with masked loads (x is zero beyond it in the registers, so the table lanes there do not matter). */
static inline VLM_INLINE VLM_TGT_AVX512VNNI void tile_i4(const int MR, const int NR, const uint8_t *x, long ldx,
                                                         const uint8_t *w, long ldw, const uint8_t *sub, long lds,
                                                         long k, int32_t s[4][8], const uint8_t *pf) {
    __m512i acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const long nb = k / VLM_I4_BLOCK;
    for (long b = 0; b < nb; b += 4) {
        const int g = nb - b >= 4 ? 4 : (int)(nb - b);
        const __mmask64 mk = g == 4 ? ~(__mmask64)0 : (__mmask64)((1ULL << (16 * g)) - 1);
        const long xo = b * VLM_I4_BLOCK; /* x: 16 g values (first halves), then 16 g (second halves) */
        if (pf) /* the next tile's rows, a line each per line streamed here (short rows: no page-long streams) */
#pragma GCC unroll 4
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)pf + j * ldw + b * 16, _MM_HINT_T1);
        __m512i xl[4], xh[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
            xl[i] = _mm512_maskz_loadu_epi8(mk, x + i * ldx + xo);
            xh[i] = _mm512_maskz_loadu_epi8(mk, x + i * ldx + xo + 16 * g);
        }
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) {
            const __m512i v = _mm512_maskz_loadu_epi8(mk, w + j * ldw + b * 16);
            const __m512i tab = i4_tables(sub + j * lds, b, g);
            const __m512i wl = _mm512_shuffle_epi8(tab, _mm512_and_si512(v, low4));
            const __m512i wh = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) {
                DPBUSD(acc[i][j], xl[i], wl);
                DPBUSD(acc[i][j], xh[i], wh);
            }
        }
    }
    const __m512i z = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) {
        int32_t r4[4];
        _mm_storeu_si128((__m128i *)r4, hsum4_512i(acc[i][0], NR > 1 ? acc[i][1 % NR] : z, NR > 2 ? acc[i][2 % NR] : z,
                                                   NR > 3 ? acc[i][3 % NR] : z));
        for (int j = 0; j < NR; j++) s[i][j] = r4[j];
    }
}

#define I4_TILE(MR, NR, J, PF) tile_i4(MR, NR, x, c->ldq, c->w4 + (j0 + (J)) * c->ldw4, c->ldw4, \
                                       c->sub4 + (j0 + (J)) * c->ldsub, c->ldsub, c->k, s, PF)
static VLM_TGT_AVX512VNNI void panel_i4(const q8_ctx *c, long i0, int mr, long j0, long jl) {
    const uint8_t *x = c->xq + i0 * c->ldq;
    int32_t s[4][8];
    long j = 0;
    for (; j + 4 <= jl; j += 4) {
        const uint8_t *pf = j + 12 <= jl ? c->w4 + (j0 + j + 8) * c->ldw4 : NULL;
        switch (mr) {
        case 4: I4_TILE(4, 4, j, pf); break;
        case 3: I4_TILE(3, 4, j, pf); break;
        case 2: I4_TILE(2, 4, j, pf); break;
        default: I4_TILE(1, 4, j, pf); break;
        }
        store_q8(c, i0, mr, j0 + j, 4, s);
    }
    for (; j < jl; j++) {
        switch (mr) {
        case 4: I4_TILE(4, 1, j, NULL); break;
        case 3: I4_TILE(3, 1, j, NULL); break;
        case 2: I4_TILE(2, 1, j, NULL); break;
        default: I4_TILE(1, 1, j, NULL); break;
        }
        store_q8(c, i0, mr, j0 + j, 1, s);
    }
}
#undef I4_TILE

/* One 4-bit row -> k int8 weights (16-byte pshufb per half block). */
static VLM_TGT_AVX2 void unpack_row_i4_avx2(const uint8_t *p, const uint8_t *sub, long k, int8_t *d) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (long b = 0; b < k / VLM_I4_BLOCK; b++) {
        const __m128i tab = _mm_load_si128((const __m128i *)I4_TAB[i4_sub(sub, b)]);
        const __m128i v = _mm_loadu_si128((const __m128i *)(p + 16 * b));
        _mm_storeu_si128((__m128i *)(d + 32 * b), _mm_shuffle_epi8(tab, _mm_and_si128(v, low4)));
        _mm_storeu_si128((__m128i *)(d + 32 * b + 16), _mm_shuffle_epi8(tab, _mm_and_si128(_mm_srli_epi16(v, 4), low4)));
    }
}
#endif /* VLM_X86 */

static void unpack_row_i4_generic(const uint8_t *p, const uint8_t *sub, long k, int8_t *d) {
    for (long b = 0; b < k / VLM_I4_BLOCK; b++) {
        const int8_t *tab = I4_TAB[i4_sub(sub, b)];
        for (int t = 0; t < 16; t++) {
            d[32 * b + t] = tab[p[16 * b + t] & 15];
            d[32 * b + 16 + t] = tab[p[16 * b + t] >> 4];
        }
    }
}

static void panel_generic(const q8_ctx *c, long i0, int mr, long j0, long jl) {
    int32_t s[4][8];
    for (long j = 0; j < jl; j++) {
        tile_generic(mr, 1, c->xq + i0 * c->ldq, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s);
        store_q8(c, i0, mr, j0 + j, 1, s);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* int8 / int4 W, m > QP_MIN_M on VNNI: packed panels and a broadcast kernel                        */
/*
 * gemm.c's packed bf16 path with bytes: the quantized x (xq, u8, rows zero padded to ldq) is packed once per call,
 * on the pool, into row panels of QP_MR rows, [nq][mr] uint32 (four u8 of adjacent k; nq = ldq / 4). Each thread
 * then takes its W columns QP_NC at a time, packs them into [nq][QP_NC] uint32 (four s8; the k tail zero), and runs
 * a register tile of mr rows x QP_NC columns over the row panels of one row block (VLM_PACK_XBLOCK_BYTES of packed x,
 * kept in L3): per quad two W vectors and one broadcast per row, 28 vpdpbusd, no horizontal sums. k is not split:
 * a W panel is ldq x QP_NC bytes (352 KB at k = 11008), kept in L2. The sums are exact integers, so the result is
 * bitwise what the other kernels give, on any thread count. 4-bit weights take the same path: a thread unpacks its
 * QP_NC rows to int8 (unpack_row_i4_avx2) and packs those. A weight packed at load already lies in these panels
 * ([k / 4][QP_NC] each): the threads read them in place and pack nothing. */
#define QP_MR VLM_PACK_MR   /* gemm_pack.h: the tile and panel geometry both packed paths share */
#define QP_NC VLM_PACK_NC
_Static_assert(QP_NC == VLM_I8_PANEL, "prepacked int8 panels are the qp path's W panels");
#define QP_MIN_M 16
#define QP_MAX_K 16384

typedef struct {
    const q8_ctx *c;
    uint32_t *ap;       /* packed x: the panel starting at row i0 is ap + i0 * nq, [nq][mr] */
    uint32_t *bp;       /* per-thread W panel buffers, nq * QP_NC (+ alignment) each */
    int8_t *unp;        /* 4-bit W: per-thread int8 rows, QP_NC * ldq (+ alignment) each */
    long nq, mc, panels;
    int packed;         /* workers done packing x (atomic) */
} qp_ctx;

static int use_qp(int kern, int64_t m, int64_t k) { return VLM_X86 && kern == 2 && m > QP_MIN_M && k <= QP_MAX_K; }

static size_t qp_scratch_bytes(int64_t m, long ldq, int n_threads, int i4) {
    return (size_t)m * (size_t)ldq + (size_t)n_threads * ((size_t)ldq * QP_NC + VLM_ALIGN) * (i4 ? 2 : 1) + VLM_ALIGN;
}

#if VLM_X86
static VLM_TGT_AVX512VNNI void qp_pack_x(const uint8_t *xq, long ldq, long i0, int mr, long nq, uint32_t *dst) {
    const __mmask16 keep = (__mmask16)((1u << mr) - 1);
    for (long g = 0; g < nq / 16; g++) {
        __m512i r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < mr ? _mm512_loadu_si512((const void *)(xq + (i0 + i) * ldq + 64 * g)) : _mm512_setzero_si512();
        vlm_transpose16_epi32(r);
        for (int p = 0; p < 16; p++) _mm512_mask_storeu_epi32(dst + (16 * g + p) * mr, keep, r[p]);
    }
}

/* out rows i0..i0+MR, columns j0..j0+nc = A [nq][MR] . B [nq][QP_NC] with store_q8's epilogue, vectorized (the same
 * float operations in the same order: no contraction). */
static inline VLM_INLINE VLM_TGT_AVX512VNNI VLM_NO_CONTRACT void qp_tile(const int MR, const q8_ctx *c,
                                                                          const uint32_t *a, const uint32_t *b,
                                                                          long nq, long i0, long j0, int nc) {
    __m512i acc[QP_MR][2];
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    for (long p = 0; p < nq; p++) {
        /* unaligned loads: a prepacked panel lies where its numpy array (or mapped cache file) put it */
        const __m512i b0 = _mm512_loadu_si512((const void *)(b + p * QP_NC));
        const __m512i b1 = _mm512_loadu_si512((const void *)(b + p * QP_NC + 16));
#pragma GCC unroll 14
        for (int i = 0; i < MR; i++) {
            const __m512i av = _mm512_set1_epi32((int)a[p * MR + i]);
            DPBUSD(acc[i][0], av, b0);
            DPBUSD(acc[i][1], av, b1);
        }
    }
    const __mmask16 mk0 = (__mmask16)(nc >= 16 ? 0xffff : (1u << nc) - 1);
    const __mmask16 mk1 = (__mmask16)(nc >= 32 ? 0xffff : nc > 16 ? (1u << (nc - 16)) - 1 : 0);
    /* 128 wsum[j] (wsum holds exact integers), the scales, the bias */
    const __m512i ws0 = _mm512_slli_epi32(_mm512_cvttps_epi32(_mm512_maskz_loadu_ps(mk0, c->wsum + j0)), 7);
    const __m512i ws1 = _mm512_slli_epi32(_mm512_cvttps_epi32(_mm512_maskz_loadu_ps(mk1, c->wsum + j0 + 16)), 7);
    const __m512 sc0 = _mm512_maskz_loadu_ps(mk0, c->scale + j0), sc1 = _mm512_maskz_loadu_ps(mk1, c->scale + j0 + 16);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (c->bias) {
        bias0 = _mm512_maskz_loadu_ps(mk0, c->bias + j0);
        bias1 = _mm512_maskz_loadu_ps(mk1, c->bias + j0 + 16);
    }
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) {
        const __m512 sx = _mm512_set1_ps(c->sx[i0 + i]);
        float *o = c->out + (i0 + i) * c->ldo + j0;
        __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][0], ws0)), _mm512_mul_ps(sx, sc0));
        __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][1], ws1)), _mm512_mul_ps(sx, sc1));
        if (c->bias) { v0 = _mm512_add_ps(v0, bias0); v1 = _mm512_add_ps(v1, bias1); }
        if (c->accumulate) {
            v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk0, o), v0);
            v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk1, o + 16), v1);
        }
        _mm512_mask_storeu_ps(o, mk0, v0);
        _mm512_mask_storeu_ps(o + 16, mk1, v1);
    }
}

#define QP_CASE(R) case R: qp_tile(R, c, a, b, nq, i0, j0, nc); break;
static VLM_TGT_AVX512VNNI void qp_panel(const q8_ctx *c, int mr, const uint32_t *a, const uint32_t *b, long nq,
                                        long i0, long j0, int nc) {
    switch (mr) {
    QP_CASE(14) QP_CASE(13) QP_CASE(12) QP_CASE(11) QP_CASE(10) QP_CASE(9) QP_CASE(8)
    QP_CASE(7) QP_CASE(6) QP_CASE(5) QP_CASE(4) QP_CASE(3) QP_CASE(2) default: qp_tile(1, c, a, b, nq, i0, j0, nc);
    }
}
#undef QP_CASE

static void qp_task(void *p, int ith, int nth) {
    qp_ctx *q = (qp_ctx *)p;
    const q8_ctx *c = q->c;
    long r0, r1;
    vlm_split((c->m + QP_MR - 1) / QP_MR, 1, ith, nth, &r0, &r1);
    for (long r = r0; r < r1; r++) {
        const long i0 = r * QP_MR;
        qp_pack_x(c->xq, c->ldq, i0, c->m - i0 < QP_MR ? (int)(c->m - i0) : QP_MR, q->nq, q->ap + i0 * q->nq);
    }
    vlm_task_join(&q->packed, nth);   /* every x panel is packed before any thread reads one */
    long q0, q1; /* this thread's column panels */
    vlm_split(q->panels, 1, ith, nth, &q0, &q1);
    const size_t per = (size_t)q->nq * 4 * QP_NC + VLM_ALIGN;
    uint32_t *bbuf = (uint32_t *)vlm_align_up((size_t)(uintptr_t)((char *)q->bp + (size_t)ith * per), VLM_ALIGN);
    int8_t *ubuf = c->i4 ? (int8_t *)vlm_align_up((size_t)(uintptr_t)(q->unp + (size_t)ith * per), VLM_ALIGN) : NULL;
    for (long m0 = 0; m0 < c->m; m0 += q->mc) {
        const long m1 = c->m - m0 < q->mc ? c->m : m0 + q->mc;
        for (long qq = q0; qq < q1; qq++) {
            const long j0 = qq * QP_NC;
            const int nc = c->n - j0 < QP_NC ? (int)(c->n - j0) : QP_NC;
            const uint32_t *panel = bbuf;
            long nqw = q->nq;   /* the panel's groups (the packed x rows have q->nq, the tail zero) */
            if (c->packed) {    /* prepacked at load: the panel as it lies in memory */
                panel = (const uint32_t *)((const char *)c->w + (size_t)qq * QP_NC * (size_t)c->k);
                nqw = c->k / 4;
            } else if (c->i4) {   /* this panel's 4-bit rows -> int8 rows, packed from there */
                for (int r = 0; r < nc; r++)
                    unpack_row_i4_avx2(c->w4 + (j0 + r) * c->ldw4, c->sub4 + (j0 + r) * c->ldsub, c->k, ubuf + r * c->k);
                vlm_pack_w((const uint8_t *)ubuf, (size_t)c->k, 0, nc, 0, c->k, q->nq / 16, bbuf);
            } else {
                vlm_pack_w((const uint8_t *)c->w, (size_t)c->k, j0, nc, 0, c->k, q->nq / 16, bbuf);
            }
            for (long i0 = m0; i0 < m1; i0 += QP_MR)
                qp_panel(c, c->m - i0 < QP_MR ? (int)(c->m - i0) : QP_MR, q->ap + i0 * q->nq, panel, nqw, i0, j0, nc);
        }
    }
}

/* The packed path on c (x already quantized into c->xq), scratch: qp_scratch_bytes(m, ldq, pool size) bytes. */
static void qp_run(vlm_pool *pool, const q8_ctx *c, void *scratch) {
    qp_ctx q;
    memset(&q, 0, sizeof q);
    q.c = c;
    q.nq = c->ldq / 4;
    q.panels = (c->n + QP_NC - 1) / QP_NC;
    q.mc = vlm_pack_row_block(c->m, (size_t)c->ldq * QP_MR);
    q.ap = (uint32_t *)vlm_align_up((size_t)(uintptr_t)scratch, VLM_ALIGN);
    q.bp = (uint32_t *)vlm_align_up((size_t)(uintptr_t)(q.ap + (size_t)c->m * (size_t)q.nq), VLM_ALIGN);
    q.unp = (int8_t *)q.bp + (size_t)vlm_pool_size(pool) * ((size_t)q.nq * 4 * QP_NC + VLM_ALIGN);
    vlm_pool_run(pool, qp_task, &q);
}
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Pool tasks and the entry point                                                                   */

static void quant_x_task(void *p, int ith, int nth) {
    const q8_ctx *c = (const q8_ctx *)p;
    long r0, r1;
    vlm_split(c->m, 1, ith, nth, &r0, &r1);
    for (long r = r0; r < r1; r++) {
        uint8_t *d = (uint8_t *)c->xq + r * c->ldq;
        c->sx[r] = quant_row(c->level, c->x + r * c->ldx, 0, c->k, d, 128, NULL);
        memset(d + c->k, 0, (size_t)(c->ldq - c->k)); /* zero padding: u8 0 adds nothing */
        if (c->direct) { /* the order of tile_i4: per group of g <= 4 blocks, first halves, then second halves */
            const long nb = c->k / VLM_I4_BLOCK;
            for (long b = 0; b < nb; b += 4) {
                const int g = nb - b >= 4 ? 4 : (int)(nb - b);
                uint8_t tmp[4 * VLM_I4_BLOCK];
                uint8_t *grp = d + b * VLM_I4_BLOCK;
                memcpy(tmp, grp, (size_t)g * VLM_I4_BLOCK);
                for (int l = 0; l < g; l++) {
                    memcpy(grp + 16 * l, tmp + VLM_I4_BLOCK * l, 16);
                    memcpy(grp + 16 * (g + l), tmp + VLM_I4_BLOCK * l + 16, 16);
                }
            }
        }
    }
}

/* Rows [i0, m) of x against the W panel of rows [j0, j0 + jl) of c, 4 rows of x at a time. */
static void q8_panels(const q8_ctx *c, long j0, long jl) {
    for (long i0 = 0; i0 < c->m; i0 += 4) {
        int mr = c->m - i0 < 4 ? (int)(c->m - i0) : 4;
#if VLM_X86
        if (c->direct) { panel_i4(c, i0, mr, j0, jl); continue; }
        if (c->kern == 2) { panel_vnni(c, i0, mr, j0, jl); continue; }
        if (c->kern == 1) { panel_avx2(c, i0, mr, j0, jl); continue; }
#endif
        panel_generic(c, i0, mr, j0, jl);
    }
}

static void q8_task(void *p, int ith, int nth) {
    const q8_ctx *c = (const q8_ctx *)p;
    long n0, n1;
    vlm_split(c->n, c->packed ? VLM_I8_PANEL : 16, ith, nth, &n0, &n1);
    for (long j0 = n0; j0 < n1; j0 += c->nb) {
        long jl = n1 - j0 < c->nb ? n1 - j0 : c->nb;
        if ((!c->i4 || c->direct) && !c->packed) {
            q8_panels(c, j0, jl);
            continue;
        }
        /* 4-bit W without the direct kernel, or a packed W off the VNNI path: unpack the panel to int8 rows in
         * this thread's scratch, then run the int8 kernels on it as rows [0, jl) of a weight of its own */
        int8_t *buf = (int8_t *)(c->unp + (size_t)ith * c->unp_stride);
        if (c->packed) unpack_panel_i8(c->w, c->k, j0, (int)jl, buf);
        else for (long r = 0; r < jl; r++) {
            const uint8_t *pw = c->w4 + (j0 + r) * c->ldw4, *ps = c->sub4 + (j0 + r) * c->ldsub;
#if VLM_X86
            if (c->level >= VLM_ISA_AVX2) {
                unpack_row_i4_avx2(pw, ps, c->k, buf + r * c->k);
                continue;
            }
#endif
            unpack_row_i4_generic(pw, ps, c->k, buf + r * c->k);
        }
        q8_ctx cc = *c;
        cc.w = buf;
        cc.scale += j0;
        cc.wsum += j0;
        if (cc.bias) cc.bias += j0;
        cc.out += j0;
        q8_panels(&cc, 0, jl);
    }
}

static long q8_ldq(int64_t k) { return (long)vlm_align_up((size_t)k, 64); }
static int q8_kernel(int level);

/* 4-bit weights on the unpacking path: rows per W panel (an int8 panel of about PANEL_BYTES) and the bytes of
 * each thread's panel buffer. */
static long i4_panel_rows(int64_t k) {
    long nb = (long)(PANEL_BYTES / (size_t)k);
    return nb < 12 ? 12 : nb / 6 * 6;
}
static size_t i4_unp_stride(int64_t k) { return vlm_align_up((size_t)i4_panel_rows(k) * (size_t)k, VLM_ALIGN); }

/* A packed weight off the VNNI path: each thread's unpacked panel. */
static size_t packed_unp_stride(int64_t k) { return vlm_align_up((size_t)VLM_I8_PANEL * (size_t)k, VLM_ALIGN); }

size_t vlm_matmul_i8_scratch_size(int64_t m, const vlm_weight *w, int n_threads) {
    if (m <= 0 || !w || w->k <= 0) return 0;
    const int nth = n_threads < 1 ? 1 : n_threads, kern = q8_kernel(vlm_cpu_isa());
    size_t b = vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN) + vlm_align_up((size_t)m * (size_t)q8_ldq(w->k), VLM_ALIGN) + VLM_ALIGN;
    if (w->dtype == VLM_I4) b += (size_t)nth * i4_unp_stride(w->k);
    if (w->packed) {
        if (VLM_X86 && kern == 2) b += qp_scratch_bytes(m, q8_ldq(w->k), nth, 0);
        else b += (size_t)nth * packed_unp_stride(w->k);
    } else if (use_qp(kern, m, w->k)) {
        b += qp_scratch_bytes(m, q8_ldq(w->k), nth, w->dtype == VLM_I4);
    }
    return b;
}

/* The int8 kernel family in use: "vnni", "avx2" or "generic" (follows vlm_cpu_isa() and its cap). */
static int q8_kernel(int level) {
    if (level >= VLM_ISA_AVX512 && vlm_cpu_has_vnni()) return 2;
    if (level >= VLM_ISA_AVX2) return 1;
    return 0;
}

const char *vlm_matmul_i8_kernel_name(void) {
    static const char *const names[] = {"generic", "avx2", "avx512vnni"};
    return names[q8_kernel(vlm_cpu_isa())];
}

/* Called by vlm_matmul for VLM_I8 and VLM_I4 weights, after its common argument checks. */
vlm_status vlm_matmul_i8(vlm_pool *pool, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                         const vlm_weight *w, int accumulate, void *scratch, size_t scratch_size, vlm_err *err) {
    const int i4 = w->dtype == VLM_I4;
    const char *what = i4 ? "int4" : "int8";
    if (!w->scale || !w->wsum) return vlm_fail(err, VLM_ERR_ARG, "matmul: %s weight without scale or wsum", what);
    if (i4 && !w->sub) return vlm_fail(err, VLM_ERR_ARG, "matmul: int4 weight without its block scales (sub)");
    if (i4 && w->k % VLM_I4_BLOCK)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: int4 weight: k (2 x the codes' columns) must be a multiple of %d, "
                        "got %lld", VLM_I4_BLOCK, (long long)w->k);
    if (w->k > VLM_I8_MAX_K)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: %s weight with k=%lld > %d", what, (long long)w->k, VLM_I8_MAX_K);
    size_t need = vlm_matmul_i8_scratch_size(m, w, vlm_pool_size(pool));
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: scratch of %zu bytes too small (need %zu)",
                        scratch ? scratch_size : (size_t)0, need);
    q8_ctx c;
    memset(&c, 0, sizeof c);
    c.level = vlm_cpu_isa();
    c.kern = q8_kernel(c.level);
    c.x = x;
    c.ldx = ldx;
    c.m = m;
    c.n = w->n;
    c.k = w->k;
    c.ldq = q8_ldq(w->k);
    char *base = (char *)vlm_align_up((size_t)(uintptr_t)scratch, VLM_ALIGN);
    c.sx = (float *)base;
    c.xq = (const uint8_t *)(base + vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN));
    c.w = (const int8_t *)w->data;
    if (i4) {
        c.i4 = 1;
        c.direct = c.kern == 2 && m <= 4; /* decode on VNNI: codes to weights in registers */
        c.w4 = (const uint8_t *)w->data;
        c.sub4 = w->sub;
        c.ldw4 = (long)(w->k / 2);
        c.ldsub = (long)vlm_i4_sub_stride(w->k);
        c.unp = base + vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN) +
                vlm_align_up((size_t)m * (size_t)c.ldq, VLM_ALIGN);
        c.unp_stride = i4_unp_stride(w->k);
    }
    if (w->packed) {   /* checked by vlm_matmul: int8, k a multiple of 4 */
        c.packed = 1;
        c.unp = base + vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN) +
                vlm_align_up((size_t)m * (size_t)c.ldq, VLM_ALIGN);
        c.unp_stride = packed_unp_stride(w->k);
    }
    c.scale = w->scale;
    c.wsum = w->wsum;
    c.bias = w->bias;
    c.out = out;
    c.ldo = ldo;
    c.accumulate = accumulate;
    if (c.packed) {
        c.nb = VLM_I8_PANEL;       /* off the VNNI path: one unpacked panel at a time */
    } else if (c.i4 && !c.direct) {
        c.nb = i4_panel_rows(c.k); /* the unpacked panel stays in L2 while every x tile passes */
    } else if (m <= 4) {
        c.nb = c.n; /* one x tile: stream W once */
    } else {
        long nb = (long)(PANEL_BYTES / (size_t)c.k); /* a W panel stays in L2 while every x tile passes */
        c.nb = nb < 12 ? 12 : nb / 6 * 6;
    }
    if (m * c.k >= PAR_QUANT_MIN && vlm_pool_size(pool) > 1) vlm_pool_run(pool, quant_x_task, &c);
    else quant_x_task(&c, 0, 1);
#if VLM_X86
    if (use_qp(c.kern, m, c.k) || (c.packed && c.kern == 2)) {   /* after sx and xq (this path does not use the
                                                                    4-bit panels of q8_task); packed: every m */
        qp_run(pool, &c, base + vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN) +
                             vlm_align_up((size_t)m * (size_t)c.ldq, VLM_ALIGN));
        return VLM_OK;
    }
#endif
    vlm_pool_run(pool, q8_task, &c);
    return VLM_OK;
}
