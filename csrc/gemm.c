/* gemm.c — matrix-multiply kernels of the vlmfo1 core (see gemm.h).
 *
 * Paths of vlm_matmul (out[m][n] = x[m][k] . W[n][k]^T + bias):
 *   fp32 W, m >  VLM_SMALL_M_F32 : OpenBLAS sgemm, single-threaded, one call per output tile; the tiles are
 *                                  shared out over the pool.
 *   fp32 W, m <= VLM_SMALL_M_F32 : own FMA dot-product kernel on the pool (decode, bandwidth bound).
 *   bf16 W, compute BF16         : x rounded to bf16 (RNE) into scratch, then a vdpbf16ps kernel
 *                                  (AVX512-BF16); without it x is rounded to bf16 values kept in fp32
 *                                  and the widened-weight FMA kernel below is used.
 *   bf16 W, compute F32          : weights widened exactly (bits << 16) in registers and FMA'd with
 *                                  fp32 activations.
 *   int8 / int4 W                : activations quantized per row, exact integer dot products (gemm_i8.c).
 *
 * Thread-count invariance (the guarantee): for a given CPU and kernel choice (OpenBLAS core type, which
 * OPENBLAS_CORETYPE may force; VLM_GEMM_ISA), the result is bitwise identical for every pool size. Every
 * output element is computed by exactly one thread, k is never split, and the order of its reduction
 * depends only on (m, n, k):
 *   - sgemm: OpenBLAS is kept at one thread (its own threading partitions the matrix by thread count, and
 *     its kernels sum an element in an order that depends on where the element falls in a partition:
 *     up to ~1e-4 differences with the Haswell kernels a Zen 5 gets). The output is cut into tiles whose
 *     sizes are a function of (m, n, k) alone (blas_tiles); each tile is one sgemm call over the whole k,
 *     its bias written first (beta = 1). Pool workers take tiles from an atomic counter, so which thread
 *     computes a tile never matters. OpenBLAS 0.3 supports concurrent calls from several threads when
 *     it runs single-threaded (each call takes its own buffers); its results do not depend on pointer
 *     alignment (checked by tests/test_thread_invariance.py over core types).
 *   - own kernels: "dot product along k" kernels; a register tile of MR rows of x times NR rows of W keeps
 *     MR*NR vector accumulators, reduced horizontally at the end of a k block. Threads split the n range
 *     (each streams a disjoint part of W); an element's reduction order depends only on (m, k), never on
 *     the thread count or on the position of the element inside a tile.
 * Results do differ between CPUs and kernel families (different FMA / summation orders).
 * Own-kernel cache blocking (m > 16): k blocks sized so a 4-row x tile fills half of L1, n blocks of
 * ~L2-sized W panels, then 4-row tiles of x (in L1) against 6-row tiles of W (from L2). Decode (m <= 4):
 * W is streamed once, unblocked; 4 < m <= 16: whole W rows, small W panels reused from L2.
 * The environment variable VLM_GEMM_ISA=generic|avx2|avx512 caps the own kernel family (tests).
 */
#include "gemm.h"
#include "gemm_pack.h"

#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "cpu.h"
#if VLM_X86
#include <immintrin.h>
#endif


/* fp32 weights: up to this many rows of x use the own kernel instead of sgemm (measured, see
 * benchmarks/bench_gemm.py). */
#define VLM_SMALL_M_F32 16
/* sgemm tiling (see blas_tiles). */
#define BLAS_TILE_M_MAX 1024
#define BLAS_TILE_M_MIN 64
#define BLAS_TILE_N_MIN 128
#define BLAS_TILES_MIN 8
#define BLAS_TILE_MIN_FLOP 4e6
#define BLAS_TILE_ALIGN 16
/* Cache blocking for m > 4 (measured on Zen 4, 32 KB L1d, 1 MB L2): bytes of one 4-row x tile
 * (sets the k block) and of the W panel kept in L2. */
#define XTILE_BYTES (16 * 1024)
/* Up to this m the k range is not blocked (long W row streams from DRAM) and small W panels are
 * reused from L2 by the m/4 x tiles. */
#define SMALL_M_UNBLOCKED 16
#define PANEL_BYTES (256 * 1024)
/* Convert x on the pool when it has at least this many elements. */
#define PAR_CONVERT_MIN (1L << 16)

/* ------------------------------------------------------------------------------------------------ */
/* CPU dispatch (levels: cpu.h)                                                                     */

const char *vlm_gemm_kernel_name(void) { return vlm_isa_name(vlm_cpu_isa()); }

vlm_status vlm_check_weight(const vlm_weight *w, int64_t n, int64_t k, int need_bias, vlm_err *err, const char *fmt,
                            ...) {
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (!w->data) return vlm_fail(err, VLM_ERR_KEY, "%s: missing weight", name);
    if (need_bias && !w->bias) return vlm_fail(err, VLM_ERR_KEY, "%s: missing bias", name);
    if (w->n != n || w->k != k)
        return vlm_fail(err, VLM_ERR_SHAPE, "%s has shape [%lld, %lld], expected [%lld, %lld]", name, (long long)w->n,
                        (long long)w->k, (long long)n, (long long)k);
    return VLM_OK;
}

const char *vlm_blas_info(void) {
    static char buf[512];
    const char *core = scipy_openblas_get_corename();
    const char *conf = scipy_openblas_get_config();
    snprintf(buf, sizeof buf, "OpenBLAS core=%s threads=%d config=%s", core ? core : "?",
             scipy_openblas_get_num_threads(), conf ? conf : "?");
    return buf;
}

/* ------------------------------------------------------------------------------------------------ */
/* Task description                                                                                 */

enum { KIND_DP = 0,   /* x bf16 (scratch), W bf16: vdpbf16ps */
       KIND_XW16 = 1, /* x fp32, W bf16 widened */
       KIND_XW32 = 2  /* x fp32, W fp32 */ };

