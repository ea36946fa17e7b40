/* gemm_i8.c — int8 weights for vlm_matmul (W8A8) and the weight quantizer vlm_quantize_i8 (see gemm.h).
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
 * threads split n; tiles of 4 rows of x by 6 rows of W (3 on AVX2), W panels sized for L2 when m > 4. */
#include "gemm.h"

#include <math.h>
#include <string.h>

#include "cpu.h"
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

/* ------------------------------------------------------------------------------------------------ */
/* Weight quantizer                                                                                 */

typedef struct {
    int level, bf16;
    const void *src;
    long n, k;
    int8_t *q;
    float *scale, *wsum;
    int bad; /* atomic: a row held NaN or inf (its first index + 1, the smallest one seen) */
} wq_ctx;

static void wq_task(void *p, int ith, int nth) {
    wq_ctx *c = (wq_ctx *)p;
    long r0, r1;
    vlm_split(c->n, 1, ith, nth, &r0, &r1);
    size_t esz = c->bf16 ? 2 : 4;
    for (long r = r0; r < r1; r++) {
        int32_t sum;
        float s = quant_row(c->level, (const char *)c->src + (size_t)r * (size_t)c->k * esz, c->bf16, c->k,
                            (uint8_t *)(c->q + r * c->k), 0, &sum);
        if (isnan(s)) {
            int cur = __atomic_load_n(&c->bad, __ATOMIC_RELAXED);
            while ((cur == 0 || r + 1 < cur) &&
                   !__atomic_compare_exchange_n(&c->bad, &cur, (int)(r + 1), 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            }
        }
        c->scale[r] = s;
        c->wsum[r] = (float)sum;
    }
}

vlm_status vlm_quantize_i8(vlm_pool *pool, const void *src, vlm_dtype dtype, int64_t n, int64_t k, int8_t *q,
                           float *scale, float *wsum, vlm_err *err) {
    if (dtype != VLM_F32 && dtype != VLM_BF16)
        return vlm_fail(err, VLM_ERR_ARG, "quantize_i8: source dtype must be float32 or bf16");
    if (n <= 0 || k <= 0 || k > VLM_I8_MAX_K || n > INT32_MAX - 1)
        return vlm_fail(err, VLM_ERR_ARG, "quantize_i8: bad sizes n=%lld k=%lld (k <= %d)", (long long)n,
                        (long long)k, VLM_I8_MAX_K);
    if (!src || !q || !scale || !wsum) return vlm_fail(err, VLM_ERR_ARG, "quantize_i8: NULL pointer");
    wq_ctx c = {vlm_cpu_isa(), dtype == VLM_BF16, src, n, k, q, scale, wsum, 0};
    if (pool && n * k >= PAR_QUANT_MIN) vlm_pool_run(pool, wq_task, &c);
    else wq_task(&c, 0, 1);
    if (c.bad) return vlm_fail(err, VLM_ERR_ARG, "quantize_i8: row %d holds NaN or inf", c.bad - 1);
    return VLM_OK;
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
                                                     const int8_t *w, long ldw, long k, int32_t s[4][8]) {
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
                                                           const int8_t *w, long ldw, long k, int32_t s[4][8]) {
    __m512i acc[4][6];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    for (long t = 0; t < k; t += 64) {
        const __mmask64 mk = t + 64 <= k ? ~(__mmask64)0 : (__mmask64)((1ULL << (k - t)) - 1);
        __m512i xv[4];
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
    switch (mr) {                                                                                              \
    case 4: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(4, NRMAIN, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); \
                store_q8(c, i0, 4, j0 + j, NRMAIN, s); } break;                                                \
    case 3: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(3, NRMAIN, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); \
                store_q8(c, i0, 3, j0 + j, NRMAIN, s); } break;                                                \
    case 2: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(2, NRMAIN, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); \
                store_q8(c, i0, 2, j0 + j, NRMAIN, s); } break;                                                \
    default: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(1, NRMAIN, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); \
                store_q8(c, i0, 1, j0 + j, NRMAIN, s); } break;                                                \
    }                                                                                                          \
    for (; j < jl; j++) {                                                                                      \
        switch (mr) {                                                                                          \
        case 4: TILE(4, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); break;                           \
        case 3: TILE(3, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); break;                           \
        case 2: TILE(2, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); break;                           \
        default: TILE(1, 1, x, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s); break;                          \
        }                                                                                                      \
        store_q8(c, i0, mr, j0 + j, 1, s);                                                                     \
    }

