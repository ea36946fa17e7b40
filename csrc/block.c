/* block.c — composite steps that several networks share, each a short list of op calls (see ops.h): the
 * pre-norm MLP residual of DaViT and Swin. */
#include "ops.h"

vlm_status vlm_ln_mlp_residual(const vlm_mm_ctx *mm, float *x, long N, int C, const float *ln_w, const float *ln_b,
                               float eps, const vlm_weight *fc1, const vlm_weight *fc2, long step, float *xn,
                               float *h) {
    const int I = (int)fc1->n;
    for (long t0 = 0; t0 < N; t0 += step) {
        const long nr = N - t0 < step ? N - t0 : step;
        float *xb = x + (size_t)t0 * C;
        vlm_layernorm(mm->pool, xn, xb, ln_w, ln_b, eps, nr, C);
        VLM_TRY(vlm_mm(mm, h, I, xn, C, nr, fc1, 0));
        vlm_gelu_erf_poly(mm->pool, h, (size_t)nr * I);
        VLM_TRY(vlm_mm(mm, xb, C, h, I, nr, fc2, 1));
    }
    return VLM_OK;
}