typedef struct {
    int kind, isa;
    const void *x;
    long ldx; /* elements of x's type */
    const void *w;
    long m, n, k;
    float *out;
    long ldo;
    const float *bias;
    int accumulate;
    long kc, nb; /* k block, n block */
    const struct cv_ctx *cv; /* x conversion to run on the pool first, or NULL */
    int conv_done;           /* workers done converting (atomic) */
} mm_ctx;

/* Write the MR x NR sums s of one tile (k block starting at k0 == 0 iff first). */
static inline __attribute__((always_inline)) void store_tile(const mm_ctx *c, long i0, int mr, long j0, int nr,
                                                             float s[4][8], int first) {
    for (int i = 0; i < mr; i++) {
        float *o = c->out + (i0 + i) * c->ldo + j0;
        for (int j = 0; j < nr; j++) {
            float v = s[i][j];
            if (first) {
                if (c->bias) v += c->bias[j0 + j];
                if (c->accumulate) v = o[j] + v;
            } else {
                v = o[j] + v;
            }
            o[j] = v;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* bf16 x bf16, m > SMALL_M_UNBLOCKED (AVX512-BF16): packed panels and a broadcast kernel           */
/*
 * The prefill / vision shapes. x is rounded to bf16 and packed once per call, on the pool, into row panels
 * of BP_MR rows: per k block, [pairs][mr] uint32 (two bf16 of adjacent k). Each thread then takes its W columns
 * BP_NC at a time, packs them into [pairs][BP_NC] (one k block, <= 256 KB, kept in L2) and runs a register tile
 * of mr rows x BP_NC columns over the row panels of one row block (VLM_PACK_XBLOCK_BYTES of packed x, kept in L3),
 * row block after row block: per pair it loads two W vectors and broadcasts one uint32 of each x row
 * (28 vdpbf16ps per 2 loads + 14 broadcasts, no horizontal sums). k blocks have the same size
 * (a multiple of 32, at most BP_KC, a function of k alone) and are zero padded to whole 16-pair groups.
 * An element's sum runs over the k blocks in order, each block's pairs in order, whatever the thread count. */
#define BP_MR VLM_PACK_MR   /* gemm_pack.h: the tile and panel geometry both packed paths share */
#define BP_NC VLM_PACK_NC
#define BP_KC 4096
/* Up to this m the unpacked kernels run (decode, short prompts: W streamed once). */
#define BP_MIN_M SMALL_M_UNBLOCKED

/* One weight of a packed-path call: its columns are panels [panel0, panel0 + ceil(n / BP_NC)) of the call. */
typedef struct {
    const uint16_t *w;
    long n, panel0;
    float *out;
    long ldo;
    const float *bias;
    int accumulate;
} bp_weight;

#define BP_MAX_W VLM_MM_MULTI_MAX
typedef struct {
    const float *x;
    long ldx, m, k;
    int nw;
    bp_weight wt[BP_MAX_W]; /* weights sharing x (q/k/v, gate/up): one packing of x, one pool run */
    long panels;            /* column panels of all weights */
    long kc, nkb, np;   /* k block (elements), blocks, pairs per block padded to 16 */
    long mc;            /* row block (a multiple of BP_MR): its packed x stays in cache while W panels pass */
    uint32_t *ap;       /* packed x: block b, panel starting at row i0: ap + (b * m + i0) * np, [np][mr] */
    uint32_t *bp;       /* per-thread W panel buffers, np * BP_NC each */
    int packed;         /* workers done packing x (atomic) */
} bp_ctx;

static size_t bp_blocks(long k, long *kc, long *np) {
    long nkb = (k + BP_KC - 1) / BP_KC;
    long c = (k + nkb - 1) / nkb;
    c = (c + 31) / 32 * 32;
    *kc = c;
    *np = c / 2;           /* a multiple of 16 */
    return (size_t)nkb;
}

/* k block b of a call: its first k, its length and its pairs (padded to whole 16-pair groups). */
static void bp_kblock(const bp_ctx *c, long b, long *k0, long *kl, long *np) {
    *k0 = b * c->kc;
    *kl = c->k - *k0 < c->kc ? c->k - *k0 : c->kc;
    *np = (*kl + 31) / 32 * 16;
}

/* Bytes of bp scratch: packed x, one W panel buffer per thread. */
static size_t bp_scratch_bytes(int64_t m, int64_t k, int n_threads) {
    long kc, np;
    size_t nkb = bp_blocks((long)k, &kc, &np);
    return (size_t)m * nkb * (size_t)np * 4 + (size_t)n_threads * ((size_t)np * BP_NC * 4 + VLM_ALIGN) + VLM_ALIGN;
}


/* ------------------------------------------------------------------------------------------------ */
/* Generic C kernels                                                                                */

static void panel_generic(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    float s[4][8];
    for (long j = 0; j < jl; j++) {
        for (int i = 0; i < mr; i++) {
            const float *x = (const float *)c->x + (i0 + i) * c->ldx + k0;
            float acc = 0.0f;
            if (c->kind == KIND_XW32) {
                const float *w = (const float *)c->w + (j0 + j) * c->k + k0;
                for (long t = 0; t < kl; t++) acc += x[t] * w[t];
            } else {
                const uint16_t *w = (const uint16_t *)c->w + (j0 + j) * c->k + k0;
                for (long t = 0; t < kl; t++) acc += x[t] * vlm_bf16_to_f32(w[t]);
            }
            s[i][0] = acc;
        }
        store_tile(c, i0, mr, j0 + j, 1, s, first);
    }
}

#if VLM_X86
/* ------------------------------------------------------------------------------------------------ */
/* AVX2 kernels: MR=4 x NR=3 ymm accumulators                                                       */


/* [sum(a), sum(b), sum(c), sum(d)] with a fixed per-lane tree. */
static inline VLM_INLINE VLM_TGT_AVX2 __m128 hsum4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline VLM_INLINE VLM_TGT_AVX2 __m256 ld_w16_256(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* KIND: KIND_XW16 or KIND_XW32 (compile-time constant after inlining). */
static inline VLM_INLINE VLM_TGT_AVX2 void tile_avx2(const int KIND, const int MR, const int NR, const float *x, long ldx,
                                        const void *wv, long ldw, long kl, float s[4][8]) {
    __m256 acc[4][3];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    const uint16_t *w16 = (const uint16_t *)wv;
    const float *w32 = (const float *)wv;
    long t = 0;
    for (; t + 8 <= kl; t += 8) {
        __m256 w[3];
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++)
            w[j] = KIND == KIND_XW16 ? ld_w16_256(w16 + j * ldw + t) : _mm256_loadu_ps(w32 + j * ldw + t);
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * ldx + t);
#pragma GCC unroll 3
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    if (t < kl) { /* k tail: zero-padded copies */
        int r = (int)(kl - t);
        float xb[4][8] __attribute__((aligned(32)));
        __m256 w[3];
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) {
            if (KIND == KIND_XW16) {
                uint16_t b[8] = {0};
                memcpy(b, w16 + j * ldw + t, (size_t)r * 2);
                w[j] = ld_w16_256(b);
            } else {
                float b[8] = {0};
                memcpy(b, w32 + j * ldw + t, (size_t)r * 4);
                w[j] = _mm256_loadu_ps(b);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) {
            memset(xb[i], 0, sizeof xb[i]);
            memcpy(xb[i], x + i * ldx + t, (size_t)r * 4);
            __m256 xv = _mm256_load_ps(xb[i]);
#pragma GCC unroll 3
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, w[j], acc[i][j]);
        }
    }
    const __m256 z = _mm256_setzero_ps();
#pragma GCC unroll 3
    for (int j = 0; j < NR; j++) {
        float r4[4];
        _mm_storeu_ps(r4, hsum4_256(acc[0][j], MR > 1 ? acc[1 % MR][j] : z, MR > 2 ? acc[2 % MR][j] : z,
                                    MR > 3 ? acc[3 % MR][j] : z));
        for (int i = 0; i < MR; i++) s[i][j] = r4[i];
    }
}

#define PANEL_BODY(TILE, KINDC, NRMAIN, XT, WT)                                                              \
    const XT *x = (const XT *)c->x + i0 * c->ldx + k0;                                                       \
    const WT *w = (const WT *)c->w + j0 * c->k + k0;                                                         \
    const long ldx = c->ldx, ldw = c->k;                                                                     \
    float s[4][8];                                                                                           \
    long j = 0;                                                                                              \
    switch (mr) {                                                                                            \
    case 4: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(KINDC, 4, NRMAIN, x, ldx, w + j * ldw, ldw, kl, s); \
                store_tile(c, i0, 4, j0 + j, NRMAIN, s, first); } break;                                     \
    case 3: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(KINDC, 3, NRMAIN, x, ldx, w + j * ldw, ldw, kl, s); \
                store_tile(c, i0, 3, j0 + j, NRMAIN, s, first); } break;                                     \
    case 2: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(KINDC, 2, NRMAIN, x, ldx, w + j * ldw, ldw, kl, s); \
                store_tile(c, i0, 2, j0 + j, NRMAIN, s, first); } break;                                     \
    default: for (; j + NRMAIN <= jl; j += NRMAIN) { TILE(KINDC, 1, NRMAIN, x, ldx, w + j * ldw, ldw, kl, s); \
                store_tile(c, i0, 1, j0 + j, NRMAIN, s, first); } break;                                     \
    }                                                                                                        \
    for (; j < jl; j++) {                                                                                    \
        switch (mr) {                                                                                        \
        case 4: TILE(KINDC, 4, 1, x, ldx, w + j * ldw, ldw, kl, s); break;                                   \
        case 3: TILE(KINDC, 3, 1, x, ldx, w + j * ldw, ldw, kl, s); break;                                   \
        case 2: TILE(KINDC, 2, 1, x, ldx, w + j * ldw, ldw, kl, s); break;                                   \
        default: TILE(KINDC, 1, 1, x, ldx, w + j * ldw, ldw, kl, s); break;                                  \
        }                                                                                                    \
        store_tile(c, i0, mr, j0 + j, 1, s, first);                                                          \
    }

