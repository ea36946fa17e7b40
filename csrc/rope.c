/* rope.c — rotary position embedding ops (see ops.h): the cos/sin tables of (multimodal) RoPE and the
 * rotate-half application to q / k rows. */
#include "ops.h"
#include "cpu.h"

#include <math.h>

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
