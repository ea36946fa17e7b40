/* act.c — activations (see ops.h): GELU in the two formulas the references use, and SiLU·mul.
 *
 * Element-wise ops split their array into 64-aligned contiguous parts, one per thread; an element's value
 * never depends on the split. */
#include "ops.h"
#include "simd.h"

#include <math.h>

typedef struct { float *x; const float *u; size_t n; } act_ctx;

/* ---------------------------------------------------------------- GELU, erf from libm */

/* Matches torch's exact GELU (approximate='none') as the Qwen2.5-VL merger and the HFRE SimpleFP / projector
 * references compute it. No FMA contraction is possible in this expression, so every clone rounds alike. */
VLM_CLONES static void gelu_erf_range(float *x, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

static void gelu_erf_task(void *p, int ith, int nth) {
    act_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    gelu_erf_range(c->x, (size_t)lo, (size_t)hi);
}

void vlm_gelu_erf(vlm_pool *pool, float *x, size_t n) {
    act_ctx c = {x, NULL, n};
    vlm_pool_run(pool, gelu_erf_task, &c);
}

/* ---------------------------------------------------------------- GELU, erf by Abramowitz-Stegun 7.1.26 */

/* x/2 · (1 + erf(x/√2)), erf from Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7): the formula of PyTorch's
 * vectorized CPU GELU, which DaViT's reference run goes through. An AVX-512 version (the compiler does not
 * vectorize the scalar exp) and a portable one; the split into threads is 64-aligned, so only the array's
 * tail takes the scalar path. */
static inline float gelu_poly1(float v) {
    float z = v * 0.70710678118654752f, a = fabsf(z);
    float t = 1.0f / (0.3275911f * a + 1.0f);
    float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
    float e = 1.0f - r * t * vlm_expf(-(a * a));
    return v * 0.5f * (1.0f + copysignf(e, z));
}

static void gelu_poly_generic(float *x, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) x[i] = gelu_poly1(x[i]);
}

#if VLM_X86
static VLM_TGT_AVX512 void gelu_poly_512(float *x, size_t lo, size_t hi) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), sgn = _mm512_set1_ps(-0.0f);
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i), z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
        __m512 a = _mm512_abs_ps(z);
        __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
        __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
        __m512 e = vlm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));   /* exp(-a^2) */
        __m512 erfa = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);           /* erf(|z|) >= 0 */
        __m512 erf = _mm512_or_ps(erfa, _mm512_and_ps(z, sgn));                /* sign of z */
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_mul_ps(v, half), _mm512_add_ps(one, erf)));
    }
    gelu_poly_generic(x, i, hi);
}
#else
static void gelu_poly_512(float *x, size_t lo, size_t hi) { gelu_poly_generic(x, lo, hi); }
#endif

static void gelu_poly_task(void *p, int ith, int nth) {
    act_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    if (vlm_cpu_has_avx512()) gelu_poly_512(c->x, (size_t)lo, (size_t)hi);
    else gelu_poly_generic(c->x, (size_t)lo, (size_t)hi);
}

void vlm_gelu_erf_poly(vlm_pool *pool, float *x, size_t n) {
    act_ctx c = {x, NULL, n};
    vlm_pool_run(pool, gelu_poly_task, &c);
}

/* ---------------------------------------------------------------- SiLU · mul (SwiGLU) */

VLM_CLONES static void silu_range(float *g, const float *u, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) {
        float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

#if VLM_X86
/* 16 at a time with vlm_exp512 (libm's scalar expf was most of this op's time: it is the decoder's largest
 * element-wise pass, over [T][11008]); the same expression, exp within an ulp or two of libm's. */
static VLM_TGT_AVX512 void silu_512(float *g, const float *u, size_t lo, size_t hi) {
    const __m512 one = _mm512_set1_ps(1.0f);
    size_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        __m512 a = _mm512_loadu_ps(g + i);
        __m512 e = vlm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), a));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(a, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    silu_range(g, u, i, hi);
}
#endif

static void silu_task(void *p, int ith, int nth) {
    act_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
#if VLM_X86
    if (vlm_cpu_has_avx512()) { silu_512(c->x, c->u, (size_t)lo, (size_t)hi); return; }
#endif
    silu_range(c->x, c->u, (size_t)lo, (size_t)hi);
}

void vlm_silu_mul(vlm_pool *pool, float *g, const float *u, int T, int C) {
    act_ctx c = {g, u, (size_t)T * C};
    vlm_pool_run(pool, silu_task, &c);
}

/* ---------------------------------------------------------------- ReLU */

VLM_CLONES static void relu_range(float *x, size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; i++) x[i] = x[i] < 0.f ? 0.f : x[i];   /* NaN stays NaN, as in torch */
}

static void relu_task(void *p, int ith, int nth) {
    act_ctx *c = p;
    long lo, hi;
    vlm_split((long)c->n, 64, ith, nth, &lo, &hi);
    relu_range(c->x, (size_t)lo, (size_t)hi);
}

void vlm_relu(vlm_pool *pool, float *x, size_t n) {
    act_ctx c = {x, NULL, n};
    vlm_pool_run(pool, relu_task, &c);
}