static VLM_TGT_AVX2 void panel_avx2_w16(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    PANEL_BODY(tile_avx2, KIND_XW16, 3, float, uint16_t)
}
static VLM_TGT_AVX2 void panel_avx2_w32(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    PANEL_BODY(tile_avx2, KIND_XW32, 3, float, float)
}

/* ------------------------------------------------------------------------------------------------ */
/* AVX-512 kernels: MR=4 x NR=6 zmm accumulators                                                    */


static inline VLM_INLINE VLM_TGT_AVX512 __m128 hsum4_512(__m512 a, __m512 b, __m512 c, __m512 d) {
#define LO8(v) _mm512_castps512_ps256(v)
#define HI8(v) _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
    return hsum4_256(_mm256_add_ps(LO8(a), HI8(a)), _mm256_add_ps(LO8(b), HI8(b)), _mm256_add_ps(LO8(c), HI8(c)),
                     _mm256_add_ps(LO8(d), HI8(d)));
#undef LO8
#undef HI8
}

static inline VLM_INLINE VLM_TGT_AVX512 __m512 widen16(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline VLM_INLINE VLM_TGT_AVX512 void reduce_tile_512(const int MR, const int NR, __m512 acc[4][6], float s[4][8]) {
    const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int j = 0; j < NR; j++) {
        float r4[4];
        _mm_storeu_ps(r4, hsum4_512(acc[0][j], MR > 1 ? acc[1 % MR][j] : z, MR > 2 ? acc[2 % MR][j] : z,
                                    MR > 3 ? acc[3 % MR][j] : z));
        for (int i = 0; i < MR; i++) s[i][j] = r4[i];
    }
}

