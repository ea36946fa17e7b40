/* simd.h — small AVX-512 helpers shared by kernels (x86-64 with GCC/Clang only; callers compile them inside
 * functions carrying VLM_TGT_AVX512 or a superset, see cpu.h). */
#ifndef VLM_SIMD_H
#define VLM_SIMD_H

#include "cpu.h"

#if VLM_X86
#include <immintrin.h>

/* 16-lane exp, the same algorithm as vlm_expf (common.h): x = n·ln2 + r, degree-6 polynomial, 2^n by
 * scalef. Inputs below -87 are clamped (softmax and erf arguments are <= 0). */
static inline VLM_INLINE VLM_TGT_AVX512 __m512 vlm_exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