static VLM_TGT_AVX2 void panel_avx2(const q8_ctx *c, long i0, int mr, long j0, long jl) { Q8_PANEL(tile_avx2, 3) }
static VLM_TGT_AVX512VNNI void panel_vnni(const q8_ctx *c, long i0, int mr, long j0, long jl) {
    Q8_PANEL(tile_vnni, 6)
}
#endif /* VLM_X86 */

static void panel_generic(const q8_ctx *c, long i0, int mr, long j0, long jl) {
    int32_t s[4][8];
    for (long j = 0; j < jl; j++) {
        tile_generic(mr, 1, c->xq + i0 * c->ldq, c->ldq, c->w + (j0 + j) * c->k, c->k, c->k, s);
        store_q8(c, i0, mr, j0 + j, 1, s);
    }
}

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
    }
}

static void q8_task(void *p, int ith, int nth) {
    const q8_ctx *c = (const q8_ctx *)p;
    long n0, n1;
    vlm_split(c->n, 16, ith, nth, &n0, &n1);
    for (long j0 = n0; j0 < n1; j0 += c->nb) {
        long jl = n1 - j0 < c->nb ? n1 - j0 : c->nb;
        for (long i0 = 0; i0 < c->m; i0 += 4) {
            int mr = c->m - i0 < 4 ? (int)(c->m - i0) : 4;
#if VLM_X86
            if (c->kern == 2) { panel_vnni(c, i0, mr, j0, jl); continue; }
            if (c->kern == 1) { panel_avx2(c, i0, mr, j0, jl); continue; }
#endif
            panel_generic(c, i0, mr, j0, jl);
        }
    }
}

static long q8_ldq(int64_t k) { return (long)vlm_align_up((size_t)k, 64); }

size_t vlm_matmul_i8_scratch_size(int64_t m, int64_t k) {
    if (m <= 0 || k <= 0) return 0;
    return vlm_align_up((size_t)m * sizeof(float), VLM_ALIGN) + (size_t)m * (size_t)q8_ldq(k) + VLM_ALIGN;
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

/* Called by vlm_matmul for VLM_I8 weights, after its common argument checks. */
vlm_status vlm_matmul_i8(vlm_pool *pool, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                         const vlm_weight *w, int accumulate, void *scratch, size_t scratch_size, vlm_err *err) {
    if (!w->scale || !w->wsum) return vlm_fail(err, VLM_ERR_ARG, "matmul: int8 weight without scale or wsum");
    if (w->k > VLM_I8_MAX_K)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: int8 weight with k=%lld > %d", (long long)w->k, VLM_I8_MAX_K);
    size_t need = vlm_matmul_i8_scratch_size(m, w->k);
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
    c.scale = w->scale;
    c.wsum = w->wsum;
    c.bias = w->bias;
    c.out = out;
    c.ldo = ldo;
    c.accumulate = accumulate;
    if (m <= 4) {
        c.nb = c.n; /* one x tile: stream W once */
    } else {
        long nb = (long)(PANEL_BYTES / (size_t)c.k); /* a W panel stays in L2 while every x tile passes */
        c.nb = nb < 12 ? 12 : nb / 6 * 6;
    }
    if (m * c.k >= PAR_QUANT_MIN && vlm_pool_size(pool) > 1) vlm_pool_run(pool, quant_x_task, &c);
    else quant_x_task(&c, 0, 1);
    vlm_pool_run(pool, q8_task, &c);
    return VLM_OK;
}