/* x fp32 with W bf16 (widened) or W fp32; 16 k per step. */
static inline VLM_INLINE VLM_TGT_AVX512 void tile_512(const int KIND, const int MR, const int NR, const float *x, long ldx,
                                      const void *wv, long ldw, long kl, float s[4][8]) {
    __m512 acc[4][6];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    const uint16_t *w16 = (const uint16_t *)wv;
    const float *w32 = (const float *)wv;
    long t = 0;
    for (; t + 16 <= kl; t += 16) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(x + i * ldx + t);
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) {
            __m512 w = KIND == KIND_XW16 ? widen16(_mm256_loadu_si256((const __m256i *)(w16 + j * ldw + t)))
                                         : _mm512_loadu_ps(w32 + j * ldw + t);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], w, acc[i][j]);
        }
    }
    if (t < kl) {
        __mmask16 mk = (__mmask16)((1u << (kl - t)) - 1);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x + i * ldx + t);
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) {
            __m512 w = KIND == KIND_XW16 ? widen16(_mm256_maskz_loadu_epi16(mk, w16 + j * ldw + t))
                                         : _mm512_maskz_loadu_ps(mk, w32 + j * ldw + t);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], w, acc[i][j]);
        }
    }
    reduce_tile_512(MR, NR, acc, s);
}

/* x bf16 with W bf16: vdpbf16ps, 32 k per step. */
static inline VLM_INLINE VLM_TGT_AVX512BF16 void tile_dp(const int KIND, const int MR, const int NR, const uint16_t *x, long ldx,
                                      const uint16_t *w, long ldw, long kl, float s[4][8]) {
    (void)KIND;
    __m512 acc[4][6];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    long t = 0;
    for (; t + 32 <= kl; t += 32) {
        __m512i xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_si512((const void *)(x + i * ldx + t));
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + j * ldw + t));
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
        }
    }
    if (t < kl) {
        __mmask32 mk = (__mmask32)((1u << (kl - t)) - 1);
        __m512i xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_epi16(mk, x + i * ldx + t);
#pragma GCC unroll 6
        for (int j = 0; j < NR; j++) {
            __m512i wv = _mm512_maskz_loadu_epi16(mk, w + j * ldw + t);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
        }
    }
    reduce_tile_512(MR, NR, acc, s);
}

static VLM_TGT_AVX512 void panel_512_w16(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    PANEL_BODY(tile_512, KIND_XW16, 6, float, uint16_t)
}
static VLM_TGT_AVX512 void panel_512_w32(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    PANEL_BODY(tile_512, KIND_XW32, 6, float, float)
}
static VLM_TGT_AVX512BF16 void panel_dp(const mm_ctx *c, long i0, int mr, long j0, long jl, long k0, long kl, int first) {
    PANEL_BODY(tile_dp, KIND_DP, 6, uint16_t, uint16_t)
}
/* Rows i0..i0+mr of x (fp32), k block [k0, k0 + kl), rounded to bf16 (RNE) -> dst [np][mr] uint32. */
static VLM_TGT_AVX512BF16 void bp_pack_x(const float *x, long ldx, long i0, int mr, long k0, long kl, long np,
                                         uint32_t *dst) {
    const __mmask16 keep = (__mmask16)((1u << mr) - 1);
    for (long g = 0; g < np / 16; g++) {
        long t = 32 * g, rem = kl - t;
        __mmask16 m0 = (__mmask16)(rem >= 16 ? 0xffff : rem > 0 ? (1u << rem) - 1 : 0);
        __mmask16 m1 = (__mmask16)(rem >= 32 ? 0xffff : rem > 16 ? (1u << (rem - 16)) - 1 : 0);
        __m512i r[16];
        for (int i = 0; i < 16; i++) {
            if (i < mr) {
                const float *s = x + (i0 + i) * ldx + k0 + t;
                r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, s + 16), _mm512_maskz_loadu_ps(m0, s));
            } else {
                r[i] = _mm512_setzero_si512();
            }
        }
        vlm_transpose16_epi32(r);
        for (int p = 0; p < 16; p++) _mm512_mask_storeu_epi32(dst + (16 * g + p) * mr, keep, r[p]);
    }
}

/* out rows i0..i0+MR, columns j0..j0+nc  (+)=  A [np][MR] . B [np][BP_NC]; store as store_tile. */
static inline VLM_INLINE VLM_TGT_AVX512BF16 void bp_tile(const int MR, const bp_weight *c, const uint32_t *a,
                                                         const uint32_t *b, long np, long i0, long j0, int nc,
                                                         int first) {
    __m512 acc[BP_MR][2];
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long p = 0; p < np; p++) {
        __m512bh b0 = (__m512bh)_mm512_load_si512((const void *)(b + p * BP_NC));
        __m512bh b1 = (__m512bh)_mm512_load_si512((const void *)(b + p * BP_NC + 16));
#pragma GCC unroll 14
        for (int i = 0; i < MR; i++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[p * MR + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
        }
    }
    const __mmask16 mk0 = (__mmask16)(nc >= 16 ? 0xffff : (1u << nc) - 1);
    const __mmask16 mk1 = (__mmask16)(nc >= 32 ? 0xffff : nc > 16 ? (1u << (nc - 16)) - 1 : 0);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (first && c->bias) {
        bias0 = _mm512_maskz_loadu_ps(mk0, c->bias + j0);
        bias1 = _mm512_maskz_loadu_ps(mk1, c->bias + j0 + 16);
    }
#pragma GCC unroll 14
    for (int i = 0; i < MR; i++) {
        float *o = c->out + (i0 + i) * c->ldo + j0;
        __m512 v0 = acc[i][0], v1 = acc[i][1];
        if (first) {
            if (c->bias) { v0 = _mm512_add_ps(v0, bias0); v1 = _mm512_add_ps(v1, bias1); }
            if (c->accumulate) {
                v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk0, o), v0);
                v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk1, o + 16), v1);
            }
        } else {
            v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk0, o), v0);
            v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mk1, o + 16), v1);
        }
        _mm512_mask_storeu_ps(o, mk0, v0);
        _mm512_mask_storeu_ps(o + 16, mk1, v1);
    }
}

#define BP_CASE(R) case R: bp_tile(R, c, a, b, np, i0, j0, nc, first); break;
static VLM_TGT_AVX512BF16 void bp_panel(const bp_weight *c, int mr, const uint32_t *a, const uint32_t *b, long np,
                                        long i0, long j0, int nc, int first) {
    switch (mr) {
    BP_CASE(14) BP_CASE(13) BP_CASE(12) BP_CASE(11) BP_CASE(10) BP_CASE(9) BP_CASE(8)
    BP_CASE(7) BP_CASE(6) BP_CASE(5) BP_CASE(4) BP_CASE(3) BP_CASE(2) default: bp_tile(1, c, a, b, np, i0, j0, nc, first);
    }
}
#undef BP_CASE

static void bp_task(void *p, int ith, int nth) {
    bp_ctx *c = (bp_ctx *)p;
    const long panels = (c->m + BP_MR - 1) / BP_MR;
    long r0, r1;
    vlm_split(panels, 1, ith, nth, &r0, &r1);
    for (long r = r0; r < r1; r++) {
        long i0 = r * BP_MR;
        int mr = c->m - i0 < BP_MR ? (int)(c->m - i0) : BP_MR;
        for (long b = 0; b < c->nkb; b++) {
            long k0, kl, np;
            bp_kblock(c, b, &k0, &kl, &np);
            bp_pack_x(c->x, c->ldx, i0, mr, k0, kl, np, c->ap + (b * c->m + i0) * c->np);
        }
    }
    vlm_task_join(&c->packed, nth);   /* every x panel is packed before any thread reads one */
    long q0, q1; /* this thread's column panels */
    vlm_split(c->panels, 1, ith, nth, &q0, &q1);
    uint32_t *bbuf = (uint32_t *)vlm_align_up((size_t)(uintptr_t)(c->bp + (size_t)ith * ((size_t)c->np * BP_NC +
                                                                                         VLM_ALIGN / 4)), VLM_ALIGN);
    for (long b = 0; b < c->nkb; b++) {
        long k0, kl, np;
        bp_kblock(c, b, &k0, &kl, &np);
        for (long m0 = 0; m0 < c->m; m0 += c->mc) {
            long m1 = c->m - m0 < c->mc ? c->m : m0 + c->mc;
            int wi = 0;
            for (long q = q0; q < q1; q++) {
                while (wi + 1 < c->nw && q >= c->wt[wi + 1].panel0) wi++;
                const bp_weight *wt = &c->wt[wi];
                long j0 = (q - wt->panel0) * BP_NC;
                int nc = wt->n - j0 < BP_NC ? (int)(wt->n - j0) : BP_NC;
                vlm_pack_w((const uint8_t *)wt->w, 2 * (size_t)c->k, j0, nc, 2 * (size_t)k0, 2 * kl, np / 16, bbuf);
                for (long i0 = m0; i0 < m1; i0 += BP_MR) {
                    int mr = c->m - i0 < BP_MR ? (int)(c->m - i0) : BP_MR;
                    bp_panel(wt, mr, c->ap + (b * c->m + i0) * c->np, bbuf, np, i0, j0, nc, b == 0);
                }
            }
        }
    }
}
/* x fp32 rows -> bf16 (RNE), row stride ldd, zero padded to a multiple of 32. */
static VLM_TGT_AVX512BF16 void convert_rows_bf16_512(const float *x, long ldx, uint16_t *d, long ldd, long r0, long r1, long k) {
    for (long r = r0; r < r1; r++) {
        const float *s = x + r * ldx;
        uint16_t *o = d + r * ldd;
        long t = 0;
        for (; t + 32 <= k; t += 32) {
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + t + 16), _mm512_loadu_ps(s + t));
            _mm512_storeu_si512((void *)(o + t), (__m512i)v);
        }
        if (t < ldd) {
            long rem = k - t;
            __mmask16 m0 = (__mmask16)(rem >= 16 ? 0xffff : (1u << rem) - 1);
            __mmask16 m1 = (__mmask16)(rem >= 32 ? 0xffff : rem > 16 ? (1u << (rem - 16)) - 1 : 0);
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, s + t + 16), _mm512_maskz_loadu_ps(m0, s + t));
            _mm512_storeu_si512((void *)(o + t), (__m512i)v);
        }
    }
}
#endif /* VLM_X86 */

static void convert_rows_round(const float *x, long ldx, float *d, long ldd, long r0, long r1, long k) {
    for (long r = r0; r < r1; r++)
        for (long t = 0; t < k; t++) d[r * ldd + t] = vlm_round_bf16(x[r * ldx + t]);
}

/* ------------------------------------------------------------------------------------------------ */
/* Pool tasks                                                                                       */

typedef struct cv_ctx {
    int isa;
    const float *x;
    long ldx, m, k, ldd;
    void *dst;
} cv_ctx;

static void convert_task(void *p, int ith, int nth) {
    const cv_ctx *c = (const cv_ctx *)p;
    long r0, r1;
    vlm_split(c->m, 1, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
#if VLM_X86
    if (c->isa == VLM_ISA_AVX512BF16) {
        convert_rows_bf16_512(c->x, c->ldx, (uint16_t *)c->dst, c->ldd, r0, r1, c->k);
        return;
    }
#endif
    convert_rows_round(c->x, c->ldx, (float *)c->dst, c->ldd, r0, r1, c->k);
}

static void mm_task(void *p, int ith, int nth) {
    mm_ctx *c = (mm_ctx *)p;
    if (c->cv) { /* convert a share of the x rows, then wait for the other workers (one pool run per call) */
        convert_task((void *)c->cv, ith, nth);
        vlm_task_join(&c->conv_done, nth);
    }
    long n0, n1;
    vlm_split(c->n, 16, ith, nth, &n0, &n1);
    if (n0 >= n1) return;
    for (long k0 = 0; k0 < c->k; k0 += c->kc) {
        long kl = c->k - k0 < c->kc ? c->k - k0 : c->kc;
        int first = k0 == 0;
        for (long j0 = n0; j0 < n1; j0 += c->nb) {
            long jl = n1 - j0 < c->nb ? n1 - j0 : c->nb;
            for (long i0 = 0; i0 < c->m; i0 += 4) {
                int mr = c->m - i0 < 4 ? (int)(c->m - i0) : 4;
                switch (c->isa) {
#if VLM_X86
                case VLM_ISA_AVX512BF16:
                case VLM_ISA_AVX512:
                    if (c->kind == KIND_DP) panel_dp(c, i0, mr, j0, jl, k0, kl, first);
                    else if (c->kind == KIND_XW16) panel_512_w16(c, i0, mr, j0, jl, k0, kl, first);
                    else panel_512_w32(c, i0, mr, j0, jl, k0, kl, first);
                    break;
                case VLM_ISA_AVX2:
                    if (c->kind == KIND_XW16) panel_avx2_w16(c, i0, mr, j0, jl, k0, kl, first);
                    else panel_avx2_w32(c, i0, mr, j0, jl, k0, kl, first);
                    break;
#endif
                default: panel_generic(c, i0, mr, j0, jl, k0, kl, first); break;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* fp32 weights, m > VLM_SMALL_M_F32: single-threaded OpenBLAS sgemm on shape-only tiles            */

/* OpenBLAS runs single-threaded: all parallelism comes from the pool, one sgemm call per tile. Set
 * again whenever something else in the process (threadpoolctl, an old caller) changed it. */
void vlm_blas_single_thread(void) {
    if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
}

/* Tile sizes of the sgemm path, a function of (m, n, k) only. OpenBLAS packs a tile's x rows once per
 * call and its W rows once per call, so tall tiles spanning many W rows waste least: start from row
 * blocks of at most BLAS_TILE_M_MAX rows, then halve the longer side (rows >= BLAS_TILE_M_MIN, columns
 * >= BLAS_TILE_N_MIN, work >= BLAS_TILE_MIN_FLOP) until there are at least BLAS_TILES_MIN tiles for
 * the pool to share. Parts are near-equal, rounded up to BLAS_TILE_ALIGN. */
static long even_part(long len, long parts, long align) {
    long part = (len + parts - 1) / parts;
    part = (part + align - 1) / align * align;
    return part < len ? part : len;
}

static void blas_tiles(long m, long n, long k, long *mt, long *nt) {
    long pm = (m + BLAS_TILE_M_MAX - 1) / BLAS_TILE_M_MAX, pn = 1;
    for (;;) {
        long a = even_part(m, pm, BLAS_TILE_ALIGN), b = even_part(n, pn, BLAS_TILE_ALIGN);
        long tiles = ((m + a - 1) / a) * ((n + b - 1) / b);
        if (tiles >= BLAS_TILES_MIN) break;
        int cut_n = b >= a; /* halve the longer side if it may be halved, else the other one */
        for (int tries = 0; tries < 2; tries++, cut_n = !cut_n) {
            long a2 = cut_n ? a : even_part(m, 2 * pm, BLAS_TILE_ALIGN);
            long b2 = cut_n ? even_part(n, 2 * pn, BLAS_TILE_ALIGN) : b;
            if ((cut_n ? b2 >= BLAS_TILE_N_MIN : a2 >= BLAS_TILE_M_MIN) && 2.0 * a2 * b2 * k >= BLAS_TILE_MIN_FLOP) {
                if (cut_n) pn *= 2;
                else pm *= 2;
                goto next;
            }
        }
        break;
    next:;
    }
    *mt = even_part(m, pm, BLAS_TILE_ALIGN);
    *nt = even_part(n, pn, BLAS_TILE_ALIGN);
}

typedef struct {
    const float *x;
    long ldx;
    const float *w;
    long k;
    float *out;
    long ldo;
    const float *bias;
    int accumulate;
    long m, n, mt, nt, tm, tn; /* tile sizes, tiles along m and n */
    long next;                 /* next tile to take (atomic) */
} blas_ctx;

/* Tiles are handed out through an atomic counter; a tile's result depends only on its shape and
 * position, never on which worker computes it. */
static void blas_task(void *p, int ith, int nth) {
    blas_ctx *c = (blas_ctx *)p;
    const long total = c->tm * c->tn;
    (void)ith;
    (void)nth;
    for (;;) {
        long t = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED);
        if (t >= total) break;
        long i0 = (t % c->tm) * c->mt, j0 = (t / c->tm) * c->nt;
        long mi = c->m - i0 < c->mt ? c->m - i0 : c->mt, nj = c->n - j0 < c->nt ? c->n - j0 : c->nt;
        float *o = c->out + i0 * c->ldo + j0;
        float beta = c->accumulate ? 1.0f : 0.0f;
        if (c->bias) {
            for (long i = 0; i < mi; i++) {
                float *r = o + i * c->ldo;
                if (c->accumulate)
                    for (long j = 0; j < nj; j++) r[j] += c->bias[j0 + j];
                else
                    memcpy(r, c->bias + j0, (size_t)nj * sizeof(float));
            }
            beta = 1.0f;
        }
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mi, (int)nj, (int)c->k, 1.0f,
                          c->x + i0 * c->ldx, (int)c->ldx, c->w + j0 * c->k, (int)c->k, beta, o, (int)c->ldo);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Entry points                                                                                     */

static int use_blas(int64_t m, const vlm_weight *w) { return w->dtype == VLM_F32 && m > VLM_SMALL_M_F32; }

/* bf16 weights, bf16 compute, AVX512-BF16, more than BP_MIN_M rows: the packed-panel path. */
static int use_bp(int64_t m, const vlm_weight *w, vlm_compute cmode, int level) {
    return VLM_X86 && level == VLM_ISA_AVX512BF16 && w->dtype == VLM_BF16 && cmode == VLM_COMPUTE_BF16 && m > BP_MIN_M;
}

/* Bytes of the converted-x buffer (without alignment slack). */
static size_t xconv_bytes(int64_t m, const vlm_weight *w, vlm_compute cmode, int level, long *ldd) {
    *ldd = 0;
    if (w->dtype != VLM_BF16 || cmode != VLM_COMPUTE_BF16 || m <= 0 || w->k <= 0) return 0;
    if (level == VLM_ISA_AVX512BF16) {
        *ldd = (long)vlm_align_up((size_t)w->k, 32);
        return (size_t)m * (size_t)*ldd * 2;
    }
    *ldd = (long)vlm_align_up((size_t)w->k, 16);
    return (size_t)m * (size_t)*ldd * 4;
}

size_t vlm_matmul_scratch_size(int64_t m, const vlm_weight *w, vlm_compute cmode, int n_threads) {
    if (!w) return 0;
    if (w->dtype == VLM_I8 || w->dtype == VLM_I4) return vlm_matmul_i8_scratch_size(m, w, n_threads);
    if (use_bp(m, w, cmode, vlm_cpu_isa())) return bp_scratch_bytes(m, w->k, n_threads < 1 ? 1 : n_threads);
    long ldd;
    size_t b = xconv_bytes(m, w, cmode, vlm_cpu_isa(), &ldd);
    return b ? b + VLM_ALIGN : 0;
}

#if VLM_X86
/* The packed path over nw weights that share x (same k; checked by the callers). */
static vlm_status bp_run(vlm_pool *pool, int nw, float *const *out, const int64_t *ldo, const float *x, int64_t ldx,
                         int64_t m, const vlm_weight *const *w, int accumulate, void *scratch, size_t scratch_size,
                         vlm_err *err) {
    size_t need = bp_scratch_bytes(m, w[0]->k, vlm_pool_size(pool));
    if (!scratch || scratch_size < need)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: scratch of %zu bytes too small (need %zu)",
                        scratch ? scratch_size : (size_t)0, need);
    bp_ctx c;
    memset(&c, 0, sizeof c);
    c.x = x;
    c.ldx = ldx;
    c.m = m;
    c.k = w[0]->k;
    c.nw = nw;
    for (int i = 0; i < nw; i++) {
        c.wt[i] = (bp_weight){(const uint16_t *)w[i]->data, w[i]->n, c.panels, out[i], ldo[i], w[i]->bias, accumulate};
        c.panels += (w[i]->n + BP_NC - 1) / BP_NC;
    }
    c.nkb = (long)bp_blocks(c.k, &c.kc, &c.np);
    c.mc = vlm_pack_row_block(m, (size_t)c.np * 4 * BP_MR);
    c.ap = (uint32_t *)vlm_align_up((size_t)(uintptr_t)scratch, VLM_ALIGN);
    c.bp = c.ap + (size_t)m * (size_t)c.nkb * (size_t)c.np;
    vlm_pool_run(pool, bp_task, &c);
    return VLM_OK;
}
#endif

/* The argument checks of vlm_matmul (m == 0 passes: the caller then has nothing to do). */
static vlm_status check_matmul(float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m, const vlm_weight *w,
                               vlm_compute cmode, vlm_err *err) {
    if (!w) return vlm_fail(err, VLM_ERR_ARG, "matmul: weight is NULL");
    if (w->dtype != VLM_F32 && w->dtype != VLM_BF16 && w->dtype != VLM_I8 && w->dtype != VLM_I4)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: unsupported weight dtype %d", (int)w->dtype);
    if (cmode != VLM_COMPUTE_F32 && cmode != VLM_COMPUTE_BF16)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: unsupported compute mode %d", (int)cmode);
    if (m < 0 || w->n <= 0 || w->k <= 0)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: bad sizes m=%lld n=%lld k=%lld", (long long)m, (long long)w->n,
                        (long long)w->k);
    if (w->packed && (w->packed != 1 || w->dtype != VLM_I8 || w->k % 4))
        return vlm_fail(err, VLM_ERR_ARG, w->packed == -1 ? "matmul: a slice of a packed int8 weight must start on a "
                        "panel (a multiple of 32 rows)" : "matmul: a packed weight must be int8 with k a multiple of 4");
    if (m == 0) return VLM_OK;
    if (!w->data || !x || !out) return vlm_fail(err, VLM_ERR_ARG, "matmul: NULL data, x or out pointer");
    if (ldx < w->k || ldo < w->n)
        return vlm_fail(err, VLM_ERR_ARG, "matmul: row strides ldx=%lld (k=%lld) ldo=%lld (n=%lld) too small",
                        (long long)ldx, (long long)w->k, (long long)ldo, (long long)w->n);
    return VLM_OK;
}

vlm_status vlm_matmul(vlm_pool *pool, float *out, int64_t ldo, const float *x, int64_t ldx, int64_t m,
                      const vlm_weight *w, vlm_compute cmode, int accumulate, void *scratch, size_t scratch_size,
                      vlm_err *err) {
    VLM_TRY(check_matmul(out, ldo, x, ldx, m, w, cmode, err));
    if (m == 0) return VLM_OK;
    vlm_pool_count(pool, VLM_FLOPS_GEMM, 2 * (uint64_t)m * (uint64_t)w->n * (uint64_t)w->k);
    if (w->dtype == VLM_I8 || w->dtype == VLM_I4) return vlm_matmul_i8(pool, out, ldo, x, ldx, m, w, accumulate, scratch, scratch_size, err);
    const int level = vlm_cpu_isa();
#if VLM_X86
    if (use_bp(m, w, cmode, level)) return bp_run(pool, 1, &out, &ldo, x, ldx, m, &w, accumulate, scratch, scratch_size, err);
#endif
    long ldd;
    size_t need = xconv_bytes(m, w, cmode, level, &ldd);
    if (need) need += VLM_ALIGN;
    if (need && (!scratch || scratch_size < need))
        return vlm_fail(err, VLM_ERR_ARG, "matmul: scratch of %zu bytes too small (need %zu)",
                        scratch ? scratch_size : (size_t)0, need);

    if (use_blas(m, w)) {
        if (m > INT_MAX || w->n > INT_MAX || w->k > INT_MAX || ldx > INT_MAX || ldo > INT_MAX)
            return vlm_fail(err, VLM_ERR_ARG, "matmul: sizes exceed the 32-bit BLAS interface");
        vlm_blas_single_thread();
        blas_ctx b;
        memset(&b, 0, sizeof b);
        b.x = x;
        b.ldx = ldx;
        b.w = (const float *)w->data;
        b.k = w->k;
        b.out = out;
        b.ldo = ldo;
        b.bias = w->bias;
        b.accumulate = accumulate;
        b.m = m;
        b.n = w->n;
        blas_tiles(m, w->n, w->k, &b.mt, &b.nt);
        b.tm = (m + b.mt - 1) / b.mt;
        b.tn = (w->n + b.nt - 1) / b.nt;
        if (b.tm * b.tn == 1) blas_task(&b, 0, 1);
        else vlm_pool_run(pool, blas_task, &b);
        return VLM_OK;
    }

    mm_ctx c;
    memset(&c, 0, sizeof c);
    c.isa = level;
    c.m = m;
    c.n = w->n;
    c.k = w->k;
    c.w = w->data;
    c.out = out;
    c.ldo = ldo;
    c.bias = w->bias;
    c.accumulate = accumulate;
    c.x = x;
    c.ldx = ldx;
    c.kind = w->dtype == VLM_F32 ? KIND_XW32 : KIND_XW16;
    size_t wbytes = w->dtype == VLM_F32 ? 4 : 2;

    cv_ctx cv; /* outlives the pool run below */
    if (need) { /* bf16 compute: round x into scratch */
        void *dst = (void *)vlm_align_up((size_t)(uintptr_t)scratch, VLM_ALIGN);
        cv = (cv_ctx){level, x, ldx, m, w->k, ldd, dst};
        if (m * w->k >= PAR_CONVERT_MIN && vlm_pool_size(pool) > 1) c.cv = &cv;
        else convert_task(&cv, 0, 1);
        c.x = dst;
        c.ldx = ldd;
        if (level == VLM_ISA_AVX512BF16) c.kind = KIND_DP;
    }

    if (m <= 4) { /* one x tile: stream W once, no blocking */
        c.kc = c.k;
        c.nb = c.n;
    } else if (m <= SMALL_M_UNBLOCKED) { /* few x tiles: whole W rows (long DRAM streams), W panel reused from L2 */
        c.kc = c.k;
        long nb = (long)(2 * PANEL_BYTES / ((size_t)c.k * wbytes));
        c.nb = nb < 6 ? 6 : nb / 6 * 6;
    } else {
        /* an x tile (4 rows x kc) fills half of L1; the W panel (nb rows x kc) stays in L2 */
        long kcb = c.kind == KIND_DP ? XTILE_BYTES / (4 * 2) : XTILE_BYTES / (4 * 4);
        c.kc = c.k < kcb ? c.k : kcb;
        long nb = (long)(PANEL_BYTES / ((size_t)c.kc * wbytes));
        nb = nb < 12 ? 12 : nb / 6 * 6;
        c.nb = nb;
    }
    vlm_pool_run(pool, mm_task, &c);
    return VLM_OK;
}

vlm_status vlm_matmul_multi(vlm_pool *pool, int nw, float *const *out, const int64_t *ldo, const float *x, int64_t ldx,
                            int64_t m, const vlm_weight *const *w, vlm_compute cmode, void *scratch,
                            size_t scratch_size, vlm_err *err) {
    if (nw < 1 || nw > VLM_MM_MULTI_MAX || !w || !out || !ldo)
        return vlm_fail(err, VLM_ERR_ARG, "matmul_multi: between 1 and %d weights, got %d", VLM_MM_MULTI_MAX, nw);
    int same = 1;
    for (int i = 0; i < nw; i++) {
        if (w[i] && w[0] && w[i]->k != w[0]->k)
            return vlm_fail(err, VLM_ERR_ARG, "matmul_multi: the weights must have the same k (weight %d: %lld, "
                            "weight 0: %lld)", i, (long long)w[i]->k, (long long)w[0]->k);
        VLM_TRY(check_matmul(out[i], ldo[i], x, ldx, m, w[i], cmode, err));
        same &= w[i]->dtype == w[0]->dtype;
    }
    if (m == 0) return VLM_OK;
#if VLM_X86
    if (same && use_bp(m, w[0], cmode, vlm_cpu_isa())) {
        for (int i = 0; i < nw; i++)
            vlm_pool_count(pool, VLM_FLOPS_GEMM, 2 * (uint64_t)m * (uint64_t)w[i]->n * (uint64_t)w[i]->k);
        return bp_run(pool, nw, out, ldo, x, ldx, m, w, 0, scratch, scratch_size, err);
    }
#endif
    for (int i = 0; i < nw; i++)
        VLM_TRY(vlm_matmul(pool, out[i], ldo[i], x, ldx, m, w[i], cmode, 0, scratch, scratch_size, err));
    return VLM_OK;
}
